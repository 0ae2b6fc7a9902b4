//! Self-attention of the decoder: GPT-2's fused `c_attn` or separate q/k/v projections (GQA),
//! RoPE, a KV cache, prefix keys/values (prefix tuning), key padding and packed rows.
//!
//!   Attn(x) = softmax(QKᵀ/√d + mask)·V · W_o,   Q, K, V = x·W_q, x·W_k, x·W_v (K, V shared by
//!   n_head / n_kv query heads)
//!
//! On the CPU in f32 the fused kernel (`kernels::attention`) runs it; `composite` is the
//! reference it is tested against and the path for CUDA, other dtypes and key padding.

use super::config::{Family, ModelConfig};
use super::layers::{causal_mask, softmax_last, Builder, Layout, Linear, Rope};
use super::packing::Packing;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// What one layer's attention needs beyond its input, built per layer by the model's forward.
pub(super) struct LayerCtx<'a> {
    pub(super) rope: Option<&'a Rope>,
    /// Packed rows: rotary tables at the rows' positions, built once per forward.
    pub(super) rope_at: Option<&'a (Tensor, Tensor)>,
    /// Packed rows on the composite path: the cross-example mask, built by the first layer.
    pub(super) packing_mask: &'a std::cell::RefCell<Option<Tensor>>,
    /// Cached positions (keys before this call's).
    pub(super) past: usize,
    /// Position of this call's first token: `past` after any virtual tokens.
    pub(super) pos0: usize,
    pub(super) cache: Option<&'a mut Option<(Tensor, Tensor)>>,
    /// The cache keeps the autograd graph (prompt tuning's virtual keys/values).
    pub(super) keep_graph: bool,
    pub(super) prefix: Option<&'a (Tensor, Tensor)>,
    pub(super) key_padding: Option<&'a Tensor>,
    pub(super) packing: Option<&'a Packing>,
}

#[derive(Clone)]
enum Qkv {
    /// GPT-2's `c_attn`: one (C, 3C) Conv1D.
    Fused(Linear),
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
}

pub struct Attention {
    qkv: Qkv,
    o: Linear,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    window: Option<usize>,
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Default, Clone)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>, // (B, S, n_kv, hd) each
    pub(super) len: usize,
    /// Virtual tokens' keys/values, computed at the sequence's first call.
    pub(super) prefix: Option<Vec<(Tensor, Tensor)>>,
    pub(super) keep_graph: bool,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            prefix: None,
            keep_graph: false,
        }
    }
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only batch rows `rows` (in that order): finished sequences leave the batch.
    pub fn keep_rows(&mut self, rows: &[u32]) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::from_slice(rows, rows.len(), k.device())?;
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        Ok(())
    }

    /// Adds `other`'s rows after this cache's (continuous batching: a prefilled request joins
    /// running ones). Rows are left-padded (zero keys and values the padding mask hides) to the
    /// longer of the two; returns the columns added before this cache's rows and before
    /// `other`'s. Both must come from the same model and adapters (virtual tokens are shared).
    pub fn append_rows(&mut self, other: KvCache) -> Result<(usize, usize)> {
        if self.layers.iter().all(Option::is_none) {
            *self = other;
            return Ok((0, 0));
        }
        let width = self.len.max(other.len);
        let (pad_self, pad_other) = (width - self.len, width - other.len);
        let left = |t: &Tensor, n: usize| -> Result<Tensor> {
            if n == 0 {
                return Ok(t.clone());
            }
            let (b, _, h, d) = t.dims4()?; // (B, S, n_kv, hd)
            let z = Tensor::zeros((b, n, h, d), t.dtype(), t.device())?;
            Ok(Tensor::cat(&[&z, t], 1)?)
        };
        if self.layers.len() != other.layers.len() {
            bail!("joining KV caches of different depths");
        }
        // All layers built before any is replaced: a failure leaves this cache as it was.
        let mut joined = Vec::with_capacity(self.layers.len());
        for (mine, theirs) in self.layers.iter().zip(&other.layers) {
            let (Some((k, v)), Some((k2, v2))) = (mine, theirs) else {
                bail!("joining KV caches of different depths");
            };
            joined.push(Some((
                Tensor::cat(&[&left(k, pad_self)?, &left(k2, pad_other)?], 0)?,
                Tensor::cat(&[&left(v, pad_self)?, &left(v2, pad_other)?], 0)?,
            )));
        }
        self.layers = joined;
        self.len = width;
        Ok((pad_self, pad_other))
    }

    /// Drops the first `n` columns of every row (padding no row needs any more).
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n > self.len {
            bail!("dropping {n} of {} cached columns", self.len);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(1, n, self.len - n)?;
            *v = v.narrow(1, n, self.len - n)?;
        }
        self.len -= n;
        Ok(())
    }
}

