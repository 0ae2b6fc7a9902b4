//! Direct preference optimisation and its pairwise relatives (TRL's `DPOTrainer` loss types,
//! `ORPOTrainer`, and `CPOTrainer` with `loss_type="simpo"`), as one method with `--loss`:
//!
//!   DPO (Rafailov et al. 2023):  L = −log σ(β[(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))])
//!   ORPO (Hong et al. 2024):     L = NLL(y⁺) − λ·log σ(log odds π̄(y⁺|x) − log odds π̄(y⁻|x))     (no reference)
//!   SimPO (Meng et al. 2024):    L = −log σ(β(π̄(y⁺|x) − π̄(y⁻|x)) − γ)                              (no reference)
//!
//! log π(y|x) is the sum of the completion's token log-probs (`train::logps`), π̄ their mean.
//! The other losses (`robust`, `ipo`, `hinge`, …) are pure functions in `losses::preference`.
//! Chosen and rejected completions go through the model in one batch (TRL's concatenated
//! forward). The reference's log-probs are computed once before training and cached on disk
//! (`train::reference`); with LoRA the reference is the same model with its adapters switched
//! off. `--ref-live` instead computes them at every step, as TRL does without
//! `precompute_ref_log_probs`: with LoRA by switching the adapters off, with a full fine-tune on
//! a frozen second copy of the model.
//!
//! Deliberate deviations: the SFT term of ORPO (and `--sft-weight` for the others) is each
//! pair's mean chosen-token NLL, summed over pairs and divided by the step's pair count, not a
//! mean over the micro-batch's tokens, so a step's loss does not depend on how it is split;
//! SimPO's SFT weight defaults to 0 (the paper's loss; TRL's `cpo_alpha` defaults to 1).

use crate::data::preference::{self, Counts, TokPair, Warn};
use crate::data::sft::{Formatter, Tokenized};
use crate::eval::score::{score_text_ids, Forgetting};
use crate::losses::preference::{self as pl, Pair, PairLoss, Params};
use crate::losses::sum_f64 as sum;
use crate::model::ParamStore;
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, Schedule};
use crate::train::engine::{TrainArgs, TrainConfig};
use crate::train::lm::Policy;
use crate::train::logps::{completion_logps, RefPlan, Reference, SeqBatch};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;

/// `lmforge dpo`'s options: its flags and its TOML config (`[peft]`, `[train]` sections).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct DpoOptions {
    /// Policy (and reference) model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Preference JSONL: {"prompt","chosen","rejected"} (strings or messages) or HH-RLHF
    /// {"chosen","rejected"} dialogues.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out pairs, evaluated every --eval-every steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data's prompts instead (split by prompt, seeded).
    #[arg(long, default_value_t = 0.0)]
    pub eval_fraction: f64,
    /// Run directory: metrics.jsonl, checkpoints/, and model/ (full) or adapter/ (LoRA).
    #[arg(long, default_value = "runs/dpo")]
    pub out: PathBuf,
    /// Prompt + completion are truncated to this many tokens (capped at the model's context).
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// sigmoid (DPO), robust, ipo, hinge, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero,
    /// apo_down, sigmoid_norm, discopop; or the reference-free orpo and simpo.
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub loss: PairLoss,
    /// β: strength of the KL constraint (ORPO: λ, the odds-ratio weight; IPO: τ).
    #[arg(long)]
    pub beta: Option<f64>,
    /// ε, the assumed rate of flipped labels (sigmoid = cDPO, robust, exo_pair, simpo).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ.
    #[arg(long, default_value_t = 0.05)]
    pub discopop_tau: f64,
    /// Weight of the chosen completion's NLL added to the loss (RPO's α; ORPO: 1; others: 0).
    #[arg(long)]
    pub sft_weight: Option<f64>,
    /// Compute the reference log-probs at every step instead of once before training.
    #[arg(long, conflicts_with = "ref_cache")]
    pub ref_live: bool,
    /// Directory for the reference log-prob cache (default: the run directory's ref_cache/).
    #[arg(long)]
    pub ref_cache: Option<PathBuf>,
    /// A Jinja chat template file, instead of the model's own.
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

crate::clap_default!(DpoOptions);

