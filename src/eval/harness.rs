//! `lmforge eval`: tasks × shot counts on one model (and optionally a baseline), written as
//! `results.json` + `samples.jsonl` and printed as a Markdown table. The kinds' scorers live in
//! `runners` (and `bias`); this file loads the model, builds prompts (few-shot, chat) and
//! writes the report.

use super::runners;
use super::task::{Kind, Task};
use crate::chat::Message;
use crate::model::backbone::{load_head_model, HeadModel};
use crate::model::encoder::Heads;
use crate::model::hf::{self, LoadedEncoder, LoadedModel};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// `eval`'s defaults, shared by the flags and by trainers' `--eval-suite`.
const DEFAULT_SEED: u64 = 1234;
const DEFAULT_BATCH_TOKENS: usize = 4096;
const DEFAULT_GEN_BATCH: usize = 16;

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The model: an HF directory or .gguf (causal LM), a `finetune` classifier, or a BERT
    /// masked LM (bias probe).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter (PEFT directory) on the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Tasks: built-in names or task TOML files, comma-separated.
    #[arg(long, required = true, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Demonstrations per prompt, comma-separated (0,1,5 compares zero/one/few-shot); default:
    /// each task's num_fewshot.
    #[arg(long, value_delimiter = ',')]
    pub shots: Vec<usize>,
    /// Evaluate only the first N items of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write results.json and samples.jsonl into this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an earlier lmforge output in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Prompts through the model's chat template, demonstrations as earlier turns.
    #[arg(long)]
    pub chat: bool,
    /// Run the same suite on this model too and print the per-task change (forgetting).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Seed of the demonstration sampler and the bootstrap.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Tokens per forward batch.
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    pub batch_tokens: usize,
    /// Rows decoded together by generative tasks.
    #[arg(long, default_value_t = DEFAULT_GEN_BATCH)]
    pub gen_batch: usize,
    /// Where built-in tasks find their data (scripts/fetch_eval_data.py writes it).
    #[arg(long, default_value = "data/eval")]
    pub data_dir: PathBuf,
    /// Decode GGUF weights to f32 instead of running their quantized blocks.
    #[arg(long)]
    pub dequantize: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl EvalArgs {
    /// A trainer's `--eval-suite`: these tasks with the defaults of `lmforge eval`; the model,
    /// adapter, baseline and output are filled in once training has written its result.
    pub fn suite(tasks: &[String], limit: Option<usize>, data_dir: &Path, device: &str) -> Self {
        EvalArgs {
            model: PathBuf::new(),
            adapter: None,
            tasks: tasks.to_vec(),
            shots: Vec::new(),
            limit,
            out: None,
            overwrite: true,
            chat: false,
            baseline: None,
            seed: DEFAULT_SEED,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            gen_batch: DEFAULT_GEN_BATCH,
            data_dir: data_dir.to_path_buf(),
            dequantize: false,
            device: device.to_string(),
        }
    }
}

/// What is evaluated.
pub enum Subject {
    Decoder(LoadedModel),
    Classifier(HeadModel),
    Encoder(LoadedEncoder),
}

impl Subject {
    pub fn load(
        path: &Path,
        adapter: Option<&Path>,
        dequantize: bool,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let arch = architecture(path)?;
        // A classifier: its directory, an adapter with the head as --model, or base + --adapter.
        if let Some(a) = adapter.filter(|a| adapter_has_head(a)) {
            return Ok(Subject::Classifier(load_head_model(
                a,
                Some(path),
                dev,
                false,
            )?));
        }
        if arch.ends_with("ForSequenceClassification") || adapter_has_head(path) {
            if adapter.is_some() {
                bail!(
                    "--adapter: {} is a classifier already; give the adapter alone as --model",
                    path.display()
                );
            }
            return Ok(Subject::Classifier(load_head_model(
                path, None, dev, false,
            )?));
        }
        if arch.starts_with("Bert") {
            let heads = Heads {
                mlm: true,
                pooler: false,
            };
            let e = hf::load_encoder(path, dev, heads, &|_| true)?;
            if !e.fresh.is_empty() {
                bail!(
                    "{}: has no masked-LM head ({} missing); the bias probe's pseudo-log-likelihood needs one",
                    path.display(),
                    e.fresh.join(", ")
                );
            }
            return Ok(Subject::Encoder(e));
        }
        let mut m = hf::load_with_blocks(path, dev, &|_| true, !dequantize)?;
        if let Some(dir) = adapter {
            m.apply_adapter(dir)?;
        }
        Ok(Subject::Decoder(m))
    }

