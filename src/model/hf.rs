//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards),
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`. What lmforge writes is
//! the same kind of directory it reads, and loads in transformers unchanged.

use super::config::{Family, ModelConfig};
use super::decoder::DecoderModel;
use super::encoder::{Encoder, EncoderConfig, Heads};
use super::gguf::{self, GgufFile};
use super::loader::WeightSource;
use super::params::ParamStore;
use crate::chat::{template_from_dir, ChatTemplate};
use crate::fsutil::write_json;
use crate::outdir::write_output;
use crate::tokenizer::{hf_tokenizer_config, load_from_dir, Tok};
use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;

pub struct LoadedModel {
    pub model: DecoderModel,
    pub store: ParamStore,
    pub tok: Tok,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    /// The model's Jinja chat template, if it ships one.
    pub chat_template: Option<String>,
}

impl LoadedModel {
    /// Applies the PEFT adapter in `dir` (any method lmforge trains, switched on) and, when the
    /// adapter ships a chat template (`sft` saves the one it trained with), uses that template.
    pub fn apply_adapter(&mut self, dir: &Path) -> Result<()> {
        let switch = crate::peft::AdapterSwitch::default();
        crate::peft::load(dir, &mut self.model, &mut self.store, &switch)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        if let Some(t) = template_from_dir(dir)? {
            self.chat_template = Some(t);
        }
        Ok(())
    }

    /// The ids that end a response: the model's EOS ids, else the tokenizer's EOS.
    pub fn stop_ids(&self) -> Vec<u32> {
        if self.eos_ids.is_empty() {
            self.tok.eos_id.into_iter().collect()
        } else {
            self.eos_ids.clone()
        }
    }

    /// The chat template with this model's special tokens, or an error naming `what`.
    pub fn chat(&self, what: &str) -> Result<ChatTemplate> {
        let src = self
            .chat_template
            .clone()
            .with_context(|| format!("{what}: the model has no chat template"))?;
        let name = |id: Option<u32>| id.and_then(|i| self.tok.inner.id_to_token(i));
        Ok(ChatTemplate::new(
            src,
            name(self.model.cfg.bos_token_id.or(self.tok.bos_id)),
            name(self.eos_ids.first().copied().or(self.tok.eos_id)),
        ))
    }
}

/// Loads a model from an HF directory or a `.gguf` file.
pub fn load(path: &Path, dev: &Device, frozen: &dyn Fn(&str) -> bool) -> Result<LoadedModel> {
    load_with_blocks(path, dev, frozen, false)
}

/// `load`, and with `blocks` a `.gguf` model on the CPU also keeps its Q4_0/Q4_1/Q8_0 blocks
/// for decoding (`gguf::llama::attach_quantized`), read from the file already opened.
pub fn load_with_blocks(
    path: &Path,
    dev: &Device,
    frozen: &dyn Fn(&str) -> bool,
    blocks: bool,
) -> Result<LoadedModel> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let g = GgufFile::open(path)?;
        let m = gguf::llama::load(&g)?;
        let mut store = ParamStore::new(dev.clone());
        let mut model = DecoderModel::load(&m.cfg, &mut store, &m.weights, frozen)?;
        if blocks && matches!(dev, Device::Cpu) {
            gguf::llama::attach_quantized(&mut model, &g)?;
        }
        Ok(LoadedModel {
            model,
            store,
            tok: m.tok,
            eos_ids: m.eos_ids,
            chat_template: m.chat_template,
        })
    } else if path.is_file() {
        anyhow::bail!(
            "{}: expected a model directory or a .gguf file",
            path.display()
        )
    } else {
        load_dir(path, dev, frozen)
    }
}

/// QLoRA: loads a .gguf model with every weight frozen and its quantized linear layers kept
/// as GGUF blocks (never dequantized; `kernels::qlinear` reads them). Returns the model and
/// the number of layers and bytes kept in blocks.
pub fn load_qlora(path: &Path, dev: &Device) -> Result<(LoadedModel, usize, usize)> {
    if !(path.is_file() && path.extension().is_some_and(|e| e == "gguf")) {
        anyhow::bail!(
            "{}: --qlora keeps a GGUF file's quantized weights; give a .gguf model",
            path.display()
        );
    }
    if !matches!(dev, Device::Cpu) {
        anyhow::bail!("--qlora runs on the CPU (the quantized GEMM is a CPU kernel)");
    }
    let g = GgufFile::open(path)?;
    let m = gguf::llama::load_with(&g, true)?;
    let (n, bytes) = (m.blocks.len(), m.blocks.values().map(|q| q.nbytes()).sum());
    let mut store = ParamStore::new(dev.clone());
    let model =
        DecoderModel::load_with_blocks(&m.cfg, &mut store, &m.weights, &|_| true, Some(&m.blocks))?;
    let loaded = LoadedModel {
        model,
        store,
        tok: m.tok,
        eos_ids: m.eos_ids,
        chat_template: m.chat_template,
    };
    Ok((loaded, n, bytes))
}

/// Loads an HF model directory (weights must match the config exactly).
pub fn load_dir(dir: &Path, dev: &Device, frozen: &dyn Fn(&str) -> bool) -> Result<LoadedModel> {
    let (cfg, weights) = open_dir(dir)?;
    let mut store = ParamStore::new(dev.clone());
    let model = DecoderModel::load(&cfg, &mut store, &weights, frozen)?;
    let (tok, eos_ids, chat_template) = dir_extras(dir, &cfg)?;
    Ok(LoadedModel {
        model,
        store,
        tok,
        eos_ids,
        chat_template,
    })
}

/// A decoder directory's config and weights (GPT-2's `transformer.` prefix optional).
pub fn open_dir(dir: &Path) -> Result<(ModelConfig, WeightSource)> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a model directory", dir.display());
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut weights = WeightSource::open_dir(dir)?;
    if cfg.family == Family::Gpt2 {
        weights = weights.with_strip_prefix("transformer.");
    }
    Ok((cfg, weights))
}

/// The tokenizer (checked against the config), EOS ids and chat template of a directory.
pub fn dir_extras(dir: &Path, cfg: &ModelConfig) -> Result<(Tok, Vec<u32>, Option<String>)> {
    let tok = load_from_dir(dir)?;
    tok.check_fits(cfg.vocab_size, &dir.display().to_string())?;
    let eos = eos_ids(dir, cfg, &tok)?;
    Ok((tok, eos, template_from_dir(dir)?))
}

fn eos_ids(dir: &Path, cfg: &ModelConfig, tok: &Tok) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = crate::input::read_text(&path, crate::input::MAX_CONFIG_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => {
                return Ok(n.as_u64().into_iter().map(|x| x as u32).collect())
            }
            Some(Value::Array(a)) => {
                return Ok(a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect())
            }
            _ => {}
        }
    }
    Ok(cfg.eos_token_id.or(tok.eos_id).into_iter().collect())
}

/// Writes the model's files into `dir` (which must exist); not atomic on its own.
pub fn write_files(dir: &Path, model: &DecoderModel, store: &ParamStore, tok: &Tok) -> Result<()> {
    write_files_with(dir, model, store, tok, None)
}

/// `write_files`, with a chat template stored in `tokenizer_config.json`.
pub fn write_files_with(
    dir: &Path,
    model: &DecoderModel,
    store: &ParamStore,
    tok: &Tok,
    chat_template: Option<&str>,
) -> Result<()> {
    let mut cfg = model.cfg.clone();
    cfg.eos_token_id = cfg.eos_token_id.or(tok.eos_id);
    cfg.bos_token_id = cfg.bos_token_id.or(tok.bos_id).or(tok.eos_id);
    write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
    store.save_safetensors(&dir.join("model.safetensors"))?;
    tok.save(&dir.join("tokenizer.json"))?;
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
    let mut tc = hf_tokenizer_config(tok, cfg.max_position_embeddings);
    tc["eos_token"] = json!(name(cfg.eos_token_id));
    tc["bos_token"] = json!(name(cfg.bos_token_id));
    if let Some(t) = chat_template {
        tc["chat_template"] = json!(t);
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)?;
    let gen = json!({
        "_from_model_config": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    });
    write_json(&dir.join("generation_config.json"), &gen)
}

/// Writes a complete HF model directory atomically (a crash leaves the old one intact).
pub fn save_dir(dir: &Path, model: &DecoderModel, store: &ParamStore, tok: &Tok) -> Result<()> {
    write_output(dir, "model", |tmp| write_files(tmp, model, store, tok))
}

/// Writes a loaded model (e.g. one read from GGUF) as an HF directory, atomically.
pub fn save_loaded(dir: &Path, m: &LoadedModel) -> Result<()> {
    write_output(dir, "model", |tmp| {
        write_files_with(tmp, &m.model, &m.store, &m.tok, m.chat_template.as_deref())
    })
}

/// An encoder (BERT) HF directory, loaded.
pub struct LoadedEncoder {
    pub model: Encoder,
    pub store: ParamStore,
    pub tok: Tok,
    /// Heads the checkpoint did not have, initialised fresh.
    pub fresh: Vec<String>,
}

/// Loads a BERT directory (`BertModel`, `BertForMaskedLM`, … weights; a `bert.` prefix or none).
pub fn load_encoder(
    dir: &Path,
    dev: &Device,
    heads: Heads,
    frozen: &dyn Fn(&str) -> bool,
) -> Result<LoadedEncoder> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a model directory", dir.display());
    }
    let cfg = EncoderConfig::from_file(&dir.join("config.json"))?;
    let weights = WeightSource::open_dir(dir)?.with_strip_prefix("bert.");
    let mut store = ParamStore::new(dev.clone());
    let (model, fresh) = Encoder::load(&cfg, &mut store, &weights, heads, frozen)?;
    let tok = load_from_dir(dir)?;
    tok.check_fits(cfg.vocab_size, &dir.display().to_string())?;
    Ok(LoadedEncoder {
        model,
        store,
        tok,
        fresh,
    })
}

/// Writes an encoder as an HF directory (atomically); `architecture` names the transformers
/// class that loads it (`BertForMaskedLM`, `BertForSequenceClassification`, …).
pub fn save_encoder(
    dir: &Path,
    model: &Encoder,
    store: &ParamStore,
    tok: &Tok,
    architecture: &str,
) -> Result<()> {
    write_output(dir, "model", |tmp| {
        write_encoder_files(tmp, model, store, tok, architecture)
    })
}

/// The files of `save_encoder` into an existing `dir`; not atomic on its own.
pub fn write_encoder_files(
    dir: &Path,
    model: &Encoder,
    store: &ParamStore,
    tok: &Tok,
    architecture: &str,
) -> Result<()> {
    write_json(
        &dir.join("config.json"),
        &model.cfg.to_hf_json(architecture),
    )?;
    store.save_safetensors(&dir.join("model.safetensors"))?;
    tok.save(&dir.join("tokenizer.json"))?;
    let tc = hf_tokenizer_config(tok, model.cfg.max_position_embeddings);
    write_json(&dir.join("tokenizer_config.json"), &tc)
}
