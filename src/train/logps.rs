//! Sequence log-probabilities of completions: the primitive DPO, KTO, ORPO, SimPO and online RL
//! (per token: PPO, GRPO, RLOO, and their reference) stand on.
//!
//!   log π(y | x) = Σ_{t ∈ completion} log p(y_t | x, y_<t)
//!
//! Only the completion positions go through the output head: with a 49k-token vocabulary the
//! head's GEMM and the (N, V) log-softmax are most of a forward, and a prompt of 200 tokens
//! before a completion of 50 would spend 80% of them on positions whose log-probs are thrown
//! away (TRL computes every position's logits and masks afterwards).

use super::lm::Policy;
use super::reference::RefCache;
use crate::data::sft::Tokenized;
use crate::model::{DecoderModel, ForwardOpts};
use crate::peft::AdapterSwitch;
use crate::train::engine::Control;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Right-padded rows and where their completion tokens are.
pub struct SeqBatch {
    /// Inputs (B, T): each row's tokens but the last.
    pub x: Vec<u32>,
    pub b: usize,
    pub t: usize,
    /// Flat input positions `row·T + t` whose next token is a completion token, in row order.
    pub at: Vec<u32>,
    /// The completion tokens predicted there.
    pub targets: Vec<u32>,
    /// Completion tokens per row.
    pub counts: Vec<usize>,
    /// Rows that pack several sequences (completions sharing their prompt, `train::rl`).
    pub packing: Option<crate::model::Packing>,
}

impl SeqBatch {
    pub fn new(rows: &[&Tokenized], pad: u32) -> Self {
        let t = rows
            .iter()
            .map(|r| r.ids.len() - 1)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut s = SeqBatch {
            x: Vec::with_capacity(rows.len() * t),
            b: rows.len(),
            t,
            at: Vec::new(),
            targets: Vec::new(),
            counts: Vec::with_capacity(rows.len()),
            packing: None,
        };
        for (i, r) in rows.iter().enumerate() {
            let n = r.ids.len() - 1;
            s.x.extend_from_slice(&r.ids[..n]);
            s.x.extend(std::iter::repeat_n(pad, t - n));
            let mut c = 0;
            for j in 0..n {
                if r.train[j + 1] {
                    s.at.push((i * t + j) as u32);
                    s.targets.push(r.ids[j + 1]);
                    c += 1;
                }
            }
            s.counts.push(c);
        }
        s
    }

    /// Tokens the forward processes.
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }
}

/// Σ log p of each row's completion tokens, (B,), with a graph when the model has trainable
/// weights.
pub fn completion_logps(model: &DecoderModel, s: &SeqBatch) -> Result<Tensor> {
    if s.at.is_empty() {
        // No scored token in any row (e.g. a one-token completion with no prompt before it).
        return Ok(Tensor::zeros(s.b, DType::F32, model.device())?);
    }
    let h = completion_states(model, s)?;
    row_sums(&token_logps(model, &h, s, 1.0)?, &s.counts, model.device())
}

/// Final hidden states (N, C) at the N positions that predict a completion token, in `at` order
/// (a position may appear more than once: a shared prompt's last token predicts every
/// completion's first).
pub fn completion_states(model: &DecoderModel, s: &SeqBatch) -> Result<Tensor> {
    let dev = model.device();
    let x = Tensor::from_slice(&s.x, (s.b, s.t), dev)?;
    let opts = ForwardOpts {
        packing: s.packing.as_ref(),
        ..Default::default()
    };
    let h = model.hidden_states(&model.embed(&x)?, opts)?; // (B, T, C)
    let c = model.cfg.hidden_size;
    let at = Tensor::from_slice(&s.at, s.at.len(), dev)?;
    Ok(h.reshape((s.b * s.t, c))?.index_select(&at, 0)?) // (N, C)
}

/// log p of each completion token (N,) from its states `h` (N, C), under logits / `temperature`
/// (online RL scores tokens under the distribution it sampled them from, as TRL does).
pub fn token_logps(
    model: &DecoderModel,
    h: &Tensor,
    s: &SeqBatch,
    temperature: f64,
) -> Result<Tensor> {
    let mut logits = model.logits(h)?; // (N, V)
    if temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let y = Tensor::from_slice(&s.targets, s.targets.len(), model.device())?;
    crate::losses::gather_logprobs(&logits, &y) // (N,)
}

/// Sums consecutive runs of `counts` entries of `v` (N,) -> (B,), as one small matmul so the
/// gradient flows back to every token.
pub fn row_sums(v: &Tensor, counts: &[usize], dev: &Device) -> Result<Tensor> {
    let n: usize = counts.iter().sum();
    let mut m = vec![0f32; counts.len() * n];
    let mut k = 0;
    for (i, &c) in counts.iter().enumerate() {
        for j in k..k + c {
            m[i * n + j] = 1.0;
        }
        k += c;
    }
    let m = Tensor::from_vec(m, (counts.len(), n), dev)?.to_dtype(v.dtype())?;
    Ok(m.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)
}

/// Completion log-prob sums of many sequences without a graph, `batch` rows at a time.
pub fn score_all(
    model: &DecoderModel,
    seqs: &[&Tokenized],
    pad: u32,
    batch: usize,
) -> Result<Vec<f32>> {
    // Longest first keeps padding low; results go back to the input order.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
    let mut vals = vec![0f32; seqs.len()];
    for chunk in order.chunks(batch.max(1)) {
        let rows: Vec<&Tokenized> = chunk.iter().map(|&i| seqs[i]).collect();
        let sums = completion_logps(model, &SeqBatch::new(&rows, pad))?;
        let sums: Vec<f32> = sums.detach().to_dtype(DType::F32)?.to_vec1()?;
        for (&i, v) in chunk.iter().zip(sums) {
            if !v.is_finite() {
                anyhow::bail!(
                    "the log-probability of a completion is not finite ({v}): the model's weights or config are broken"
                );
            }
            vals[i] = v;
        }
    }
    Ok(vals)
}