impl DpoOptions {
    /// TRL's `DPOConfig` habits: lr 1e-6 full (5e-5 with LoRA), linear decay 8 pairs per step.
    pub fn train_defaults(&self) -> TrainConfig {
        TrainConfig {
            lr: self.peft.lr(1e-6, 5e-5),
            schedule: Schedule::Linear,
            // 8 per step as TRL, one per forward: rows of one pair share a prompt, so there is
            // little padding, and activations are an eighth (the step is the same either way).
            batch_size: 1,
            grad_accum: 8,
            ..TrainConfig::base()
        }
    }

    pub fn params(&self) -> Params {
        Params {
            beta: self.beta.unwrap_or(match self.loss {
                PairLoss::Simpo => 2.0,
                _ => 0.1,
            }),
            label_smoothing: self.label_smoothing,
            simpo_gamma: self.simpo_gamma,
            discopop_tau: self.discopop_tau,
        }
    }

    fn sft_weight(&self) -> f64 {
        self.sft_weight.unwrap_or(match self.loss {
            PairLoss::Orpo => 1.0,
            _ => 0.0,
        })
    }
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    pub counts: Counts,
    pub trainable: usize,
    pub total: usize,
    /// Perplexity of the forgetting text before and after.
    pub forgetting: Option<(f64, f64)>,
    pub output: Option<PathBuf>,
}

/// One micro-batch: pair indices (into train ++ eval) and their sequences, chosen then rejected.
pub struct Batch {
    pairs: Vec<usize>,
    seqs: SeqBatch,
}

/// Per-step sums of what TRL logs.
#[derive(Default)]
struct Stats {
    n: f64,
    rewards_c: f64,
    rewards_r: f64,
    acc: f64,
    logps_c: f64,
    logps_r: f64,
    nll: f64,
    log_odds: f64,
}

struct Dpo {
    p: Policy,
    loss: PairLoss,
    params: Params,
    sft_weight: f64,
    /// Train pairs, then eval pairs.
    pairs: Vec<TokPair>,
    n_train: usize,
    /// None for ORPO and SimPO.
    reference: Option<Reference>,
    pad: u32,
    stats: Stats,
    eval_batch: usize,
}

impl Dpo {
    fn batch_of(&self, pairs: Vec<usize>) -> Batch {
        let mut rows: Vec<&Tokenized> = pairs.iter().map(|&i| &self.pairs[i].chosen).collect();
        rows.extend(pairs.iter().map(|&i| &self.pairs[i].rejected));
        Batch {
            seqs: SeqBatch::new(&rows, self.pad),
            pairs,
        }
    }

    /// Per-pair losses (B,) of a batch and its statistics added to `stats`.
    fn pair_losses(&self, b: &Batch, stats: &mut Stats) -> Result<Tensor> {
        let n = b.pairs.len();
        let model = &self.p.m.model;
        let dev = model.device();
        let sums = completion_logps(model, &b.seqs)?; // (2B,)
        let lens: Vec<f32> = b.seqs.counts.iter().map(|&c| c as f32).collect();
        let lens = Tensor::from_vec(lens, 2 * n, dev)?;
        let split = |t: &Tensor| -> Result<Pair> {
            Ok(Pair {
                chosen: t.narrow(0, 0, n)?,
                rejected: t.narrow(0, n, n)?,
            })
        };
        let policy = split(&sums)?;
        let len = split(&lens)?;
        let avg = split(&(&sums / &lens)?)?;
        let beta = self.params.beta;
        // TRL's logged rewards: β·(π − ref), or β·π̄ for the reference-free losses.
        let (mut losses, (rc, rr)) = match self.loss {
            PairLoss::Orpo => {
                let (term, log_odds) = pl::orpo(beta, &avg)?;
                stats.log_odds += sum(&log_odds)?;
                (term, ((&avg.chosen * beta)?, (&avg.rejected * beta)?))
            }
            PairLoss::Simpo => (
                pl::simpo(&self.params, &avg)?,
                ((&avg.chosen * beta)?, (&avg.rejected * beta)?),
            ),
            _ => {
                let reference = self.reference_of(b)?;
                let l = pl::dpo(self.loss, &self.params, &policy, &reference, &len)?;
                (l, pl::implicit_rewards(beta, &policy, &reference)?)
            }
        };
        if self.sft_weight != 0.0 {
            let nll = (&policy.chosen / &len.chosen)?.neg()?;
            stats.nll += sum(&nll)?;
            losses = (losses + (nll * self.sft_weight)?)?;
        }
        let rc: Vec<f64> = rc.detach().to_dtype(DType::F64)?.to_vec1()?;
        let rr: Vec<f64> = rr.detach().to_dtype(DType::F64)?.to_vec1()?;
        stats.n += n as f64;
        stats.rewards_c += rc.iter().sum::<f64>();
        stats.rewards_r += rr.iter().sum::<f64>();
        stats.acc += rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64;
        let (lc, lr) = if self.loss.length_averaged() {
            (&avg.chosen, &avg.rejected)
        } else {
            (&policy.chosen, &policy.rejected)
        };
        stats.logps_c += sum(lc)?;
        stats.logps_r += sum(lr)?;
        Ok(losses)
    }

