//! Tokenizers: byte-level BPE trained from a corpus, or any HF `tokenizer.json`.
//!
//! Training follows GPT-2's recipe (Radford et al. 2019): byte-level alphabet so no input is
//! ever unknown, GPT-2's pre-tokenisation regex, no prefix space, and `<|endoftext|>` as the
//! document separator. The result is a plain `tokenizer.json` that transformers loads.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::str::FromStr;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

pub const EOT: &str = "<|endoftext|>";

/// A token's byte range in the encoded text.
pub type Span = (usize, usize);

pub struct Tok {
    pub inner: Tokenizer,
    /// End-of-sequence / document separator id, if the vocabulary has one.
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
    /// Where it came from (a `tokenizer.json`, a GGUF file), for errors.
    pub origin: String,
}

thread_local! {
    static IN_ENCODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside the tokenizers crate into an error. A tokenizer file is
/// code of a kind: a pre-tokenizer regex with catastrophic backtracking makes oniguruma give up
/// (its retry limit), and the crate panics on that. The panic message is kept from stderr.
fn guarded<T>(origin: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_ENCODE.with(|g| g.get()) {
                default(info);
            }
        }));
    });
    IN_ENCODE.with(|g| g.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_ENCODE.with(|g| g.set(false));
    r.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(anyhow::anyhow!(
            "{origin}: the tokenizer failed on this input ({why}); its pre-tokenizer regex may backtrack catastrophically"
        ))
    })
}

impl Tok {
    pub fn from_file(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text = crate::input::read_text(path, crate::input::MAX_CONFIG_BYTES)?;
        let inner = guarded(&origin, || {
            text.parse::<Tokenizer>()
                .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))
        })?;
        let mut t = Self::wrap(inner);
        t.origin = origin;
        Ok(t)
    }

    pub fn wrap(inner: Tokenizer) -> Self {
        let find = |cands: &[&str]| cands.iter().find_map(|t| inner.token_to_id(t));
        let eos_id = find(&[
            EOT,
            "</s>",
            "<|im_end|>",
            "<|end_of_text|>",
            "<eos>",
            "[SEP]",
        ]);
        let bos_id = find(&["<s>", "<|begin_of_text|>", "<bos>", "[CLS]"]);
        Self {
            inner,
            eos_id,
            bos_id,
            origin: "the tokenizer".into(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes like transformers' `tokenizer(text)` when `special` (post-processor applied,
    /// e.g. a BOS for Llama tokenizers), or as raw text pieces otherwise.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.encoding(text, special)?;
        Ok(enc.get_ids().to_vec())
    }

    fn encoding(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        guarded(&self.origin, || {
            self.inner
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.origin))
        })
    }

    /// `encode` with each token's byte range in `text` (`None` for tokens the post-processor
    /// added, e.g. BOS). Byte-level tokenizers may trim a leading space out of the range.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        special: bool,
    ) -> Result<(Vec<u32>, Vec<Option<Span>>)> {
        let enc = self.encoding(text, special)?;
        let spec = enc.get_special_tokens_mask();
        let offs = enc
            .get_offsets()
            .iter()
            .zip(spec)
            .map(|(&o, &s)| (s == 0 || o.0 != o.1).then_some(o))
            .collect();
        Ok((enc.get_ids().to_vec(), offs))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("{}: cannot write tokenizer: {e}", path.display()))?;
        crate::fsutil::write_file(path, json.as_bytes())
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

