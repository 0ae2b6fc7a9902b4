//! Reward models (Ouyang et al. 2022 §3.5; TRL's `RewardTrainer`): a scalar head on a decoder's
//! last non-pad token (or an encoder's pooled [CLS]), trained on preference pairs with the
//! Bradley–Terry loss
//!
//!   L = −log σ(r(x, y⁺) − r(x, y⁻) − m) + c·(r(x, y⁺) + r(x, y⁻))²
//!
//! m: an optional per-pair `"margin"` from the data (Llama 2's margin loss); c: TRL's
//! `center_rewards_coefficient` (Eisenstein et al. 2023), which keeps rewards near zero.
//! Metrics: pairwise accuracy (r⁺ > r⁻) and mean margin on held-out pairs. The output is an
//! `…ForSequenceClassification` directory with `num_labels = 1` (or a PEFT adapter with the head
//! in `modules_to_save`) that transformers loads, and `lmforge reward score` reads back.
//!
//! Sequences are the prompt and the completion as the model sees them (chat template for chat
//! models), with no EOS appended: the reward is read at the completion's last token.
//!
//! Deliberate deviations: none in the loss. The held-out loss is the mean over pairs (TRL's is a
//! mean of per-batch means), and string pairs go through a chat model's template (TRL templates
//! conversational data only).