    /// The reference's (chosen, rejected) log-probs of a batch (cache order: 2i, 2i + 1).
    fn reference_of(&self, b: &Batch) -> Result<Pair> {
        let Some(r) = &self.reference else {
            bail!("the {} loss has no reference model", self.loss.name());
        };
        let n = b.pairs.len();
        let mut ids: Vec<usize> = b.pairs.iter().map(|&i| 2 * i).collect();
        ids.extend(b.pairs.iter().map(|&i| 2 * i + 1));
        let v = r.logps(&self.p.m.model, &b.seqs, &ids)?;
        Ok(Pair {
            chosen: v.narrow(0, 0, n)?,
            rejected: v.narrow(0, n, n)?,
        })
    }
}

impl Stats {
    fn report(
        &self,
        prefix: &'static [&'static str; 8],
        orpo: bool,
        nll: bool,
    ) -> Vec<(&'static str, f64)> {
        let n = self.n.max(1.0);
        let mut v = vec![
            (prefix[0], self.rewards_c / n),
            (prefix[1], self.rewards_r / n),
            (prefix[2], self.acc / n),
            (prefix[3], (self.rewards_c - self.rewards_r) / n),
            (prefix[4], self.logps_c / n),
            (prefix[5], self.logps_r / n),
        ];
        if nll {
            v.push((prefix[6], self.nll / n));
        }
        if orpo {
            v.push((prefix[7], self.log_odds / n));
        }
        v
    }
}

const TRAIN_NAMES: [&str; 8] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
];
const EVAL_NAMES: [&str; 8] = [
    "eval_rewards/chosen",
    "eval_rewards/rejected",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
    "eval_nll_loss",
    "eval_log_odds_ratio",
];

impl Method for Dpo {
    type Batch = Batch;

    fn store(&self) -> &ParamStore {
        &self.p.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.n_train)
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Batch> {
        Ok(self.batch_of(draws.to_vec()))
    }

    fn units(&self, b: &Batch) -> usize {
        b.pairs.len()
    }

    fn tokens(&self, b: &Batch) -> usize {
        b.seqs.tokens()
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        let mut stats = std::mem::take(&mut self.stats);
        let l = self.pair_losses(b, &mut stats);
        self.stats = stats;
        Ok(l?.sum_all()?)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.p.switch.set_training(key.is_some(), key.unwrap_or(0));
    }

    fn step_stats(&mut self) -> Vec<(&'static str, f64)> {
        let s = std::mem::take(&mut self.stats);
        s.report(
            &TRAIN_NAMES,
            self.loss == PairLoss::Orpo,
            self.sft_weight != 0.0,
        )
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.pairs.len() == self.n_train {
            return Ok(Vec::new());
        }
        let mut stats = Stats::default();
        let mut total = 0f64;
        let idx: Vec<usize> = (self.n_train..self.pairs.len()).collect();
        for c in idx.chunks(self.eval_batch) {
            let b = self.batch_of(c.to_vec());
            total += sum(&self.pair_losses(&b, &mut stats)?)?;
        }
        let mut v = vec![("eval_loss", total / stats.n.max(1.0))];
        v.extend(stats.report(
            &EVAL_NAMES,
            self.loss == PairLoss::Orpo,
            self.sft_weight != 0.0,
        ));
        Ok(v)
    }
}

