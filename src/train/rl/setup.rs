//! What every online method shares around the loop: its options (`[rollout]`, `[reward]`), and
//! `run`, which loads the policy, prompts, rewards and reference, trains on the engine and writes
//! the outputs.

use super::prompts;
use super::rewards::{self, Rewards, Rule, Source as RewardSource};
use super::{intern, Algo, Online, StepStats};
use crate::generate::Sampling;
use crate::model::layers::Linear;
use crate::model::params::{Init, ParamKind, Source};
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Metrics, Outcome, RunFiles, TrainConfig};
use crate::train::lm::Policy;
use crate::train::logps::Reference;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Sampling and rollout sizes: flags and the `[rollout]` config section.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutArgs {
    /// Longest response, in tokens (TRL's max_completion_length / response_length).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Prompts keep their last this-many tokens.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_len: usize,
    /// Prompts per rollout (default: one optimizer step's rows / samples per prompt).
    #[arg(long)]
    pub prompts_per_rollout: Option<usize>,
    /// Rows decoded together.
    #[arg(long, default_value_t = 32)]
    pub generation_batch: usize,
}

crate::clap_default!(RolloutArgs);

/// What is maximised: flags and the `[reward]` config section.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RewardArgs {
    /// A rule reward (repeatable): number, contains:TEXT, avoids:TEXT, length:MIN-MAX, json, eos.
    #[arg(long = "reward")]
    pub rules: Vec<String>,
    /// A reward model from `lmforge reward` (or transformers/PEFT).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// With an adapter reward model: its base (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub reward_model_base: Option<PathBuf>,
    /// Weights of the rules then the reward model, in order (default: all 1).
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Vec<f64>,
}

crate::clap_default!(RewardArgs);

impl RewardArgs {
    pub fn build(&self, dev: &candle_core::Device) -> Result<Rewards> {
        let mut sources = Vec::new();
        for r in &self.rules {
            sources.push(RewardSource::Rule(r.parse::<Rule>()?));
        }
        if let Some(p) = &self.reward_model {
            let m = rewards::RewardModel::load(p, self.reward_model_base.as_deref(), dev)?;
            sources.push(RewardSource::Model(Box::new(m)));
        }
        if sources.is_empty() {
            bail!("no reward: give --reward RULE (number, contains:TEXT, …) and/or --reward-model DIR");
        }
        let w = &self.reward_weights;
        if w.iter().any(|x| !x.is_finite()) {
            bail!("reward_weights must be finite numbers, got {w:?}");
        }
        if !w.is_empty() && w.len() != sources.len() {
            bail!(
                "reward_weights has {} values for {} rewards",
                w.len(),
                sources.len()
            );
        }
        Ok(Rewards {
            sources: sources
                .into_iter()
                .enumerate()
                .map(|(i, s)| (s, w.get(i).copied().unwrap_or(1.0)))
                .collect(),
        })
    }
}

/// The engine settings the online methods start from: `full_lr` for a full fine-tune (TRL's
/// default of each trainer), 1e-5 with LoRA, linear decay, 100 steps of 8 rows.
pub fn train_defaults(peft: &PeftArgs, full_lr: f64) -> TrainConfig {
    TrainConfig {
        lr: peft.lr(full_lr, 1e-5),
        schedule: crate::train::engine::Schedule::Linear,
        max_steps: 100,
        batch_size: 8,
        grad_accum: 1,
        ..TrainConfig::base()
    }
}

/// PPO-style clipping settings every method checks the same way.
pub fn check_clip(passes: usize, eps: f64, eps_high: Option<f64>) -> Result<()> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if passes == 0 || !ok(eps) || eps_high.is_some_and(|e| !ok(e)) {
        bail!(
            "the passes over a rollout must be positive, epsilon and epsilon_high finite and >= 0"
        );
    }
    Ok(())
}

