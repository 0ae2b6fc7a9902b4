//! Sequence classification fine-tuning (BERT §4.1; decoders read their last token, as
//! transformers' `LlamaForSequenceClassification`):
//!
//!   p(y | x) = softmax(W·f(x) + b),   L = −(1/B) Σ log p(y_i | x_i)
//!
//! f(x) is the encoder's pooled [CLS] vector or the decoder's last-token hidden state. The head is
//! `classifier` (with bias) on encoders and `score` (no bias) on decoders, so the output directory
//! loads as `AutoModelForSequenceClassification` with `id2label`/`label2id`. With LoRA, the body is
//! frozen, the head trains in full and is saved beside the adapter as PEFT's `modules_to_save`.
//!
//! Data: JSONL `{"text", "label"}` or CSV with `text` and `label` columns. Labels come from the
//! training file (sorted); an evaluation label not among them is an error naming file:line.

use crate::data::labeled::{read_labeled, Labeled};
use crate::eval::metrics::{accuracy, macro_f1};
use crate::model::backbone::{
    add_head, argmax_rows, open_metrics, write_head_outputs, Backbone, HeadOutputs, POOLER,
};
use crate::peft::lora::LoraConfig;
use crate::rng::Stream;
use crate::train::optim::{lr_at, AdamW, AdamWConfig};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub struct Options {
    pub model: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub out: PathBuf,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub max_len: usize,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub seed: u64,
    pub lora: Option<LoraConfig>,
    pub merge: bool,
    /// Decoders: text whose perplexity is reported before and after fine-tuning.
    pub forgetting_eval: Option<PathBuf>,
    pub device: Device,
    pub quiet: bool,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: u64,
    pub seconds: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    pub trainable: usize,
    pub total: usize,
    pub accuracy: Option<f64>,
    pub macro_f1: Option<f64>,
    /// Token classification: entity-level F1.
    pub entity_f1: Option<f64>,
    /// Extractive QA: exact match and F1 (percent).
    pub squad: Option<(f64, f64)>,
    /// Perplexity of the forgetting-evaluation text before and after.
    pub forgetting: Option<(f64, f64)>,
    /// Bytes of the written weights (adapter + head, or the whole model).
    pub checkpoint_bytes: u64,
}

impl Summary {
    /// Timing and sizes of a finished head fine-tune (`seconds` of training, `times`: each
    /// step's seconds); the caller fills in its scores and the forgetting report.
    pub fn new(
        steps: u64,
        seconds: f64,
        mut times: Vec<f64>,
        (trainable, total): (usize, usize),
        checkpoint_bytes: u64,
    ) -> Self {
        times.sort_by(f64::total_cmp);
        Self {
            steps,
            seconds,
            step_s_median: times.get(times.len() / 2).copied().unwrap_or(0.0),
            peak_rss_mib: crate::bench::peak_rss_mib(),
            trainable,
            total,
            accuracy: None,
            macro_f1: None,
            entity_f1: None,
            squad: None,
            forgetting: None,
            checkpoint_bytes,
        }
    }

    /// The summary line of metrics.jsonl, with `extra` keys of the task.
    pub fn write_line(&self, metrics: &mut std::fs::File, extra: serde_json::Value) -> Result<()> {
        let mut v = json!({"summary": true, "steps": self.steps, "seconds": self.seconds,
            "step_s_median": self.step_s_median, "peak_rss_mib": self.peak_rss_mib,
            "trainable_params": self.trainable, "total_params": self.total,
            "checkpoint_bytes": self.checkpoint_bytes, "forgetting_ppl": self.forgetting,
            "accuracy": self.accuracy, "macro_f1": self.macro_f1, "entity_f1": self.entity_f1,
            "exact_match": self.squad.map(|s| s.0), "f1": self.squad.map(|s| s.1)});
        if let (Some(v), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            v.extend(e);
        }
        writeln!(metrics, "{v}")?;
        Ok(())
    }
}

fn encode(tok: &crate::tokenizer::Tok, rows: &[Labeled], max_len: usize) -> Result<Vec<Vec<u32>>> {
    rows.iter()
        .map(|r| {
            let (mut ids, offs) = tok.encode_with_offsets(&r.text, true)?;
            if ids.len() > max_len {
                // Keep a closing special token ([SEP], EOS) the way transformers truncates.
                let tail = match offs.last() {
                    Some(None) => ids.last().copied(),
                    _ => None,
                };
                ids.truncate(max_len - usize::from(tail.is_some()));
                ids.extend(tail);
            }
            if ids.is_empty() {
                bail!("{}: the text tokenizes to nothing", r.at);
            }
            Ok(ids)
        })
        .collect()
}

