//! Perplexity of a text under a model, as transformers' sliding-window recipe computes it:
//! windows of the model's context advance by `stride`; each window scores only the tokens no
//! earlier window scored, with the tokens before them as context. With `stride = ctx` windows
//! share one token (fast, pessimistic); smaller strides give each token more context.

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
    let w = model.cfg.max_position_embeddings.min(512);
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
    if stride == 0 || stride > window {
        bail!("stride must be in 1..={window}");
    }
    let dev = model.device();
    let mut total = 0f64;
    let mut count = 0usize;
    // `done` = index of the last token already scored (token 0 is never predicted).
    let mut done = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(ids.len());
        let x = Tensor::from_slice(&ids[begin..end], (1, end - begin), dev)?;
        let lp: Vec<f32> = model
            .token_logprobs(&x, ForwardOpts::default())?
            .squeeze(0)?
            .to_vec1()?;
        if let Some(j) = lp.iter().position(|v| !v.is_finite()) {
            bail!(
                "the model's log-probability of token {} is not finite ({}): its weights or config (norm epsilon, RoPE base) are broken",
                begin + j + 1,
                lp[j]
            );
        }
        // lp[j] is log p(ids[begin + j + 1]); score the targets after `done`.
        for (j, v) in lp.iter().enumerate() {
            if begin + j + 1 > done {
                total -= *v as f64;
                count += 1;
            }
        }
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