    fn kind(&self) -> &'static str {
        match self {
            Subject::Decoder(_) => "causal LM",
            Subject::Classifier(_) => "sequence classifier",
            Subject::Encoder(_) => "masked LM",
        }
    }
}

fn architecture(path: &Path) -> Result<String> {
    let p = path.join("config.json");
    if !path.is_dir() || !p.is_file() {
        return Ok(String::new());
    }
    let v = crate::input::read_json(&p)?;
    Ok(v["architectures"][0].as_str().unwrap_or("").to_string())
}

fn adapter_has_head(path: &Path) -> bool {
    crate::peft::read_head_config(path).is_ok_and(|(_, _, heads)| !heads.is_empty())
}

/// One task at one shot count.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub task: String,
    pub kind: Kind,
    pub shots: usize,
    pub n: usize,
    /// (metric, value, standard error).
    pub metrics: Vec<(String, f64, Option<f64>)>,
    pub seconds: f64,
    /// Extra, kind-specific: the BLEU signature, per-category bias tables, …
    pub extra: Value,
    pub samples: Vec<Value>,
}

impl TaskResult {
    pub fn items_per_s(&self) -> f64 {
        self.n as f64 / self.seconds.max(1e-9)
    }
}

/// The prompt of item `i` with `k` demonstrations: (shared prefix text, whole context). In chat
/// mode the context is the rendered conversation and the prefix is empty (templates rarely
/// keep an earlier turn's text byte-identical in a prefix).
pub fn context(
    task: &Task,
    i: usize,
    k: usize,
    seed: u64,
    chat: Option<&crate::chat::ChatTemplate>,
) -> Result<(String, String)> {
    let item = &task.items[i];
    let shots = task.shots(i, k, seed)?;
    let text = task.text(item)?;
    if let Some(tpl) = chat {
        let mut msgs = Vec::new();
        let description = task.description(item)?;
        if !description.is_empty() {
            msgs.push(Message::new("system", &description));
        }
        for j in shots {
            let d = task.shot_item(j);
            msgs.push(Message::new("user", &task.text(d)?));
            msgs.push(Message::new("assistant", &task.target_text(d)?));
        }
        msgs.push(Message::new("user", &text));
        return Ok((String::new(), tpl.render(&msgs, true)?));
    }
    let mut prefix = task.description(item)?;
    for j in shots {
        let d = task.shot_item(j);
        prefix.push_str(&task.text(d)?);
        prefix.push_str(&task.target_delimiter);
        prefix.push_str(&task.target_text(d)?);
        prefix.push_str(&task.fewshot_delimiter);
    }
    let whole = format!("{prefix}{text}");
    Ok((prefix, whole))
}

/// Everything one task run needs besides the task.
pub struct Env<'a> {
    pub subject: &'a Subject,
    pub args: &'a EvalArgs,
    pub chat: Option<crate::chat::ChatTemplate>,
}

/// Runs every task at every shot count on `subject`.
pub fn run_suite(subject: &Subject, tasks: &[Task], a: &EvalArgs) -> Result<Vec<TaskResult>> {
    let chat = match (a.chat, subject) {
        (true, Subject::Decoder(m)) => Some(m.chat("--chat")?),
        (true, _) => bail!("--chat needs a causal LM with a chat template"),
        (false, _) => None,
    };
    let env = Env {
        subject,
        args: a,
        chat,
    };
    let mut out = Vec::new();
    for t in tasks {
        for k in shot_list(t, a) {
            let t0 = std::time::Instant::now();
            let mut r = match t.kind {
                Kind::MultipleChoice => runners::multiple_choice(&env, t, k)?,
                Kind::Generate => runners::generate(&env, t, k)?,
                Kind::Rolling => runners::rolling(&env, t)?,
                Kind::Classify => runners::classify(&env, t)?,
                Kind::Bias => super::bias::run(&env, t)?,
            };
            r.seconds = t0.elapsed().as_secs_f64();
            eprintln!(
                "{} ({}-shot): {} items in {:.1} s ({:.2} items/s)",
                r.task,
                k,
                r.n,
                r.seconds,
                r.items_per_s()
            );
            out.push(r);
        }
    }
    Ok(out)
}