pub fn run(o: Options) -> Result<Summary> {
    let say = |s: &str| {
        if !o.quiet {
            eprintln!("{s}");
        }
    };
    // 1. Data and labels.
    let train = read_labeled(&o.data)?;
    let mut labels: Vec<String> = train.iter().map(|r| r.label.clone()).collect();
    // Integer labels keep their numeric order (label 10 after 9, not after 1).
    labels.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    labels.dedup();
    if labels.len() < 2 {
        bail!(
            "{}: need at least 2 distinct labels, found {:?}",
            o.data.display(),
            labels
        );
    }
    let label_id = |r: &Labeled| -> Result<usize> {
        labels.iter().position(|l| *l == r.label).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: label {:?} is not in the training labels {:?}",
                r.at,
                r.label,
                labels
            )
        })
    };
    let eval = match &o.eval_data {
        Some(p) => read_labeled(p)?,
        None => Vec::new(),
    };
    let y_train: Vec<usize> = train.iter().map(label_id).collect::<Result<_>>()?;
    let y_eval: Vec<usize> = eval.iter().map(label_id).collect::<Result<_>>()?;

    // 2. Body (frozen for LoRA) and head.
    let peft = o.lora.is_some();
    // BERT's pooler belongs to the classification head: it trains (and is saved with the
    // adapter as `modules_to_save`) under LoRA too, also when the checkpoint has none.
    let mut m = Backbone::load(&o.model, &o.device, true, &|n: &str| {
        peft && !n.starts_with(POOLER)
    })?;
    let max_len = o.max_len.min(m.body.max_len());
    if o.batch_size == 0 || max_len < 2 {
        bail!("--batch-size must be positive and --max-len at least 2");
    }
    let x_train = encode(&m.tok, &train, max_len)?;
    let x_eval = encode(&m.tok, &eval, max_len)?;
    let (head_name, head_bias) = m.body.head_name();
    let (head, switch, adapters) = add_head(
        &mut m,
        head_name,
        head_bias,
        labels.len(),
        o.lora.as_ref(),
        o.seed,
    )?;
    let mut forgetting = Forgetting::start(o.forgetting_eval.as_deref(), &m)?;
    let (trainable, total) = (m.store.num_trainable(), m.store.num_params());
    say(&format!(
        "{} train / {} eval examples, {} labels; trainable parameters {trainable} of {total} ({:.2}%)",
        train.len(),
        eval.len(),
        labels.len(),
        100.0 * trainable as f64 / total as f64
    ));

    // 3. Loop.
    let pad = m.body.pad_id(&m.tok);
    let dev = o.device.clone();
    let (mut opt, per_epoch, total_steps) = plan(&o, &m.store, train.len())?;
    let predict = |rows: &[Vec<u32>]| -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for c in rows.chunks(o.batch_size.max(1)) {
            let logits = head.forward(&m.body.features(c, pad, &dev)?.detach())?;
            out.extend(argmax_rows(&logits)?);
        }
        Ok(out)
    };
    let mut metrics = open_metrics(&o.out)?;
    let mut stream = Stream::new(o.seed, train.len());
    let started = Instant::now();
    let mut times = Vec::new();
    let (mut acc, mut f1) = (None, None);
    for step in 0..total_steps {
        let t0 = Instant::now();
        let idx: Vec<usize> = (0..o.batch_size)
            .map(|i| stream.get(step as usize * o.batch_size + i))
            .collect();
        let rows: Vec<Vec<u32>> = idx.iter().map(|&i| x_train[i].clone()).collect();
        let y: Vec<u32> = idx.iter().map(|&i| y_train[i] as u32).collect();
        switch.set_training(true, step ^ o.seed.rotate_left(17));
        let logits = head.forward(&m.body.features(&rows, pad, &dev)?)?;
        switch.set_training(false, 0);
        let loss = crate::losses::cross_entropy(&logits, &Tensor::from_vec(y, idx.len(), &dev)?)?;
        let lr = lr_at(step, o.lr, 0.0, o.warmup_steps, total_steps);
        let lv = optimizer_step(&m.store, &mut opt, &loss, lr, step, &mut metrics)?;
        times.push(t0.elapsed().as_secs_f64());
        if (step + 1) % per_epoch == 0 || step + 1 == total_steps {
            let epoch = (step + 1).div_ceil(per_epoch);
            if !x_eval.is_empty() {
                let pred = predict(&x_eval)?;
                let (a, f) = (accuracy(&y_eval, &pred), macro_f1(&y_eval, &pred));
                (acc, f1) = (Some(a), Some(f));
                writeln!(
                    metrics,
                    "{}",
                    json!({"epoch": epoch, "accuracy": a, "macro_f1": f})
                )?;
                say(&format!(
                    "epoch {epoch}: loss {lv:.4}  eval accuracy {a:.4}  macro-F1 {f:.4}"
                ));
            } else {
                say(&format!("epoch {epoch}: loss {lv:.4}"));
            }
        } else if !o.quiet && (step + 1) % (total_steps / 20).max(1) == 0 {
            eprintln!("step {:>5}/{total_steps}  loss {lv:.4}", step + 1);
        }
    }
    // 4. Output: the full model, or the adapter with the head (plus the merged model).
    let seconds = started.elapsed().as_secs_f64();
    let checkpoint_bytes = write_head_outputs(&mut HeadOutputs {
        m: &mut m,
        kind: "SequenceClassification",
        peft_task: "SEQ_CLS",
        head_name,
        labels: &labels,
        pad,
        max_len,
        adapters: adapters.as_ref(),
        out: &o.out,
        base: &o.model,
        merge: o.merge,
    })?;
    let summary = Summary {
        accuracy: acc,
        macro_f1: f1,
        forgetting: forgetting.finish(&m.body)?,
        ..Summary::new(
            total_steps,
            seconds,
            times,
            (trainable, total),
            checkpoint_bytes,
        )
    };
    summary.write_line(&mut metrics, json!({}))?;
    Ok(summary)
}

