//! Entry points for the fuzzers (`fuzz/`, run by `scripts/fuzz.sh`) and the property tests
//! (`tests/hostile.rs`): each takes arbitrary bytes, hands them to one parser the way a user's
//! file would reach it, and returns whatever the parser said. A parser may refuse any input;
//! it may not panic, abort, hang or allocate without bound — that is what the callers check.

use anyhow::Result;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A scratch directory of this process and thread (inputs that must be files go there).
fn scratch() -> PathBuf {
    let tid = format!("{:?}", std::thread::current().id());
    let tid: String = tid.chars().filter(char::is_ascii_digit).collect();
    let d = std::env::temp_dir().join(format!("lmforge-fuzz-{}-{tid}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn file(name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = scratch().join(name);
    std::fs::write(&p, bytes)?;
    Ok(p)
}

/// A GGUF file: header, metadata, tensor table, the llama config, tokenizer and chat template
/// it describes, then the weights.
pub fn gguf(bytes: &[u8]) -> Result<()> {
    let p = file("model.gguf", bytes)?;
    let m = crate::model::hf::load(&p, &candle_core::Device::Cpu, &|_| true)?;
    if let Some(t) = &m.chat_template {
        let tpl = crate::chat::ChatTemplate::new(t.clone(), None, None);
        let _ = tpl.render(&[crate::chat::Message::new("user", "hi")], true);
    }
    m.tok.encode("Hello world", true)?;
    Ok(())
}

/// `model.safetensors` of an HF directory whose `config.json` and tokenizer are `model_dir`'s
/// (a small valid model): the header, dtypes, offsets and shapes are the fuzzed part.
pub fn safetensors(bytes: &[u8], model_dir: &Path) -> Result<()> {
    let d = scratch().join("st");
    std::fs::create_dir_all(&d)?;
    for f in ["config.json", "tokenizer.json"] {
        let (src, dst) = (model_dir.join(f), d.join(f));
        if !dst.exists() {
            std::fs::copy(src, dst)?;
        }
    }
    std::fs::write(d.join("model.safetensors"), bytes)?;
    crate::model::hf::load(&d, &candle_core::Device::Cpu, &|_| true)?;
    Ok(())
}

/// A `tokenizer.json`, loaded and used on a short text.
pub fn tokenizer_json(bytes: &[u8]) -> Result<()> {
    let p = file("tokenizer.json", bytes)?;
    let t = crate::tokenizer::Tok::from_file(&p)?;
    let ids = t.encode(
        "Hello, world! ¿Qué tal? 12345 \n\t  aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!",
        true,
    )?;
    let _ = t.inner.decode(&ids, false);
    Ok(())
}

/// A Jinja chat template, rendered for a short conversation.
pub fn chat_template(bytes: &[u8]) -> Result<()> {
    let src = String::from_utf8_lossy(bytes).into_owned();
    let t = crate::chat::ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()));
    let msgs = [
        crate::chat::Message::new("system", "Be brief."),
        crate::chat::Message::new("user", "Hi"),
        crate::chat::Message::new("assistant", "Hello."),
    ];
    t.render(&msgs, true)?;
    Ok(())
}

/// A TOML recipe, read as each training command's config and checked.
pub fn recipe(bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    let none = HashSet::new();
    let base = || crate::config::Base::Saved {
        text: &text,
        origin: "recipe.toml",
    };
    use crate::train::{finetune::FinetuneOptions, pretrain::PretrainOptions, sft::SftOptions};
    if let Ok(o) = crate::config::load(base(), None, &[], &PretrainOptions::default(), &none) {
        let _ = o.check();
    }
    if let Ok(o) = crate::config::load(base(), None, &[], &SftOptions::default(), &none) {
        let _ = o.train.resolve(&o.train_defaults());
    }
    let o = crate::config::load(base(), None, &[], &FinetuneOptions::default(), &none)?;
    o.train.resolve(&o.train_defaults())?;
    Ok(())
}

/// The line-oriented dataset readers (SFT JSONL, labeled JSONL and CSV, CoNLL, SQuAD JSON,
/// pre-training JSONL), each on the same bytes.
pub fn jsonl(bytes: &[u8]) -> Result<()> {
    let mut any = Ok(());
    let mut note = |r: Result<()>| {
        if r.is_err() {
            any = r;
        }
    };
    let p = file("data.jsonl", bytes)?;
    note(crate::data::sft::read_jsonl(&p).map(drop));
    note(crate::data::labeled::read_labeled(&p).map(drop));
    note(crate::data::conll::read_conll(&p).map(drop));
    note(crate::data::squad::read_squad(&p).map(drop));
    let csv = file("data.csv", bytes)?;
    note(crate::data::labeled::read_labeled(&csv).map(drop));
    let sources = crate::data::collect_sources(std::slice::from_ref(&p))?;
    for piece in crate::data::Pieces::new(sources, false) {
        piece?;
    }
    any
}