impl Env<'_> {
    pub fn decoder(&self, task: &Task) -> Result<&LoadedModel> {
        match self.subject {
            Subject::Decoder(m) => Ok(m),
            s => bail!(
                "task {}: a {:?} task needs a causal LM; the model is a {}",
                task.name,
                task.kind,
                s.kind()
            ),
        }
    }

    /// The items evaluated: the first `--limit`.
    pub fn n_items(&self, task: &Task) -> usize {
        self.args
            .limit
            .map_or(task.items.len(), |l| l.min(task.items.len()))
    }
}

/// The shot counts task `t` runs at: `--shots`, else its `num_fewshot`; kinds that take no
/// demonstrations (rolling, classify, bias) run once, as 0-shot.
fn shot_list(t: &Task, a: &EvalArgs) -> Vec<usize> {
    if !matches!(t.kind, Kind::MultipleChoice | Kind::Generate) {
        return vec![0];
    }
    if a.shots.is_empty() {
        return vec![t.num_fewshot];
    }
    let mut v = a.shots.clone();
    let mut seen = std::collections::HashSet::new();
    v.retain(|k| seen.insert(*k));
    v
}

/// `stat` of `times` bootstrap resamples of `n` items (indices drawn with replacement from a
/// stream keyed by `seed` and `key`).
pub fn bootstrap(
    n: usize,
    (seed, key): (u64, u64),
    times: usize,
    stat: impl Fn(&[usize]) -> f64,
) -> Vec<f64> {
    let mut rng = crate::rng::Rng::keyed(&[seed, key, n as u64]);
    (0..times)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.below(n as u64) as usize).collect();
            stat(&idx)
        })
        .collect()
}

/// Mean and standard error of the mean (sample standard deviation / √n, as lm-eval).
pub fn mean_stderr(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len();
    if n == 0 {
        return (0.0, None);
    }
    let m = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (m, None);
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, Some((var / n as f64).sqrt()))
}

fn model_hash(path: &Path) -> Result<String> {
    Ok(crate::fsutil::hex(
        &crate::train::reference::model_hash(path)?[..8],
    ))
}

/// results.json of one model (`adapter`: the adapter it ran with).
fn results_json(
    (model, adapter): (&Path, Option<&PathBuf>),
    a: &EvalArgs,
    tasks: &[Task],
    rs: &[TaskResult],
) -> Result<Value> {
    let mut per = serde_json::Map::new();
    for r in rs {
        let t = tasks.iter().find(|t| t.name == r.task);
        let metrics: serde_json::Map<String, Value> = r
            .metrics
            .iter()
            .flat_map(|(m, v, se)| [(m.clone(), json!(v)), (format!("{m}_stderr"), json!(se))])
            .collect();
        per.insert(
            format!("{}|{}-shot", r.task, r.shots),
            json!({
                "task": r.task, "kind": format!("{:?}", r.kind), "shots": r.shots, "n": r.n,
                "metrics": metrics, "seconds": r.seconds, "items_per_s": r.items_per_s(),
                "extra": r.extra,
                "task_file": t.map(|t| t.file.clone()),
                "data": t.map(|t| t.data_path.display().to_string()),
                "data_hash": t.map(|t| t.data_hash()),
                "source": t.and_then(|t| t.source.clone()),
                "license": t.and_then(|t| t.license.clone()),
            }),
        );
    }
    Ok(json!({
        "lmforge_version": env!("CARGO_PKG_VERSION"),
        "model": model.display().to_string(),
        "model_hash": model_hash(model)?,
        "adapter": adapter.map(|p| p.display().to_string()),
        "seed": a.seed, "limit": a.limit, "chat": a.chat,
        "results": per,
    }))
}

