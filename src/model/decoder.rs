//! The causal decoder: GPT-2 (Radford et al. 2019) and the Llama family (Touvron et al. 2023)
//! in one model, read bottom-up: attention, MLP, block, model.
//!
//!   GPT-2:  h = x + Attn(LN(x)),  out = h + W₂·gelu(W₁·LN(h)),  learned positions, tied head
//!   Llama:  h = x + Attn(RMS(x)), out = h + W_d·(silu(W_g·RMS(h)) ⊙ W_u·RMS(h)),  RoPE, GQA
//!
//! Deliberate deviations: no dropout (lmforge writes `*_pdrop = 0` into configs it saves);
//! attention is the plain composite `softmax(QKᵀ/√d + mask)·V`, the reference the fused kernel
//! of the speed work must reproduce.

use super::config::{Family, ModelConfig};
use super::layers::{
    activate, causal_mask, gated, softmax_last, Builder, Embedding, Layout, Linear, Norm, Rope,
};
use super::loader::WeightSource;
pub use super::packing::Packing;
use super::params::{ParamStore, Source};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

// ---------------------------------------------------------------- attention

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
    layers: Vec<Option<(Tensor, Tensor)>>, // (B, S, n_kv, hd) each
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Attention {
    fn new(b: &mut Builder, cfg: &ModelConfig, i: usize) -> Result<Self> {
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

    fn forward(&self, x: &Tensor, ctx: &mut LayerCtx) -> Result<Tensor> {
        let (bsz, t, _) = x.dims3()?; // (B, T, C)
        let (nh, nkv, hd) = (self.n_head, self.n_kv, self.hd);
        let scale = 1.0 / (hd as f64).sqrt();
        let plain = ctx.rope.is_none()
            && ctx.cache.is_none()
            && ctx.prefix.is_none()
            && ctx.key_padding.is_none();
        // (B, T, n, hd) views of the projections: no transposes, no copies.
        let (mut q, mut k, mut v) = match &self.qkv {
            Qkv::Fused(l) => {
                let y = l.forward(x)?.reshape((bsz, t, 3, nh, hd))?;
                if plain && crate::kernels::fusable(&[&y]) {
                    let spec = crate::kernels::attention::Spec {
                        scale: scale as f32,
                        prefix: 0,
                        past: 0,
                        window: self.window,
                    };
                    let starts = ctx.packing.map(|p| p.starts.clone());
                    let y = crate::kernels::attention::attention_qkv(&y, spec, starts)?; // (B, T, H, hd)
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
                    q = rope.apply(&q, ctx.past)?;
                    k = rope.apply(&k, ctx.past)?;
                }
            }
        }
        if let Some(slot) = ctx.cache.as_deref_mut() {
            if let Some((pk, pv)) = slot.take() {
                k = Tensor::cat(&[&pk, &k], 1)?;
                v = Tensor::cat(&[&pv, &v], 1)?;
            }
            *slot = Some((k.clone(), v.clone()));
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
            let spec = crate::kernels::attention::Spec {
                scale: scale as f32,
                prefix: n_prefix,
                past: ctx.past,
                window: self.window,
            };
            let starts = ctx.packing.map(|p| p.starts.clone());
            crate::kernels::attention::attention_packed(&q, &k, &v, spec, starts)?
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

// ---------------------------------------------------------------- MLP

pub enum Mlp {
    /// GPT-2: proj(act(fc(x)))
    Plain {
        fc: Linear,
        proj: Linear,
        act: super::config::Activation,
    },
    /// Llama: down(act(gate(x)) ⊙ up(x))
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: super::config::Activation,
    },
}

impl Mlp {
    fn new(b: &mut Builder, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let resid_std = 0.02 / (2.0 * cfg.num_layers as f64).sqrt();
        Ok(match cfg.family {
            Family::Gpt2 => {
                let p = format!("transformer.h.{i}.mlp");
                Mlp::Plain {
                    fc: Linear::new(b, &format!("{p}.c_fc"), c, f, true, Layout::InOut, 0.02)?,
                    proj: Linear::new(
                        b,
                        &format!("{p}.c_proj"),
                        f,
                        c,
                        true,
                        Layout::InOut,
                        resid_std,
                    )?,
                    act: cfg.activation,
                }
            }
            Family::Llama => {
                let p = format!("model.layers.{i}.mlp");
                let bias = cfg.mlp_bias;
                Mlp::Gated {
                    gate: Linear::new(
                        b,
                        &format!("{p}.gate_proj"),
                        c,
                        f,
                        bias,
                        Layout::OutIn,
                        0.02,
                    )?,
                    up: Linear::new(b, &format!("{p}.up_proj"), c, f, bias, Layout::OutIn, 0.02)?,
                    down: Linear::new(
                        b,
                        &format!("{p}.down_proj"),
                        f,
                        c,
                        bias,
                        Layout::OutIn,
                        resid_std,
                    )?,
                    act: cfg.activation,
                }
            }
        })
    }

    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Plain { fc, proj, .. } => vec![fc, proj],
            Mlp::Gated { gate, up, down, .. } => vec![gate, up, down],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Plain { fc, proj, .. } => vec![fc, proj],
            Mlp::Gated { gate, up, down, .. } => vec![gate, up, down],
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Plain { fc, proj, act } => proj.forward(&activate(&fc.forward(x)?, *act)?),
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => down.forward(&gated(&gate.forward(x)?, &up.forward(x)?, *act)?),
        }
    }
}

// ---------------------------------------------------------------- block

pub struct Block {
    pub norm1: Norm,
    pub attn: Attention,
    pub norm2: Norm,
    pub mlp: Mlp,
}

struct LayerCtx<'a> {
    rope: Option<&'a Rope>,
    /// Packed rows: rotary tables at the rows' positions, built once per forward.
    rope_at: Option<&'a (Tensor, Tensor)>,
    /// Packed rows on the composite path: the cross-example mask, built by the first layer.
    packing_mask: &'a std::cell::RefCell<Option<Tensor>>,
    past: usize,
    cache: Option<&'a mut Option<(Tensor, Tensor)>>,
    prefix: Option<&'a (Tensor, Tensor)>,
    key_padding: Option<&'a Tensor>,
    packing: Option<&'a Packing>,
}

