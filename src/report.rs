//! What the training subcommands print when they finish: `pretrain`, `sft`, `finetune`,
//! `reward` (and `reward score`), `dpo`, `kto`, `ppo`, `grpo`, `rloo`, and `label`.

use super::{exit_code, setup, Train};
use anyhow::Result;
use lmforge::train::dpo::DpoOptions;
use lmforge::train::engine::Outcome;
use lmforge::train::engine::RunArgs;
use lmforge::train::finetune::FinetuneOptions;
use lmforge::train::kto::KtoOptions;
use lmforge::train::pretrain::{self, PretrainOptions};
use lmforge::train::reward::RewardOptions;
use lmforge::train::sft::SftOptions;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// "loss a -> b" of a run.
pub fn loss_span(o: &Outcome) -> String {
    let first = o.losses.first().map_or(f32::NAN, |l| l.1);
    let last = o.losses.last().map_or(f32::NAN, |l| l.1);
    format!("loss {first:.4} -> {last:.4}")
}

/// The `--forgetting-eval` line, if there was one.
pub fn forgetting(f: Option<(f64, f64)>) {
    if let Some((b, after)) = f {
        eprintln!(
            "forgetting: perplexity of the evaluation text {b:.3} before, {after:.3} after ({:+.1}%)",
            100.0 * (after / b - 1.0)
        );
    }
}

/// The base model a method's options name (`model`), read generically from their serialised form.
fn base_model<T: serde::Serialize>(opts: &T) -> Option<PathBuf> {
    let v = serde_json::to_value(opts).ok()?;
    v.get("model")?.as_str().map(PathBuf::from)
}

/// The base model an adapter directory names (`base_model_name_or_path`), any PEFT method.
fn adapter_base(dir: &Path) -> Result<PathBuf> {
    use anyhow::Context;
    let p = dir.join("adapter_config.json");
    lmforge::input::read_json(&p)?["base_model_name_or_path"]
        .as_str()
        .map(PathBuf::from)
        .with_context(|| format!("--eval-suite: {} names no base model", p.display()))
}

/// `--eval-suite`: the tasks on the base model and on what training wrote (base + adapter, or
/// the full model), the change per task printed and written to RUN/eval_suite/.
fn eval_suite(run: &RunArgs, base: Option<PathBuf>, run_dir: &Path, output: &Path) -> Result<()> {
    use lmforge::eval::harness::{self, EvalArgs};
    if run.eval_suite.is_empty() {
        return Ok(());
    }
    let adapter = output.join("adapter_config.json").is_file();
    let base = match base {
        Some(b) => b,
        None if adapter => adapter_base(output)?,
        None => anyhow::bail!("--eval-suite: no base model to compare with"),
    };
    let (model, adapter) = if adapter {
        (base.clone(), Some(output.to_path_buf()))
    } else {
        (output.to_path_buf(), None)
    };
    let args = EvalArgs {
        model,
        adapter,
        out: Some(lmforge::outdir::entry(run_dir, "eval_suite")?),
        baseline: Some(base),
        ..EvalArgs::suite(
            &run.eval_suite,
            run.eval_suite_limit,
            &run.eval_data_dir,
            &run.device,
        )
    };
    let (rs, b) = harness::run(&args)?;
    println!("{}", harness::markdown(&rs));
    if let Some(b) = b {
        println!("Change from the base model (--eval-suite):\n");
        println!("{}", harness::delta_table(&b, &rs));
    }
    eprintln!("eval suite: {}", run_dir.join("eval_suite").display());
    Ok(())
}

pub fn cmd_reward(a: Train<RewardOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "reward")?;
    let s = lmforge::train::reward::run(opts, ctl)?;
    let o = &s.outcome;
    if !o.finished() {
        return Ok(exit_code(o));
    }
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), {}; {} pairs skipped; {} of {} parameters trained; peak RSS {:.0} MiB",
        o.steps, o.seconds, o.step_s_median, loss_span(o), s.counts.skipped(), s.trainable, s.total, o.peak_rss_mib
    );
    let metric = |k: &str| s.eval.iter().find(|(n, _)| *n == k).map(|e| e.1);
    if let (Some(acc), Some(m)) = (metric("eval_accuracy"), metric("eval_margin")) {
        eprintln!("eval: pairwise accuracy {acc:.4}, mean margin {m:.4}");
    }
    forgetting(s.forgetting);
    eprintln!("output: {}", s.run_dir.display());
    Ok(exit_code(o))
}

