//! Autoregressive sampling with a KV cache: the prompt is run once, then one token per step.
//! Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus,
//! Holtzman et al. 2020) filtering, drawn from a seeded stream (same seed → same text).
//!
//! `batch`: many prompts decoded at once (rollouts of online RL, candidates to judge); `file`:
//! `lmforge generate --prompts FILE`, a prompt file to JSONL responses with throughput.

mod batch;
pub mod file;

pub use batch::{
    generate_batch, generate_batch_until, generate_chunked, generate_chunked_until, Sampled,
};

use crate::model::{DecoderModel, ForwardOpts, KvCache, Packing};
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 100,
            temperature: 0.8,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Eos,
    MaxTokens,
    ContextFull,
    /// A caller's stop condition (a stop string appeared).
    Sequence,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::MaxTokens => "max_tokens",
            Stop::ContextFull => "context_full",
            Stop::Sequence => "stop_sequence",
        }
    }
}

impl Sampling {
    pub fn check(&self) -> Result<()> {
        if self.temperature.is_nan()
            || self.temperature < 0.0
            || self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0))
        {
            bail!("temperature must be >= 0 and top_p in (0, 1]");
        }
        Ok(())
    }
}

/// Generates after `prompt`, calling `on_token` for each new token (EOS excluded).
pub fn generate(
    model: &DecoderModel,
    prompt: &[u32],
    s: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, Stop)> {
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization; give at least one token");
    }
    s.check()?;
    let ctx = model.context();
    if prompt.len() >= ctx {
        bail!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        );
    }
    let mut cache = KvCache::new(model.cfg.num_layers);
    let mut rng = Rng::keyed(&[s.seed, 0x5A3F]);
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    loop {
        if out.len() >= s.max_new_tokens {
            return Ok((out, Stop::MaxTokens));
        }
        if cache.len() + input.len() > ctx {
            return Ok((out, Stop::ContextFull));
        }
        let n = input.len();
        let logits = last_logits(model, input, (1, n), &mut cache, None)?;
        check_finite(&logits, out.len())?;
        let next = sample(&logits, s, &mut rng);
        if eos.contains(&next) {
            return Ok((out, Stop::Eos));
        }
        on_token(next)?;
        out.push(next);
        input = vec![next];
    }
}

/// One decoding forward: `ids` (rows × cols, row-major) after what `cache` holds, with
/// `packing` for left-padded rows; the logits of each row's last column, rows × vocab in f32.
pub(crate) fn last_logits(
    model: &DecoderModel,
    ids: Vec<u32>,
    (rows, cols): (usize, usize),
    cache: &mut KvCache,
    packing: Option<&Packing>,
) -> Result<Vec<f32>> {
    let ids = Tensor::from_vec(ids, (rows, cols), model.device())?;
    let opts = ForwardOpts {
        cache: Some(cache),
        packing,
        ..Default::default()
    };
    let h = model.hidden_states(&model.embed(&ids)?, opts)?;
    let last = h.narrow(1, cols - 1, 1)?;
    Ok(model
        .logits(&last)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()?)
}

pub(crate) fn check_finite(logits: &[f32], done: usize) -> Result<()> {
    if let Some(i) = logits.iter().position(|v| v.is_nan()) {
        bail!(
            "the model's logits are not finite (NaN at token id {i}, after {done} generated tokens): its weights or config (norm epsilon, RoPE base) are broken"
        );
    }
    Ok(())
}

/// Picks a token id from raw logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    sample_logp(logits, s, rng).0
}

/// Picks a token id from raw logits; also returns its log-probability under the distribution
/// it was drawn from.
pub fn sample_logp(logits: &[f32], s: &Sampling, rng: &mut Rng) -> (u32, f64) {
    if s.temperature == 0.0 {
        return (argmax(logits), 0.0);
    }
    if s.top_k.is_none_or(|k| k == 0 || k >= logits.len()) && s.top_p.is_none_or(|p| p >= 1.0) {
        // No filter: no sort of the vocabulary (a batch of 32 rows × 49k ids per step), and
        // the exponentials vectorised in f32.
        let inv = (1.0 / s.temperature) as f32;
        let mut w: Vec<f32> = logits.iter().map(|&x| x * inv).collect();
        let max = crate::kernels::vmath::max(&w);
        let total = crate::kernels::vmath::exp_shift_sum(&mut w, max) as f64;
        let mut u = rng.next_f64() * total;
        let mut pick = argmax(logits) as usize;
        for (i, &p) in w.iter().enumerate() {
            let p = p as f64;
            if u < p && p > 0.0 {
                pick = i;
                break;
            }
            u -= p;
        }
        return (pick as u32, (w[pick] as f64 / total).ln());
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        idx.truncate(k);
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = s.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return (idx[i] as u32, p.ln());
        }
        u -= p;
    }
    let last = probs.len() - 1;
    (idx[last] as u32, probs[last].max(f64::MIN_POSITIVE).ln())
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        let greedy = Sampling {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &top1, &mut rng) == 1));
        let top2 = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        assert!((0..200).all(|_| matches!(sample(&logits, &top2, &mut rng), 1 | 3)));
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: Some(0.3),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &nucleus, &mut rng) == 1));
    }
}
