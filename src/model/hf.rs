//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards),
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`. What lmforge writes is
//! the same kind of directory it reads, and loads in transformers unchanged.

use super::config::{Family, ModelConfig};
use super::decoder::DecoderModel;
use super::loader::WeightSource;
use super::params::ParamStore;
use crate::fsutil::{write_dir, write_json};
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
}

/// Loads an HF model directory (weights must match the config exactly).
pub fn load_dir(dir: &Path, dev: &Device, frozen: &dyn Fn(&str) -> bool) -> Result<LoadedModel> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a model directory", dir.display());
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut weights = WeightSource::open_dir(dir)?;
    if cfg.family == Family::Gpt2 {
        weights = weights.with_strip_prefix("transformer.");
    }
    let mut store = ParamStore::new(dev.clone());
    let model = DecoderModel::load(&cfg, &mut store, &weights, frozen)?;
    let tok = load_from_dir(dir)?;
    tok.check_fits(cfg.vocab_size, &dir.display().to_string())?;
    let eos_ids = eos_ids(dir, &cfg, &tok)?;
    Ok(LoadedModel {
        model,
        store,
        tok,
        eos_ids,
    })
}

fn eos_ids(dir: &Path, cfg: &ModelConfig, tok: &Tok) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
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
    let mut cfg = model.cfg.clone();
    cfg.eos_token_id = cfg.eos_token_id.or(tok.eos_id);
    cfg.bos_token_id = cfg.bos_token_id.or(tok.bos_id).or(tok.eos_id);
    write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
    store.save_safetensors(&dir.join("model.safetensors"))?;
    tok.save(&dir.join("tokenizer.json"))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &hf_tokenizer_config(tok, cfg.max_position_embeddings),
    )?;
    let gen = json!({
        "_from_model_config": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    });
    write_json(&dir.join("generation_config.json"), &gen)
}

/// Writes a complete HF model directory atomically (a crash leaves the old one intact).
pub fn save_dir(dir: &Path, model: &DecoderModel, store: &ParamStore, tok: &Tok) -> Result<()> {
    write_dir(dir, |tmp| write_files(tmp, model, store, tok))
}
