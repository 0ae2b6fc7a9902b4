//! PEFT methods beyond plain LoRA against Python peft (adapters written by
//! `scripts/make_fixtures.py ia3|dora`): IA³ and DoRA logits with the adapter on and off, the
//! loss and every adapter weight's gradient, no gradient for the frozen base; a fresh adapter is
//! the base; merged = unmerged; save → load round trip; `sft --peft ia3`, `sft --peft lora
//! --use-dora`, `generate --adapter` and `merge` on their outputs.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::model::hf;
use lmforge::model::params::ParamKind;
use lmforge::peft::ia3::Ia3Config;
use lmforge::peft::lora::{Head, Targets};
use lmforge::peft::{AdapterSwitch, Adapters, PeftConfig};

fn loss_of(m: &hf::LoadedModel, ids: &Tensor) -> (Tensor, Tensor) {
    let logits = m.model.forward(ids).unwrap();
    let loss = lm_loss(&logits, ids);
    (logits, loss)
}

#[test]
fn ia3_and_dora_match_python_peft_logits_and_gradients() {
    for (kind, base) in [
        ("ia3", "llama_tiny"),
        ("ia3", "gpt2_tiny"),
        ("dora", "llama_tiny"),
        ("dora", "gpt2_tiny"),
    ] {
        let dir = fixture(&format!("peft/{base}_{kind}"));
        let r = reference(&format!("peft/{base}_{kind}"));
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let switch = AdapterSwitch::default();
        let a = lmforge::peft::load(&dir, &mut m.model, &mut m.store, &switch).unwrap();
        match (kind, &a) {
            ("ia3", Adapters::Ia3(_)) => {}
            ("dora", Adapters::Lora(l)) => assert!(l.cfg.use_dora),
            _ => panic!("{kind}: loaded as another method"),
        }
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let (logits, loss) = loss_of(&m, &ids);
        let d = max_abs_diff(&logits, &r["logits"]);
        assert!(d < 1e-4, "{base}: logits differ from peft by {d}");
        assert!(
            max_abs_diff(&r["logits"], &r["logits_base"]) > 1e-3,
            "{base}: the fixture changes nothing"
        );
        let want = r["loss"].to_vec1::<f32>().unwrap()[0];
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        let grads = m.store.grads(&loss.backward().unwrap());
        check_grads(&m.store, &grads, &r, base, |p| p.kind == ParamKind::Adapter);
        switch.set_enabled(false);
        let d0 = max_abs_diff(&m.model.forward(&ids).unwrap(), &r["logits_base"]);
        assert!(
            d0 < 1e-4,
            "{base}: vectors off differ from the base by {d0}"
        );
    }
}

