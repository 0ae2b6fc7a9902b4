//! The decoder's hyper-parameters, read from and written to Hugging Face `config.json`.
//!
//! One struct covers both families: GPT-2 (learned positions, LayerNorm, GELU, biases) and the
//! Llama family (`llama`, `mistral`, `qwen2`: RoPE, RMSNorm, SwiGLU, grouped-query attention).
//! Fields that would change the math but are not implemented are an error naming the field:
//! a model that silently computes something else is worse than one that refuses to load.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation GPT-2 was trained with.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    Relu,
    Silu,
}

impl Activation {
    pub(crate) fn parse(s: &str, key: &str) -> Result<Self> {
        Ok(match s {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("config.json: {key} = {other:?} is not supported (gelu_new, gelu_pytorch_tanh, gelu, relu, silu)"),
        })
    }

    fn hf_name(self) -> &'static str {
        match self {
            Self::GeluTanh => "gelu_new",
            Self::GeluErf => "gelu",
            Self::Relu => "relu",
            Self::Silu => "silu",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// HF `model_type`: `gpt2`, `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub activation: Activation,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Per-layer sliding attention window (Mistral, Qwen2 `layer_types`); `None` = full causal.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The `config.json` this was read from, so fields lmforge does not interpret survive a save.
    pub source: Map<String, Value>,
}

impl ModelConfig {
    pub fn norm(&self) -> NormKind {
        match self.family {
            Family::Gpt2 => NormKind::LayerNorm,
            Family::Llama => NormKind::RmsNorm,
        }
    }

    /// A fresh GPT-2 style configuration (for pre-training from scratch and benchmarks).
    pub fn gpt2(vocab: usize, dim: usize, layers: usize, heads: usize, ctx: usize) -> Self {
        Self {
            model_type: "gpt2".into(),
            family: Family::Gpt2,
            vocab_size: vocab,
            hidden_size: dim,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: dim / heads.max(1),
            intermediate_size: dim.saturating_mul(4),
            max_position_embeddings: ctx,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            activation: Activation::GeluTanh,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            tie_word_embeddings: true,
            sliding_window: vec![None; layers],
            bos_token_id: None,
            eos_token_id: None,
            source: Map::new(),
        }
    }

    /// A fresh Llama style configuration; `ffn` defaults to the 8/3·d rounded up to 64 rule.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab: usize,
        dim: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        ctx: usize,
        ffn: Option<usize>,
    ) -> Self {
        Self {
            model_type: "llama".into(),
            family: Family::Llama,
            vocab_size: vocab,
            hidden_size: dim,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: dim / heads.max(1),
            intermediate_size: ffn
                .unwrap_or(dim.saturating_mul(8).div_ceil(3 * 64).saturating_mul(64)),
            max_position_embeddings: ctx,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            activation: Activation::Silu,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            sliding_window: vec![None; layers],
            bos_token_id: None,
            eos_token_id: None,
            source: Map::new(),
        }
    }