/// The inputs every online method reads from its options.
pub struct Common<'a> {
    pub model: Option<&'a Path>,
    pub data: Option<&'a Path>,
    pub eval_data: Option<&'a Path>,
    pub chat_template: Option<&'a Path>,
    pub rollout: &'a RolloutArgs,
    pub reward: &'a RewardArgs,
    pub peft: &'a PeftArgs,
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    pub trainable: usize,
    pub total: usize,
    /// Held-out metrics before training (after: `outcome.eval`).
    pub eval_before: Vec<(&'static str, f64)>,
    pub output: Option<PathBuf>,
}

/// Loads the policy, prompts, rewards and reference, trains `algo` on the engine, and writes the
/// outputs. `opts` are saved as the run's config.
pub fn run<A: Algo, O: Serialize>(
    c: Common,
    algo: A,
    cfg: TrainConfig,
    (opts, command, out): (&O, &'static str, &Path),
    ctl: Control,
) -> Result<Summary> {
    let model_path = c
        .model
        .context("a model is needed: --model DIR (or `model` in the config)")?;
    let data_path = c
        .data
        .context("prompts are needed: --data FILE.jsonl (or `data` in the config)")?;
    let ro = c.rollout;
    let k = algo.k();
    // Rows of a step over all data-parallel ranks: every rank samples the whole rollout (the
    // same, from the same weights and seeds) and trains on its slice of each step's rows.
    let m = cfg.per_step() * crate::dist::world().size;
    let per_rollout = match ro.prompts_per_rollout {
        Some(p) => p,
        None if m.is_multiple_of(k) => m / k,
        None => bail!(
            "batch_size × grad_accum (× ranks) = {m} rows per step is not a multiple of {k} samples per prompt; \
             set prompts_per_rollout (rollout rows = prompts × samples must be a multiple of {m})"
        ),
    };
    if per_rollout
        .checked_mul(k)
        .is_none_or(|r| r == 0 || !r.is_multiple_of(m))
    {
        bail!(
            "a rollout of {per_rollout} prompts × {k} samples does not split into steps of \
             batch_size × grad_accum (× ranks) = {m} rows"
        );
    }
    if ro.max_new_tokens == 0 || ro.max_prompt_len == 0 {
        bail!("max_new_tokens and max_prompt_len must be positive");
    }
    let sampling = Sampling {
        max_new_tokens: ro.max_new_tokens,
        temperature: ro.temperature,
        top_k: ro.top_k,
        top_p: ro.top_p,
        seed: cfg.seed,
    };
    sampling.check()?;
    if ro.temperature == 0.0 {
        bail!(
            "temperature 0 (greedy) gives a rollout nothing to compare: use a positive temperature"
        );
    }
    let peft_cfg = c.peft.config()?;
    let files = RunFiles::create(&ctl, out, opts, command)?;
    let run_dir = files.run_dir.clone();

    // 1. Policy, prompts, rewards.
    let mut p = Policy::load(model_path, c.chat_template, c.peft.base_load(), &ctl)?;
    let mut prompts = prompts::read(data_path)?;
    let n_train = prompts.len();
    if let Some(e) = c.eval_data {
        prompts.extend(prompts::read(e)?);
    }
    let chat = prompts
        .iter()
        .any(|x| matches!(x.text, crate::data::preference::Text::Messages(_)));
    if chat && p.use_default_template() {
        ctl.say(crate::data::sft::DEFAULT_TEMPLATE_NOTE);
    }
    let tpl = p.chat_template()?;
    let max_prompt = prompts::room(
        p.context(peft_cfg.as_ref()),
        ro.max_new_tokens,
        ro.max_prompt_len,
    )?;
    let mut ids = Vec::with_capacity(prompts.len());
    let mut cut = 0;
    for x in &prompts {
        let (t, c) = prompts::tokenize(x, &p.m.tok, tpl.as_ref(), max_prompt)?;
        cut += usize::from(c);
        ids.push(t);
    }
    let rewards = c.reward.build(&ctl.device)?;
    rewards.check(&prompts)?;
    let reward_names: Vec<&'static str> = rewards
        .sources
        .iter()
        .map(|(s, _)| intern(&format!("rewards/{}", s.name())))
        .collect();
    ctl.say(&format!(
        "prompts: {n_train} train / {} eval{}; rollouts of {per_rollout} prompts × {k}, {} steps each",
        prompts.len() - n_train,
        if cut > 0 { format!(" ({cut} cut to their last {max_prompt} tokens)") } else { String::new() },
        algo.epochs() * per_rollout * k / m
    ));

    // 2. Adapters, value head, reference.
    if let Some(lc) = &peft_cfg {
        p.attach_peft(lc, cfg.seed)?;
    }
    let value_head = if algo.value_head() {
        let h = p.m.model.cfg.hidden_size;
        let store = &mut p.m.store;
        let src = Source::Random { seed: cfg.seed };
        let w = store.add(
            &src,
            "v_head.weight",
            &[1, h],
            ParamKind::Aux,
            Init::Zeros,
            true,
        )?;
        let b = store.add(&src, "v_head.bias", &[1], ParamKind::Aux, Init::Zeros, true)?;
        Some(Linear {
            name: "v_head".into(),
            weight: w,
            bias: Some(b),
            layout: crate::model::layers::Layout::OutIn,
            in_dim: h,
            out_dim: 1,
            adapter: None,
            quant: None,
            qbase: None,
        })
    } else {
        None
    };
    ctl.say(&p.describe());
    let reference = if algo.needs_reference() {
        Some(Reference::live(&p, &ctl)?)
    } else {
        None
    };
    let eos = p.m.stop_ids();
    if eos.is_empty() {
        ctl.say("warning: the tokenizer has no EOS token: every response runs to max_new_tokens");
    }
    let pad = p.eos().unwrap_or(0);

    // 3. The engine.
    let (trainable, total) = (p.m.store.num_trainable(), p.num_params());
    let mut method = Online {
        p,
        algo,
        value_head,
        prompts,
        ids,
        n_train,
        rewards,
        reward_names,
        reference,
        sampling,
        per_rollout,
        generation_batch: ro.generation_batch.max(1),
        rows_per_step: m,
        micro: cfg.batch_size,
        seed: cfg.seed,
        eos,
        pad,
        rollout: None,
        compared: None,
        stats: StepStats::default(),
        pending: Vec::new(),
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let eval_before = outcome.eval_start.clone();
    let mut s = Summary {
        run_dir: run_dir.clone(),
        outcome,
        trainable,
        total,
        eval_before,
        output: None,
    };
    if !s.outcome.finished() {
        return Ok(s);
    }

    // 4. Outputs.
    let mut p = method.p;
    s.output = Some(p.write_outputs(&run_dir, c.peft.merge, &ctl)?);
    if let Some(h) = &method.value_head {
        // Beside the policy, for a later run to start its critic from.
        let dest = crate::outdir::entry(&run_dir, "value_head.safetensors")?;
        let mut t = vec![("v_head.weight", h.weight.detach())];
        t.extend(h.bias.iter().map(|b| ("v_head.bias", b.detach())));
        let bytes = safetensors::serialize(t, None)?;
        crate::fsutil::write_file(&dest, &bytes)?;
    }
    let oc = &s.outcome;
    let mut line = json!({"summary": true, "method": command, "steps": oc.steps,
        "final_loss": oc.losses.last().map(|l| l.1), "prompts": n_train,
        "skipped_steps": oc.skipped, "trainable_params": trainable, "total_params": total,
        "seconds": oc.seconds, "step_s_median": oc.step_s_median, "peak_rss_mib": oc.peak_rss_mib});
    for (k, v) in &s.eval_before {
        line[format!("before_{k}")] = json!(v);
    }
    for (k, v) in &oc.eval {
        line[*k] = json!(v);
    }
    Metrics::open(&run_dir)?.line(&line)?;
    Ok(s)
}