#[test]
fn fresh_adapters_are_the_base_and_merge_and_round_trip_agree() {
    let dora = lmforge::peft::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora: true,
    };
    for (kind, base) in [
        ("ia3", "llama_tiny"),
        ("ia3", "gpt2_tiny"),
        ("dora", "llama_tiny"),
        ("dora", "gpt2_tiny"),
    ] {
        let ids = reference(base)["input_ids"].to_dtype(DType::U32).unwrap();
        let plain = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let want = plain.model.forward(&ids).unwrap();
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let cfg = match kind {
            "ia3" => PeftConfig::Ia3(Ia3Config::new(Targets::AllLinear, Targets::AllLinear)),
            _ => PeftConfig::Lora(dora.clone()),
        };
        let switch = AdapterSwitch::default();
        Adapters::attach(&mut m.model, &mut m.store, &cfg, 0, &switch).unwrap();
        // IA³'s vectors of 1 change nothing; DoRA's (W₀x + b − b)·1 + b may round.
        let fresh = max_abs_diff(&m.model.forward(&ids).unwrap(), &want);
        assert!(
            fresh <= if kind == "ia3" { 0.0 } else { 1e-6 },
            "{kind} {base}: fresh differs by {fresh}"
        );
        // The PEFT adapter: saved and loaded back, then merged.
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let dir = fixture(&format!("peft/{base}_{kind}"));
        let a2 = lmforge::peft::load(&dir, &mut m.model, &mut m.store, &switch).unwrap();
        let adapted = m.model.forward(&ids).unwrap();
        let d = tmpdir(&format!("{kind}_{base}"));
        a2.write_files(&d, &m.store, "base", &Head::causal_lm())
            .unwrap();
        let cfgj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap();
        match kind {
            "ia3" => {
                assert_eq!(cfgj["peft_type"], "IA3");
                assert!(!cfgj["feedforward_modules"].as_array().unwrap().is_empty());
            }
            _ => assert_eq!(cfgj["use_dora"], true),
        }
        let mut m2 = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        lmforge::peft::load(&d, &mut m2.model, &mut m2.store, &switch).unwrap();
        assert_eq!(
            max_abs_diff(&m2.model.forward(&ids).unwrap(), &adapted),
            0.0,
            "{kind} {base}: round trip"
        );
        a2.merge(&mut m.model, &m.store).unwrap();
        let dm = max_abs_diff(&m.model.forward(&ids).unwrap(), &adapted);
        assert!(
            dm < 1e-4,
            "{kind} {base}: merged differs from unmerged by {dm}"
        );
    }
}

#[test]
fn sft_with_ia3_and_dora_trains_saves_generates_and_merges() {
    let d = tmpdir("ia3_cli");
    let data = d.join("train.jsonl");
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q: {i}?\nA:"), "completion": " yes"}))
        .collect();
    write_jsonl(&data, &rows);
    let base = fixture("llama_tiny");
    let out = d.join("run");
    // `sft` on the tiny Llama with these PEFT flags; its stderr.
    let sft = |out: &std::path::Path, peft: &[&str]| -> String {
        let (b, dt, o) = (
            base.to_str().unwrap(),
            data.to_str().unwrap(),
            out.to_str().unwrap(),
        );
        let mut a = vec!["sft", "--model", b, "--data", dt, "--out", o];
        a.extend_from_slice(peft);
        a.extend(["--max-steps", "6", "--batch-size", "2", "--lr", "5e-2"]);
        ok(&a)
    };
    let err = sft(&out, &["--peft", "ia3"]);
    assert!(err.contains("IA³ on 6 layers (2 feed-forward)"), "{err}");
    let adapter = out.join("adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "IA3");
    let merged = d.join("merged");
    ok(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let gen = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            "Q: 3?\nA:",
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ];
        a.extend_from_slice(extra);
        let o = lmforge(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let with = gen(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    assert_eq!(with, gen(&["--model", merged.to_str().unwrap()]));
    // DoRA through the same commands.
    let dout = d.join("dora");
    let err = sft(
        &dout,
        &[
            "--peft",
            "lora",
            "--use-dora",
            "--lora-dropout",
            "0.1",
            "--merge",
        ],
    );
    assert!(err.contains("DoRA r=8"), "{err}");
    let with = gen(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        dout.join("adapter").to_str().unwrap(),
    ]);
    assert_eq!(
        with,
        gen(&["--model", dout.join("model").to_str().unwrap()])
    );
    let e = fails(&[
        "sft",
        "--model",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        d.join("x").to_str().unwrap(),
        "--peft",
        "ia3",
        "--use-dora",
    ]);
    assert!(e.contains("--use-dora"), "{e}");
    // An encoder takes no prefix (Python PEFT has none for BERT).
    let (tr, _) = classify_data(&d);
    let e = fails(&[
        "finetune",
        "--task",
        "classify",
        "--model",
        fixture("bert_tiny").to_str().unwrap(),
        "--data",
        &tr,
        "--out",
        d.join("ft").to_str().unwrap(),
        "--peft",
        "prefix",
    ]);
    assert!(e.contains("--peft prefix") && e.contains("encoder"), "{e}");
}
