//! `lmforge finetune --task ner`: CoNLL reading (column count, BIO tags, -DOCSTART-), word →
//! sub-token alignment, entity-level F1 after training on encoder and decoder fixtures, the
//! `…ForTokenClassification` layout of the output.

mod common;
use common::*;
use lmforge::data::conll::{align, read_conll};
use lmforge::model::hf;
use std::process::Command;

#[test]
fn conll_reading_and_bad_lines() {
    let d = tmpdir("ner_read");
    let p = d.join("a.conll");
    std::fs::write(
        &p,
        "-DOCSTART- -X- O\n\nHamlet NNP B-PER\nspeaks VB O\n\nDenmark NNP B-LOC\n",
    )
    .unwrap();
    let s = read_conll(&p).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].words.clone(), s[0].tags.clone()),
        (
            vec!["Hamlet".to_string(), "speaks".into()],
            vec!["B-PER".to_string(), "O".into()]
        )
    );
    assert_eq!(s[1].at, format!("{}:6", p.display()));
    std::fs::write(&p, "Hamlet NNP B-PER\nspeaks O\n").unwrap();
    let e = read_conll(&p).unwrap_err().to_string();
    assert!(e.contains("a.conll:2") && e.contains("2 columns"), "{e}");
    std::fs::write(&p, "Hamlet NNP PER\n").unwrap();
    assert!(read_conll(&p).unwrap_err().to_string().contains("not BIO"));
}

#[test]
fn first_sub_token_alignment() {
    let m = hf::load_encoder(
        &fixture("bert_tiny"),
        &candle_core::Device::Cpu,
        lmforge::model::encoder::Heads::default(),
        &|_| true,
    )
    .unwrap();
    let words: Vec<String> = ["Horatio", "speaks", "unto", "Elsinore"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let a = align(&m.tok, &words, 64, false).unwrap();
    for (w, f) in words.iter().zip(&a.first) {
        let t = m.tok.inner.id_to_token(a.ids[f.unwrap()]).unwrap();
        assert!(w.to_lowercase().starts_with(&t), "{w}: first sub-token {t}");
    }
    // Truncation drops the labels of words past the limit.
    let cut = align(&m.tok, &words, 4, false).unwrap();
    assert!(cut.first[3].is_none() && cut.first[0].is_some());
    // Decoders label the last sub-token: it has seen the whole word.
    let d = hf::load_dir(&fixture("llama_tiny"), &candle_core::Device::Cpu, &|_| true).unwrap();
    let (a1, a2) = (
        align(&d.tok, &words, 64, false).unwrap(),
        align(&d.tok, &words, 64, true).unwrap(),
    );
    assert!(a1.first.iter().zip(&a2.first).all(|(x, y)| x <= y));
    assert!(
        a1.first != a2.first,
        "the fixture words should span several tokens"
    );
}

#[test]
fn ner_learns_on_encoder_and_decoder_and_writes_hf_layout() {
    let d = tmpdir("ner_cli");
    let (tr, te) = (
        conll(&d, "train.conll", 240, 1),
        conll(&d, "test.conll", 50, 2),
    );
    for base in ["bert_tiny", "llama_tiny"] {
        let out = d.join(base);
        let b = fixture(base);
        let o = Command::new(env!("CARGO_BIN_EXE_lmforge"))
            .args([
                "finetune",
                "--task",
                "ner",
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
                "4",
                "--lr",
                "3e-3",
                "--quiet",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{base}: {err}");
        let f1: f64 = err
            .lines()
            .find_map(|l| l.strip_prefix("eval: entity F1 "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(f1 >= 0.9, "{base}: entity F1 {f1}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["id2label"]["0"], "O");
        assert_eq!(
            cfg["label2id"]["B-PER"]
                .as_u64()
                .map(|i| cfg["id2label"][i.to_string()].clone()),
            Some(serde_json::json!("B-PER"))
        );
        let w = candle_core::safetensors::load(
            out.join("model/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let head = if base == "bert_tiny" {
            "classifier"
        } else {
            "score"
        };
        assert_eq!(w[&format!("{head}.weight")].dims(), &[4, 32]); // O, B-LOC, B-PER, I-PER
        assert!(w.contains_key(&format!("{head}.bias")) && !w.keys().any(|k| k.contains("pooler")));
    }
    // A tag the training data never had is named with its line.
    let bad = d.join("bad.conll");
    std::fs::write(&bad, "Hamlet NNP B-ORG\n").unwrap();
    let b = fixture("bert_tiny");
    let o = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args([
            "finetune",
            "--task",
            "ner",
            "--model",
            b.to_str().unwrap(),
            "--data",
            &tr,
            "--eval-data",
            bad.to_str().unwrap(),
            "--out",
            d.join("x").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.conll:1") && err.contains("B-ORG"),
        "{err}"
    );
}