impl Attention {
    pub(super) fn new(b: &mut Builder, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let (c, hd) = (cfg.hidden_size, cfg.head_dim);
        let resid_std = 0.02 / (2.0 * cfg.num_layers as f64).sqrt();
        let (qkv, o) = match cfg.family {
            Family::Gpt2 => {
                let p = format!("transformer.h.{i}.attn");
                let fused = Linear::new(
                    b,
                    &format!("{p}.c_attn"),
                    c,
                    3 * c,
                    true,
                    Layout::InOut,
                    0.02,
                )?;
                let o = Linear::new(
                    b,
                    &format!("{p}.c_proj"),
                    c,
                    c,
                    true,
                    Layout::InOut,
                    resid_std,
                )?;
                (Qkv::Fused(fused), o)
            }
            Family::Llama => {
                let p = format!("model.layers.{i}.self_attn");
                let kvd = cfg.num_kv_heads * hd;
                let qd = cfg.num_heads * hd;
                let q = Linear::new(
                    b,
                    &format!("{p}.q_proj"),
                    c,
                    qd,
                    cfg.qkv_bias,
                    Layout::OutIn,
                    0.02,
                )?;
                let k = Linear::new(
                    b,
                    &format!("{p}.k_proj"),
                    c,
                    kvd,
                    cfg.qkv_bias,
                    Layout::OutIn,
                    0.02,
                )?;
                let v = Linear::new(
                    b,
                    &format!("{p}.v_proj"),
                    c,
                    kvd,
                    cfg.qkv_bias,
                    Layout::OutIn,
                    0.02,
                )?;
                let o = Linear::new(
                    b,
                    &format!("{p}.o_proj"),
                    qd,
                    c,
                    cfg.o_bias,
                    Layout::OutIn,
                    resid_std,
                )?;
                (Qkv::Separate { q, k, v }, o)
            }
        };
        Ok(Self {
            qkv,
            o,
            n_head: cfg.num_heads,
            n_kv: cfg.num_kv_heads,
            hd,
            window: cfg.sliding_window.get(i).copied().flatten(),
        })
    }

