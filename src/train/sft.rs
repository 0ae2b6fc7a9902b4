//! Supervised fine-tuning (instruction tuning; Ouyang et al. 2022 §3.5, TRL's `SFTTrainer`):
//!
//!   L = −(1/|M|) Σ_{t∈M} log p(x_t | x_<t)
//!
//! where M holds the completion / assistant tokens of every example in the optimizer step
//! (all tokens with `train_on_prompt`). `run` reads top to bottom: base model → data → forgetting
//! baseline → optional LoRA → the engine → output (an HF model directory, or a PEFT adapter
//! directory, optionally merged too) → forgetting after.
//!
//! Batches are right-padded: with causal attention, padding after a sequence cannot change the
//! tokens before it, so no attention mask is needed and padded positions just carry no loss.

use crate::data::sft::{build_batch, read_jsonl, rows_of, tokenize_all, Counts, Example};
use crate::data::sft::{Formatter, RowBatch, Tokenized};
use crate::eval::score::{score_text_ids, Forgetting, Score};
use crate::model::{DecoderModel, ForwardOpts, Packing, ParamStore};
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, Schedule};
use crate::train::engine::{TrainArgs, TrainConfig};
use crate::train::lm::Policy;
use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;

/// `lmforge sft`'s options: its flags and its TOML config (`[peft]`, `[train]` sections).
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct SftOptions {
    /// Base model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL: {"prompt","completion"}, {"messages":[{"role","content"}...]} or {"text"} per line.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, checkpoints/, and model/ (full) or adapter/ (LoRA).
    #[arg(long, default_value = "runs/sft")]
    pub out: PathBuf,
    /// Examples are truncated to this many tokens (capped at the model's context).
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// Put prompt / user / system tokens in the loss too.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Pack several examples into each sequence (no attention across examples).
    #[arg(long)]
    pub packing: bool,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// A text file whose perplexity is reported before and after fine-tuning.
    #[arg(long)]
    pub forgetting_eval: Option<PathBuf>,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

crate::clap_default!(SftOptions);

impl SftOptions {
    /// SFT's engine defaults: lr 2e-5 for a full fine-tune, 2e-4 for LoRA (TRL's habits).
    pub fn train_defaults(&self) -> TrainConfig {
        TrainConfig {
            lr: self.peft.lr(2e-5, 2e-4),
            schedule: Schedule::Cosine,
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
    pub forgetting: Option<(Score, Score)>,
    /// Where the result went: `out/model` or `out/adapter` (None when stopped early).
    pub output: Option<PathBuf>,
}

/// The method: rows of tokenized examples, the loss on their trained tokens.
struct Sft {
    p: Policy,
    data: Vec<Tokenized>,
    rows: Vec<Vec<usize>>,
    pad: u32,
}

impl Method for Sft {
    type Batch = RowBatch;

    fn store(&self) -> &ParamStore {
        &self.p.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.rows.len())
    }

    fn batch(&mut self, draws: &[usize]) -> Result<RowBatch> {
        let rows: Vec<Vec<&Tokenized>> = draws
            .iter()
            .map(|&r| self.rows[r].iter().map(|&e| &self.data[e]).collect())
            .collect();
        Ok(build_batch(&rows, self.pad))
    }

    fn units(&self, b: &RowBatch) -> usize {
        b.w.iter().filter(|&&w| w > 0.0).count()
    }

    fn tokens(&self, b: &RowBatch) -> usize {
        b.segments.iter().flatten().sum()
    }

    fn loss(&mut self, b: &RowBatch) -> Result<Tensor> {
        masked_loss(&self.p.m.model, b)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.p.switch.set_training(key.is_some(), key.unwrap_or(0));
    }
}

pub fn run(o: SftOptions, ctl: Control) -> Result<Summary> {
    let cfg = o.train.resolve(&o.train_defaults())?;
    let peft_cfg = o.peft.config()?;
    let model_path = o
        .model
        .clone()
        .context("sft needs a base model: --model DIR (or `model` in the config)")?;
    let data_path = o
        .data
        .clone()
        .context("sft needs training data: --data FILE.jsonl (or `data` in the config)")?;
    let files = RunFiles::create(&ctl, &o.out, &o, "sft")?;
    let run_dir = files.run_dir.clone();

    // 1. Base model: every weight frozen for LoRA (no gradient, no weight-gradient GEMM).
    let mut p = Policy::load(
        &model_path,
        o.chat_template.as_deref(),
        o.peft.base_load(),
        &ctl,
    )?;

    // 2. Data.
    let examples = read_jsonl(&data_path)?;
    let has_chat = examples
        .iter()
        .any(|e| matches!(e.example, Example::Chat(_)));
    // The template is written with the output even for text-only data: the fine-tune is then
    // ready for chat.
    if p.use_default_template() && has_chat {
        ctl.say(crate::data::sft::DEFAULT_TEMPLATE_NOTE);
    }
    let tpl = p.chat_template()?;
    let max_len = p.max_len(o.max_len, peft_cfg.as_ref())?;
    let fmt = Formatter {
        tok: &p.m.tok,
        template: tpl.as_ref(),
        train_on_prompt: o.train_on_prompt,
        eos: p.eos(),
    };
    let (data, counts) = tokenize_all(&fmt, &examples, max_len, |w| ctl.say(w))?;
    let targets: usize = data.iter().map(Tokenized::n_targets).sum();
    ctl.say(&format!(
        "data: {} examples ({} truncated, {} skipped), {targets} trained tokens",
        data.len(),
        counts.truncated,
        counts.dropped
    ));
    let pad = p.eos().unwrap_or(0);

    // 3. Forgetting baseline, measured on the base model.
    let forgetting = Forgetting::start(o.forgetting_eval.as_deref(), &p.m.tok, |ids| {
        score_text_ids(&p.m.model, ids)
    })?;

    // 4. Adapters.
    if let Some(c) = &peft_cfg {
        p.attach_peft(c, cfg.seed)?;
    }
    let (trainable, total) = (p.m.store.num_trainable(), p.num_params());
    ctl.say(&p.describe());
    let rows = rows_of(&data, o.packing, max_len, cfg.seed);
    if o.packing {
        ctl.say(&format!(
            "packing: {} examples into {} rows of up to {max_len} tokens",
            data.len(),
            rows.len()
        ));
    }

    // 5. The engine.
    let mut method = Sft { p, data, rows, pad };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let mut summary = Summary {
        run_dir: run_dir.clone(),
        outcome,
        counts,
        trainable,
        total,
        forgetting: None,
        output: None,
    };
    if !summary.outcome.finished() {
        return Ok(summary);
    }

    // 6. Output.
    let mut p = method.p;
    summary.output = Some(p.write_outputs(&run_dir, o.peft.merge, &ctl)?);

    // 7. Forgetting: the same text under the fine-tuned model.
    let mut metrics = Metrics::open(&run_dir)?;
    if let Some(f) = &forgetting {
        let (b, after) = (f.before, f.after(|ids| score_text_ids(&p.m.model, ids))?);
        metrics.line(
            &json!({"forgetting_eval": o.forgetting_eval.as_ref().map(|p| p.display().to_string()),
               "ppl_before": b.ppl(), "ppl_after": after.ppl(), "tokens": b.tokens}),
        )?;
        summary.forgetting = Some((b, after));
    }
    let (oc, counts) = (&summary.outcome, &summary.counts);
    metrics.line(
        &json!({"summary": true, "steps": oc.steps, "final_loss": oc.losses.last().map(|l| l.1),
           "examples": counts.kept + counts.truncated, "truncated": counts.truncated,
           "skipped": counts.dropped, "skipped_steps": oc.skipped,
           "trainable_params": trainable, "total_params": total, "seconds": oc.seconds,
           "step_s_median": oc.step_s_median, "peak_rss_mib": oc.peak_rss_mib}),
    )?;
    Ok(summary)
}

/// Summed NLL over the trained tokens of a right-padded batch of rows. Rows holding several
/// examples run with `Packing` (positions and attention per example).
pub fn masked_loss(model: &DecoderModel, rb: &RowBatch) -> Result<Tensor> {
    let dev = model.device();
    let (b, t) = (rb.segments.len(), rb.t);
    let x = Tensor::from_slice(&rb.x, (b, t), dev)?;
    let y = Tensor::from_slice(&rb.y, b * t, dev)?;
    let w = Tensor::from_slice(&rb.w, b * t, dev)?;
    let packing = if rb.segments.iter().any(|s| s.len() > 1) {
        Some(Packing::new(&rb.segments, t, dev)?)
    } else {
        None
    };
    let opts = ForwardOpts {
        packing: packing.as_ref(),
        ..Default::default()
    };
    let h = model.hidden_states(&model.embed(&x)?, opts)?;
    let logits = model.logits(&h)?.reshape((b * t, model.cfg.vocab_size))?;
    Ok((crate::losses::gather_logprobs(&logits, &y)?.neg()? * w)?.sum_all()?)
}
