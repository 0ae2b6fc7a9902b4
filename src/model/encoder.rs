//! BERT (Devlin et al. 2019): a bidirectional, post-LayerNorm transformer encoder, read bottom-up:
//! embeddings (word + position + token type, then LayerNorm), layers (attention → add & norm →
//! GELU MLP → add & norm), the masked-LM head (dense → GELU → LayerNorm → logits tied to the word
//! embeddings, plus a bias) and the pooler (tanh(dense(h_[CLS]))) that classifiers read.
//!
//! Weight names are transformers' `BertForMaskedLM` ones (`bert.embeddings…`, `cls.predictions…`);
//! checkpoints saved from `BertModel` (no `bert.` prefix, e.g. all-MiniLM-L6-v2) load too. Heads a
//! checkpoint lacks (MLM head, pooler) are initialised fresh, as transformers does, and reported.
//! Attention is the composite (explicit scores + padding mask): the fused kernel is causal-only.

use super::config::Activation;
use super::layers::{activate, softmax_last, Builder, Embedding, Layout, Linear, Norm};
use super::loader::WeightSource;
use super::params::{Init, ParamKind, ParamStore, Source};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl EncoderConfig {
    /// BERT-style defaults for a fresh model.
    pub fn bert(vocab: usize, dim: usize, layers: usize, heads: usize, ctx: usize) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: dim,
            num_layers: layers,
            num_heads: heads,
            intermediate_size: 4 * dim,
            activation: Activation::GeluErf,
            max_position_embeddings: ctx,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::input::read_text(path, crate::input::MAX_CONFIG_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(&v, &path.display().to_string())
    }

    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let mt = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if mt != "bert" {
            bail!("{what}: model_type {mt:?} is not an encoder lmforge supports (bert)");
        }
        let int = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("{what}: key {k} missing or not an integer"))
        };
        if let Some(p) = v.get("position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                bail!("{what}: position_embedding_type {p:?} is not supported (absolute only)");
            }
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        let cfg = Self {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads: int("num_attention_heads")?,
            intermediate_size: int("intermediate_size")?,
            activation: Activation::parse(act, "hidden_act").with_context(|| what.to_string())?,
            max_position_embeddings: int("max_position_embeddings")?,
            type_vocab_size: v
                .get("type_vocab_size")
                .and_then(Value::as_u64)
                .unwrap_or(2) as usize,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            pad_token_id: v.get("pad_token_id").and_then(Value::as_u64).unwrap_or(0) as u32,
        };
        cfg.validate().with_context(|| what.to_string())?;
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
            bail!(
                "{what}: hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_heads
            );
        }
        Ok(cfg)
    }

    /// Every value's allowed range (`model::limits`); errors name the `config.json` key.
    pub fn validate(&self) -> Result<()> {
        use super::limits::*;
        in_range("vocab_size", self.vocab_size, 1, MAX_VOCAB)?;
        in_range("hidden_size", self.hidden_size, 1, MAX_HIDDEN)?;
        in_range("num_hidden_layers", self.num_layers, 1, MAX_LAYERS)?;
        in_range("num_attention_heads", self.num_heads, 1, MAX_HEADS)?;
        in_range("intermediate_size", self.intermediate_size, 1, MAX_FFN)?;
        in_range(
            "max_position_embeddings",
            self.max_position_embeddings,
            1,
            MAX_CONTEXT,
        )?;
        in_range("type_vocab_size", self.type_vocab_size, 1, 1 << 16)?;
        positive_at_most("layer_norm_eps", self.layer_norm_eps, 1.0)?;
        if self.pad_token_id as usize >= self.vocab_size {
            anyhow::bail!(
                "model config: pad_token_id = {} is not below vocab_size ({})",
                self.pad_token_id,
                self.vocab_size
            );
        }
        Ok(())
    }

    pub fn to_hf_json(&self, architecture: &str) -> Value {
        let act = match self.activation {
            Activation::GeluErf => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        };
        json!({
            "architectures": [architecture],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        })
    }
}