    pub(super) fn detached(&self) -> Self {
        Self {
            qkv: match &self.qkv {
                Qkv::Fused(l) => Qkv::Fused(l.detached()),
                Qkv::Separate { q, k, v } => Qkv::Separate {
                    q: q.detached(),
                    k: k.detached(),
                    v: v.detached(),
                },
            },
            o: self.o.detached(),
            ..*self
        }
    }

    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.qkv {
            Qkv::Fused(l) => vec![l],
            Qkv::Separate { q, k, v } => vec![q, k, v],
        };
        v.push(&self.o);
        v
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.qkv {
            Qkv::Fused(l) => vec![l],
            Qkv::Separate { q, k, v } => vec![q, k, v],
        };
        v.push(&mut self.o);
        v
    }

    pub(super) fn forward(&self, x: &Tensor, ctx: &mut LayerCtx) -> Result<Tensor> {
        let (bsz, t, _) = x.dims3()?; // (B, T, C)
        let (nh, nkv, hd) = (self.n_head, self.n_kv, self.hd);
        let scale = 1.0 / (hd as f64).sqrt();
        let plain = ctx.rope.is_none()
            && ctx.cache.is_none()
            && ctx.prefix.is_none()
            && ctx.key_padding.is_none();
        let spec = |prefix: usize, past: usize| crate::kernels::attention::Spec {
            scale: scale as f32,
            prefix,
            past,
            window: self.window,
        };
        let starts = || ctx.packing.map(|p| p.segs());
        // (B, T, n, hd) views of the projections: no transposes, no copies.
        let (mut q, mut k, mut v) = match &self.qkv {
            Qkv::Fused(l) => {
                let y = l.forward(x)?.reshape((bsz, t, 3, nh, hd))?;
                if plain && crate::kernels::fusable(&[&y]) {
                    let y = crate::kernels::attention::attention_qkv(&y, spec(0, 0), starts())?; // (B, T, H, hd)
                    return self.o.forward(&y.reshape((bsz, t, nh * hd))?);
                }
                let part = |i: usize| -> Result<Tensor> { Ok(y.narrow(2, i, 1)?.squeeze(2)?) };
                (part(0)?, part(1)?, part(2)?)
            }
            Qkv::Separate { q, k, v } => (
                q.forward(x)?.reshape((bsz, t, nh, hd))?,
                k.forward(x)?.reshape((bsz, t, nkv, hd))?,
                v.forward(x)?.reshape((bsz, t, nkv, hd))?,
            ),
        };
        if let Some(rope) = ctx.rope {
            match ctx.rope_at {
                Some((cos, sin)) => {
                    q = rope.rotate(&q, cos, sin)?;
                    k = rope.rotate(&k, cos, sin)?;
                }
                None => {
                    q = rope.apply(&q, ctx.pos0)?;
                    k = rope.apply(&k, ctx.pos0)?;
                }
            }
        }
        if let Some(slot) = ctx.cache.as_deref_mut() {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(&[&pk, &k], 1)?;
                v = Tensor::cat(&[&pv, &v], 1)?;
            }
            // Detached: a cache is for decoding, and would otherwise keep every step's graph alive.
            *slot = Some(if ctx.keep_graph {
                (k.clone(), v.clone())
            } else {
                (k.detach(), v.detach())
            });
        }
        let n_prefix = match ctx.prefix {
            Some((pk, pv)) => {
                let p = pk.dim(2)?;
                // (1 or B, n_kv, P, hd) -> (B, P, n_kv, hd)
                let expand = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.transpose(1, 2)?.broadcast_as((bsz, p, nkv, hd))?)
                };
                k = Tensor::cat(&[&expand(pk)?, &k], 1)?;
                v = Tensor::cat(&[&expand(pv)?, &v], 1)?;
                p
            }
            None => 0,
        };
        let y = if ctx.key_padding.is_none() && crate::kernels::fusable(&[&q, &k, &v]) {
            let spec = spec(n_prefix, ctx.past);
            crate::kernels::attention::attention_packed(&q, &k, &v, spec, starts())?
        // (B, T, H, hd)
        } else {
            self.composite(&q, &k, &v, n_prefix, ctx)?
        };
        self.o.forward(&y.reshape((bsz, t, nh * hd))?)
    }

    /// The reference: explicit scores, additive mask, softmax, ·V. q (B, T, H, hd),
    /// k and v (B, S, n_kv, hd) -> (B, T, H, hd).
    fn composite(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n_prefix: usize,
        ctx: &LayerCtx,
    ) -> Result<Tensor> {
        let (bsz, t, nh, hd) = q.dims4()?;
        let (_, s, nkv, _) = k.dims4()?;
        // Grouped-query attention: each kv head serves n_head / n_kv query heads.
        let rep = nh / nkv;
        let heads = |x: &Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?; // (B, n_kv, S, hd)
            if rep == 1 {
                return Ok(x.contiguous()?);
            }
            Ok(x.unsqueeze(2)?
                .broadcast_as((bsz, nkv, rep, s, hd))?
                .reshape((bsz, nh, s, hd))?)
        };
        let (k, v) = (heads(k)?, heads(v)?);
        let q = q.transpose(1, 2)?.contiguous()?; // (B, H, T, hd)
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?; // (B, H, T, S)
        let mut mask = causal_mask(t, ctx.past, n_prefix, self.window, q.device())?; // (T, S)
        if let Some(pad) = ctx.key_padding {
            mask = padding_mask(&mask, pad, n_prefix)?; // (B, 1, T, S)
        }
        if let Some(p) = ctx.packing {
            let mut cached = ctx.packing_mask.borrow_mut();
            if cached.is_none() {
                *cached = Some(p.mask(n_prefix, q.device())?);
            }
            if let Some(m) = cached.as_ref() {
                mask = mask.broadcast_add(m)?; // (B, 1, T, S)
            }
        }
        let att = softmax_last(&att.broadcast_add(&mask)?)?;
        Ok(att.matmul(&v)?.transpose(1, 2)?) // (B, T, H, hd)
    }
}

/// Combines a (T, S) causal mask with a (B, past+T) key mask of 1 (keep) / 0 (padding).
fn padding_mask(mask: &Tensor, keep: &Tensor, n_prefix: usize) -> Result<Tensor> {
    let (bsz, len) = keep.dims2()?;
    let (t, s) = mask.dims2()?;
    if len + n_prefix != s {
        bail!(
            "attention mask covers {len} positions but the keys span {}",
            s - n_prefix
        );
    }
    let keep = keep.to_dtype(DType::F32)?;
    let keep = if n_prefix > 0 {
        Tensor::cat(
            &[
                &Tensor::ones((bsz, n_prefix), DType::F32, keep.device())?,
                &keep,
            ],
            1,
        )?
    } else {
        keep
    };
    // 0 where kept, f32::MIN where padded (MIN + MIN saturates to -inf only where the causal
    // mask already hides the key, so rows never turn NaN).
    let pad = ((keep - 1.0)? * -(f32::MIN as f64))?.reshape((bsz, 1, 1, s))?;
    Ok(mask
        .reshape((1, 1, t, s))?
        .broadcast_add(&pad)?
        .maximum(f32::MIN as f64)?)
}
