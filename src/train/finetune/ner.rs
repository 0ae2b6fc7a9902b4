//! Token classification (named-entity recognition; BERT §4.3):
//!
//!   p(tag_w | x) = softmax(W·h_{first sub-token of word w} + b),   L = mean over words
//!
//! Data: CoNLL-style files, one word per line with the BIO tag in the last column, blank lines
//! between sentences, `-DOCSTART-` lines skipped; every line must have the file's column count.
//! Words are joined with spaces and tokenized once; each token belongs to the word its byte offset
//! falls in, and only a word's first sub-token carries its label (transformers' usual alignment;
//! the others are ignored, −100). Deviation: decoders label the last sub-token (see `align`). Evaluation is entity-level precision/recall/F1 with seqeval's
//! semantics (`eval::metrics::entity_prf`); words cut away by `--max-len` are predicted `O` and
//! counted.

use super::{load_body, train, FinetuneOptions, HeadSpec, Summary, TaskMethod, Tuned};
use crate::data::conll::{align, read_conll, Aligned, Sentence};
use crate::eval::metrics::entity_prf;
use crate::model::backbone::{argmax_rows, Backbone};
use crate::model::ParamStore;
use crate::train::engine::{Control, Method, TrainConfig};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde_json::json;

/// A sentence's aligned tokens and its tag ids.
type Example = (Aligned, Vec<usize>);

struct Ner {
    t: Tuned,
    train: Vec<Example>,
    eval: Vec<Example>,
    eval_gold: Vec<Vec<String>>,
    labels: Vec<String>,
    eval_batch: usize,
}

/// The labelled positions of a batch: flat token positions and their tag ids.
pub struct NerBatch {
    idx: Vec<usize>,
    pos: Vec<u32>,
    tgt: Vec<u32>,
}

impl Ner {
    /// Per-token logits (B, T, L) of a batch of sentences, and T.
    fn logits(&self, batch: &[&Example]) -> Result<(Tensor, usize)> {
        let t = &self.t;
        let rows: Vec<Vec<u32>> = batch.iter().map(|(a, _)| a.ids.clone()).collect();
        let h = t.m.body.token_states(&rows, t.pad, t.device())?;
        let len = h.dim(1)?;
        Ok((t.head.forward(&h)?, len))
    }
}

impl Method for Ner {
    type Batch = NerBatch;

    fn store(&self) -> &ParamStore {
        &self.t.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        Some(self.train.len())
    }

    fn batch(&mut self, draws: &[usize]) -> Result<NerBatch> {
        // Targets at each word's labelled sub-token; everything else carries no loss.
        let tmax = draws
            .iter()
            .map(|&i| self.train[i].0.ids.len())
            .max()
            .unwrap_or(1);
        let (mut pos, mut tgt) = (Vec::new(), Vec::new());
        for (bi, &i) in draws.iter().enumerate() {
            let (a, tags) = &self.train[i];
            for (f, &tag) in a.first.iter().zip(tags) {
                if let Some(ti) = f {
                    pos.push((bi * tmax + ti) as u32);
                    tgt.push(tag as u32);
                }
            }
        }
        Ok(NerBatch {
            idx: draws.to_vec(),
            pos,
            tgt,
        })
    }

    fn units(&self, b: &NerBatch) -> usize {
        b.pos.len()
    }

    fn tokens(&self, b: &NerBatch) -> usize {
        b.idx.iter().map(|&i| self.train[i].0.ids.len()).sum()
    }

    fn loss(&mut self, b: &NerBatch) -> Result<Tensor> {
        let batch: Vec<&Example> = b.idx.iter().map(|&i| &self.train[i]).collect();
        let (lg, t) = self.logits(&batch)?;
        let dev = self.t.device();
        let n = b.pos.len();
        let picked = lg
            .reshape((batch.len() * t, self.labels.len()))?
            .index_select(&Tensor::from_slice(&b.pos, n, dev)?, 0)?;
        crate::losses::nll_sum(&picked, &Tensor::from_slice(&b.tgt, n, dev)?)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.t.train_mode(key);
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.eval.is_empty() {
            return Ok(Vec::new());
        }
        let mut pred = Vec::new();
        for chunk in self.eval.chunks(self.eval_batch) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (lg, t) = self.logits(&refs)?;
            let best = argmax_rows(&lg.detach().reshape((refs.len() * t, self.labels.len()))?)?;
            for (bi, (a, _)) in chunk.iter().enumerate() {
                pred.push(
                    a.first
                        .iter()
                        .map(|f| f.map_or("O", |ti| self.labels[best[bi * t + ti]].as_str()))
                        .collect::<Vec<_>>(),
                );
            }
        }
        let gold: Vec<Vec<&str>> = self
            .eval_gold
            .iter()
            .map(|g| g.iter().map(String::as_str).collect())
            .collect();
        let p = entity_prf(&gold, &pred);
        Ok(vec![
            ("entity_f1", p.f1),
            ("entity_precision", p.precision),
            ("entity_recall", p.recall),
        ])
    }
}

impl TaskMethod for Ner {
    fn tuned(&mut self) -> &mut Tuned {
        &mut self.t
    }
}

pub fn run(o: FinetuneOptions, cfg: TrainConfig, ctl: Control) -> Result<Summary> {
    let train_s = read_conll(o.data()?)?;
    let eval_s = match &o.eval_data {
        Some(p) => read_conll(p)?,
        None => Vec::new(),
    };
    // Labels: O first, then the entity tags sorted.
    let mut labels: Vec<String> = train_s
        .iter()
        .flat_map(|s| s.tags.iter().cloned())
        .collect();
    labels.push("O".into());
    labels.sort_by(|a, b| (a != "O", a).cmp(&(b != "O", b)));
    labels.dedup();
    let tag_id = |t: &str, at: &str| -> Result<usize> {
        labels
            .iter()
            .position(|l| l == t)
            .with_context(|| format!("{at}: tag {t:?} does not occur in the training data"))
    };

    let m = load_body(&o.body()?, &ctl, false)?;
    let head = m.body.token_head_name();
    let t = Tuned::new(m, &o.body()?, head, labels.len(), cfg.seed)?;
    let last = matches!(t.m.body, Backbone::Decoder(_));
    let prep = |ss: &[Sentence]| -> Result<Vec<Example>> {
        ss.iter()
            .map(|s| {
                Ok((
                    align(&t.m.tok, &s.words, t.max_len, last)?,
                    s.tags
                        .iter()
                        .map(|tag| tag_id(tag, &s.at))
                        .collect::<Result<_>>()?,
                ))
            })
            .collect()
    };
    let (tr, ev) = (prep(&train_s)?, prep(&eval_s)?);
    let cut = tr
        .iter()
        .chain(&ev)
        .filter(|(a, _)| a.first.iter().any(Option::is_none))
        .count();
    let (trainable, total) = (t.m.store.num_trainable(), t.m.store.num_params());
    ctl.say(&format!(
        "{} train / {} eval sentences, {} tags, {cut} sentences truncated; trainable parameters {trainable} of {total}",
        tr.len(),
        ev.len(),
        labels.len()
    ));
    let method = Ner {
        t,
        train: tr,
        eval: ev,
        eval_gold: eval_s.into_iter().map(|s| s.tags).collect(),
        labels: labels.clone(),
        eval_batch: cfg.batch_size,
    };
    let spec = HeadSpec {
        kind: "TokenClassification",
        peft_task: "TOKEN_CLS",
        labels: &labels,
        chat_template: None,
    };
    train(
        method,
        &o,
        cfg,
        ctl,
        spec,
        json!({"truncated_sentences": cut}),
    )
}
