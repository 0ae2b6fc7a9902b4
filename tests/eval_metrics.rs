//! Text metrics against the reference implementations' own numbers
//! (scripts/make_eval_fixtures.py: sacrebleu 2.6.0, rouge-score 0.1.2, SQuAD v1.1's script).

mod common;

use lmforge::eval::{bleu, metrics, rouge};
use serde_json::Value;

fn fixture() -> Value {
    let p = common::fixture("eval").join("metrics.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bleu_chrf_and_rouge_match_the_reference_packages() {
    let f = fixture();
    assert_eq!(f["sacrebleu"], bleu::SACREBLEU_VERSION);
    for c in f["corpora"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let hyps = strings(&c["hyps"]);
        let refs: Vec<Vec<String>> = c["refs"].as_array().unwrap().iter().map(strings).collect();
        for (h, t) in hyps.iter().zip(strings(&c["tok13a"])) {
            assert_eq!(bleu::tokenize_13a(h), t, "{name}: 13a tokens of {h:?}");
        }
        let b = bleu::corpus_bleu(&hyps, &refs);
        let want = c["bleu"].as_f64().unwrap();
        assert!(
            (b.score - want).abs() < 0.01,
            "{name}: BLEU {} vs sacrebleu {want}",
            b.score
        );
        assert_eq!(
            b.sys_len as u64,
            c["bleu_sys_len"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            b.ref_len as u64,
            c["bleu_ref_len"].as_u64().unwrap(),
            "{name}"
        );
        for (p, w) in b
            .precisions
            .iter()
            .zip(c["bleu_precisions"].as_array().unwrap())
        {
            assert!(
                (p - w.as_f64().unwrap()).abs() < 1e-9,
                "{name}: precisions {:?}",
                b.precisions
            );
        }
        assert!(
            (b.bp - c["bleu_bp"].as_f64().unwrap()).abs() < 1e-12,
            "{name}: BP"
        );
        let chrf = bleu::corpus_chrf(&hyps, &refs);
        let want = c["chrf"].as_f64().unwrap();
        assert!(
            (chrf - want).abs() < 1e-6,
            "{name}: chrF {chrf} vs sacrebleu {want}"
        );
        for (stem, key) in [(false, "rouge_l"), (true, "rouge_l_stem")] {
            for ((h, r), w) in hyps.iter().zip(&refs).zip(c[key].as_array().unwrap()) {
                let got = rouge::rouge_l_best(r, h, stem);
                let w = w.as_f64().unwrap();
                assert!(
                    (got - w).abs() < 1e-6,
                    "{name}: {key} of {h:?}: {got} vs rouge-score {w}"
                );
            }
        }
    }
}

#[test]
fn squad_metrics_match_the_official_script() {
    let f = fixture();
    for c in f["squad"].as_array().unwrap() {
        let pred = c["prediction"].as_str().unwrap();
        let golds = strings(&c["answers"]);
        let em = metrics::exact_match(pred, &golds);
        let f1 = metrics::squad_f1(pred, &golds);
        assert!(
            (em - c["em"].as_f64().unwrap()).abs() < 1e-6,
            "EM of {pred:?}"
        );
        assert!(
            (f1 - c["f1"].as_f64().unwrap()).abs() < 1e-6,
            "F1 of {pred:?}: {f1} vs {}",
            c["f1"]
        );
    }
}

#[test]
fn bleu_signature_names_the_settings() {
    let one = vec![vec!["a".to_string()], vec!["b".to_string()]];
    assert_eq!(
        bleu::Bleu::signature(&one),
        format!(
            "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{}",
            bleu::SACREBLEU_VERSION
        )
    );
    let var = vec![
        vec!["a".to_string()],
        vec!["b".to_string(), "c".to_string()],
    ];
    assert!(bleu::Bleu::signature(&var).starts_with("nrefs:var|"));
}