impl Block {
    fn new(b: &mut Builder, cfg: &ModelConfig, i: usize) -> Result<Self> {
        let norm = |b: &mut Builder, name: &str| match cfg.family {
            Family::Gpt2 => Norm::layer_norm(b, name, cfg.hidden_size, cfg.norm_eps),
            Family::Llama => Norm::rms_norm(b, name, cfg.hidden_size, cfg.norm_eps),
        };
        let (n1, n2) = match cfg.family {
            Family::Gpt2 => (
                format!("transformer.h.{i}.ln_1"),
                format!("transformer.h.{i}.ln_2"),
            ),
            Family::Llama => (
                format!("model.layers.{i}.input_layernorm"),
                format!("model.layers.{i}.post_attention_layernorm"),
            ),
        };
        let norm1 = norm(b, &n1)?;
        let attn = Attention::new(b, cfg, i)?;
        let norm2 = norm(b, &n2)?;
        let mlp = Mlp::new(b, cfg, i)?;
        Ok(Self {
            norm1,
            attn,
            norm2,
            mlp,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut LayerCtx) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.norm1.forward(x)?, ctx)?)?;
        Ok((&h + self.mlp.forward(&self.norm2.forward(&h)?)?)?)
    }
}

// ---------------------------------------------------------------- model

/// Optional inputs of a forward pass beyond the token embeddings.
#[derive(Default)]
pub struct ForwardOpts<'a> {
    /// Incremental decoding: keys/values of earlier positions; updated in place.
    pub cache: Option<&'a mut KvCache>,
    /// Extra keys/values per layer, (1 or B, n_kv, P, hd) each, visible to every query
    /// (prefix tuning). They occupy no positions.
    pub prefix: Option<&'a [(Tensor, Tensor)]>,
    /// (B, past+T) with 1 for real tokens and 0 for padding keys.
    pub key_padding: Option<&'a Tensor>,
    /// Several examples per row (SFT packing); not with a cache.
    pub packing: Option<&'a Packing>,
}

