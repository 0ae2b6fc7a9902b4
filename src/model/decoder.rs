//! The causal decoder: GPT-2 (Radford et al. 2019) and the Llama family (Touvron et al. 2023)
//! in one model, read bottom-up: attention, MLP, block, model.
//!
//!   GPT-2:  h = x + Attn(LN(x)),  out = h + W₂·gelu(W₁·LN(h)),  learned positions, tied head
//!   Llama:  h = x + Attn(RMS(x)), out = h + W_d·(silu(W_g·RMS(h)) ⊙ W_u·RMS(h)),  RoPE, GQA
//!
//! Deliberate deviations: no dropout (lmforge writes `*_pdrop = 0` into configs it saves).
//! Attention lives in `model::attention`.

pub use super::attention::KvCache;
use super::attention::{Attention, LayerCtx};
use super::config::{Family, ModelConfig};
use super::layers::{activate, gated, Builder, Embedding, Layout, Linear, Norm, QBlocks, Rope};
use super::loader::WeightSource;
pub use super::packing::Packing;
use super::params::{ParamStore, Source};
use super::virtual_tokens::{LayerKv, VirtualTokens};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

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

    fn detached(&self) -> Self {
        match self {
            Mlp::Plain { fc, proj, act } => Mlp::Plain {
                fc: fc.detached(),
                proj: proj.detached(),
                act: *act,
            },
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => Mlp::Gated {
                gate: gate.detached(),
                up: up.detached(),
                down: down.detached(),
                act: *act,
            },
        }
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
    /// Several examples per row (SFT packing), or left-padded rows of batched generation
    /// (with a cache: `Packing::left_padded` at the cache's length).
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
    /// Prefix tuning, prompt tuning, P-tuning: positions ahead of every sequence.
    pub virtual_tokens: Option<Arc<dyn VirtualTokens>>,
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
        Self::new_with_blocks(cfg, store, source, frozen, None)
    }

    /// `new`, with the linear weights found in `blocks` kept as GGUF blocks (QLoRA).
    pub fn new_with_blocks(
        cfg: &ModelConfig,
        store: &mut ParamStore,
        source: &Source,
        frozen: &dyn Fn(&str) -> bool,
        blocks: Option<&QBlocks>,
    ) -> Result<Self> {
        cfg.validate()?;
        let dev = store.device.clone();
        let mut b = Builder {
            store,
            source,
            frozen,
            blocks,
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
            virtual_tokens: None,
        })
    }

    /// Loads a model whose weights are in `weights`, checking that every tensor is used.
    pub fn load(
        cfg: &ModelConfig,
        store: &mut ParamStore,
        weights: &WeightSource,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        Self::load_with_blocks(cfg, store, weights, frozen, None)
    }

    /// `load`, with the linear weights in `blocks` kept as GGUF blocks (QLoRA).
    pub fn load_with_blocks(
        cfg: &ModelConfig,
        store: &mut ParamStore,
        weights: &WeightSource,
        frozen: &dyn Fn(&str) -> bool,
        blocks: Option<&QBlocks>,
    ) -> Result<Self> {
        let model = Self::new_with_blocks(cfg, store, &Source::Weights(weights), frozen, blocks)?;
        weights.check_all_used(|n| Self::unused_ok(cfg, n))?;
        Ok(model)
    }

    /// Tensors a checkpoint may hold that the model does not read: GPT-2's causal-mask buffers,
    /// RoPE's inverse frequencies, and a tied LM head's copy.
    pub fn unused_ok(cfg: &ModelConfig, name: &str) -> bool {
        name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with("rotary_emb.inv_freq")
            || (cfg.tie_word_embeddings && name == "lm_head.weight")
    }

    pub fn device(&self) -> &Device {
        self.wte.weight.device()
    }

    /// The model on detached weights: the same storage (updates to the weights show), no
    /// autograd graph. Decoding with it keeps no activations alive for a backward that never
    /// comes (a batched prefill through trainable weights would hold every layer's).
    pub fn detached(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            wte: self.wte.detached(),
            wpe: self.wpe.as_ref().map(Embedding::detached),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    norm1: b.norm1.detached(),
                    attn: b.attn.detached(),
                    norm2: b.norm2.detached(),
                    mlp: b.mlp.detached(),
                })
                .collect(),
            norm_f: self.norm_f.detached(),
            lm_head: self.lm_head.as_ref().map(Linear::detached),
            rope: self.rope.clone(),
            virtual_tokens: self.virtual_tokens.as_ref().map(|v| v.detached()),
        }
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
    /// Active virtual tokens (prefix/prompt tuning) come first: their keys and values join
    /// every layer's and the real tokens' positions start after them; the output holds the
    /// real tokens only.
    pub fn hidden_states(&self, embeds: &Tensor, mut opts: ForwardOpts) -> Result<Tensor> {
        let Some(v) = self.virtual_tokens.as_ref().filter(|v| v.active()) else {
            return self.run(embeds, opts, 0);
        };
        if opts.prefix.is_some() {
            bail!("a prefix was given to a model with active virtual tokens");
        }
        // With a cache the virtual keys/values are computed once per sequence and kept there
        // (detached: a cache is for decoding).
        let kv: Vec<LayerKv> = match opts.cache.as_deref_mut() {
            Some(c) => {
                if c.layers.len() != self.blocks.len() {
                    *c = KvCache::new(self.blocks.len());
                }
                if c.is_empty() || c.prefix.is_none() {
                    let kv = self.virtual_keys_values(v.as_ref())?;
                    c.prefix = Some(kv.iter().map(|(k, v)| (k.detach(), v.detach())).collect());
                }
                c.prefix.clone().unwrap_or_default()
            }
            None => self.virtual_keys_values(v.as_ref())?,
        };
        let opts = ForwardOpts {
            cache: opts.cache,
            prefix: Some(&kv),
            key_padding: opts.key_padding,
            packing: opts.packing,
        };
        self.run(embeds, opts, v.positions())
    }

    /// The blocks over `embeds`, the first real position at `offset` (after virtual tokens).
    pub(super) fn run(&self, embeds: &Tensor, opts: ForwardOpts, offset: usize) -> Result<Tensor> {
        let (_, t, _) = embeds.dims3()?;
        let ForwardOpts {
            mut cache,
            prefix,
            key_padding,
            packing,
        } = opts;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if packing.is_some_and(|p| p.past() != past) {
            bail!("per-row positions were built for a cache of another length");
        }
        let max = self.cfg.max_position_embeddings;
        // Packed rows without a cache hold several sequences: their positions bound the
        // context, not the row's length.
        let span = offset
            + match (packing, cache.is_some()) {
                (Some(p), false) => p.max_position() + 1,
                _ => past + t,
            };
        if span > max {
            let virt = if offset > 0 {
                format!(" ({offset} of them virtual tokens)")
            } else {
                String::new()
            };
            bail!("sequence of {span} positions{virt} exceeds the model's context of {max}");
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
        // Packed rows' positions, after the virtual tokens.
        let positions = match packing {
            Some(p) if offset > 0 => Some(
                p.positions
                    .broadcast_add(&Tensor::new(offset as u32, embeds.device())?)?,
            ),
            Some(p) => Some(p.positions.clone()),
            None => None,
        };
        let pos0 = offset + past;
        let mut x = match &self.wpe {
            Some(wpe) => match &positions {
                Some(pos) => {
                    let (b, _, c) = embeds.dims3()?;
                    let pos = pos.flatten_all()?;
                    (embeds + wpe.weight.index_select(&pos, 0)?.reshape((b, t, c))?)?
                }
                None => {
                    let pos = Tensor::arange(pos0 as u32, (pos0 + t) as u32, embeds.device())?;
                    embeds.broadcast_add(&wpe.weight.index_select(&pos, 0)?)?
                }
            },
            None => embeds.clone(),
        };
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.blocks.len() {
                let keep = c.keep_graph;
                *c = KvCache::new(self.blocks.len());
                c.keep_graph = keep;
            }
        }
        let keep_graph = cache.as_ref().is_some_and(|c| c.keep_graph);
        let rope_at = match (&positions, &self.rope) {
            (Some(p), Some(r)) => Some(r.tables_at(p, embeds.dtype())?),
            _ => None,
        };
        let packing_mask = std::cell::RefCell::new(None);
        for (i, block) in self.blocks.iter().enumerate() {
            let mut ctx = LayerCtx {
                rope: self.rope.as_ref(),
                rope_at: rope_at.as_ref(),
                packing_mask: &packing_mask,
                past,
                pos0,
                cache: cache.as_deref_mut().map(|c| &mut c.layers[i]),
                keep_graph,
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
                if let Some(q) = &self.wte.qbase {
                    // QLoRA: the tied head read from the table's blocks.
                    let y = crate::kernels::qlinear::qlinear(&h2, q)?;
                    let mut out = h.dims().to_vec();
                    *out.last_mut().expect("h has a hidden dimension") = self.cfg.vocab_size;
                    return Ok(y.reshape(out)?);
                }
                let q = self.wte.quant.as_deref();
                let y = match super::layers::quantized_xwt(q, w, &h2, None)? {
                    Some(y) => y,
                    None => super::layers::xwt(&h2, w)?,
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

    /// Weights held as GGUF blocks (QLoRA), not in the parameter store.
    pub fn quantized_params(&self) -> usize {
        let lin = self.linears().into_iter().filter_map(|l| l.qbase.as_ref());
        lin.chain(self.wte.qbase.as_ref())
            .map(|q| q.rows() * q.cols())
            .sum()
    }

    /// Positions left for real tokens: the context less any virtual tokens (prefix/prompt
    /// tuning), which take the first P.
    pub fn context(&self) -> usize {
        let p = self.virtual_tokens.as_ref().map_or(0, |v| v.positions());
        self.cfg.max_position_embeddings.saturating_sub(p)
    }

    /// Keys/values shape a prefix must have for layer caches: (n_kv, head_dim).
    pub fn kv_shape(&self) -> (usize, usize) {
        (self.cfg.num_kv_heads, self.cfg.head_dim)
    }
}