// ---------------------------------------------------------------- layer

pub struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: Norm,
    fc: Linear,
    out: Linear,
    ln2: Norm,
    act: Activation,
    n_head: usize,
}

impl EncoderLayer {
    fn new(b: &mut Builder, cfg: &EncoderConfig, i: usize) -> Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        let p = format!("bert.encoder.layer.{i}");
        let lin = |b: &mut Builder, name: &str, i: usize, o: usize| {
            Linear::new(b, &format!("{p}.{name}"), i, o, true, Layout::OutIn, 0.02)
        };
        Ok(Self {
            q: lin(b, "attention.self.query", c, c)?,
            k: lin(b, "attention.self.key", c, c)?,
            v: lin(b, "attention.self.value", c, c)?,
            o: lin(b, "attention.output.dense", c, c)?,
            ln1: Norm::layer_norm(
                b,
                &format!("{p}.attention.output.LayerNorm"),
                c,
                cfg.layer_norm_eps,
            )?,
            fc: lin(b, "intermediate.dense", c, f)?,
            out: lin(b, "output.dense", f, c)?,
            ln2: Norm::layer_norm(b, &format!("{p}.output.LayerNorm"), c, cfg.layer_norm_eps)?,
            act: cfg.activation,
            n_head: cfg.num_heads,
        })
    }

    /// x (B, T, C), mask (B, 1, 1, T) additive -> (B, T, C)
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, hd) = (self.n_head, c / self.n_head);
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?) // (B, H, T, hd)
        };
        let (q, k, v) = (
            heads(self.q.forward(x)?)?,
            heads(self.k.forward(x)?)?,
            heads(self.v.forward(x)?)?,
        );
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?; // (B, H, T, T)
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let y = softmax_last(&att)?.matmul(&v)?; // (B, H, T, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?;
        let x = self.ln1.forward(&(x + self.o.forward(&y)?)?)?;
        let f = self
            .out
            .forward(&activate(&self.fc.forward(&x)?, self.act)?)?;
        self.ln2.forward(&(x + f)?)
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.fc,
            &mut self.out,
        ]
    }
}

// ---------------------------------------------------------------- heads

/// The masked-LM head; its output matrix is the word embedding matrix (tied).
pub struct MlmHead {
    dense: Linear,
    ln: Norm,
    bias: Tensor,
    act: Activation,
}

pub struct Encoder {
    pub cfg: EncoderConfig,
    pub word: Embedding,
    pos: Embedding,
    token_type: Embedding,
    emb_ln: Norm,
    pub layers: Vec<EncoderLayer>,
    pub pooler: Option<Linear>,
    pub mlm: Option<MlmHead>,
    /// Prompt tuning / P-tuning: embeddings ahead of every input (see `forward`).
    pub virtual_tokens: Option<std::sync::Arc<dyn super::virtual_tokens::VirtualTokens>>,
}

/// Which heads to build besides the encoder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heads {
    pub mlm: bool,
    pub pooler: bool,
}

