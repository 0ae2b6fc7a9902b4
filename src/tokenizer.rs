//! Tokenizers: byte-level BPE trained from a corpus, or any HF `tokenizer.json`.
//!
//! Training follows GPT-2's recipe (Radford et al. 2019): byte-level alphabet so no input is
//! ever unknown, GPT-2's pre-tokenisation regex, no prefix space, and `<|endoftext|>` as the
//! document separator. The result is a plain `tokenizer.json` that transformers loads.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

pub const EOT: &str = "<|endoftext|>";

pub struct Tok {
    pub inner: Tokenizer,
    /// End-of-sequence / document separator id, if the vocabulary has one.
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
}

impl Tok {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self::wrap(inner))
    }

    pub fn wrap(inner: Tokenizer) -> Self {
        let find = |cands: &[&str]| cands.iter().find_map(|t| inner.token_to_id(t));
        let eos_id = find(&[EOT, "</s>", "<|im_end|>", "<|end_of_text|>", "<eos>"]);
        let bos_id = find(&["<s>", "<|begin_of_text|>", "<bos>"]);
        Self {
            inner,
            eos_id,
            bos_id,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes like transformers' `tokenizer(text)` when `special` (post-processor applied,
    /// e.g. a BOS for Llama tokenizers), or as raw text pieces otherwise.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow::anyhow!("{}: cannot write tokenizer: {e}", path.display()))
    }

    /// A model whose embedding has fewer rows than the tokenizer has ids would index out of range.
    pub fn check_fits(&self, model_vocab: usize, what: &str) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab {
            bail!("{what}: tokenizer has {n} tokens but the model's embedding has only {model_vocab} rows");
        }
        Ok(())
    }
}

/// Trains a byte-level BPE tokenizer on `texts` with `vocab_size` entries (specials included).
pub fn train_bpe<I>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<Tok>
where
    I: Iterator<Item = String> + Send,
{
    if vocab_size < 256 + 1 {
        bail!("vocab size must be at least 257 (256 byte symbols + {EOT}), got {vocab_size}");
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tk: tokenizers::TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()))
        .build()
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    tk.train(&mut trainer, texts)
        .map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;
    let tok = Tok::wrap(Tokenizer::from(tk));
    if tok.eos_id.is_none() {
        bail!("internal error: trained tokenizer lacks {EOT}");
    }
    Ok(tok)
}

/// The `tokenizer_config.json` transformers needs to know the special tokens of our tokenizers.
pub fn hf_tokenizer_config(tok: &Tok, model_max_length: usize) -> serde_json::Value {
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "eos_token": name(tok.eos_id),
        "bos_token": name(tok.bos_id.or(tok.eos_id)),
        "unk_token": name(tok.eos_id),
        "clean_up_tokenization_spaces": false,
    })
}

/// Reads `tokenizer.json` from a model directory, with a clear error when absent.
pub fn load_from_dir(dir: &Path) -> Result<Tok> {
    let p = dir.join("tokenizer.json");
    if !p.exists() {
        bail!("{}: no tokenizer.json", dir.display());
    }
    Tok::from_file(&p).with_context(|| format!("loading tokenizer of {}", dir.display()))
}
