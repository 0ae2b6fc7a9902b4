//! Batched decoding: prompts are left-padded so every row's next token lands in the same column,
//! each row keeps its own positions (`Packing::left_padded`) and never attends to its padding,
//! one KV cache serves the batch, and a row that stops leaves it (its cache rows are dropped), so
//! the remaining rows cost what they would alone. Row i draws from its own stream keyed by
//! (seed, i): its text does not depend on which other rows share the batch. Rows with the same
//! prompt (k samples of one prompt in GRPO/RLOO) share its prefill: each distinct prompt is run
//! once and its cache rows copied to its samples.

use super::{check_finite, last_logits, sample_logp, Sampling, Stop};
use crate::model::{DecoderModel, KvCache, Packing};
use crate::rng::Rng;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// One row of a batched generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The new tokens; the EOS that ended the row is the last one (`stop == Eos`).
    pub tokens: Vec<u32>,
    /// Log-probability of each token under the distribution it was drawn from (after
    /// temperature, top-k and top-p; 0 for greedy picks).
    pub logps: Vec<f32>,
    pub stop: Stop,
}

impl Sampled {
    /// The tokens of the response's text: without the EOS that ended it.
    pub fn text_tokens(&self) -> &[u32] {
        &self.tokens[..self.tokens.len() - usize::from(self.stop == Stop::Eos)]
    }
}

/// `generate_batch` over `chunk` rows at a time (memory bounds the batch), chunk c sampling from
/// the streams of seed (s.seed, c).
pub fn generate_chunked(
    model: &DecoderModel,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    chunk: usize,
) -> Result<Vec<Sampled>> {
    generate_chunked_until(model, prompts, s, eos, chunk, &|_, _| false)
}

/// `generate_chunked` with a stop condition per row (`generate_batch_until`; row indices are
/// within the chunk).
pub fn generate_chunked_until(
    model: &DecoderModel,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    chunk: usize,
    until: &(dyn Fn(usize, &[u32]) -> bool + Sync),
) -> Result<Vec<Sampled>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (c, part) in prompts.chunks(chunk.max(1)).enumerate() {
        let sc = Sampling {
            seed: Rng::keyed(&[s.seed, c as u64]).next_u64(),
            ..s.clone()
        };
        out.extend(generate_batch_until(model, part, &sc, eos, until)?);
    }
    Ok(out)
}

/// Generates after each of `prompts` in one batch (see the module doc). Row i samples from the
/// stream keyed by (s.seed, i). The batch's columns (the longest prompt, then one per step) must
/// fit the context: when they no longer do, every live row stops with `ContextFull`, so with
/// prompts of very different lengths a short one can stop before its own context is full
/// (callers that cap prompts at context − max_new_tokens never see it).
pub fn generate_batch(
    model: &DecoderModel,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
) -> Result<Vec<Sampled>> {
    generate_batch_until(model, prompts, s, eos, &|_, _| false)
}

/// `generate_batch` where row i also stops (`Stop::Sequence`) once `until(i, tokens so far)`
/// holds — stop strings of evaluation tasks.
pub fn generate_batch_until(
    model: &DecoderModel,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    until: &(dyn Fn(usize, &[u32]) -> bool + Sync),
) -> Result<Vec<Sampled>> {
    s.check()?;
    let ctx = model.context();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty after tokenization; give at least one token");
    }
    if width >= ctx {
        bail!("a prompt has {width} tokens; the model's context is {ctx}");
    }
    let dev = model.device();
    let mut out: Vec<Sampled> = prompts
        .iter()
        .map(|_| Sampled {
            tokens: Vec::new(),
            logps: Vec::new(),
            stop: Stop::MaxTokens,
        })
        .collect();
    if prompts.is_empty() || s.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut rngs: Vec<Rng> = (0..prompts.len())
        .map(|i| Rng::keyed(&[s.seed, 0x5A3F, i as u64]))
        .collect();
    // Distinct prompts, and per row the one it is.
    let mut distinct: Vec<&Vec<u32>> = Vec::new();
    let mut first: std::collections::HashMap<&[u32], u32> = Default::default();
    let mut of_row: Vec<u32> = Vec::with_capacity(prompts.len());
    for p in prompts {
        let d = *first.entry(p.as_slice()).or_insert_with(|| {
            distinct.push(p);
            (distinct.len() - 1) as u32
        });
        of_row.push(d);
    }
    // Rows still generating (indices into `prompts`), the cache row each reads (after the
    // prefill: its own), and the left padding of each cache row.
    let mut live: Vec<usize> = (0..prompts.len()).collect();
    let mut cache_row: Vec<u32> = of_row;
    let mut pads: Vec<usize> = distinct.iter().map(|p| width - p.len()).collect();
    let mut input: Vec<u32> = Vec::with_capacity(distinct.len() * width);
    for p in &distinct {
        input.extend(std::iter::repeat_n(p[0], width - p.len()));
        input.extend_from_slice(p);
    }
    let mut cols = width;
    let mut cache = KvCache::new(model.cfg.num_layers);
    let v = model.cfg.vocab_size;
    while !live.is_empty() {
        if cache.len() + cols > ctx {
            for &r in &live {
                out[r].stop = Stop::ContextFull;
            }
            break;
        }
        let n_rows = pads.len();
        let rows = Packing::left_padded(&pads, cache.len(), cols, dev)?;
        let logits = last_logits(model, input, (n_rows, cols), &mut cache, Some(&rows))?;
        check_finite(&logits, out[live[0]].tokens.len())?;
        let mut row_rngs: Vec<Rng> = live.iter().map(|&r| rngs[r].clone()).collect();
        let picks: Vec<(u32, f64)> = row_rngs
            .par_iter_mut()
            .zip(cache_row.par_iter())
            .map(|(rng, &c)| sample_logp(&logits[c as usize * v..(c as usize + 1) * v], s, rng))
            .collect();
        let (mut keep, mut next) = (Vec::new(), Vec::new());
        for (k, (&r, (id, lp))) in live.iter().zip(picks).enumerate() {
            rngs[r] = row_rngs[k].clone();
            let o = &mut out[r];
            o.tokens.push(id);
            o.logps.push(lp as f32);
            if eos.contains(&id) {
                o.stop = Stop::Eos;
            } else if until(r, &o.tokens) {
                o.stop = Stop::Sequence;
            } else if o.tokens.len() >= s.max_new_tokens {
                o.stop = Stop::MaxTokens;
            } else {
                keep.push(k as u32);
                next.push(id);
            }
        }
        let rows: Vec<u32> = keep.iter().map(|&k| cache_row[k as usize]).collect();
        let same = rows.len() == n_rows && rows.iter().enumerate().all(|(i, &c)| c == i as u32);
        if !same && !rows.is_empty() {
            cache.keep_rows(&rows)?;
        }
        pads = rows.iter().map(|&c| pads[c as usize]).collect();
        live = keep.iter().map(|&k| live[k as usize]).collect();
        cache_row = (0..live.len() as u32).collect();
        input = next;
        cols = 1;
    }
    Ok(out)
}