    /// Every value's allowed range, in one place; errors name the `config.json` key. Sizes are
    /// bounded by sane maxima (far above any released model) so that a few hostile bytes cannot
    /// ask for a terabyte; the weights' shapes are checked against the file when they load.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let gpt2 = c.family == Family::Gpt2;
        let key = |g: &'static str, l: &'static str| if gpt2 { g } else { l };
        use super::limits::*;
        in_range(key("vocab_size", "vocab_size"), c.vocab_size, 1, MAX_VOCAB)?;
        in_range(key("n_embd", "hidden_size"), c.hidden_size, 1, MAX_HIDDEN)?;
        in_range(
            key("n_layer", "num_hidden_layers"),
            c.num_layers,
            1,
            MAX_LAYERS,
        )?;
        in_range(
            key("n_head", "num_attention_heads"),
            c.num_heads,
            1,
            MAX_HEADS,
        )?;
        in_range("num_key_value_heads", c.num_kv_heads, 1, MAX_HEADS)?;
        in_range("head_dim", c.head_dim, 1, MAX_HEAD_DIM)?;
        in_range(
            key("n_inner", "intermediate_size"),
            c.intermediate_size,
            1,
            MAX_FFN,
        )?;
        let ctx = key("n_positions", "max_position_embeddings");
        in_range(ctx, c.max_position_embeddings, 1, MAX_CONTEXT)?;
        positive_at_most(key("layer_norm_epsilon", "rms_norm_eps"), c.norm_eps, 1.0)?;
        let theta_ok = c.rope_theta.is_finite() && c.rope_theta >= 1.0;
        if !gpt2 && !theta_ok {
            bail!(
                "model config: rope_theta = {} must be a finite number ≥ 1 (the RoPE base)",
                c.rope_theta
            );
        }
        if let Some(w) = c.sliding_window.iter().flatten().find(|w| **w == 0) {
            bail!("model config: sliding_window = {w} must be at least 1 (or null for full attention)");
        }
        for (k, id) in [
            ("bos_token_id", c.bos_token_id),
            ("eos_token_id", c.eos_token_id),
        ] {
            if let Some(id) = id.filter(|id| *id as usize >= c.vocab_size) {
                bail!(
                    "model config: {k} = {id} is not below vocab_size ({})",
                    c.vocab_size
                );
            }
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            bail!(
                "model config: num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                c.num_heads,
                c.num_kv_heads
            );
        }
        if c.family == Family::Gpt2 && !c.hidden_size.is_multiple_of(c.num_heads) {
            bail!(
                "model config: n_embd ({}) must be divisible by n_head ({})",
                c.hidden_size,
                c.num_heads
            );
        }
        if c.family == Family::Llama && !c.head_dim.is_multiple_of(2) {
            bail!(
                "model config: head_dim ({}) must be even for RoPE",
                c.head_dim
            );
        }
        Ok(())
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::input::read_text(path, crate::input::MAX_CONFIG_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_hf_json(v).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_hf_json(v: Value) -> Result<Self> {
        let Value::Object(map) = v else {
            bail!("config.json: expected a JSON object")
        };
        let r = Reader(&map);
        let model_type = r
            .str("model_type")?
            .context("config.json: missing key model_type")?;
        let cfg = match model_type.as_str() {
            "gpt2" => Self::gpt2_from(&r)?,
            "llama" | "mistral" | "qwen2" => Self::llama_from(&r, &model_type)?,
            other => bail!(
                "config.json: model_type {other:?} is not supported (gpt2, llama, mistral, qwen2)"
            ),
        };
        let mut cfg = cfg;
        cfg.source = map;
        cfg.validate()?;
        Ok(cfg)
    }

    fn gpt2_from(r: &Reader) -> Result<Self> {
        for key in [
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "add_cross_attention",
        ] {
            if r.bool(key)?.unwrap_or(false) {
                bail!("config.json: {key} = true is not supported");
            }
        }
        if r.bool("scale_attn_weights")? == Some(false) {
            bail!("config.json: scale_attn_weights = false is not supported");
        }
        let dim = r.req_usize("n_embd")?;
        let layers = r.req_usize("n_layer")?;
        // Per-layer tables are allocated before `validate` sees the whole config.
        super::limits::in_range("n_layer", layers, 1, super::limits::MAX_LAYERS)?;
        let heads = r.req_usize("n_head")?;
        let ctx = r.usize("n_positions")?.unwrap_or(1024);
        let mut c = Self::gpt2(r.req_usize("vocab_size")?, dim, layers, heads, ctx);
        c.intermediate_size = r.usize("n_inner")?.unwrap_or(4 * dim);
        c.norm_eps = r.f64("layer_norm_epsilon")?.unwrap_or(1e-5);
        if let Some(a) = r.str("activation_function")? {
            c.activation = Activation::parse(&a, "activation_function")?;
        }
        c.tie_word_embeddings = r.bool("tie_word_embeddings")?.unwrap_or(true);
        c.bos_token_id = r.token_id("bos_token_id")?;
        c.eos_token_id = r.token_id("eos_token_id")?;
        Ok(c)
    }

    fn llama_from(r: &Reader, model_type: &str) -> Result<Self> {
        if let Some(v) = r.0.get("rope_scaling") {
            if !v.is_null() {
                bail!("config.json: rope_scaling = {v} is not supported (only plain RoPE)");
            }
        }
        let mut rope_theta = r.f64("rope_theta")?;
        if let Some(p) = r.0.get("rope_parameters").filter(|v| !v.is_null()) {
            let kind = p
                .get("rope_type")
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                bail!("config.json: rope_parameters.rope_type = {kind:?} is not supported (only \"default\")");
            }
            if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
                rope_theta = Some(t);
            }
        }
        let dim = r.req_usize("hidden_size")?;
        let layers = r.req_usize("num_hidden_layers")?;
        // Per-layer tables are allocated before `validate` sees the whole config.
        super::limits::in_range("num_hidden_layers", layers, 1, super::limits::MAX_LAYERS)?;
        let heads = r.req_usize("num_attention_heads")?;
        let kv = r.usize("num_key_value_heads")?.unwrap_or(heads);
        let ctx = r.usize("max_position_embeddings")?.unwrap_or(2048);
        let ffn = r.req_usize("intermediate_size")?;
        let mut c = Self::llama(
            r.req_usize("vocab_size")?,
            dim,
            layers,
            heads,
            kv,
            ctx,
            Some(ffn),
        );
        c.model_type = model_type.to_string();
        if let Some(hd) = r.usize("head_dim")? {
            c.head_dim = hd;
        }
        c.norm_eps = r.f64("rms_norm_eps")?.unwrap_or(1e-6);
        c.rope_theta = rope_theta.unwrap_or(10000.0);
        if let Some(a) = r.str("hidden_act")? {
            c.activation = Activation::parse(&a, "hidden_act")?;
        }
        let attention_bias = r.bool("attention_bias")?.unwrap_or(false);
        c.qkv_bias = model_type == "qwen2" || attention_bias;
        c.o_bias = model_type != "qwen2" && attention_bias;
        c.mlp_bias = r.bool("mlp_bias")?.unwrap_or(false);
        c.tie_word_embeddings = r.bool("tie_word_embeddings")?.unwrap_or(false);
        c.bos_token_id = r.token_id("bos_token_id")?;
        c.eos_token_id = r.token_id("eos_token_id")?;
        let window = r.usize("sliding_window")?;
        c.sliding_window = match model_type {
            "mistral" => vec![window; layers],
            "qwen2" if r.bool("use_sliding_window")?.unwrap_or(false) => {
                let types = r.0.get("layer_types").and_then(Value::as_array);
                let max_window_layers = r.usize("max_window_layers")?.unwrap_or(layers);
                (0..layers)
                    .map(|i| {
                        let sliding = match types {
                            Some(t) => {
                                t.get(i).and_then(Value::as_str) == Some("sliding_attention")
                            }
                            None => i >= max_window_layers,
                        };
                        if sliding {
                            window
                        } else {
                            None
                        }
                    })
                    .collect()
            }
            _ => vec![None; layers],
        };
        Ok(c)
    }

    /// The `config.json` object to write: the source's fields, with every field lmforge owns
    /// overwritten, so that transformers builds the same model.
    pub fn to_hf_json(&self) -> Value {
        let mut m = self.source.clone();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("model_type", json!(self.model_type));
        set("vocab_size", json!(self.vocab_size));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("bos_token_id", json!(self.bos_token_id));
        set("eos_token_id", json!(self.eos_token_id));
        // transformers ≥ 4.56 reads `dtype` and warns about the old `torch_dtype`.
        set("dtype", json!("float32"));
        match self.family {
            Family::Gpt2 => {
                set("architectures", json!(["GPT2LMHeadModel"]));
                set("n_embd", json!(self.hidden_size));
                set("n_layer", json!(self.num_layers));
                set("n_head", json!(self.num_heads));
                set("n_positions", json!(self.max_position_embeddings));
                set("n_ctx", json!(self.max_position_embeddings));
                set("n_inner", json!(self.intermediate_size));
                set("activation_function", json!(self.activation.hf_name()));
                set("layer_norm_epsilon", json!(self.norm_eps));
                for k in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
                    set(k, json!(0.0));
                }
            }
            Family::Llama => {
                let arch = match self.model_type.as_str() {
                    "mistral" => "MistralForCausalLM",
                    "qwen2" => "Qwen2ForCausalLM",
                    _ => "LlamaForCausalLM",
                };
                set("architectures", json!([arch]));
                set("hidden_size", json!(self.hidden_size));
                set("intermediate_size", json!(self.intermediate_size));
                set("num_hidden_layers", json!(self.num_layers));
                set("num_attention_heads", json!(self.num_heads));
                set("num_key_value_heads", json!(self.num_kv_heads));
                set("head_dim", json!(self.head_dim));
                set(
                    "max_position_embeddings",
                    json!(self.max_position_embeddings),
                );
                set("rms_norm_eps", json!(self.norm_eps));
                set("hidden_act", json!(self.activation.hf_name()));
                set("rope_theta", json!(self.rope_theta));
                set(
                    "rope_parameters",
                    json!({"rope_type": "default", "rope_theta": self.rope_theta}),
                );
                if self.model_type != "qwen2" {
                    set("attention_bias", json!(self.qkv_bias));
                }
                set("mlp_bias", json!(self.mlp_bias));
                set("attention_dropout", json!(0.0));
            }
        }
        m.remove("torch_dtype");
        Value::Object(m)
    }
}

/// Typed access to `config.json` keys with errors that name the key.
struct Reader<'a>(&'a Map<String, Value>);

impl Reader<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).with_context(|| {
                format!("config.json: {k} must be a non-negative integer, got {v}")
            }),
        }
    }
    fn req_usize(&self, k: &str) -> Result<usize> {
        self.usize(k)?
            .with_context(|| format!("config.json: missing key {k}"))
    }
    fn f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("config.json: {k} must be a number, got {v}")),
        }
    }
    fn bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .with_context(|| format!("config.json: {k} must be true or false, got {v}")),
        }
    }
    fn str(&self, k: &str) -> Result<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .with_context(|| format!("config.json: {k} must be a string, got {v}")),
        }
    }
    /// Token ids may be an integer or (eos in newer configs) a list; the first entry is used.
    fn token_id(&self, k: &str) -> Result<Option<u32>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|x| x as u32)),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as u32))
                .with_context(|| format!("config.json: {k} must be an integer, got {v}")),
        }
    }
}
