//! KTO, Kahneman–Tversky optimisation (Ethayarajh et al. 2024; TRL's `KTOTrainer`), on unpaired
//! examples labelled desirable or undesirable:
//!
//!   r(x, y) = log π(y|x) − log π_ref(y|x)
//!   z       = max(0, mean over mismatched (x, y') of r(x, y'))        (detached)
//!   L       = λ_D·(1 − σ(β(r − z)))  for desirable y,   λ_U·(1 − σ(β(z − r)))  for undesirable y
//!
//! averaged over the examples. Pairs are accepted too and unpaired (chosen desirable, rejected
//! undesirable), as TRL's `unpair_preference_dataset` does.
//!
//! Deliberate deviations: TRL estimates z on completions rotated by one inside each batch; here
//! example i's mismatched sequence is its prompt followed by the completion of example π(i) for
//! a fixed seeded derangement π, so the reference log-probs of those sequences can be computed
//! once and cached like the others. z is the mean over the optimizer step's examples (computed
//! before its forward passes, `Method::begin_step`), not over each micro-batch as in TRL, so a
//! step is the same however it is split.

use crate::data::preference::{self, Counts, TokOne, Warn};
use crate::data::sft::{Formatter, Tokenized};
use crate::eval::score::{score_text_ids, Forgetting};
use crate::losses::preference as pl;
use crate::model::ParamStore;
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, Schedule};
use crate::train::engine::{Reduce, TrainArgs, TrainConfig};
use crate::train::lm::Policy;
use crate::train::logps::{completion_logps, RefPlan, Reference, SeqBatch};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;

/// `lmforge kto`'s options: its flags and its TOML config (`[peft]`, `[train]` sections).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct KtoOptions {
    /// Policy (and reference) model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL: {"prompt","completion","label": true|false}, or preference pairs (unpaired).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, checkpoints/, and model/ (full) or adapter/ (LoRA).
    #[arg(long, default_value = "runs/kto")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// β: strength of the KL constraint.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// λ_D, the weight of desirable examples.
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// λ_U, the weight of undesirable examples.
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
    /// Compute the reference log-probs at every step instead of once before training.
    #[arg(long, conflicts_with = "ref_cache")]
    pub ref_live: bool,
    /// Directory for the reference log-prob cache (default: the run directory's ref_cache/).
    #[arg(long)]
    pub ref_cache: Option<PathBuf>,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// A text file whose perplexity is reported before and after training.
    #[arg(long)]
    pub forgetting_eval: Option<PathBuf>,
    /// Make every skipped record an error.
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

crate::clap_default!(KtoOptions);

impl KtoOptions {
    /// TRL's `KTOConfig`: lr 1e-6 (5e-5 with LoRA), linear decay.
    pub fn train_defaults(&self) -> TrainConfig {
        TrainConfig {
            lr: self.peft.lr(1e-6, 5e-5),
            schedule: Schedule::Linear,
            // 8 examples per step as TRL, one per forward (the least padding, an eighth of the
            // activations); z is taken over the whole step either way.
            batch_size: 1,
            grad_accum: 8,
            ..TrainConfig::base()
        }
    }
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    pub counts: Counts,
    pub desirable: usize,
    pub undesirable: usize,
    pub forgetting: Option<(f64, f64)>,
    pub output: Option<PathBuf>,
}

pub struct Batch {
    items: Vec<usize>,
    seqs: SeqBatch,
    kl: SeqBatch,
}

#[derive(Default)]
struct Stats {
    n_c: f64,
    n_r: f64,
    rewards_c: f64,
    rewards_r: f64,
    logps_c: f64,
    logps_r: f64,
    kl: f64,
    batches: f64,
}

struct Kto {
    p: Policy,
    data: Vec<TokOne>,
    /// Example i's prompt with another example's completion.
    mismatched: Vec<Tokenized>,
    reference: Reference,
    beta: f64,
    weights: (f64, f64),
    pad: u32,
    stats: Stats,
    /// This step's KL estimate z.
    z: f64,
}

/// Prompt of `a` + completion of `b`, cut to `max_len`; at least one completion token is kept
/// (a prompt that fills the window loses its start).
fn mismatch(a: &TokOne, b: &TokOne, max_len: usize) -> Tokenized {
    let comp = &b.seq.ids[b.prompt_len..];
    let keep_prompt = a.prompt_len.min(max_len.saturating_sub(1).max(1));
    let prompt = &a.seq.ids[a.prompt_len - keep_prompt..a.prompt_len];
    let mut ids: Vec<u32> = prompt.iter().chain(comp).copied().collect();
    ids.truncate(max_len.max(2));
    // Scored as b's completion is scored (a chat template's trailer tokens are not).
    let mut train = vec![false; prompt.len()];
    train.extend_from_slice(&b.seq.train[b.prompt_len..]);
    train.truncate(ids.len());
    Tokenized { ids, train }
}

