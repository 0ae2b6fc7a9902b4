//! Perplexity of a text under a model, as transformers' sliding-window recipe computes it:
//! windows of the model's context advance by `stride`; each window scores only the tokens no
//! earlier window scored, with the tokens before them as context. With `stride = ctx` windows
//! share one token (fast, pessimistic); smaller strides give each token more context.
//! `score_rolling` is lm-evaluation-harness's rolling windows (the eval harness's perplexity
//! tasks) on the same window scorer.

use crate::model::{DecoderModel, ForwardOpts};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct Score {
    /// Tokens predicted (all but the first).
    pub tokens: usize,
    /// Mean negative log-likelihood in nats.
    pub nll: f64,
}

impl Score {
    pub fn ppl(&self) -> f64 {
        self.nll.exp()
    }
}

/// Perplexity as lmforge reports it for a whole text (forgetting reports): windows of the
/// model's context, at most 512 tokens, advancing by half a window.
pub fn score_text_ids(model: &DecoderModel, ids: &[u32]) -> Result<Score> {
    let w = model.context().min(512);
    score_ids(model, ids, w, (w / 2).max(1))
}

/// Scores `ids` with windows of at most `window` tokens advancing by `stride`.
pub fn score_ids(model: &DecoderModel, ids: &[u32], window: usize, stride: usize) -> Result<Score> {
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s); scoring needs at least 2",
            ids.len()
        );
    }
    if stride == 0 || stride > window || window < 2 {
        bail!("window must be at least 2 and stride in 1..={window}");
    }
    let mut total = 0f64;
    let mut count = 0usize;
    // `done` = index of the last token already scored (token 0 is never predicted).
    let mut done = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(ids.len());
        // Score the targets after `done`: the window's last end − 1 − done tokens.
        let lp = window_logps(model, &ids[begin..end], end - 1 - done, begin)?;
        total -= lp.iter().map(|&v| v as f64).sum::<f64>();
        count += lp.len();
        done = end - 1;
        if end == ids.len() {
            break;
        }
        // A window cannot predict its own first token, so the next one starts no later than
        // the last token scored: with `stride = window` windows share exactly one token.
        begin = (begin + stride).min(end - 1);
    }
    Ok(Score {
        tokens: count,
        nll: total / count as f64,
    })
}

/// lm-evaluation-harness's `loglikelihood_rolling`: every token of `ids` predicted once, the
/// first after `prefix` (BOS/EOS), in windows of the model's context; each later window is full
/// length, reaching back as far as it can, and scores only tokens no window scored before.
pub fn score_rolling(model: &DecoderModel, ids: &[u32], prefix: u32) -> Result<Score> {
    if ids.is_empty() {
        bail!("the document has no tokens");
    }
    let len = model.context();
    let first = len.min(ids.len());
    let mut x = Vec::with_capacity(first + 1);
    x.push(prefix);
    x.extend_from_slice(&ids[..first]);
    let lp = window_logps(model, &x, first, 0)?;
    let mut total = -lp.iter().map(|&v| v as f64).sum::<f64>();
    let mut done = first;
    while done < ids.len() {
        let n = (ids.len() - done).min(len);
        let end = done + n;
        // Input ids[end − len − 1 .. end − 1] predicts ids[end − len .. end]; keep the last n.
        let lp = window_logps(model, &ids[end - len - 1..end], n, end - len - 1)?;
        total -= lp.iter().map(|&v| v as f64).sum::<f64>();
        done = end;
    }
    Ok(Score {
        tokens: ids.len(),
        nll: total / ids.len() as f64,
    })
}

/// log p(x[j] | x[..j]) for the last `last` tokens of `x`; `x` minus its final token is fed
/// (nothing is predicted from it), so a window may hold the model's context + 1 tokens.
/// `offset` places the window in the text, for errors.
fn window_logps(model: &DecoderModel, x: &[u32], last: usize, offset: usize) -> Result<Vec<f32>> {
    let n = x.len();
    if last == 0 {
        return Ok(Vec::new());
    }
    let dev = model.device();
    let input = Tensor::from_slice(&x[..n - 1], (1, n - 1), dev)?;
    let h = model.hidden_states(&model.embed(&input)?, ForwardOpts::default())?;
    let logits = model.logits(&h.narrow(1, n - 1 - last, last)?)?;
    let targets = Tensor::from_slice(&x[n - last..], (1, last), dev)?;
    let lp: Vec<f32> = crate::losses::gather_logprobs(&logits, &targets)?
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    if let Some(j) = lp.iter().position(|v| !v.is_finite()) {
        bail!(
            "the model's log-probability of token {} is not finite ({}): its weights or config (norm epsilon, RoPE base) are broken",
            offset + n - last + j,
            lp[j]
        );
    }
    Ok(lp)
}

/// `--forgetting-eval`: a text's perplexity under the model before training, then after. The
/// caller says how to score (a decoder's LM head, or a task body's untouched one).
pub struct Forgetting {
    ids: Vec<u32>,
    pub before: Score,
}

impl Forgetting {
    /// The baseline, scored now; None without a file.
    pub fn start(
        path: Option<&Path>,
        tok: &crate::tokenizer::Tok,
        score: impl Fn(&[u32]) -> Result<Score>,
    ) -> Result<Option<Self>> {
        let Some(p) = path else { return Ok(None) };
        let ids = crate::data::encode_file(p, tok)?;
        if ids.len() < 2 {
            bail!("{}: too short to measure perplexity on", p.display());
        }
        if !crate::dist::world().writes() {
            // Data-parallel ranks > 0 write no report.
            return Ok(None);
        }
        let before = score(&ids)?;
        Ok(Some(Self { ids, before }))
    }

    pub fn after(&self, score: impl Fn(&[u32]) -> Result<Score>) -> Result<Score> {
        score(&self.ids)
    }

    /// (perplexity before, after).
    pub fn ppl(&self, score: impl Fn(&[u32]) -> Result<Score>) -> Result<(f64, f64)> {
        Ok((self.before.ppl(), self.after(score)?.ppl()))
    }
}