/// Where a method's reference log-probs come from during training.
pub enum Reference {
    /// Precomputed once before training (`train::reference`), one value per sequence.
    Cached(Vec<f32>),
    /// The policy itself with its adapters switched off (LoRA: no second copy in memory).
    AdaptersOff(AdapterSwitch),
    /// A frozen copy of the model (a full fine-tune with `--ref-live`).
    Copy(Box<DecoderModel>),
}

/// How a run gets its reference: `--ref-live`, or precomputed into `--ref-cache` (by default
/// the run directory's `ref_cache/`).
pub struct RefPlan<'a> {
    pub live: bool,
    pub cache: Option<&'a Path>,
}

impl RefPlan<'_> {
    /// Rejects options that contradict each other (before any work is done).
    pub fn check(&self) -> Result<()> {
        if self.live && self.cache.is_some() {
            anyhow::bail!("ref_live computes the reference at every step; it has no ref_cache");
        }
        Ok(())
    }
}

impl Reference {
    /// The reference for `policy` as `plan` says: computed at every step, or precomputed for
    /// `seqs` (all sequences the run will score, in cache order) with the cache keyed by the
    /// `data` file and the method `what`.
    pub fn build(
        plan: &RefPlan,
        policy: &Policy,
        seqs: &[&Tokenized],
        pad: u32,
        (run_dir, data, what): (&Path, &Path, &str),
        ctl: &Control,
    ) -> Result<Self> {
        plan.check()?;
        if plan.live {
            return Self::live(policy, ctl);
        }
        let dir = match plan.cache {
            Some(d) => d.to_path_buf(),
            None => crate::outdir::entry(run_dir, "ref_cache")?,
        };
        let dir = dir.as_path();
        let cache = RefCache::new(dir, &policy.model_path, &policy.m.tok, data, seqs, what)?;
        policy.switch.set_enabled(false);
        let v = reference_logps(&cache, &policy.m.model, seqs, pad, &|s| ctl.say(s));
        policy.switch.set_enabled(true);
        Ok(Reference::Cached(v?))
    }

    /// A reference computed at every step: the policy with its adapters off (LoRA), or a frozen
    /// copy of the model (a full fine-tune).
    pub fn live(policy: &Policy, ctl: &Control) -> Result<Self> {
        Ok(match &policy.adapters {
            Some(_) => Reference::AdaptersOff(policy.switch.clone()),
            None => {
                let copy = crate::model::hf::load(&policy.model_path, &ctl.device, &|_| true)?;
                Reference::Copy(Box::new(copy.model))
            }
        })
    }

    /// `f` run on the reference model: the policy with its adapters switched off, or the frozen
    /// copy; None for a precomputed reference.
    fn with_live<T>(
        &self,
        policy: &DecoderModel,
        f: impl Fn(&DecoderModel) -> Result<T>,
    ) -> Option<Result<T>> {
        match self {
            Reference::Cached(_) => None,
            Reference::AdaptersOff(switch) => {
                switch.set_enabled(false);
                let r = f(policy);
                switch.set_enabled(true);
                Some(r)
            }
            Reference::Copy(m) => Some(f(m)),
        }
    }

    /// Per-token log-probs (N,) of a batch's completion tokens under logits / `temperature`,
    /// without a graph (a live reference only).
    pub fn token_logps(
        &self,
        policy: &DecoderModel,
        s: &SeqBatch,
        temperature: f64,
    ) -> Result<Tensor> {
        self.with_live(policy, |m| {
            Ok(token_logps(m, &completion_states(m, s)?, s, temperature)?.detach())
        })
        .unwrap_or_else(|| {
            anyhow::bail!("internal error: per-token log-probs of a cached reference")
        })
    }

    /// The reference's completion log-prob sums of a batch's rows, without a graph; `ids` are
    /// the rows' indices in the cache order.
    pub fn logps(&self, policy: &DecoderModel, s: &SeqBatch, ids: &[usize]) -> Result<Tensor> {
        if let Reference::Cached(v) = self {
            let r: Vec<f32> = ids.iter().map(|&i| v[i]).collect();
            return Ok(Tensor::from_vec(r, ids.len(), policy.device())?);
        }
        self.with_live(policy, |m| Ok(completion_logps(m, s)?.detach()))
            .unwrap_or_else(|| anyhow::bail!("internal error: no reference"))
    }
}

/// Reference log-prob sums of `seqs`: from the cache when its key matches, else computed with
/// `model` (adapters off when it has them: the caller switches) and stored.
pub fn reference_logps(
    cache: &RefCache,
    model: &DecoderModel,
    seqs: &[&Tokenized],
    pad: u32,
    say: &dyn Fn(&str),
) -> Result<Vec<f32>> {
    if let Some(v) = cache.load(seqs.len())? {
        say(&format!(
            "reference log-probs: {} sequences read from {}",
            v.len(),
            cache.path.display()
        ));
        return Ok(v);
    }
    let t0 = std::time::Instant::now();
    let v = score_all(model, seqs, pad, 8)?;
    if crate::dist::world().writes() {
        cache.store(&v)?;
    }
    say(&format!(
        "reference log-probs: {} sequences computed in {:.1}s, cached in {}",
        v.len(),
        t0.elapsed().as_secs_f64(),
        cache.path.display()
    ));
    Ok(v)
}
