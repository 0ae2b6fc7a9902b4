//! Extractive question answering (BERT §4.2, SQuAD v1.1):
//!
//!   (s, e) = argmax_{s ≤ e, e − s < 30} start_s + end_e,   L = ½(CE(start) + CE(end))
//!
//! Question and context are encoded as a pair; contexts longer than `--max-len` are split into
//! windows overlapping by `--stride` tokens (only the context is cut). A window that does not hold
//! the whole answer points both targets at [CLS] (transformers' `run_qa`). At evaluation every
//! window of a question is scored and the best span over all of them is mapped back to the
//! context's characters through the tokenizer's offsets; exact match and F1 use SQuAD's answer
//! normalisation (`eval::metrics`). Encoders only: a causal decoder cannot see the context after
//! a start position.

use super::{load_body, train, FinetuneOptions, HeadSpec, Summary, TaskMethod, Tuned};
use crate::data::squad::{read_squad, windows, Question, Window};
use crate::eval::metrics::{exact_match, squad_f1};
use crate::model::backbone::Backbone;
use crate::model::ParamStore;
use crate::train::engine::{Control, Method, TrainConfig};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde_json::json;

struct Qa {
    t: Tuned,
    train: Vec<Window>,
    eval_windows: Vec<Window>,
    eval: Vec<Question>,
    eval_batch: usize,
}

impl Qa {
    /// (B, T) start and end logits of a batch of windows.
    fn logits(&self, ws: &[&Window]) -> Result<(Tensor, Tensor)> {
        let t = &self.t;
        let rows: Vec<Vec<u32>> = ws.iter().map(|w| w.ids.clone()).collect();
        let se = t
            .head
            .forward(&t.m.body.token_states(&rows, t.pad, t.device())?)?; // (B, T, 2)
        Ok((
            se.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?,
            se.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?,
        ))
    }
}

impl Method for Qa {
    /// Indices of training windows.
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
        b.iter().map(|&i| self.train[i].ids.len()).sum()
    }

    fn loss(&mut self, b: &Vec<usize>) -> Result<Tensor> {
        let batch: Vec<&Window> = b.iter().map(|&i| &self.train[i]).collect();
        let (s, e) = self.logits(&batch)?;
        let dev = self.t.device();
        let n = batch.len();
        let ts: Vec<u32> = batch.iter().map(|w| w.target.0).collect();
        let te: Vec<u32> = batch.iter().map(|w| w.target.1).collect();
        // Padding positions must not win: they are real logits of pad tokens, so mask them.
        let t = s.dim(1)?;
        let mask: Vec<f32> = batch
            .iter()
            .flat_map(|w| (0..t).map(move |i| if i < w.ids.len() { 0.0 } else { -1e9 }))
            .collect();
        let mask = Tensor::from_vec(mask, (n, t), dev)?;
        let ls = crate::losses::nll_sum(&(s + &mask)?, &Tensor::from_vec(ts, n, dev)?)?;
        let le = crate::losses::nll_sum(&(e + &mask)?, &Tensor::from_vec(te, n, dev)?)?;
        Ok(((ls + le)? * 0.5)?)
    }

    fn train_mode(&self, key: Option<u64>) {
        self.t.train_mode(key);
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.eval.is_empty() {
            return Ok(Vec::new());
        }
        // Best (score, start byte, end byte) per question over its windows.
        let mut best: Vec<Option<(f32, usize, usize)>> = vec![None; self.eval.len()];
        for chunk in self.eval_windows.chunks(self.eval_batch) {
            let refs: Vec<&Window> = chunk.iter().collect();
            let (s, e) = self.logits(&refs)?;
            let (s, e): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
                s.to_dtype(DType::F32)?.to_vec2()?,
                e.to_dtype(DType::F32)?.to_vec2()?,
            );
            for ((w, sw), ew) in chunk.iter().zip(&s).zip(&e) {
                // Spans of at most 30 tokens inside the context part.
                for (i, (oi, si)) in w.ctx.iter().zip(sw).enumerate() {
                    let Some((cs, _)) = *oi else { continue };
                    for (oj, ej) in w.ctx.iter().zip(ew).skip(i).take(30) {
                        let Some((_, ce)) = *oj else { continue };
                        let score = si + ej;
                        if best[w.q].is_none_or(|(b, _, _)| score > b) {
                            best[w.q] = Some((score, cs, ce));
                        }
                    }
                }
            }
        }
        let (mut em, mut f1) = (0f64, 0f64);
        for (q, b) in self.eval.iter().zip(&best) {
            let pred = b.map_or("", |(_, s, e)| q.context.get(s..e).unwrap_or(""));
            let golds: Vec<String> = q.answers.iter().map(|a| a.0.clone()).collect();
            em += exact_match(pred, &golds);
            f1 += squad_f1(pred, &golds);
        }
        let n = self.eval.len() as f64;
        Ok(vec![
            ("exact_match", 100.0 * em / n),
            ("f1", 100.0 * f1 / n),
        ])
    }
}

impl TaskMethod for Qa {
    fn tuned(&mut self) -> &mut Tuned {
        &mut self.t
    }
}

pub fn run(o: FinetuneOptions, cfg: TrainConfig, ctl: Control) -> Result<Summary> {
    if o.forgetting_eval.is_some() {
        bail!("--forgetting-eval measures causal-LM perplexity; extractive QA runs on encoders, which have none");
    }
    let train_q = read_squad(o.data()?)?;
    let eval = match &o.eval_data {
        Some(p) => read_squad(p)?,
        None => Vec::new(),
    };
    let m = load_body(&o.body()?, &ctl, false)?;
    if !matches!(m.body, Backbone::Encoder(_)) {
        bail!(
            "{}: extractive QA needs a bidirectional encoder (BERT); decoders are not supported",
            o.model()?.display()
        );
    }
    let t = Tuned::new(m, &o.body()?, ("qa_outputs", true), 2, cfg.seed)?;
    if o.stride >= t.max_len / 2 {
        bail!(
            "--stride must be less than half of --max-len ({})",
            t.max_len
        );
    }
    let (tw, ew) = (
        windows(&t.m.tok, &train_q, t.max_len, o.stride)?,
        windows(&t.m.tok, &eval, t.max_len, o.stride)?,
    );
    let (trainable, total) = (t.m.store.num_trainable(), t.m.store.num_params());
    ctl.say(&format!(
        "{} train questions ({} windows), {} eval ({} windows); trainable parameters {trainable} of {total}",
        train_q.len(),
        tw.len(),
        eval.len(),
        ew.len()
    ));
    let method = Qa {
        t,
        train: tw,
        eval_windows: ew,
        eval,
        eval_batch: cfg.batch_size,
    };
    // transformers sizes `qa_outputs` by num_labels: 2 (start, end).
    let labels = ["LABEL_0".to_string(), "LABEL_1".to_string()];
    let spec = HeadSpec {
        kind: "QuestionAnswering",
        peft_task: "QUESTION_ANS",
        labels: &labels,
        chat_template: None,
    };
    train(method, &o, cfg, ctl, spec, json!({}))
}