/// `--forgetting-eval` for task fine-tunes: the text's perplexity before training, then after.
pub struct Forgetting {
    ids: Option<Vec<u32>>,
    before: Option<f64>,
}

impl Forgetting {
    pub fn start(
        path: Option<&std::path::Path>,
        m: &crate::model::backbone::LoadedBackbone,
    ) -> Result<Self> {
        let Some(p) = path else {
            return Ok(Self {
                ids: None,
                before: None,
            });
        };
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?;
        let ids = m.tok.encode(&text, true)?;
        let before = m.body.lm_score(&ids)?.ppl();
        Ok(Self {
            ids: Some(ids),
            before: Some(before),
        })
    }

    /// (before, after), also printed; None without --forgetting-eval.
    pub fn finish(&mut self, body: &Backbone) -> Result<Option<(f64, f64)>> {
        let (Some(ids), Some(b)) = (self.ids.take(), self.before) else {
            return Ok(None);
        };
        Ok(Some((b, body.lm_score(&ids)?.ppl())))
    }
}

/// A head fine-tune's optimizer (AdamW with the run's weight decay) and its steps per epoch and
/// in all for `n` training examples.
pub fn plan(o: &Options, store: &crate::model::ParamStore, n: usize) -> Result<(AdamW, u64, u64)> {
    let opt = AdamW::new(store, AdamWConfig::with_weight_decay(o.weight_decay))?;
    let per_epoch = n.div_ceil(o.batch_size) as u64;
    let total_steps = per_epoch * o.epochs as u64;
    if total_steps == 0 {
        bail!("nothing to do: 0 steps");
    }
    Ok((opt, per_epoch, total_steps))
}

/// Backward, AdamW update and a metrics line for one step of a head fine-tune; returns the loss.
pub fn optimizer_step(
    store: &crate::model::ParamStore,
    opt: &mut AdamW,
    loss: &Tensor,
    lr: f64,
    step: u64,
    metrics: &mut std::fs::File,
) -> Result<f32> {
    let lv = loss.to_scalar::<f32>()?;
    if !lv.is_finite() {
        bail!("loss became {lv} at step {step}; lower --lr");
    }
    let grads = store.grads(&loss.backward()?);
    opt.step(store, &grads, lr)?;
    writeln!(
        metrics,
        "{}",
        json!({"step": step + 1, "loss": lv, "lr": lr})
    )?;
    Ok(lv)
}
