//! Preference data: every JSONL form and each skip reason named by file:line, the HH-RLHF
//! split, which tokens are scored (text and chat), and the reference cache's key.

mod common;
use common::*;
use lmforge::chat::ChatTemplate;
use lmforge::data::preference::{self, split_dialogues, Counts, Record, Text, Warn};
use lmforge::data::sft::{Formatter, Tokenized, DEFAULT_TEMPLATE};
use lmforge::tokenizer::Tok;
use lmforge::train::reference::RefCache;
use serde_json::json;
use std::cell::RefCell;
use std::path::Path;

fn tok() -> Tok {
    Tok::from_file(&fixture("tokenizer/tokenizer.json")).unwrap()
}

#[test]
fn every_data_form_reads_and_bad_records_are_counted_by_line() {
    let d = tmpdir("pref_forms");
    let msgs = |r: &str, c: &str| json!([{"role": r, "content": c}]);
    let rows = [
        json!({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}),
        json!({"prompt": msgs("user", "hi"), "chosen": msgs("assistant", "hello"), "rejected": msgs("assistant", "go")}),
        json!({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}),
        json!({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"}),
        json!({"prompt": "x", "completion": "y", "label": false}),
        json!({"prompt": "same", "chosen": "a", "rejected": "a"}),
        json!({"prompt": "p", "chosen": "  ", "rejected": "b"}),
        json!({"chosen": "no dialogue here", "rejected": "nothing shared"}),
    ];
    let p = d.join("prefs.jsonl");
    write_jsonl(&p, &rows);
    let said = RefCell::new(Vec::new());
    let say = |s: &str| said.borrow_mut().push(s.to_string());
    let mut counts = Counts::default();
    let recs = preference::read(
        &p,
        &Warn {
            strict: false,
            say: &say,
        },
        &mut counts,
    )
    .unwrap();
    assert_eq!(recs.len(), 5);
    assert_eq!(
        (
            counts.read,
            counts.identical,
            counts.empty,
            counts.unsplittable
        ),
        (8, 1, 1, 1)
    );
    let said = said.into_inner();
    for (line, what) in [(6, "identical"), (7, "empty"), (8, "share no prompt")] {
        assert!(
            said.iter()
                .any(|s| s.contains(&format!("prefs.jsonl:{line}: skipped")) && s.contains(what)),
            "{said:?}"
        );
    }
    match &recs[2].record {
        Record::Pair {
            prompt: Text::Messages(p),
            chosen: Text::Messages(c),
            ..
        } => {
            assert_eq!(
                (p.len(), c[0].content.as_str()),
                (1, "good"),
                "implicit prompt = shared messages"
            );
        }
        r => panic!("{r:?}"),
    }
    match &recs[3].record {
        Record::Pair {
            prompt: Text::Plain(p),
            chosen: Text::Plain(c),
            rejected: Text::Plain(r),
            ..
        } => {
            assert!(p.ends_with("\n\nHuman: c\n\nAssistant:"), "{p:?}");
            assert_eq!((c.as_str(), r.as_str()), (" yes", " no"));
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        recs[4].record,
        Record::Unpaired { label: false, .. }
    ));
    // --strict: the first skip is an error naming file:line.
    let mut c = Counts::default();
    let e = preference::read(
        &p,
        &Warn {
            strict: true,
            say: &|_| {},
        },
        &mut c,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prefs.jsonl:6") && e.contains("--strict"), "{e}");
    // A record of the wrong shape is an error, not a skip.
    write_jsonl(&p, &[json!({"prompt": "p", "chosen": "c"})]);
    let e = preference::read(
        &p,
        &Warn {
            strict: false,
            say: &|_| {},
        },
        &mut Counts::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("prefs.jsonl:1"), "{e}");
}

#[test]
fn hh_dialogues_split_at_the_last_shared_assistant_turn() {
    let (p, c, r) = split_dialogues(
        "\n\nHuman: hi\n\nAssistant: Sure!",
        "\n\nHuman: hi\n\nAssistant: Sorry.",
    )
    .unwrap();
    assert_eq!(
        (p.as_str(), c.as_str(), r.as_str()),
        ("\n\nHuman: hi\n\nAssistant:", " Sure!", " Sorry.")
    );
    // Completions that share a first word still split at the turn, not inside the answer.
    let (p, c, _) = split_dialogues(
        "\n\nHuman: q\n\nAssistant: I think so",
        "\n\nHuman: q\n\nAssistant: I do not",
    )
    .unwrap();
    assert_eq!(
        (p.as_str(), c.as_str()),
        ("\n\nHuman: q\n\nAssistant:", " I think so")
    );
    assert!(split_dialogues("abc", "abd").is_none());
    let m = preference::dialogue_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:")
        .unwrap();
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
}

/// The text of a sequence's scored tokens.
fn scored(tok: &Tok, t: &Tokenized) -> String {
    let ids: Vec<u32> = t
        .ids
        .iter()
        .zip(&t.train)
        .filter(|x| *x.1)
        .map(|x| *x.0)
        .collect();
    tok.decode(&ids, false).unwrap()
}

#[test]
fn only_the_completion_is_scored_text_and_chat() {
    let tok = tok();
    let d = tmpdir("pref_mask");
    let p = d.join("p.jsonl");
    let multi = json!([{"role": "user", "content": "first"}, {"role": "assistant", "content": "earlier answer"},
                       {"role": "user", "content": "second"}]);
    write_jsonl(
        &p,
        &[
            json!({"prompt": "Question: colour?", "chosen": " Blue sky", "rejected": " Red"}),
            json!({"prompt": multi, "chosen": [{"role": "assistant", "content": "new answer"}],
               "rejected": [{"role": "assistant", "content": "other"}]}),
        ],
    );
    let mut counts = Counts::default();
    let warn = Warn {
        strict: true,
        say: &|_| {},
    };
    let recs = preference::read(&p, &warn, &mut counts).unwrap();
    let tpl = ChatTemplate::new(DEFAULT_TEMPLATE.into(), None, Some("<|endoftext|>".into()));
    // Text through a plain model: the completion and EOS.
    let plain = Formatter {
        tok: &tok,
        template: None,
        train_on_prompt: false,
        eos: tok.eos_id,
    };
    let pairs = preference::tokenize_pairs(&plain, &recs[..1], 512, &warn, &mut counts).unwrap();
    assert_eq!(scored(&tok, &pairs[0].chosen), " Blue sky<|endoftext|>");
    assert_eq!(scored(&tok, &pairs[0].rejected), " Red<|endoftext|>");
    // A conversation: the new assistant turn and its end marker, not the earlier one.
    let chat = Formatter {
        tok: &tok,
        template: Some(&tpl),
        train_on_prompt: false,
        eos: tok.eos_id,
    };
    let pairs = preference::tokenize_pairs(&chat, &recs[1..], 512, &warn, &mut counts).unwrap();
    let s = scored(&tok, &pairs[0].chosen);
    assert!(s.contains("new answer") && !s.contains("earlier"), "{s:?}");
    // A prompt that fills the length limit leaves no room: counted and named.
    let said = RefCell::new(Vec::new());
    let say = |s: &str| said.borrow_mut().push(s.to_string());
    let warn = Warn {
        strict: false,
        say: &say,
    };
    let mut c = Counts::default();
    let long = preference::read(&p, &warn, &mut c).unwrap();
    let e = preference::tokenize_pairs(&plain, &long[..1], 4, &warn, &mut c).unwrap_err();
    assert!(
        e.to_string().contains("no usable pairs") && c.no_room == 1,
        "{e}"
    );
    assert!(said
        .borrow()
        .iter()
        .any(|s| s.contains("p.jsonl:1") && s.contains("no room")));
}

#[test]
fn the_reference_cache_is_keyed_by_model_data_and_tokenizer() {
    let d = tmpdir("pref_cache");
    let model = fixture("llama_tiny");
    let data = tiny_pairs(&d, 4);
    let tok = Tok::from_file(&model.join("tokenizer.json")).unwrap();
    let seqs = [Tokenized {
        ids: vec![1, 2, 3],
        train: vec![false, true, true],
    }];
    let refs: Vec<&Tokenized> = seqs.iter().collect();
    let key = |model: &Path, tok: &Tok, data: &Path, what: &str| {
        RefCache::new(&d.join("cache"), model, tok, data, &refs, what)
            .unwrap()
            .path
    };
    let base = key(&model, &tok, &data, "dpo");
    assert_eq!(
        base,
        key(&model, &tok, &data, "dpo"),
        "same inputs, same cache"
    );
    // Another model: a copy whose weights differ in one byte.
    let m2 = d.join("model2");
    std::fs::create_dir_all(&m2).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m2.join(f.file_name().unwrap())).unwrap();
    }
    assert_eq!(
        base,
        key(&m2, &tok, &data, "dpo"),
        "a byte-identical copy is the same model"
    );
    let w = m2.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, bytes).unwrap();
    assert_ne!(base, key(&m2, &tok, &data, "dpo"), "changed weights");
    // Other data.
    let data2 = d.join("pairs2.jsonl");
    std::fs::write(
        &data2,
        std::fs::read_to_string(&data)
            .unwrap()
            .replace("gladly", "happily"),
    )
    .unwrap();
    assert_ne!(base, key(&model, &tok, &data2, "dpo"), "changed data");
    // Another tokenizer (one more special token).
    let mut inner = tok.inner.clone();
    inner
        .add_special_tokens([tokenizers::AddedToken::from("<|extra|>", true)])
        .unwrap();
    let tok2 = Tok::wrap(inner);
    assert_ne!(base, key(&model, &tok2, &data, "dpo"), "changed tokenizer");
    assert_ne!(
        base,
        key(&model, &tok, &data, "kto"),
        "another method's sequences"
    );
    // Round trip, and a damaged file is recomputed rather than read.
    let c = RefCache::new(&d.join("cache"), &model, &tok, &data, &refs, "dpo").unwrap();
    assert_eq!(c.load(1).unwrap(), None);
    c.store(&[-3.5]).unwrap();
    assert_eq!(c.load(1).unwrap(), Some(vec![-3.5]));
    assert_eq!(c.load(2).unwrap(), None, "a count mismatch is not a hit");
    let mut b = std::fs::read(&c.path).unwrap();
    b.truncate(b.len() - 2);
    std::fs::write(&c.path, b).unwrap();
    assert_eq!(c.load(1).unwrap(), None);
    // A file of the cache's name that lmforge did not write is neither read nor replaced.
    std::fs::write(&c.path, "my notes").unwrap();
    let e = c.load(1).unwrap_err().to_string();
    assert!(e.contains("not an lmforge reference cache"), "{e}");
    assert!(c.store(&[1.0]).is_err());
    assert_eq!(std::fs::read_to_string(&c.path).unwrap(), "my notes");
}