pub fn run(o: DpoOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.train.resolve(&o.train_defaults())?;
    let params = o.params();
    params.check(o.loss)?;
    let peft_cfg = o.peft.config()?;
    let model_path = o
        .model
        .clone()
        .context("dpo needs a model: --model DIR (or `model` in the config)")?;
    let data_path = o
        .data
        .clone()
        .context("dpo needs preference data: --data FILE.jsonl (or `data` in the config)")?;
    if !(0.0..1.0).contains(&o.eval_fraction) {
        bail!("eval_fraction must be in [0, 1), got {}", o.eval_fraction);
    }
    if !o.loss.needs_reference() && (o.ref_live || o.ref_cache.is_some()) {
        bail!(
            "the {} loss has no reference model: ref_live / ref_cache do not apply",
            o.loss.name()
        );
    }
    let plan = RefPlan {
        live: o.ref_live,
        cache: o.ref_cache.as_deref(),
    };
    plan.check()?;
    let files = RunFiles::create(&ctl, &o.out, &o, "dpo")?;
    let run_dir = files.run_dir.clone();

    // 1. The model, its template and the data.
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
    let train_recs = preference::read(&data_path, &warn, &mut counts)?;
    let eval_recs = match &o.eval_data {
        Some(e) => preference::read(e, &warn, &mut counts)?,
        None => Vec::new(),
    };
    let has_messages = train_recs
        .iter()
        .chain(&eval_recs)
        .any(|r| r.record.has_messages());
    if has_messages && p.use_default_template() {
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
    let mut train = preference::tokenize_pairs(&fmt, &train_recs, max_len, &warn, &mut counts)?;
    let mut eval = preference::tokenize_pairs(&fmt, &eval_recs, max_len, &warn, &mut counts)?;
    if o.eval_fraction > 0.0 {
        let (t, e) =
            preference::split_by_prompt(train, |x| x.prompt_key, o.eval_fraction, cfg.seed);
        train = t;
        eval.extend(e);
        if train.is_empty() {
            bail!("--eval-fraction {} left no training pairs", o.eval_fraction);
        }
    }
    ctl.say(&format!(
        "data: {}; {} train / {} eval pairs",
        counts.summary(),
        train.len(),
        eval.len()
    ));
    let pad = p.eos().unwrap_or(0);
    let n_train = train.len();
    train.extend(eval);
    let pairs = train;

    // 2. Forgetting baseline, adapters, and the reference.
    let forgetting = Forgetting::start(o.forgetting_eval.as_deref(), &p.m.tok, |ids| {
        score_text_ids(&p.m.model, ids)
    })?;
    if let Some(c) = &peft_cfg {
        p.attach_peft(c, cfg.seed)?;
    }
    ctl.say(&p.describe());
    let reference = if o.loss.needs_reference() {
        let seqs: Vec<&Tokenized> = pairs
            .iter()
            .flat_map(|x| [&x.chosen, &x.rejected])
            .collect();
        Some(Reference::build(
            &plan,
            &p,
            &seqs,
            pad,
            (&run_dir, &data_path, "dpo"),
            &ctl,
        )?)
    } else {
        None
    };

    // 3. The engine.
    let (trainable, total) = (p.m.store.num_trainable(), p.num_params());
    let mut method = Dpo {
        p,
        loss: o.loss,
        params,
        sft_weight: o.sft_weight(),
        pairs,
        n_train,
        reference,
        pad,
        stats: Stats::default(),
        eval_batch: cfg.batch_size,
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let mut s = Summary {
        run_dir: run_dir.clone(),
        outcome,
        counts,
        trainable,
        total,
        forgetting: None,
        output: None,
    };
    if !s.outcome.finished() {
        return Ok(s);
    }

    // 4. Outputs, forgetting, summary.
    let mut p = method.p;
    s.output = Some(p.write_outputs(&run_dir, o.peft.merge, &ctl)?);
    if let Some(f) = &forgetting {
        s.forgetting = Some(f.ppl(|ids| score_text_ids(&p.m.model, ids))?);
    }
    let oc = &s.outcome;
    let mut line = json!({"summary": true, "loss_type": o.loss.name(), "steps": oc.steps,
        "final_loss": oc.losses.last().map(|l| l.1), "pairs": n_train, "skipped": s.counts.skipped(),
        "truncated": s.counts.truncated, "skipped_steps": oc.skipped, "trainable_params": trainable,
        "total_params": total, "seconds": oc.seconds, "step_s_median": oc.step_s_median,
        "peak_rss_mib": oc.peak_rss_mib, "reference": if o.ref_live { "live" } else { "precomputed" },
        "forgetting_ppl": s.forgetting});
    for (k, v) in &oc.eval {
        line[*k] = json!(v);
    }
    Metrics::open(&run_dir)?.line(&line)?;
    Ok(s)
}