pub struct DecoderModel {
    pub cfg: ModelConfig,
    pub wte: Embedding,
    pub wpe: Option<Embedding>,
    pub blocks: Vec<Block>,
    pub norm_f: Norm,
    /// `None` when the head is tied to `wte`.
    pub lm_head: Option<Linear>,
    rope: Option<Rope>,
}

impl DecoderModel {
    /// Builds the model, its weights coming from `source`; `frozen(name)` marks weights that
    /// must get no gradient.
    pub fn new(
        cfg: &ModelConfig,
        store: &mut ParamStore,
        source: &Source,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let dev = store.device.clone();
        let mut b = Builder {
            store,
            source,
            frozen,
        };
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let (wte, wpe) = match cfg.family {
            Family::Gpt2 => (
                Embedding::new(&mut b, "transformer.wte.weight", v, c, 0.02)?,
                Some(Embedding::new(
                    &mut b,
                    "transformer.wpe.weight",
                    cfg.max_position_embeddings,
                    c,
                    0.01,
                )?),
            ),
            Family::Llama => (
                Embedding::new(&mut b, "model.embed_tokens.weight", v, c, 0.02)?,
                None,
            ),
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(&mut b, cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = match cfg.family {
            Family::Gpt2 => Norm::layer_norm(&mut b, "transformer.ln_f", c, cfg.norm_eps)?,
            Family::Llama => Norm::rms_norm(&mut b, "model.norm", c, cfg.norm_eps)?,
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::new(
                &mut b,
                "lm_head",
                c,
                v,
                false,
                Layout::OutIn,
                0.02,
            )?)
        };
        let rope = match cfg.family {
            Family::Llama => Some(Rope::new(
                cfg.head_dim,
                cfg.max_position_embeddings,
                cfg.rope_theta,
                &dev,
            )?),
            Family::Gpt2 => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            norm_f,
            lm_head,
            rope,
        })
    }

    /// Loads a model whose weights are in `weights`, checking that every tensor is used.
    pub fn load(
        cfg: &ModelConfig,
        store: &mut ParamStore,
        weights: &WeightSource,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let model = Self::new(cfg, store, &Source::Weights(weights), frozen)?;
        let tied = cfg.tie_word_embeddings;
        weights.check_all_used(|n| {
            n.ends_with(".attn.bias")
                || n.ends_with(".attn.masked_bias")
                || n.ends_with("rotary_emb.inv_freq")
                || (tied && n == "lm_head.weight")
        })?;
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        self.wte.weight.device()
    }