use super::finetune::{load_body, write_outputs, BodyOpts, HeadSpec, Tuned};
use crate::data::preference::{self, Counts, TokPair, Warn};
use crate::data::sft::Formatter;
use crate::losses::preference::bradley_terry;
use crate::model::backbone::{Backbone, HeadModel};
use crate::model::layers::Linear;
use crate::model::ParamStore;
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, Schedule};
use crate::train::engine::{TrainArgs, TrainConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;

/// `lmforge reward`'s options: its flags and its TOML config (`[peft]`, `[train]` sections).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RewardOptions {
    /// Base model: an HF directory (decoder or BERT) or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Preference JSONL (see `lmforge dpo --help`); a pair may carry "margin".
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out pairs for accuracy and margin.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data's prompts instead (split by prompt, seeded).
    #[arg(long, default_value_t = 0.0)]
    pub eval_fraction: f64,
    /// Run directory: metrics.jsonl, checkpoints/, model/ or adapter/.
    #[arg(long, default_value = "runs/reward")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// c in + c·(r⁺ + r⁻)²: pulls rewards towards zero (TRL: center_rewards_coefficient).
    #[arg(long, default_value_t = 0.0)]
    pub center_rewards_coefficient: f64,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Decoders: a text file whose perplexity (through the untouched LM head) is reported
    /// before and after.
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

crate::clap_default!(RewardOptions);

impl RewardOptions {
    /// TRL's `RewardConfig`: lr 1e-5 (LoRA 1e-4), linear decay, one epoch.
    pub fn train_defaults(&self) -> TrainConfig {
        TrainConfig {
            lr: self.peft.lr(1e-5, 1e-4),
            schedule: Schedule::Linear,
            // 8 per step as TRL, one per forward: rows of one pair share a prompt, so there is
            // little padding, and activations are an eighth (the step is the same either way).
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
    pub trainable: usize,
    pub total: usize,
    pub eval: Vec<(&'static str, f64)>,
    pub forgetting: Option<(f64, f64)>,
}

/// Rewards (2B,) of B pairs, chosen then rejected: the head on each sequence's features.
fn pair_rewards(body: &Backbone, head: &Linear, pad: u32, pairs: &[&TokPair]) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = pairs
        .iter()
        .map(|p| p.chosen.ids.clone())
        .chain(pairs.iter().map(|p| p.rejected.ids.clone()))
        .collect();
    let f = body.features(&rows, pad, head.weight.device())?; // (2B, C)
    Ok(head.forward(&f)?.squeeze(1)?) // (2B,)
}

struct Reward {
    t: Tuned,
    train: Vec<TokPair>,
    eval: Vec<TokPair>,
    center: f64,
    eval_batch: usize,
    stats: (f64, f64, f64),
}

impl Reward {
    /// Per-pair losses (B,) and the (chosen, rejected) rewards.
    fn pair_losses(&self, pairs: &[&TokPair]) -> Result<(Tensor, Vec<f32>, Vec<f32>)> {
        let n = pairs.len();
        let dev = self.t.device();
        let r = pair_rewards(&self.t.m.body, &self.t.head, self.t.pad, pairs)?;
        let (c, rj) = (r.narrow(0, 0, n)?, r.narrow(0, n, n)?);
        let margin = match pairs.iter().any(|p| p.margin.is_some()) {
            true => Some(Tensor::from_vec(
                pairs
                    .iter()
                    .map(|p| p.margin.unwrap_or(0.0))
                    .collect::<Vec<f32>>(),
                n,
                dev,
            )?),
            false => None,
        };
        let l = bradley_terry(&c, &rj, margin.as_ref(), self.center)?;
        let v =
            |t: &Tensor| -> Result<Vec<f32>> { Ok(t.detach().to_dtype(DType::F32)?.to_vec1()?) };
        Ok((l, v(&c)?, v(&rj)?))
    }
}

/// (accuracy, mean margin) of chosen/rejected rewards.
pub fn pair_metrics(c: &[f32], r: &[f32]) -> (f64, f64) {
    let n = c.len().max(1) as f64;
    let acc = c.iter().zip(r).filter(|(a, b)| a > b).count() as f64 / n;
    let margin = c.iter().zip(r).map(|(a, b)| (a - b) as f64).sum::<f64>() / n;
    (acc, margin)
}

impl Method for Reward {
    type Batch = Vec<usize>;

    fn store(&self) -> &ParamStore {
        &self.t.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.train.len())
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Vec<usize>> {
        Ok(draws.to_vec())
    }

    fn units(&self, b: &Vec<usize>) -> usize {
        b.len()
    }

    fn tokens(&self, b: &Vec<usize>) -> usize {
        b.iter()
            .map(|&i| self.train[i].chosen.ids.len() + self.train[i].rejected.ids.len())
            .sum()
    }

    fn loss(&mut self, b: &Vec<usize>) -> Result<Tensor> {
        let pairs: Vec<&TokPair> = b.iter().map(|&i| &self.train[i]).collect();
        let (l, c, r) = self.pair_losses(&pairs)?;
        let (acc, margin) = pair_metrics(&c, &r);
        let n = b.len() as f64;
        self.stats.0 += acc * n;
        self.stats.1 += margin * n;
        self.stats.2 += n;
        Ok(l.sum_all()?)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.t.train_mode(key);
    }

    fn step_stats(&mut self) -> Vec<(&'static str, f64)> {
        let (a, m, n) = std::mem::take(&mut self.stats);
        vec![("accuracy", a / n.max(1.0)), ("margin", m / n.max(1.0))]
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.eval.is_empty() {
            return Ok(Vec::new());
        }
        let (mut c, mut r, mut loss) = (Vec::new(), Vec::new(), 0f64);
        let all: Vec<&TokPair> = self.eval.iter().collect();
        for chunk in all.chunks(self.eval_batch) {
            let (l, cc, rr) = self.pair_losses(chunk)?;
            loss += crate::losses::sum_f64(&l)?;
            c.extend(cc);
            r.extend(rr);
        }
        let (acc, margin) = pair_metrics(&c, &r);
        Ok(vec![
            ("eval_accuracy", acc),
            ("eval_margin", margin),
            ("eval_loss", loss / c.len() as f64),
        ])
    }
}

/// Tokenizes pairs for a reward model: no EOS appended, through the template when there is one.
fn tokenize(
    tok: &crate::tokenizer::Tok,
    tpl: Option<&crate::chat::ChatTemplate>,
    recs: &[preference::Sourced],
    max_len: usize,
    warn: &Warn,
    counts: &mut Counts,
) -> Result<Vec<TokPair>> {
    let fmt = Formatter {
        tok,
        template: tpl,
        train_on_prompt: false,
        eos: None,
    };
    preference::tokenize_pairs(&fmt, recs, max_len, warn, counts)
}

pub fn run(o: RewardOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.train.resolve(&o.train_defaults())?;
    let model = o
        .model
        .clone()
        .context("reward needs a base model: --model DIR (or `model` in the config)")?;
    let data = o
        .data
        .clone()
        .context("reward needs preference data: --data FILE.jsonl (or `data` in the config)")?;
    if !(0.0..1.0).contains(&o.eval_fraction) {
        bail!("eval_fraction must be in [0, 1), got {}", o.eval_fraction);
    }
    if !(o.center_rewards_coefficient.is_finite() && o.center_rewards_coefficient >= 0.0) {
        bail!(
            "center_rewards_coefficient must be ≥ 0, got {}",
            o.center_rewards_coefficient
        );
    }
    let files = RunFiles::create(&ctl, &o.out, &o, "reward")?;
    let run_dir = files.run_dir.clone();

    // 1. Body and a one-output head.
    let body = BodyOpts {
        model: &model,
        peft: &o.peft,
        forgetting_eval: o.forgetting_eval.as_deref(),
        max_len: o.max_len,
    };
    let m = load_body(&body, &ctl, true)?;
    let head = m.body.head_name();
    let t = Tuned::new(m, &body, head, 1, cfg.seed)?;

    // 2. Data, through the chat template (the model's, --chat-template, or ChatML for
    // conversations when there is none).
    let warn = Warn {
        strict: o.strict,
        say: &|w| ctl.say(w),
    };
    let mut counts = Counts::default();
    let train_recs = preference::read(&data, &warn, &mut counts)?;
    let eval_recs = match &o.eval_data {
        Some(p) => preference::read(p, &warn, &mut counts)?,
        None => Vec::new(),
    };
    let mut template = match &o.chat_template {
        Some(p) => Some(crate::input::read_text(p, crate::input::MAX_CONFIG_BYTES)?),
        None => t.m.chat_template.clone(),
    };
    if template.is_none()
        && train_recs
            .iter()
            .chain(&eval_recs)
            .any(|r| r.record.has_messages())
    {
        ctl.say(crate::data::sft::DEFAULT_TEMPLATE_NOTE);
        template = Some(crate::data::sft::DEFAULT_TEMPLATE.to_string());
    }
    let tpl = template.clone().map(|s| t.m.chat(s));
    let mut train = tokenize(
        &t.m.tok,
        tpl.as_ref(),
        &train_recs,
        t.max_len,
        &warn,
        &mut counts,
    )?;
    let mut eval = tokenize(
        &t.m.tok,
        tpl.as_ref(),
        &eval_recs,
        t.max_len,
        &warn,
        &mut counts,
    )?;
    if o.eval_fraction > 0.0 {
        let (a, b) =
            preference::split_by_prompt(train, |x| x.prompt_key, o.eval_fraction, cfg.seed);
        train = a;
        eval.extend(b);
    }
    if train.is_empty() {
        bail!("no training pairs left after the held-out split");
    }
    let (trainable, total) = (t.m.store.num_trainable(), t.m.store.num_params());
    ctl.say(&format!(
        "data: {}; {} train / {} eval pairs; trainable parameters {trainable} of {total} ({:.2}%)",
        counts.summary(),
        train.len(),
        eval.len(),
        100.0 * trainable as f64 / total as f64
    ));

    // 3. The engine, then the outputs.
    let mut method = Reward {
        t,
        train,
        eval,
        center: o.center_rewards_coefficient,
        eval_batch: cfg.batch_size,
        stats: (0.0, 0.0, 0.0),
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let mut s = Summary {
        run_dir: run_dir.clone(),
        eval: outcome.eval.clone(),
        outcome,
        counts,
        trainable,
        total,
        forgetting: None,
    };
    if !s.outcome.finished() {
        return Ok(s);
    }
    let labels = ["LABEL_0".to_string()];
    let spec = HeadSpec {
        kind: "SequenceClassification",
        peft_task: "SEQ_CLS",
        labels: &labels,
        chat_template: template.as_deref(),
    };
    let bytes = write_outputs(&mut method.t, &run_dir, &body, &spec)?;
    s.forgetting = method.t.forgetting_ppl()?;
    let oc = &s.outcome;
    let mut line = json!({"summary": true, "steps": oc.steps, "seconds": oc.seconds,
        "step_s_median": oc.step_s_median, "peak_rss_mib": oc.peak_rss_mib, "pairs": method.train.len(),
        "eval_pairs": method.eval.len(), "skipped": s.counts.skipped(), "trainable_params": trainable,
        "total_params": total, "weights_bytes": bytes, "forgetting_ppl": s.forgetting});
    for (k, v) in &s.eval {
        line[*k] = json!(v);
    }
    Metrics::open(&run_dir)?.line(&line)?;
    Ok(s)
}

/// `lmforge reward score`: rewards of every pair of a file under a trained reward model.
#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    /// A reward model: an `…ForSequenceClassification` directory or a PEFT adapter directory.
    #[arg(long)]
    pub model: PathBuf,
    /// With an adapter: its base model (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Preference JSONL.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Make every skipped record an error.
    #[arg(long)]
    pub strict: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// One scored pair.
pub struct Scored {
    pub at: String,
    pub chosen: f32,
    pub rejected: f32,
}

/// Loads a reward model and scores the pairs of `a.data`.
pub fn score(a: &ScoreArgs, say: &dyn Fn(&str)) -> Result<(Vec<Scored>, Counts)> {
    let dev = crate::device(&a.device)?;
    let hm = crate::model::backbone::load_head_model(&a.model, a.base.as_deref(), &dev, false)?;
    if hm.head.out_dim != 1 {
        bail!(
            "{}: the head has {} outputs; a reward model has 1",
            a.model.display(),
            hm.head.out_dim
        );
    }
    let tpl = hm.m.chat_template.clone().map(|s| hm.m.chat(s));
    let warn = Warn {
        strict: a.strict,
        say,
    };
    let mut counts = Counts::default();
    let recs = preference::read(&a.data, &warn, &mut counts)?;
    if tpl.is_none() && recs.iter().any(|r| r.record.has_messages()) {
        bail!(
            "{}: conversations need a chat template, and the reward model {} has none",
            a.data.display(),
            a.model.display()
        );
    }
    let max_len = a.max_len.min(hm.m.body.max_len());
    let pairs = tokenize(&hm.m.tok, tpl.as_ref(), &recs, max_len, &warn, &mut counts)?;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(a.batch_size.max(1)) {
        let r = score_chunk(&hm, chunk)?;
        let n = chunk.len();
        for (k, p) in chunk.iter().enumerate() {
            out.push(Scored {
                at: p.at.clone(),
                chosen: r[k],
                rejected: r[n + k],
            });
        }
    }
    Ok((out, counts))
}

fn score_chunk(hm: &HeadModel, pairs: &[TokPair]) -> Result<Vec<f32>> {
    let pairs: Vec<&TokPair> = pairs.iter().collect();
    let r = pair_rewards(&hm.m.body, &hm.head, hm.pad, &pairs)?;
    let r: Vec<f32> = r.to_dtype(DType::F32)?.to_vec1()?;
    if let Some(x) = r.iter().find(|x| !x.is_finite()) {
        bail!("a reward is not finite ({x}): the model's weights are broken");
    }
    Ok(r)
}