pub fn cmd_reward_score(a: lmforge::train::reward::ScoreArgs) -> Result<ExitCode> {
    let (scored, counts) = lmforge::train::reward::score(&a, &|w| eprintln!("{w}"))?;
    let mut out = std::io::stdout().lock();
    for p in &scored {
        writeln!(
            out,
            "{}",
            serde_json::json!({"at": p.at, "chosen": p.chosen, "rejected": p.rejected,
                "margin": p.chosen - p.rejected, "correct": p.chosen > p.rejected})
        )?;
    }
    let c: Vec<f32> = scored.iter().map(|p| p.chosen).collect();
    let r: Vec<f32> = scored.iter().map(|p| p.rejected).collect();
    let (acc, margin) = lmforge::train::reward::pair_metrics(&c, &r);
    writeln!(
        out,
        "{}",
        serde_json::json!({"summary": true, "pairs": scored.len(), "accuracy": acc,
            "mean_margin": margin, "skipped": counts.skipped()})
    )?;
    eprintln!(
        "{} pairs: accuracy {acc:.4} (chosen scored above rejected), mean margin {margin:.4}; {} skipped",
        scored.len(),
        counts.skipped()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn cmd_dpo(a: Train<DpoOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "dpo")?;
    let base = base_model(&opts);
    let s = lmforge::train::dpo::run(opts, ctl)?;
    let o = &s.outcome;
    let Some(output) = &s.output else {
        return Ok(exit_code(o));
    };
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), {}; {} pairs skipped; {} of {} parameters trained; peak RSS {:.0} MiB",
        o.steps, o.seconds, o.step_s_median, loss_span(o), s.counts.skipped(), s.trainable, s.total, o.peak_rss_mib
    );
    let metric = |k: &str| o.eval.iter().find(|(n, _)| *n == k).map(|e| e.1);
    if let (Some(acc), Some(m)) = (
        metric("eval_rewards/accuracies"),
        metric("eval_rewards/margins"),
    ) {
        eprintln!("eval: reward accuracy {acc:.4}, mean margin {m:.4}");
    }
    forgetting(s.forgetting);
    eprintln!("output: {}", output.display());
    eval_suite(&a.run, base, &s.run_dir, output)?;
    Ok(exit_code(o))
}

/// `ppo`, `grpo`, `rloo`.
pub fn cmd_online<T>(
    a: Train<T>,
    given: &HashSet<String>,
    name: &'static str,
    run: fn(T, lmforge::train::engine::Control) -> Result<lmforge::train::rl::Summary>,
) -> Result<ExitCode>
where
    T: clap::Args + serde::Serialize + serde::de::DeserializeOwned,
{
    let (opts, ctl) = setup(&a, given, name)?;
    let base = base_model(&opts);
    let s = run(opts, ctl)?;
    let o = &s.outcome;
    let Some(output) = &s.output else {
        return Ok(exit_code(o));
    };
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), {}; {} of {} parameters trained; peak RSS {:.0} MiB",
        o.steps, o.seconds, o.step_s_median, loss_span(o), s.trainable, s.total, o.peak_rss_mib
    );
    let get = |m: &[(&str, f64)], k: &str| m.iter().find(|(n, _)| *n == k).map(|e| e.1);
    if let (Some(b), Some(after)) = (
        get(&s.eval_before, "eval_reward"),
        get(&o.eval, "eval_reward"),
    ) {
        eprintln!("eval: mean reward of greedy responses {b:.4} before, {after:.4} after");
    }
    eprintln!("output: {}", output.display());
    eval_suite(&a.run, base, &s.run_dir, output)?;
    Ok(exit_code(o))
}

pub fn cmd_kto(a: Train<KtoOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "kto")?;
    let base = base_model(&opts);
    let s = lmforge::train::kto::run(opts, ctl)?;
    let o = &s.outcome;
    let Some(output) = &s.output else {
        return Ok(exit_code(o));
    };
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), {}; {} desirable / {} undesirable examples, {} skipped; peak RSS {:.0} MiB",
        o.steps, o.seconds, o.step_s_median, loss_span(o), s.desirable, s.undesirable, s.counts.skipped(), o.peak_rss_mib
    );
    forgetting(s.forgetting);
    eprintln!("output: {}", output.display());
    eval_suite(&a.run, base, &s.run_dir, output)?;
    Ok(exit_code(o))
}

