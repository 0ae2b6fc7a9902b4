//! `lmforge finetune --task classify` on the tiny BERT and Llama fixtures: learns a separable
//! task, writes transformers' `…ForSequenceClassification` layout (id2label/label2id, head
//! names), LoRA writes adapter + head as PEFT `modules_to_save`, bad labels are named.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn summary(out: &Path) -> serde_json::Value {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["summary"] == true)
        .unwrap()
}

#[test]
fn classify_full_and_lora_on_encoder_and_decoder() {
    let d = tmpdir("classify");
    let (tr, te) = classify_data(&d);
    for (base, lora, lr) in [
        ("bert_tiny", false, "3e-3"),
        ("bert_tiny", true, "3e-3"),
        ("llama_tiny", false, "3e-3"),
    ] {
        let out = d.join(format!("{base}_{lora}"));
        let b = fixture(base);
        let mut args = vec![
            "finetune",
            "--task",
            "classify",
            "--model",
            b.to_str().unwrap(),
            "--data",
            &tr,
            "--eval-data",
            &te,
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "6",
            "--lr",
            lr,
            "--quiet",
        ];
        if lora {
            args.extend([
                "--peft",
                "lora",
                "--lora-r",
                "4",
                "--lora-dropout",
                "0",
                "--merge",
            ]);
        }
        let (ok, err) = run(&args);
        assert!(ok, "{base} lora={lora}: {err}");
        let s = summary(&out);
        assert!(
            s["accuracy"].as_f64().unwrap() >= 0.85,
            "{base} lora={lora}: {s}"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["id2label"], serde_json::json!({"0": "neg", "1": "pos"}));
        assert_eq!(cfg["label2id"], serde_json::json!({"neg": 0, "pos": 1}));
        let w = candle_core::safetensors::load(
            out.join("model/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let head = if base == "bert_tiny" {
            "classifier.weight"
        } else {
            "score.weight"
        };
        assert_eq!(w[head].dims(), &[2, 32], "{base}");
        assert!(!w.contains_key("lm_head.weight") && !w.keys().any(|k| k.starts_with("cls.")));
        if lora {
            let a = candle_core::safetensors::load(
                out.join("adapter/adapter_model.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            assert!(a.contains_key("base_model.model.classifier.weight"));
            assert!(a.contains_key("base_model.model.bert.pooler.dense.weight"));
            assert!(
                a.keys().filter(|k| k.contains("lora_A")).count() == 12,
                "{:?}",
                a.keys()
            );
            let c: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                (c["task_type"].as_str(), c["modules_to_save"].clone()),
                (Some("SEQ_CLS"), serde_json::json!(["classifier", "pooler"]))
            );
            assert!(
                s["checkpoint_bytes"].as_u64().unwrap() * 2
                    < std::fs::metadata(out.join("model/model.safetensors"))
                        .unwrap()
                        .len()
            );
        }
    }
}

#[test]
fn unknown_eval_label_and_bad_csv_are_named() {
    let d = tmpdir("classify_bad");
    let (tr, _) = classify_data(&d);
    let bad = d.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
    )
    .unwrap();
    let b = fixture("bert_tiny");
    let (ok, err) = run(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        b.to_str().unwrap(),
        "--data",
        &tr,
        "--eval-data",
        bad.to_str().unwrap(),
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("bad.jsonl:2") && err.contains("\"meh\""),
        "{err}"
    );
    let csv = d.join("t.csv");
    std::fs::write(&csv, "text,label\n\"good, fine\",pos\nbad,neg,extra\n").unwrap();
    let (ok, err) = run(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        b.to_str().unwrap(),
        "--data",
        csv.to_str().unwrap(),
        "--out",
        d.join("o2").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("t.csv:3"), "{err}");
}

#[test]
fn forgetting_report_on_decoders_and_refused_on_encoders() {
    let d = tmpdir("classify_forget");
    let (tr, _) = classify_data(&d);
    let text = small_corpus(&d, 2000);
    let out = d.join("o");
    let l = fixture("llama_tiny");
    let (ok, err) = run(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        l.to_str().unwrap(),
        "--data",
        &tr,
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--lr",
        "3e-3",
        "--quiet",
        "--forgetting-eval",
        text.to_str().unwrap(),
    ]);
    assert!(ok && err.contains("forgetting: perplexity"), "{err}");
    let ppl = &summary(&out)["forgetting_ppl"];
    assert!(
        ppl[0].as_f64().unwrap() > 1.0 && ppl[1].as_f64().unwrap() > 1.0,
        "{ppl}"
    );
    let b = fixture("bert_tiny");
    let (ok, err) = run(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        b.to_str().unwrap(),
        "--data",
        &tr,
        "--out",
        d.join("b").to_str().unwrap(),
        "--forgetting-eval",
        text.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("BERT encoder"), "{err}");
}
