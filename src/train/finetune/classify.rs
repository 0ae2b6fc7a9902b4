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

use super::{load_body, train, FinetuneOptions, HeadSpec, Summary, TaskMethod, Tuned};
use crate::data::labeled::{read_labeled, Labeled};
use crate::eval::metrics::{accuracy, macro_f1};
use crate::model::backbone::argmax_rows;
use crate::model::ParamStore;
use crate::train::engine::{Control, Method, TrainConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;

struct Classify {
    t: Tuned,
    x_train: Vec<Vec<u32>>,
    y_train: Vec<usize>,
    x_eval: Vec<Vec<u32>>,
    y_eval: Vec<usize>,
    eval_batch: usize,
}

impl Classify {
    /// Logits (B, L) of rows.
    fn logits(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let t = &self.t;
        t.head.forward(&t.m.body.features(rows, t.pad, t.device())?)
    }
}

impl Method for Classify {
    /// Indices of training examples.
    type Batch = Vec<usize>;

    fn store(&self) -> &ParamStore {
        &self.t.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.x_train.len())
    }

    fn batch(&mut self, draws: &[usize]) -> Result<Vec<usize>> {
        Ok(draws.to_vec())
    }

    fn units(&self, b: &Vec<usize>) -> usize {
        b.len()
    }

    fn tokens(&self, b: &Vec<usize>) -> usize {
        b.iter().map(|&i| self.x_train[i].len()).sum()
    }

    fn loss(&mut self, b: &Vec<usize>) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = b.iter().map(|&i| self.x_train[i].clone()).collect();
        let y: Vec<u32> = b.iter().map(|&i| self.y_train[i] as u32).collect();
        let logits = self.logits(&rows)?;
        crate::losses::nll_sum(&logits, &Tensor::from_vec(y, b.len(), self.t.device())?)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.t.train_mode(key);
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.x_eval.is_empty() {
            return Ok(Vec::new());
        }
        let mut pred = Vec::new();
        for c in self.x_eval.chunks(self.eval_batch) {
            pred.extend(argmax_rows(&self.logits(c)?.detach())?);
        }
        Ok(vec![
            ("accuracy", accuracy(&self.y_eval, &pred)),
            ("macro_f1", macro_f1(&self.y_eval, &pred)),
        ])
    }
}

impl TaskMethod for Classify {
    fn tuned(&mut self) -> &mut Tuned {
        &mut self.t
    }
}

fn encode(tok: &crate::tokenizer::Tok, rows: &[Labeled], max_len: usize) -> Result<Vec<Vec<u32>>> {
    rows.iter()
        .map(|r| encode_text(tok, &r.text, max_len).with_context(|| r.at.clone()))
        .collect()
}

/// A classifier's input ids: special tokens added, cut to `max_len` the way transformers
/// truncates (a closing special token — [SEP], EOS — kept).
pub fn encode_text(tok: &crate::tokenizer::Tok, text: &str, max_len: usize) -> Result<Vec<u32>> {
    let (mut ids, offs) = tok.encode_with_offsets(text, true)?;
    if ids.len() > max_len {
        let tail = match offs.last() {
            Some(None) => ids.last().copied(),
            _ => None,
        };
        ids.truncate(max_len - usize::from(tail.is_some()));
        ids.extend(tail);
    }
    if ids.is_empty() {
        bail!("the text tokenizes to nothing");
    }
    Ok(ids)
}

pub fn run(o: FinetuneOptions, cfg: TrainConfig, ctl: Control) -> Result<Summary> {
    // 1. Data and labels.
    let data = o.data()?;
    let train_rows = read_labeled(data)?;
    let mut labels: Vec<String> = train_rows.iter().map(|r| r.label.clone()).collect();
    // Integer labels keep their numeric order (label 10 after 9, not after 1).
    labels.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    labels.dedup();
    if labels.len() < 2 {
        bail!(
            "{}: need at least 2 distinct labels, found {:?}",
            data.display(),
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
    let eval_rows = match &o.eval_data {
        Some(p) => read_labeled(p)?,
        None => Vec::new(),
    };
    let y_train: Vec<usize> = train_rows.iter().map(label_id).collect::<Result<_>>()?;
    let y_eval: Vec<usize> = eval_rows.iter().map(label_id).collect::<Result<_>>()?;

    // 2. Body and head.
    let m = load_body(&o.body()?, &ctl, true)?;
    let head = m.body.head_name();
    let t = Tuned::new(m, &o.body()?, head, labels.len(), cfg.seed)?;
    let x_train = encode(&t.m.tok, &train_rows, t.max_len)?;
    let x_eval = encode(&t.m.tok, &eval_rows, t.max_len)?;
    let (trainable, total) = (t.m.store.num_trainable(), t.m.store.num_params());
    ctl.say(&format!(
        "{} train / {} eval examples, {} labels; trainable parameters {trainable} of {total} ({:.2}%)",
        x_train.len(),
        x_eval.len(),
        labels.len(),
        100.0 * trainable as f64 / total as f64
    ));

    // 3. The engine, then the outputs.
    let method = Classify {
        t,
        x_train,
        y_train,
        x_eval,
        y_eval,
        eval_batch: cfg.batch_size,
    };
    let spec = HeadSpec {
        kind: "SequenceClassification",
        peft_task: "SEQ_CLS",
        labels: &labels,
        chat_template: None,
    };
    train(method, &o, cfg, ctl, spec, json!({}))
}
