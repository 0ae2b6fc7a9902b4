//! `lmforge finetune --task qa`: SQuAD reading (answer offsets checked, character offsets
//! converted), windows over long contexts, training to exact answers on the tiny BERT, the
//! `BertForQuestionAnswering` layout, decoders refused.

mod common;
use common::*;
use lmforge::data::squad::{read_squad, windows};
use lmforge::model::hf;
use std::path::Path;
use std::process::Command;

#[test]
fn squad_reading_checks_answer_offsets() {
    let d = tmpdir("qa_read");
    let qs = read_squad(Path::new(&squad(&d, "a.json", 3, 1))).unwrap();
    for q in &qs {
        assert!(q.context[q.answers[0].1..].starts_with(&q.answers[0].0));
    }
    let bad = d.join("bad.json");
    std::fs::write(&bad, r#"{"data":[{"paragraphs":[{"context":"in denmark","qas":[{"id":"x7","question":"where?","answers":[{"text":"denmark","answer_start":2}]}]}]}]}"#).unwrap();
    let e = read_squad(&bad).unwrap_err().to_string();
    assert!(e.contains("\"x7\"") && e.contains("answer_start 2"), "{e}");
    std::fs::write(&bad, r#"{"data":[{"paragraphs":[{"context":"c","qas":[{"id":"y","question":"q","answers":[],"is_impossible":true}]}]}]}"#).unwrap();
    assert!(read_squad(&bad)
        .unwrap_err()
        .to_string()
        .contains("SQuAD 2.0"));
}

#[test]
fn windows_cover_the_context_and_locate_the_answer() {
    let d = tmpdir("qa_windows");
    let qs = read_squad(Path::new(&squad(&d, "a.json", 20, 2))).unwrap();
    let m = hf::load_encoder(
        &fixture("bert_tiny"),
        &candle_core::Device::Cpu,
        Default::default(),
        &|_| true,
    )
    .unwrap();
    let ws = windows(&m.tok, &qs, 32, 8).unwrap();
    assert!(ws.len() > qs.len(), "long contexts must be split");
    for (qi, q) in qs.iter().enumerate() {
        let mine: Vec<_> = ws.iter().filter(|w| w.q == qi).collect();
        assert!(mine.iter().all(|w| w.ids.len() <= 32));
        // Every context token is in some window.
        let n = m.tok.encode(&q.context, false).unwrap().len();
        let covered: usize = mine.iter().map(|w| w.ctx.iter().flatten().count()).sum();
        assert!(covered >= n);
        // Windows holding the answer point at exactly its text.
        let hits: Vec<_> = mine.iter().filter(|w| w.target != (0, 0)).collect();
        assert!(!hits.is_empty(), "{}", q.id);
        for w in hits {
            let (s, e) = (
                w.ctx[w.target.0 as usize].unwrap().0,
                w.ctx[w.target.1 as usize].unwrap().1,
            );
            assert_eq!(&q.context[s..e], q.answers[0].0);
        }
    }
}

#[test]
fn qa_trains_to_exact_answers_and_refuses_decoders() {
    let d = tmpdir("qa_cli");
    let (tr, te) = (
        squad(&d, "train.json", 200, 3),
        squad(&d, "dev.json", 40, 4),
    );
    let out = d.join("run");
    let b = fixture("bert_tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args([
            "finetune",
            "--task",
            "qa",
            "--model",
            b.to_str().unwrap(),
            "--data",
            &tr,
            "--eval-data",
            &te,
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--max-len",
            "32",
            "--stride",
            "8",
            "--quiet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let em: f64 = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("eval: exact match ")?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(em >= 90.0, "{err}");
    let w = candle_core::safetensors::load(
        out.join("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(w["qa_outputs.weight"].dims(), &[2, 32]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (cfg["architectures"][0].as_str(), cfg["num_labels"].as_u64()),
        (Some("BertForQuestionAnswering"), Some(2))
    );
    let l = fixture("llama_tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args([
            "finetune",
            "--task",
            "qa",
            "--model",
            l.to_str().unwrap(),
            "--data",
            &tr,
            "--out",
            d.join("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("bidirectional encoder")
    );
}