impl Method for Kto {
    type Batch = Batch;

    fn store(&self) -> &ParamStore {
        &self.p.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.data.len())
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Batch> {
        let rows: Vec<&Tokenized> = draws.iter().map(|&i| &self.data[i].seq).collect();
        let kl: Vec<&Tokenized> = draws.iter().map(|&i| &self.mismatched[i]).collect();
        Ok(Batch {
            items: draws.to_vec(),
            seqs: SeqBatch::new(&rows, self.pad),
            kl: SeqBatch::new(&kl, self.pad),
        })
    }

    fn units(&self, b: &Batch) -> usize {
        b.items.len()
    }

    fn tokens(&self, b: &Batch) -> usize {
        b.seqs.tokens() + b.kl.tokens()
    }

    /// z over every mismatched sequence of the step, without a graph (TRL: under no_grad).
    fn begin_step(&mut self, batches: &[Batch], reduce: &mut dyn Reduce) -> Result<()> {
        let model = &self.p.m.model;
        let n = self.data.len();
        let (mut pol, mut refs) = (Vec::new(), Vec::new());
        for b in batches {
            let kl_ids: Vec<usize> = b.items.iter().map(|&i| n + i).collect();
            pol.push(completion_logps(model, &b.kl)?.detach());
            refs.push(self.reference.logps(model, &b.kl, &kl_ids)?);
        }
        let (sum, n) = pl::kto_kl_sum(&Tensor::cat(&pol, 0)?, &Tensor::cat(&refs, 0)?)?;
        let mut s = [sum, n as f64];
        reduce.sum(&mut s)?;
        self.z = pl::kto_kl_of(s[0], s[1]);
        Ok(())
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        let model = &self.p.m.model;
        let dev = model.device().clone();
        let z = self.z;
        let pol = completion_logps(model, &b.seqs)?;
        let refs = self.reference.logps(model, &b.seqs, &b.items)?;
        let ratio = (&pol - &refs)?;
        let pick = |want: bool| -> Vec<u32> {
            (0..b.items.len())
                .filter(|&k| self.data[b.items[k]].label == want)
                .map(|k| k as u32)
                .collect()
        };
        let (good, bad) = (pick(true), pick(false));
        let sel = |ix: &[u32], t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(&Tensor::from_slice(ix, ix.len(), &dev)?, 0)?)
        };
        let empty = Tensor::zeros(0, ratio.dtype(), &dev)?;
        let rc = if good.is_empty() {
            empty.clone()
        } else {
            sel(&good, &ratio)?
        };
        let rr = if bad.is_empty() {
            empty
        } else {
            sel(&bad, &ratio)?
        };
        let (lc, lr) = pl::kto(self.beta, &rc, &rr, z)?;
        let loss = ((lc.sum_all()? * self.weights.0)? + (lr.sum_all()? * self.weights.1)?)?;
        let s = &mut self.stats;
        let f = crate::losses::sum_f64;
        s.n_c += good.len() as f64;
        s.n_r += bad.len() as f64;
        s.rewards_c += self.beta * f(&rc)?;
        s.rewards_r += self.beta * f(&rr)?;
        if !good.is_empty() {
            s.logps_c += f(&sel(&good, &pol)?)?;
        }
        if !bad.is_empty() {
            s.logps_r += f(&sel(&bad, &pol)?)?;
        }
        s.kl += z;
        s.batches += 1.0;
        Ok(loss)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.p.switch.set_training(key.is_some(), key.unwrap_or(0));
    }

    fn step_stats(&mut self) -> Vec<(&'static str, f64)> {
        let s = std::mem::take(&mut self.stats);
        let (c, r) = (s.rewards_c / s.n_c.max(1.0), s.rewards_r / s.n_r.max(1.0));
        vec![
            ("rewards/chosen", c),
            ("rewards/rejected", r),
            ("rewards/margins", c - r),
            ("logps/chosen", s.logps_c / s.n_c.max(1.0)),
            ("logps/rejected", s.logps_r / s.n_r.max(1.0)),
            ("kl", s.kl / s.batches.max(1.0)),
        ]
    }
}