/// A Markdown table: one row per (task, metric), one column per shot count.
pub fn markdown(rs: &[TaskResult]) -> String {
    let mut shots: Vec<usize> = rs.iter().map(|r| r.shots).collect();
    shots.sort_unstable();
    shots.dedup();
    let mut s = String::from("| task | metric |");
    for k in &shots {
        s.push_str(&format!(" {k}-shot |"));
    }
    s.push_str(" n | items/s |\n|---|---|");
    s.push_str(&"---:|".repeat(shots.len() + 2));
    s.push('\n');
    let mut seen: Vec<(String, String)> = Vec::new();
    for r in rs {
        for (m, _, _) in &r.metrics {
            if seen.contains(&(r.task.clone(), m.clone())) {
                continue;
            }
            seen.push((r.task.clone(), m.clone()));
            s.push_str(&format!("| {} | {m} |", r.task));
            let mut n = 0;
            let mut speed = Vec::new();
            for k in &shots {
                match rs.iter().find(|x| x.task == r.task && x.shots == *k) {
                    Some(x) => {
                        let (_, v, se) = x
                            .metrics
                            .iter()
                            .find(|(mm, _, _)| mm == m)
                            .cloned()
                            .unwrap_or_default();
                        match se {
                            Some(se) => s.push_str(&format!(" {v:.4} ± {se:.4} |")),
                            None => s.push_str(&format!(" {v:.4} |")),
                        }
                        n = x.n;
                        speed.push(format!("{:.1}", x.items_per_s()));
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push_str(&format!(" {n} | {} |\n", speed.join(" / ")));
        }
    }
    s
}

/// Per (task, shots, metric): baseline, model, change.
pub fn delta_table(base: &[TaskResult], model: &[TaskResult]) -> String {
    let mut s = String::from(
        "| task | shots | metric | baseline | model | Δ |\n|---|---:|---|---:|---:|---:|\n",
    );
    for r in model {
        let Some(b) = base.iter().find(|b| b.task == r.task && b.shots == r.shots) else {
            continue;
        };
        for (m, v, _) in &r.metrics {
            if let Some((_, bv, _)) = b.metrics.iter().find(|(bm, _, _)| bm == m) {
                s.push_str(&format!(
                    "| {} | {} | {m} | {bv:.4} | {v:.4} | {:+.4} |\n",
                    r.task,
                    r.shots,
                    v - bv
                ));
            }
        }
    }
    s
}

/// The tasks of `a`, resolved and checked against its flags before any model loads: a run of
/// many tasks (or the suite after hours of training) must not fail at its last one.
pub fn resolve_suite(a: &EvalArgs) -> Result<Vec<Task>> {
    if a.batch_tokens == 0 || a.gen_batch == 0 || a.limit == Some(0) {
        bail!("--batch-tokens, --gen-batch and --limit must be at least 1");
    }
    let tasks: Vec<Task> = a
        .tasks
        .iter()
        .map(|t| Task::resolve(t.trim(), &a.data_dir))
        .collect::<Result<_>>()?;
    // Every task × shot count is checked before any model runs: a run of many tasks must not
    // fail at its last one.
    for (i, t) in tasks.iter().enumerate() {
        if let Some(u) = tasks[..i].iter().find(|u| u.name == t.name) {
            bail!(
                "two tasks are named {:?} ({} and {}): rename one (key `name`)",
                t.name,
                u.file,
                t.file
            );
        }
        for k in shot_list(t, a).into_iter().filter(|&k| k > 0) {
            t.shots(0, k, a.seed)?;
        }
    }
    Ok(tasks)
}

/// The `eval` command: load, run, write, print. Returns the model's (and baseline's) results.
pub fn run(a: &EvalArgs) -> Result<(Vec<TaskResult>, Option<Vec<TaskResult>>)> {
    if let Some(out) = &a.out {
        crate::outdir::check(
            out,
            crate::outdir::Claim {
                kind: "eval",
                overwrite: a.overwrite,
                resumable: false,
            },
        )?;
    }
    let tasks = resolve_suite(a)?;
    let dev = crate::device(&a.device)?;
    let base = match &a.baseline {
        Some(b) => {
            let s = Subject::load(b, None, a.dequantize, &dev)?;
            eprintln!("baseline {}:", b.display());
            Some(run_suite(&s, &tasks, a)?)
        }
        None => None,
    };
    let subject = Subject::load(&a.model, a.adapter.as_deref(), a.dequantize, &dev)?;
    let rs = run_suite(&subject, &tasks, a)?;
    if let Some(out) = &a.out {
        let results = results_json((&a.model, a.adapter.as_ref()), a, &tasks, &rs)?;
        let baseline = match (&base, &a.baseline) {
            (Some(b), Some(p)) => Some(results_json((p, None), a, &tasks, b)?),
            _ => None,
        };
        crate::outdir::write_output(out, "eval", |dir| {
            let mut v = results.clone();
            if let Some(b) = &baseline {
                v["baseline"] = b.clone();
            }
            crate::fsutil::write_json(&dir.join("results.json"), &v)?;
            let mut lines = String::new();
            for r in &rs {
                for smp in &r.samples {
                    let mut smp = smp.clone();
                    smp["task"] = json!(r.task);
                    smp["shots"] = json!(r.shots);
                    lines.push_str(&smp.to_string());
                    lines.push('\n');
                }
            }
            crate::fsutil::write_file(&dir.join("samples.jsonl"), lines.as_bytes())
        })?;
    }
    Ok((rs, base))
}
