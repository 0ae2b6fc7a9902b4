//! Log-likelihood of continuations after contexts — lm-evaluation-harness's `loglikelihood`
//! requests — batched, with the shared work done once:
//!
//! - all continuations of one context (the choices of an item) share one row: the context once,
//!   then each continuation seeing the context and itself (`Packing::shared_prompts`), so an
//!   item with four choices costs one context, not four;
//! - requests whose contexts start with the same prefix (a few-shot block, a task description)
//!   run that prefix once into a KV cache that every row of the group continues from;
//! - logits are computed only where a continuation token is predicted, not over the context.
//!
//! Semantics are lm-eval's: log p(continuation | context) summed over the continuation's tokens,
//! and whether greedy decoding would have produced it. The last continuation token is never fed
//! (nothing is predicted from it), so a request fits when context + continuation ≤ context + 1
//! window, as in lm-eval. Deviation: when a context must be cut to fit, it is cut for the
//! longest continuation of the item (lm-eval cuts per continuation, keeping a little more for
//! shorter ones); the truncated count is reported.

use crate::model::{DecoderModel, ForwardOpts, KvCache, Packing};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// One context and the continuations to score after it.
#[derive(Debug, Clone)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    /// Leading context tokens other requests share (a few-shot prefix): run once per group.
    pub prefix_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Σ log p(token) over the continuation.
    pub logp: f64,
    /// Every continuation token was the argmax.
    pub greedy: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// Row tokens per forward batch (memory bound).
    pub batch_tokens: usize,
    /// Run shared prefixes once into a cache (off: every row holds its whole context).
    pub reuse_prefix: bool,
    /// Put all continuations of a context in one row (off: one row per continuation).
    pub share_context: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            batch_tokens: 4096,
            reuse_prefix: true,
            share_context: true,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Tokens run through the model.
    pub tokens: usize,
    /// Requests whose context was cut to fit the window.
    pub truncated: usize,
}

/// One row: a context suffix (after the group's cached prefix) and continuation segments.
struct Row {
    req: usize,
    /// Which continuations of the request (all, or one when contexts are not shared).
    conts: Vec<usize>,
    ctx: Vec<u32>,
}

/// Scores every request; out[r][j] belongs to request r's continuation j.
pub fn loglikelihoods(
    model: &DecoderModel,
    reqs: &[Request],
    o: &Opts,
) -> Result<(Vec<Vec<Scored>>, Stats)> {
    let window = model.context();
    let mut stats = Stats::default();
    // Contexts cut to fit: keep the last `window + 1 − longest` tokens.
    let mut ctxs: Vec<(usize, &[u32])> = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let longest = r.continuations.iter().map(Vec::len).max().unwrap_or(0);
        if r.continuations.iter().any(Vec::is_empty) {
            bail!("request {i}: a continuation has no tokens");
        }
        if r.context.is_empty() {
            bail!("request {i}: the context has no tokens (give a prefix token)");
        }
        if longest > window {
            bail!("request {i}: a continuation of {longest} tokens exceeds the model's context of {window}");
        }
        let v = model.cfg.vocab_size;
        if let Some(&t) = r
            .context
            .iter()
            .chain(r.continuations.iter().flatten())
            .find(|&&t| t as usize >= v)
        {
            bail!("request {i}: token id {t} is outside the model's vocabulary of {v}");
        }
        let keep = (window + 1 - longest).min(r.context.len());
        if keep < r.context.len() {
            stats.truncated += 1;
        }
        let cut = r.context.len() - keep;
        // A cached prefix puts its tokens and the row's columns in one span that must fit the
        // window, while a row alone only needs its positions to: no reuse for rows that long.
        let fed = |j: usize| r.continuations[j].len() - 1;
        let row = keep
            + if o.share_context {
                (0..r.continuations.len()).map(fed).sum::<usize>()
            } else {
                (0..r.continuations.len()).map(fed).max().unwrap_or(0)
            };
        let prefix = if o.reuse_prefix && cut == 0 && row <= window {
            r.prefix_len.min(keep.saturating_sub(1))
        } else {
            0
        };
        ctxs.push((prefix, &r.context[cut..]));
    }
    // Groups by shared prefix; within a group, longest rows first (less padding per batch).
    let mut groups: HashMap<&[u32], Vec<usize>> = HashMap::new();
    for (i, (p, c)) in ctxs.iter().enumerate() {
        groups.entry(&c[..*p]).or_default().push(i);
    }
    let mut groups: Vec<(&[u32], Vec<usize>)> = groups.into_iter().collect();
    groups.sort_by_key(|(_, v)| v[0]);
    let mut out: Vec<Vec<Scored>> = reqs
        .iter()
        .map(|r| {
            vec![
                Scored {
                    logp: 0.0,
                    greedy: true
                };
                r.continuations.len()
            ]
        })
        .collect();
    for (prefix, members) in groups {
        let p = prefix.len();
        let mut rows: Vec<Row> = Vec::new();
        for &i in &members {
            let ctx = ctxs[i].1[p..].to_vec();
            let n = reqs[i].continuations.len();
            if o.share_context {
                rows.push(Row {
                    req: i,
                    conts: (0..n).collect(),
                    ctx,
                });
            } else {
                rows.extend((0..n).map(|j| Row {
                    req: i,
                    conts: vec![j],
                    ctx: ctx.clone(),
                }));
            }
        }
        let width = |r: &Row| -> usize {
            r.ctx.len()
                + r.conts
                    .iter()
                    .map(|&j| reqs[r.req].continuations[j].len() - 1)
                    .sum::<usize>()
        };
        rows.sort_by_key(|r| std::cmp::Reverse(width(r)));
        // The prefix once (batch of one), copied to each batch's rows.
        let base = if p > 0 {
            let mut c = KvCache::new(model.cfg.num_layers);
            let ids = Tensor::from_slice(prefix, (1, p), model.device())?;
            let opts = ForwardOpts {
                cache: Some(&mut c),
                ..Default::default()
            };
            model.hidden_states(&model.embed(&ids)?, opts)?;
            stats.tokens += p;
            Some(c)
        } else {
            None
        };
        let mut start = 0;
        while start < rows.len() {
            let t = width(&rows[start]).max(1);
            // Each row also holds a copy of the cached prefix's keys and values: count them
            // (at a discount, they are not run through the layers) so memory stays bounded.
            let n = (o.batch_tokens / t)
                .min(o.batch_tokens.saturating_mul(2) / (t + p))
                .clamp(1, 64)
                .min(rows.len() - start);
            let batch = &rows[start..start + n];
            start += n;
            stats.tokens += n * t;
            score_batch(model, reqs, batch, t, p, base.as_ref(), &mut out)?;
        }
    }
    Ok((out, stats))
}