pub fn run(o: KtoOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.train.resolve(&o.train_defaults())?;
    if !(o.beta.is_finite() && o.beta > 0.0) {
        bail!("beta must be positive and finite, got {}", o.beta);
    }
    for (k, w) in [
        ("desirable_weight", o.desirable_weight),
        ("undesirable_weight", o.undesirable_weight),
    ] {
        if !(w.is_finite() && w > 0.0) {
            bail!("{k} must be positive and finite, got {w}");
        }
    }
    let plan = RefPlan {
        live: o.ref_live,
        cache: o.ref_cache.as_deref(),
    };
    plan.check()?;
    let peft_cfg = o.peft.config()?;
    let model_path = o
        .model
        .clone()
        .context("kto needs a model: --model DIR (or `model` in the config)")?;
    let data_path = o
        .data
        .clone()
        .context("kto needs data: --data FILE.jsonl (or `data` in the config)")?;
    let files = RunFiles::create(&ctl, &o.out, &o, "kto")?;
    let run_dir = files.run_dir.clone();

    // 1. The model and the data.
    let mut p = Policy::load(
        &model_path,
        o.chat_template.as_deref(),
        o.peft.base_load(),
        &ctl,
    )?;
    let warn = Warn {
        strict: o.strict,
        say: &|w| ctl.say(w),
    };
    let mut counts = Counts::default();
    let recs = preference::read(&data_path, &warn, &mut counts)?;
    if recs.iter().any(|r| r.record.has_messages()) && p.use_default_template() {
        ctl.say(crate::data::sft::DEFAULT_TEMPLATE_NOTE);
    }
    let tpl = p.chat_template()?;
    let fmt = Formatter {
        tok: &p.m.tok,
        template: tpl.as_ref(),
        train_on_prompt: false,
        eos: p.eos(),
    };
    let max_len = p.max_len(o.max_len, peft_cfg.as_ref())?;
    let data = preference::tokenize_unpaired(&fmt, &recs, max_len, &warn, &mut counts)?;
    let desirable = data.iter().filter(|d| d.label).count();
    let undesirable = data.len() - desirable;
    if data.len() < 2 {
        bail!("KTO needs at least 2 examples (the KL estimate pairs each prompt with another's completion)");
    }
    ctl.say(&format!(
        "data: {}; {desirable} desirable / {undesirable} undesirable examples",
        counts.summary()
    ));
    // A derangement: a seeded shuffle, each example paired with the next in it.
    let order = crate::rng::permutation(cfg.seed ^ 0x4B70, 0, data.len());
    let mut partner = vec![0; data.len()];
    for (k, &i) in order.iter().enumerate() {
        partner[i] = order[(k + 1) % order.len()];
    }
    let mismatched: Vec<Tokenized> = (0..data.len())
        .map(|i| mismatch(&data[i], &data[partner[i]], max_len))
        .collect();
    let pad = p.eos().unwrap_or(0);

    // 2. Forgetting baseline, adapters, the reference (examples, then mismatched sequences).
    let forgetting = Forgetting::start(o.forgetting_eval.as_deref(), &p.m.tok, |ids| {
        score_text_ids(&p.m.model, ids)
    })?;
    if let Some(c) = &peft_cfg {
        p.attach_peft(c, cfg.seed)?;
    }
    ctl.say(&p.describe());
    let seqs: Vec<&Tokenized> = data.iter().map(|d| &d.seq).chain(&mismatched).collect();
    let reference = Reference::build(&plan, &p, &seqs, pad, (&run_dir, &data_path, "kto"), &ctl)?;

    // 3. The engine, then the outputs.
    let mut method = Kto {
        p,
        data,
        mismatched,
        reference,
        beta: o.beta,
        weights: (o.desirable_weight, o.undesirable_weight),
        pad,
        stats: Stats::default(),
        z: 0.0,
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let mut s = Summary {
        run_dir: run_dir.clone(),
        outcome,
        counts,
        desirable,
        undesirable,
        forgetting: None,
        output: None,
    };
    if !s.outcome.finished() {
        return Ok(s);
    }
    let mut p = method.p;
    s.output = Some(p.write_outputs(&run_dir, o.peft.merge, &ctl)?);
    if let Some(f) = &forgetting {
        s.forgetting = Some(f.ppl(|ids| score_text_ids(&p.m.model, ids))?);
    }
    let oc = &s.outcome;
    Metrics::open(&run_dir)?.line(&json!({"summary": true, "steps": oc.steps,
        "final_loss": oc.losses.last().map(|l| l.1), "desirable": desirable, "undesirable": undesirable,
        "skipped": s.counts.skipped(), "seconds": oc.seconds, "step_s_median": oc.step_s_median,
        "peak_rss_mib": oc.peak_rss_mib, "forgetting_ppl": s.forgetting}))?;
    Ok(s)
}