/// Trains a BERT-style WordPiece tokenizer (lower-cased, BERT pre-tokenization, `##`
/// continuations) with [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0–4 and BERT's
/// `[CLS] A [SEP] (B [SEP])` post-processor.
pub fn train_wordpiece<I>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<Tok>
where
    I: Iterator<Item = String> + Send,
{
    use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
    use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::Model as _;
    const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    if vocab_size < 64 {
        bail!("vocab size must be at least 64 for a WordPiece tokenizer, got {vocab_size}");
    }
    let mut trainer = WordPieceTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(SPECIAL.iter().map(|s| AddedToken::from(*s, true)).collect())
        .build();
    let mut tk: tokenizers::TokenizerImpl<
        WordPiece,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(
            WordPiece::builder()
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?,
        )
        .with_normalizer(Some(BertNormalizer::new(true, true, None, true).into()))
        .with_pre_tokenizer(Some(BertPreTokenizer.into()))
        .with_post_processor(None)
        .with_decoder(Some(WordPieceDecoder::default().into()))
        .build()
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    tk.train(&mut trainer, texts)
        .map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;
    // The trainer numbers the `##` continuation tokens in hash-map order, so two trainings on
    // the same text gave different ids. WordPiece only asks whether a piece is in the
    // vocabulary, so any order serves: the specials keep 0–4, the rest is sorted by
    // (length, text), and the same corpus always gives the same tokenizer.
    let mut rest: Vec<String> = tk
        .get_model()
        .get_vocab()
        .into_keys()
        .filter(|t| !SPECIAL.contains(&t.as_str()))
        .collect();
    rest.sort_by(|a, b| (a.chars().count(), a).cmp(&(b.chars().count(), b)));
    let vocab: serde_json::Map<String, serde_json::Value> = SPECIAL
        .iter()
        .map(|s| s.to_string())
        .chain(rest)
        .enumerate()
        .map(|(i, t)| (t, serde_json::json!(i)))
        .collect();
    let spec = serde_json::json!({"type": "WordPiece", "unk_token": "[UNK]",
        "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab});
    // From text: the model's deserializer borrows strings, which a `Value` cannot lend.
    let model: WordPiece = serde_json::from_str(&spec.to_string())
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    tk.with_model(model);
    let id = |t: &str| {
        tk.token_to_id(t)
            .with_context(|| format!("internal error: trained tokenizer lacks {t}"))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    tk.with_post_processor(Some(PostProcessorWrapper::from(post)));
    Ok(Tok::wrap(Tokenizer::from(tk)))
}

/// The `tokenizer_config.json` transformers needs to know the special tokens of our tokenizers.
pub fn hf_tokenizer_config(tok: &Tok, model_max_length: usize) -> serde_json::Value {
    let name = |id: Option<u32>| id.and_then(|i| tok.inner.id_to_token(i));
    let mut v = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "eos_token": name(tok.eos_id),
        "bos_token": name(tok.bos_id.or(tok.eos_id)),
        "unk_token": name(tok.eos_id),
        "clean_up_tokenization_spaces": false,
    });
    // BERT-style vocabularies name their special tokens; transformers needs them all.
    for (k, t) in [
        ("pad_token", "[PAD]"),
        ("unk_token", "[UNK]"),
        ("cls_token", "[CLS]"),
        ("sep_token", "[SEP]"),
        ("mask_token", "[MASK]"),
    ] {
        if tok.inner.token_to_id(t).is_some() {
            v[k] = json!(t);
        }
    }
    v
}

/// GPT-2's byte-level pre-tokenizer (regex split unless `use_regex` is false), no prefix space.
pub fn byte_level_pre(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// What a byte-level BPE `tokenizer.json` is made of, when it has to be assembled from parts
/// (GGUF metadata, or GPT-2's older `vocab.json` + `merges.txt`).
pub struct BpeParts<'a> {
    /// token → id
    pub vocab: Map<String, Value>,
    /// `"a b"` strings or `["a", "b"]` pairs.
    pub merges: Vec<Value>,
    /// `added_tokens` entries (special tokens matched whole).
    pub added: Vec<Value>,
    pub normalizer: Value,
    pub pre_tokenizer: Value,
    /// A BOS token the post-processor prepends (Llama-3 style), else none.
    pub bos: Option<(u32, &'a str)>,
}

/// Assembles a `tokenizer.json` document from its parts and loads it.
pub fn byte_level_bpe(p: BpeParts) -> Result<Tokenizer> {
    let post = match p.bos {
        Some((id, bt)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bt, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bt, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bt: {"id": bt, "ids": [id], "tokens": [bt]}}}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": p.added, "normalizer": p.normalizer, "pre_tokenizer": p.pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": p.vocab, "merges": p.merges},
    });
    Tokenizer::from_str(&doc.to_string()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads a model directory's tokenizer: `tokenizer.json`, or GPT-2's older `vocab.json` +
/// `merges.txt` (with the special tokens `tokenizer_config.json` names), with a clear error
/// when neither is there.
pub fn load_from_dir(dir: &Path) -> Result<Tok> {
    let p = dir.join("tokenizer.json");
    if p.exists() {
        return Tok::from_file(&p)
            .with_context(|| format!("loading tokenizer of {}", dir.display()));
    }
    let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !(vocab_path.exists() && merges_path.exists()) {
        bail!(
            "{}: no tokenizer.json (nor vocab.json + merges.txt)",
            dir.display()
        );
    }
    let read = |p: &Path| crate::input::read_text(p, crate::input::MAX_CONFIG_BYTES);
    let vocab: Map<String, Value> =
        serde_json::from_str(&read(&vocab_path)?).with_context(|| {
            format!(
                "{}: expected a JSON object of token → id",
                vocab_path.display()
            )
        })?;
    let mut merges = Vec::new();
    for (i, line) in read(&merges_path)?.lines().enumerate() {
        // The first line of GPT-2's file is a `#version` comment.
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        if line.split(' ').count() != 2 {
            bail!(
                "{}:{}: expected two tokens separated by a space",
                merges_path.display(),
                i + 1
            );
        }
        merges.push(json!(line));
    }
    // Special tokens as the slow tokenizer knows them: tokenizer_config.json's named tokens
    // and its added_tokens_decoder.
    let mut specials: Vec<(u32, String)> = Vec::new();
    let cfg_path = dir.join("tokenizer_config.json");
    if cfg_path.exists() {
        let cfg: Value = serde_json::from_str(&read(&cfg_path)?)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let content = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = cfg.get(key).and_then(content) {
                if let Some(id) = vocab.get(&t).and_then(Value::as_u64) {
                    specials.push((id as u32, t));
                }
            }
        }
        if let Some(Value::Object(dec)) = cfg.get("added_tokens_decoder") {
            for (id, v) in dec {
                if let (Ok(id), Some(t)) = (id.parse::<u32>(), content(v)) {
                    specials.push((id, t));
                }
            }
        }
    }
    specials.sort();
    specials.dedup();
    let added = specials
        .iter()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let inner = byte_level_bpe(BpeParts {
        vocab,
        merges,
        added,
        normalizer: Value::Null,
        pre_tokenizer: byte_level_pre(true),
        bos: None,
    })
    .with_context(|| {
        format!(
            "{}: cannot build a tokenizer from vocab.json + merges.txt",
            dir.display()
        )
    })?;
    Ok(Tok::wrap(inner))
}
