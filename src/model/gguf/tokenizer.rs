//! Rebuilding an HF `tokenizer.json` from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is rebuilt: the vocabulary and merges
//! are copied as they are, and `tokenizer.ggml.pre` picks the pre-tokenizer llama.cpp uses for
//! that model family (the same one the original `tokenizer.json` had). Control and
//! user-defined tokens become added tokens so that `<|im_start|>` and friends are matched whole.

use super::GgufFile;
use super::Value as G;
use crate::tokenizer::{byte_level_bpe, byte_level_pre, BpeParts, Tok};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// (normalizer, pre-tokenizer) for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: Option<&str>, file: &str) -> Result<(Value, Value)> {
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => (Value::Null, byte_level_pre(true)),
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level_pre(true)]}),
        ),
        "llama-bpe" | "llama3" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level_pre(false)]}),
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level_pre(false)]}),
        ),
        other => bail!(
            "{file}: metadata tokenizer.ggml.pre = {other:?} is not supported (default, gpt-2, smollm, starcoder, refact, llama-bpe, qwen2)"
        ),
    })
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let file = g.path.display();
    let Some(v) = g.get(key) else {
        bail!("{file}: missing metadata {key}");
    };
    let G::Array(items) = v else {
        bail!("{file}: metadata {key} must be an array of strings");
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .with_context(|| format!("{file}: metadata {key}[{i}] is not a string"))
        })
        .collect()
}

/// The tokenizer and the chat template (if any) stored in a GGUF file.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<(Tok, Option<String>)> {
    let file = g.path.display().to_string();
    match g.get_str("tokenizer.ggml.model")? {
        Some("gpt2") => {}
        Some(other) => bail!(
            "{file}: metadata tokenizer.ggml.model = {other:?} is not supported (gpt2, i.e. byte-level BPE)"
        ),
        None => bail!("{file}: missing metadata tokenizer.ggml.model"),
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?;
    let merges = string_array(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        Some(G::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        Some(_) => bail!("{file}: metadata tokenizer.ggml.token_type must be an integer array"),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!(
            "{file}: tokenizer.ggml.token_type has {} entries, tokenizer.ggml.tokens {}",
            types.len(),
            tokens.len()
        );
    }
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.insert(t.to_string(), json!(id)).is_some() {
            bail!("{file}: token {t:?} appears twice in tokenizer.ggml.tokens");
        }
        // 3 = control, 4 = user-defined (llama.cpp's llama_token_type).
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    for (i, m) in merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            bail!(
                "{file}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
            );
        };
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            bail!("{file}: tokenizer.ggml.merges[{i}] = {m:?} uses a token not in the vocabulary");
        }
    }
    let id = |key: &str| -> Result<Option<u32>> {
        let v = g.get_u64(key)?;
        if let Some(i) = v.filter(|&i| i as usize >= tokens.len()) {
            bail!(
                "{file}: metadata {key} = {i} is outside the vocabulary of {}",
                tokens.len()
            );
        }
        Ok(v.map(|i| i as u32))
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let add_bos = matches!(g.get("tokenizer.ggml.add_bos_token"), Some(G::Bool(true)));
    let (normalizer, pre) = pre_tokenizer(g.get_str("tokenizer.ggml.pre")?, &file)?;
    let bos_token = bos.filter(|_| add_bos).map(|b| (b, tokens[b as usize]));
    let inner = byte_level_bpe(BpeParts {
        vocab,
        merges: merges.iter().map(|m| json!(m)).collect(),
        added,
        normalizer,
        pre_tokenizer: pre,
        bos: bos_token,
    })
    .with_context(|| format!("{file}: cannot build a tokenizer from the metadata"))?;
    let mut tok = Tok::wrap(inner);
    tok.origin = file.to_string();
    tok.eos_id = eos.or(tok.eos_id);
    tok.bos_id = bos.or(tok.bos_id);
    let template = g.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok((tok, template))
}