/// (request, continuation, target token) read from one logit row.
type Wanted = (usize, usize, u32);

/// One forward over `batch` (rows of width ≤ t after `p` cached tokens) and the read-out of
/// every continuation token's log-probability.
fn score_batch(
    model: &DecoderModel,
    reqs: &[Request],
    batch: &[Row],
    t: usize,
    p: usize,
    base: Option<&KvCache>,
    out: &mut [Vec<Scored>],
) -> Result<()> {
    let dev = model.device();
    let b = batch.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut groups = Vec::with_capacity(b);
    // Per needed logit row: (flat position, [(request, continuation, target token)]).
    let mut wanted: Vec<(usize, Vec<Wanted>)> = Vec::new();
    for (bi, r) in batch.iter().enumerate() {
        let conts = &reqs[r.req].continuations;
        let row_start = ids.len();
        ids.extend_from_slice(&r.ctx);
        let c = r.ctx.len();
        // The last context token predicts every continuation's first token.
        wanted.push((
            bi * t + c - 1,
            r.conts.iter().map(|&j| (r.req, j, conts[j][0])).collect(),
        ));
        let mut lens = Vec::with_capacity(r.conts.len());
        for &j in &r.conts {
            let seg = &conts[j][..conts[j].len() - 1];
            let s = ids.len() - row_start;
            for (k, _) in seg.iter().enumerate() {
                wanted.push((bi * t + s + k, vec![(r.req, j, conts[j][k + 1])]));
            }
            ids.extend_from_slice(seg);
            lens.push(seg.len());
        }
        let used = ids.len() - row_start;
        ids.extend(std::iter::repeat_n(r.ctx[0], t - used));
        groups.push((c, lens));
    }
    let packing = Packing::shared_prompts_after(p, &groups, t, dev)?;
    let mut cache = base.cloned();
    if let Some(c) = cache.as_mut() {
        c.keep_rows(&vec![0u32; b])?;
    }
    let x = Tensor::from_vec(ids, (b, t), dev)?;
    let opts = ForwardOpts {
        cache: cache.as_mut(),
        packing: Some(&packing),
        ..Default::default()
    };
    let h = model.hidden_states(&model.embed(&x)?, opts)?; // (B, T, C)
    let c = model.cfg.hidden_size;
    let idx: Vec<u32> = wanted.iter().map(|(i, _)| *i as u32).collect();
    let idx = Tensor::from_vec(idx, wanted.len(), dev)?;
    let sel = h.reshape((b * t, c))?.index_select(&idx, 0)?; // (N, C)
    let v = model.cfg.vocab_size;
    let logits: Vec<f32> = model
        .logits(&sel)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    // (log-sum-exp, argmax) per logit row.
    let rows: Vec<(f64, u32)> = logits
        .par_chunks(v)
        .map(|row| {
            let (mut m, mut am) = (f32::NEG_INFINITY, 0u32);
            for (i, &x) in row.iter().enumerate() {
                if x > m {
                    m = x;
                    am = i as u32;
                }
            }
            let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            (m as f64 + s.ln(), am)
        })
        .collect();
    for (k, (_, targets)) in wanted.iter().enumerate() {
        let (lse, am) = rows[k];
        for &(r, j, tok) in targets {
            let x = logits[k * v + tok as usize] as f64;
            if !x.is_finite() || !lse.is_finite() {
                bail!("the model's logits are not finite: its weights or config are broken");
            }
            let s = &mut out[r][j];
            s.logp += x - lse;
            s.greedy &= am == tok;
        }
    }
    Ok(())
}