    /// Every linear layer, in order, for PEFT methods to find by name.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v: Vec<&Linear> = self
            .blocks
            .iter()
            .flat_map(|b| b.attn.linears().into_iter().chain(b.mlp.linears()))
            .collect();
        v.extend(self.lm_head.as_ref());
        v
    }

    /// `linears`, mutable: PEFT methods attach adapters through it.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = self
            .blocks
            .iter_mut()
            .flat_map(|b| {
                let (attn, mlp) = (&mut b.attn, &mut b.mlp);
                attn.linears_mut().into_iter().chain(mlp.linears_mut())
            })
            .collect();
        v.extend(self.lm_head.as_mut());
        v
    }

    /// ids (B, T) -> token embeddings (B, T, C), without positions.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.wte.forward(ids)
    }

    /// Token embeddings (B, T, C) -> final normalised hidden states (B, T, C).
    /// Taking embeddings (not ids) lets prompt tuning prepend learned vectors.
    pub fn hidden_states(&self, embeds: &Tensor, opts: ForwardOpts) -> Result<Tensor> {
        let (_, t, _) = embeds.dims3()?;
        let ForwardOpts {
            mut cache,
            prefix,
            key_padding,
            packing,
        } = opts;
        if packing.is_some() && cache.is_some() {
            bail!("packed sequences cannot use a KV cache");
        }
        let past = cache.as_ref().map_or(0, |c| c.len);
        let max = self.cfg.max_position_embeddings;
        if past + t > max {
            bail!(
                "sequence of {} positions exceeds the model's context of {max}",
                past + t
            );
        }
        if let Some(p) = prefix {
            if p.len() != self.blocks.len() {
                bail!(
                    "prefix has {} layers, the model {}",
                    p.len(),
                    self.blocks.len()
                );
            }
        }
        let mut x = match &self.wpe {
            Some(wpe) => match packing {
                Some(p) => {
                    let (b, _, c) = embeds.dims3()?;
                    let pos = p.positions.flatten_all()?;
                    (embeds + wpe.weight.index_select(&pos, 0)?.reshape((b, t, c))?)?
                }
                None => {
                    let pos = Tensor::arange(past as u32, (past + t) as u32, embeds.device())?;
                    embeds.broadcast_add(&wpe.weight.index_select(&pos, 0)?)?
                }
            },
            None => embeds.clone(),
        };
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.blocks.len() {
                *c = KvCache::new(self.blocks.len());
            }
        }
        let rope_at = match (packing, &self.rope) {
            (Some(p), Some(r)) => Some(r.tables_at(&p.positions, embeds.dtype())?),
            _ => None,
        };
        let packing_mask = std::cell::RefCell::new(None);
        for (i, block) in self.blocks.iter().enumerate() {
            let mut ctx = LayerCtx {
                rope: self.rope.as_ref(),
                rope_at: rope_at.as_ref(),
                packing_mask: &packing_mask,
                past,
                cache: cache.as_deref_mut().map(|c| &mut c.layers[i]),
                prefix: prefix.map(|p| &p[i]),
                key_padding,
                packing,
            };
            x = block.forward(&x, &mut ctx)?;
        }
        if let Some(c) = cache {
            c.len = past + t;
        }
        self.norm_f.forward(&x)
    }

    /// Hidden states (..., C) -> logits (..., V).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let dims = h.dims().to_vec();
                let c = self.cfg.hidden_size;
                let n = h.elem_count() / c;
                let (h2, w) = (h.reshape((n, c))?, &self.wte.weight);
                let y = if w.is_contiguous() && crate::kernels::fusable(&[&h2, w]) {
                    use crate::kernels::linear::{linear, WeightLayout};
                    linear(&h2, w, WeightLayout::OutIn)?
                } else {
                    h2.matmul(&w.t()?)?
                };
                let mut out = dims;
                *out.last_mut().expect("h has a hidden dimension") = self.cfg.vocab_size;
                Ok(y.reshape(out)?)
            }
        }
    }

    /// ids (B, T) -> logits (B, T, V).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden_states(&self.embed(ids)?, ForwardOpts::default())?)
    }

    /// Log-probability of each next token: ids (B, T) -> (B, T-1), entry t = log p(ids[t+1] | ids[..=t]).
    /// The shared primitive for scoring, DPO, PPO and reward modelling.
    pub fn token_logprobs(&self, ids: &Tensor, opts: ForwardOpts) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let h = self.hidden_states(&self.embed(ids)?, opts)?;
        let logits = self.logits(&h.narrow(1, 0, t - 1)?)?;
        crate::losses::gather_logprobs(&logits, &ids.narrow(1, 1, t - 1)?)
    }

    /// Last-layer hidden states for value/reward/classification heads: ids (B, T) -> (B, T, C).
    pub fn last_hidden(&self, ids: &Tensor, opts: ForwardOpts) -> Result<Tensor> {
        self.hidden_states(&self.embed(ids)?, opts)
    }

    pub fn dtype(&self) -> DType {
        self.wte.weight.dtype()
    }

    /// Keys/values shape a prefix must have for layer caches: (n_kv, head_dim).
    pub fn kv_shape(&self) -> (usize, usize) {
        (self.cfg.num_kv_heads, self.cfg.head_dim)
    }
}
