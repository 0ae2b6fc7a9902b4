//! A GGUF file of the `llama` architecture as an lmforge model: config from the `llama.*`
//! metadata, weights dequantized to f32 under their HF names, tokenizer rebuilt from the
//! `tokenizer.ggml.*` metadata.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that its RoPE can rotate
//! interleaved pairs (x0,x1),(x2,x3)… where HF rotates halves (xᵢ, xᵢ₊d/2):
//!   gguf = W.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
//! We apply the inverse, reshape(n_head, d/2, 2, in).swapaxes(1, 2), to get HF's rows back.

use super::tokenizer::tokenizer_from_gguf;
use super::GgufFile;
use crate::kernels::qgemv::QWeight;
use crate::kernels::qlinear::QMatrix;
use crate::model::config::ModelConfig;
use crate::model::decoder::DecoderModel;
use crate::model::layers::{Layout, QBlocks};
use crate::model::loader::WeightSource;
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Map};
use std::collections::HashMap;
use std::sync::Arc;

/// Everything an HF directory would hold, read from one GGUF file.
pub struct GgufModel {
    pub cfg: ModelConfig,
    pub weights: WeightSource,
    /// With `load_with(_, true)`: the linear layers' weights as blocks (QLoRA).
    pub blocks: QBlocks,
    pub tok: Tok,
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

pub fn config(g: &GgufFile) -> Result<ModelConfig> {
    let file = g.path.display();
    let arch = g
        .get_str("general.architecture")?
        .with_context(|| format!("{file}: missing metadata general.architecture"))?;
    if arch != "llama" {
        bail!("{file}: general.architecture = {arch:?} is not supported (llama)");
    }
    let k = |s: &str| format!("llama.{s}");
    if let Some(t) = g.get_str(&k("rope.scaling.type"))? {
        if t != "none" {
            bail!("{file}: metadata llama.rope.scaling.type = {t:?} is not supported (only plain RoPE)");
        }
    }
    if g.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        bail!("{file}: tensor rope_freqs.weight (Llama-3 RoPE scaling) is not supported");
    }
    let dim = g.req_u64(&k("embedding_length"))? as usize;
    let layers = g.req_u64(&k("block_count"))?;
    // Found by fuzzing: a huge block_count allocated per-layer tables before validation.
    let layers = usize::try_from(layers).unwrap_or(usize::MAX);
    crate::model::limits::in_range(
        "llama.block_count",
        layers,
        1,
        crate::model::limits::MAX_LAYERS,
    )
    .with_context(|| file.to_string())?;
    let heads = g.req_u64(&k("attention.head_count"))? as usize;
    let kv = g
        .get_u64(&k("attention.head_count_kv"))?
        .map_or(heads, |v| v as usize);
    let ffn = g.req_u64(&k("feed_forward_length"))? as usize;
    let ctx = g.get_u64(&k("context_length"))?.unwrap_or(2048) as usize;
    let embd = g
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .with_context(|| format!("{file}: missing tensor token_embd.weight"))?;
    let vocab = match g.get_u64(&k("vocab_size"))? {
        Some(v) => v as usize,
        None => embd.shape[0],
    };
    let mut c = ModelConfig::llama(vocab, dim, layers, heads, kv, ctx, Some(ffn));
    if let Some(hd) = g.get_u64(&k("attention.key_length"))? {
        c.head_dim = hd as usize;
    }
    if let Some(rot) = g.get_u64(&k("rope.dimension_count"))? {
        if rot as usize != c.head_dim {
            bail!(
                "{file}: llama.rope.dimension_count = {rot} differs from the head size {} (partial RoPE is not supported)",
                c.head_dim
            );
        }
    }
    c.norm_eps = g
        .get_f64(&k("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    c.rope_theta = g.get_f64(&k("rope.freq_base"))?.unwrap_or(10000.0);
    c.tie_word_embeddings = !g.tensors.iter().any(|t| t.name == "output.weight");
    c.bos_token_id = g.get_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
    c.eos_token_id = g.get_u64("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
    c.qkv_bias = g.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias");
    c.o_bias = g.tensors.iter().any(|t| t.name == "blk.0.attn_output.bias");
    c.validate().with_context(|| format!("{file}"))?;
    let mut src = Map::new();
    src.insert("model_type".into(), json!("llama"));
    c.source = src;
    Ok(c)
}

/// The HF name of a GGUF tensor of the llama architecture.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's Q/K row permutation for a (out, …) tensor of `n_head` heads.
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    if n_head == 0 || !out.is_multiple_of(2 * n_head) {
        bail!("cannot unpermute a tensor of {out} rows into {n_head} heads");
    }
    let rest: usize = dims[1..].iter().product();
    Ok(w.reshape((n_head, out / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Reads a llama-architecture GGUF file: config, dequantized weights under HF names, tokenizer.
/// The head count whose rows llama.cpp permuted in this (HF-named) weight: q and k projections.
/// One rule for the f32 weights and for the blocks kept for decoding, which must match.
fn permuted_heads(hf_name: &str, n_heads: usize, n_kv_heads: usize) -> Option<usize> {
    if hf_name.contains("self_attn.q_proj") {
        Some(n_heads)
    } else if hf_name.contains("self_attn.k_proj") {
        Some(n_kv_heads)
    } else {
        None
    }
}

pub fn load(g: &GgufFile) -> Result<GgufModel> {
    load_with(g, false)
}

/// `load`; with `qlora` the quantized weights of the linear layers stay GGUF blocks
/// (`GgufModel::blocks`) and are never dequantized.
pub fn load_with(g: &GgufFile, qlora: bool) -> Result<GgufModel> {
    let cfg = config(g)?;
    let file = g.path.display().to_string();
    let mut tensors = HashMap::with_capacity(g.tensors.len());
    let mut blocks = QBlocks::new();
    for t in &g.tensors {
        let Some(name) = hf_name(&t.name) else {
            bail!(
                "{file}: unexpected tensor {} for the llama architecture",
                t.name
            );
        };
        // What QLoRA keeps in blocks: the linear layers and the embedding table.
        let frozen_matrix = name.ends_with("_proj.weight")
            || name == "lm_head.weight"
            || name == "model.embed_tokens.weight";
        if qlora && frozen_matrix {
            if let Some(mut q) = QMatrix::from_gguf(t.dtype, g.bytes(t), &t.shape) {
                if let Some(h) = permuted_heads(&name, cfg.num_heads, cfg.num_kv_heads) {
                    q = q
                        .unpermute_rows(h)
                        .with_context(|| format!("{file}: cannot unpermute {}", t.name))?;
                }
                blocks.insert(name, Arc::new(q));
                continue;
            }
        }
        let mut w = g.dequantize(t)?;
        if let Some(h) = permuted_heads(&name, cfg.num_heads, cfg.num_kv_heads) {
            w = unpermute_rows(&w, h).with_context(|| format!("{file}: {}", t.name))?;
        }
        tensors.insert(name, w);
    }
    let weights = WeightSource::from_tensors(file.clone(), tensors);
    let (tok, chat_template) = tokenizer_from_gguf(g)?;
    tok.check_fits(cfg.vocab_size, &file)?;
    let eos_ids = cfg.eos_token_id.or(tok.eos_id).into_iter().collect();
    Ok(GgufModel {
        cfg,
        weights,
        blocks,
        tok,
        eos_ids,
        chat_template,
    })
}

/// Gives each linear layer of `model` (loaded from `g`) its GGUF blocks for decoding
/// (`kernels::qgemv`) where the file stores them as Q4_0, Q4_1 or Q8_0, and a tied head its
/// embedding table's; the f32 weights stay for prompts and training. Returns how many layers
/// got blocks.
pub fn attach_quantized(model: &mut DecoderModel, g: &GgufFile) -> Result<usize> {
    let (nh, nkv) = (model.cfg.num_heads, model.cfg.num_kv_heads);
    let by_name: HashMap<String, &super::TensorInfo> = g
        .tensors
        .iter()
        .filter_map(|t| hf_name(&t.name).map(|n| (n, t)))
        .collect();
    let mut n = 0;
    for lin in model.linears_mut() {
        let Some(t) = by_name.get(&format!("{}.weight", lin.name)) else {
            continue;
        };
        let Some(mut q) = QWeight::from_gguf(t.dtype, g.bytes(t), &t.shape) else {
            continue;
        };
        if lin.layout != Layout::OutIn || (q.rows(), q.cols()) != (lin.out_dim, lin.in_dim) {
            continue;
        }
        if let Some(h) = permuted_heads(&lin.name, nh, nkv) {
            let Some(u) = q.unpermute_rows(h) else {
                continue;
            };
            q = u;
        }
        lin.quant = Some(Arc::new(q));
        n += 1;
    }
    // A head tied to the token embeddings decodes from the embedding table's blocks.
    if model.lm_head.is_none() {
        let wte = &mut model.wte;
        if let Some(t) = by_name.get("model.embed_tokens.weight") {
            if let Some(q) = QWeight::from_gguf(t.dtype, g.bytes(t), &t.shape) {
                if q.cols() == wte.dim && Some(q.rows()) == wte.weight.dims().first().copied() {
                    wte.quant = Some(Arc::new(q));
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}