impl Encoder {
    /// Builds the encoder from `source`; head weights missing from a checkpoint are initialised
    /// (seeded by `seed`) and their names returned.
    pub fn new(
        cfg: &EncoderConfig,
        store: &mut ParamStore,
        source: &Source,
        heads: Heads,
        seed: u64,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<(Self, Vec<String>)> {
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut b = Builder {
            store,
            source,
            frozen,
            blocks: None,
        };
        let word = Embedding::new(&mut b, "bert.embeddings.word_embeddings.weight", v, c, 0.02)?;
        let pos = Embedding::new(
            &mut b,
            "bert.embeddings.position_embeddings.weight",
            cfg.max_position_embeddings,
            c,
            0.02,
        )?;
        let token_type = Embedding::new(
            &mut b,
            "bert.embeddings.token_type_embeddings.weight",
            cfg.type_vocab_size,
            c,
            0.02,
        )?;
        let emb_ln = Norm::layer_norm(&mut b, "bert.embeddings.LayerNorm", c, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_layers)
            .map(|i| EncoderLayer::new(&mut b, cfg, i))
            .collect::<Result<Vec<_>>>()?;
        // Heads: from the checkpoint when it has them, else fresh.
        let mut fresh = Vec::new();
        let fresh_src = Source::Random { seed };
        let has = |n: &str| match source {
            Source::Weights(w) => w.contains(n),
            Source::Random { .. } => true,
        };
        let pooler = if heads.pooler {
            let src = if has("bert.pooler.dense.weight") {
                *source
            } else {
                fresh.push("bert.pooler".to_string());
                fresh_src
            };
            let mut hb = Builder {
                store: &mut *b.store,
                source: &src,
                frozen,
                blocks: None,
            };
            Some(Linear::new(
                &mut hb,
                "bert.pooler.dense",
                c,
                c,
                true,
                Layout::OutIn,
                0.02,
            )?)
        } else {
            None
        };
        let mlm = if heads.mlm {
            let src = if has("cls.predictions.bias") {
                *source
            } else {
                fresh.push("cls.predictions".to_string());
                fresh_src
            };
            let mut hb = Builder {
                store: &mut *b.store,
                source: &src,
                frozen,
                blocks: None,
            };
            let dense = Linear::new(
                &mut hb,
                "cls.predictions.transform.dense",
                c,
                c,
                true,
                Layout::OutIn,
                0.02,
            )?;
            let ln = Norm::layer_norm(
                &mut hb,
                "cls.predictions.transform.LayerNorm",
                c,
                cfg.layer_norm_eps,
            )?;
            let bias = hb.param("cls.predictions.bias", &[v], ParamKind::Bias, Init::Zeros)?;
            Some(MlmHead {
                dense,
                ln,
                bias,
                act: cfg.activation,
            })
        } else {
            None
        };
        Ok((
            Self {
                cfg: cfg.clone(),
                word,
                pos,
                token_type,
                emb_ln,
                layers,
                pooler,
                mlm,
                virtual_tokens: None,
            },
            fresh,
        ))
    }

    /// Loads from weights, checking every tensor of the file is used (NSP head and tied copies
    /// excepted).
    pub fn load(
        cfg: &EncoderConfig,
        store: &mut ParamStore,
        weights: &WeightSource,
        heads: Heads,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<(Self, Vec<String>)> {
        let out = Self::new(cfg, store, &Source::Weights(weights), heads, 0, frozen)?;
        weights.check_all_used(|n| {
            n.ends_with("position_ids")
                || n.starts_with("cls.predictions.decoder")
                || n.starts_with("cls.seq_relationship")
                || (!heads.pooler && n.contains("pooler."))
                || (!heads.mlm && n.starts_with("cls.predictions"))
                || n.starts_with("classifier.")
                || n.starts_with("qa_outputs.")
        })?;
        Ok(out)
    }

    /// Positions left for real tokens (prompt-tuning tokens take the first P).
    pub fn context(&self) -> usize {
        let p = self.virtual_tokens.as_ref().map_or(0, |v| v.positions());
        self.cfg.max_position_embeddings.saturating_sub(p)
    }

    /// Active prompt-tuning tokens: P.
    pub fn virtual_positions(&self) -> usize {
        self.virtual_tokens
            .as_ref()
            .filter(|v| v.active())
            .map_or(0, |v| v.positions())
    }

    /// ids (B, T) u32; token types (B, T) (default all 0); attention mask (B, T) with 1 for
    /// tokens and 0 for padding -> hidden states (B, P + T, C). With active prompt-tuning
    /// tokens (P of them, else 0) their embeddings come first, as PEFT prepends them: positions
    /// 0..P, token type 0, always attended; the output keeps them (a classifier pools the first
    /// position, as transformers does under PEFT).
    pub fn forward(
        &self,
        ids: &Tensor,
        types: Option<&Tensor>,
        attention: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t0) = ids.dims2()?;
        let dev = ids.device();
        let virt = match self.virtual_tokens.as_ref().filter(|v| v.active()) {
            Some(v) => match v.tensors()? {
                super::virtual_tokens::Virtual::Embeddings(e) => Some(e),
                super::virtual_tokens::Virtual::Prefix(_) => {
                    bail!("prefix tuning of an encoder is not supported (PEFT has none for BERT)")
                }
            },
            None => None,
        };
        let p = virt.as_ref().map_or(Ok(0), |e| e.dim(0))?;
        let t = p + t0;
        if t > self.cfg.max_position_embeddings {
            bail!(
                "sequence of {t} tokens{} exceeds the encoder's {} positions",
                if p > 0 {
                    format!(" ({p} virtual)")
                } else {
                    String::new()
                },
                self.cfg.max_position_embeddings
            );
        }
        let pos = Tensor::arange(0u32, t as u32, dev)?;
        let zeros = |n: usize| Tensor::zeros((b, n), DType::U32, dev);
        let types = match types {
            Some(x) if p > 0 => Tensor::cat(&[&zeros(p)?, x], 1)?,
            Some(x) => x.clone(),
            None => zeros(t)?,
        };
        let words = self.word.forward(ids)?; // (B, T0, C)
        let words = match &virt {
            Some(e) => {
                let c = self.cfg.hidden_size;
                Tensor::cat(&[&e.unsqueeze(0)?.broadcast_as((b, p, c))?, &words], 1)?
            }
            None => words,
        };
        let attention = match attention {
            Some(m) if p > 0 => Some(Tensor::cat(
                &[&Tensor::ones((b, p), m.dtype(), dev)?, m],
                1,
            )?),
            other => other.cloned(),
        };
        let attention = attention.as_ref();
        let x = words
            .broadcast_add(&self.pos.weight.index_select(&pos, 0)?)?
            .add(&self.token_type.forward(&types)?)?;
        let mut x = self.emb_ln.forward(&x)?;
        // 0 where attended, a large negative number on padding keys: (B, 1, 1, T).
        let mask = match attention {
            Some(m) => Some(
                ((m.to_dtype(DType::F32)?.ones_like()? - m.to_dtype(DType::F32)?)?
                    * f32::MIN as f64)?
                    .reshape((b, 1, 1, t))?,
            ),
            None => None,
        };
        for l in &self.layers {
            x = l.forward(&x, mask.as_ref())?;
        }
        Ok(x)
    }

    /// Hidden states (..., C) -> masked-LM logits (..., V).
    pub fn mlm_logits(&self, h: &Tensor) -> Result<Tensor> {
        let head = self
            .mlm
            .as_ref()
            .context("this encoder was built without an MLM head")?;
        let y = head
            .ln
            .forward(&activate(&head.dense.forward(h)?, head.act)?)?;
        let dims = y.dims().to_vec();
        let c = self.cfg.hidden_size;
        let n = y.elem_count() / c;
        let logits = super::layers::xwt(&y.reshape((n, c))?, &self.word.weight)?
            .broadcast_add(&head.bias)?;
        let mut out = dims;
        *out.last_mut()
            .context("hidden states have a last dimension")? = self.cfg.vocab_size;
        Ok(logits.reshape(out)?)
    }

    /// tanh(dense(h[:, 0])): the [CLS] summary classifiers use. (B, T, C) -> (B, C)
    pub fn pooled(&self, h: &Tensor) -> Result<Tensor> {
        let p = self
            .pooler
            .as_ref()
            .context("this encoder was built without a pooler")?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(p.forward(&cls)?.tanh()?)
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect()
    }
}