pub fn cmd_label(a: lmforge::rlaif::LabelArgs) -> Result<ExitCode> {
    let r = lmforge::rlaif::label(&a, &|w| eprintln!("{w}"))?;
    let pct = |n: usize, d: usize| 100.0 * n as f64 / d.max(1) as f64;
    eprintln!(
        "judged {} pairs in {:.1}s: {} kept, {} ties dropped (|P - 0.5| < {}); mean P(\"A\") {:.3} (0.5 = no position bias)",
        r.judged, r.seconds, r.kept, r.ties, a.min_margin, r.mean_p_a
    );
    if r.labelled > 0 {
        eprintln!(
            "agreement with the human labels: {:.1}% of {} pairs, {:.1}% of the {} kept",
            pct(r.agree, r.labelled),
            r.labelled,
            pct(r.agree_kept, r.labelled_kept),
            r.labelled_kept
        );
    }
    eprintln!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn cmd_pretrain(a: Train<PretrainOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "pretrain")?;
    let what = match opts.objective {
        pretrain::Objective::Clm => "validation loss",
        pretrain::Objective::Mlm => "validation MLM loss",
    };
    let s = pretrain::run(opts, ctl)?;
    let o = &s.outcome;
    if o.finished() {
        let val = match s.val_loss {
            Some(v) => format!(", {what} {v:.4}, perplexity {:.2}", v.exp()),
            None => String::new(),
        };
        eprintln!(
            "done: {} steps in {:.0}s ({} skipped){val}, peak RSS {:.0} MiB; run directory {}",
            o.steps,
            o.seconds,
            o.skipped,
            o.peak_rss_mib,
            s.run_dir.display()
        );
    }
    Ok(exit_code(o))
}

pub fn cmd_sft(a: Train<SftOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "sft")?;
    let base = base_model(&opts);
    let s = lmforge::train::sft::run(opts, ctl)?;
    let o = &s.outcome;
    let Some(output) = &s.output else {
        return Ok(exit_code(o));
    };
    let first = o.losses.first().map_or(f32::NAN, |l| l.1);
    let last = o.losses.last().map_or(f32::NAN, |l| l.1);
    eprintln!(
        "done: {} steps in {:.1}s, loss {first:.4} -> {last:.4}; {} examples used ({} truncated), {} skipped; {} of {} parameters trained; peak RSS {:.0} MiB",
        o.steps,
        o.seconds,
        s.counts.kept + s.counts.truncated,
        s.counts.truncated,
        s.counts.dropped,
        s.trainable,
        s.total,
        o.peak_rss_mib
    );
    forgetting(s.forgetting.map(|(b, a)| (b.ppl(), a.ppl())));
    eprintln!("output: {}", output.display());
    eval_suite(&a.run, base, &s.run_dir, output)?;
    Ok(exit_code(o))
}

pub fn cmd_finetune(a: Train<FinetuneOptions>, given: &HashSet<String>) -> Result<ExitCode> {
    let (opts, ctl) = setup(&a, given, "finetune")?;
    let s = lmforge::train::finetune::run(opts, ctl)?;
    let o = &s.outcome;
    if !o.finished() {
        return Ok(exit_code(o));
    }
    eprintln!(
        "done: {} steps in {:.1}s (median step {:.3}s), peak RSS {:.0} MiB; {} of {} parameters trained; weights written: {:.2} MB",
        o.steps, o.seconds, o.step_s_median, o.peak_rss_mib, s.trainable, s.total, s.checkpoint_bytes as f64 / 1e6
    );
    if let (Some(acc), Some(f1)) = (s.metric("accuracy"), s.metric("macro_f1")) {
        eprintln!("eval: accuracy {acc:.4}, macro-F1 {f1:.4}");
    }
    if let Some(f1) = s.metric("entity_f1") {
        eprintln!("eval: entity F1 {f1:.4}");
    }
    if let (Some(em), Some(f1)) = (s.metric("exact_match"), s.metric("f1")) {
        eprintln!("eval: exact match {em:.2}, F1 {f1:.2}");
    }
    forgetting(s.forgetting);
    eprintln!("output: {}", s.run_dir.display());
    Ok(exit_code(o))
}

pub fn cmd_eval(a: lmforge::eval::harness::EvalArgs) -> Result<ExitCode> {
    use lmforge::eval::harness;
    let (rs, base) = harness::run(&a)?;
    println!("{}", harness::markdown(&rs));
    let mut shown = Vec::new();
    for r in &rs {
        if let Some(sig) = r.extra.get("bleu_signature").and_then(|v| v.as_str()) {
            if !shown.contains(&(&r.task, sig)) {
                println!("{} BLEU signature: {sig}", r.task);
                shown.push((&r.task, sig));
            }
        }
    }
    if let Some(b) = base {
        println!(
            "\nChange from the baseline (forgetting where negative for accuracy-like metrics):\n"
        );
        println!("{}", harness::delta_table(&b, &rs));
    }
    if let Some(out) = &a.out {
        eprintln!("wrote {}/results.json and samples.jsonl", out.display());
    }
    Ok(ExitCode::SUCCESS)
}
