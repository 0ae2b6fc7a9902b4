//! QLoRA over GGUF blocks: the quantized GEMM against the dequantized f32 product for every
//! block type (forward and input gradient), a Q8_0 tiny Llama loaded with its linear layers in
//! blocks against the dequantized load (logits, LoRA/IA³/DoRA gradients), and `sft --qlora`.

mod common;
use candle_core::{Device, Tensor, Var};
use common::*;
use lmforge::kernels::qlinear::{qlinear, QMatrix};
use lmforge::model::gguf::GgufFile;
use lmforge::model::hf;
use lmforge::model::params::ParamKind;
use lmforge::peft::lora::{LoraConfig, Targets};
use lmforge::peft::{AdapterSwitch, Adapters, PeftConfig};
use std::sync::Arc;

#[test]
fn quantized_gemm_and_its_input_gradient_match_the_dequantized_product() {
    let g = GgufFile::open(&fixture("gguf").join("quants.gguf")).unwrap();
    let mut seen = 0;
    for t in &g.tensors {
        let Some(q) = QMatrix::from_gguf(t.dtype, g.bytes(t), &t.shape) else {
            continue;
        };
        let q = Arc::new(q);
        let w = g.dequantize(t).unwrap(); // (rows, cols)
        assert_eq!(
            max_abs_diff(&q.dequantize().unwrap(), &w),
            0.0,
            "{}: dequantized rows",
            t.name
        );
        let (rows, cols) = w.dims2().unwrap();
        for m in [1, 5, 70] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap())
                .unwrap();
            let y = qlinear(x.as_tensor(), &q).unwrap();
            let want = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let tol = 1e-5 * max_abs(&want).max(1.0);
            assert!(max_abs_diff(&y, &want) <= tol, "{} m={m}: forward", t.name);
            let gy = Tensor::randn(0f32, 1.0, (m, rows), &Device::Cpu).unwrap();
            let gx = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = gx.get(x.as_tensor()).unwrap();
            let want = gy.matmul(&w).unwrap();
            let tol = 1e-5 * max_abs(&want).max(1.0);
            assert!(
                max_abs_diff(gx, &want) <= tol,
                "{} m={m}: input gradient",
                t.name
            );
        }
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} quantized types covered");
}

#[test]
fn a_qlora_model_matches_the_dequantized_model_and_its_adapter_gradients() {
    let path = fixture("gguf").join("llama_q8_0.gguf");
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 22, 7, 30]], &Device::Cpu).unwrap();
    let (q, n, bytes) = hf::load_qlora(&path, &Device::Cpu).unwrap();
    let f = hf::load(&path, &Device::Cpu, &|_| true).unwrap();
    assert!(n >= 7 && bytes > 0, "{n} layers in blocks");
    // The blocks are not in the store: the frozen weights cost their GGUF bytes.
    assert!(q.store.num_params() < f.store.num_params());
    let d = max_abs_diff(
        &q.model.forward(&ids).unwrap(),
        &f.model.forward(&ids).unwrap(),
    );
    assert!(
        d < 1e-4,
        "QLoRA logits differ from the dequantized model by {d}"
    );
    let lora = |dora| {
        PeftConfig::Lora(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Targets::AllLinear,
            use_rslora: false,
            use_dora: dora,
        })
    };
    let ia3 = PeftConfig::Ia3(lmforge::peft::ia3::Ia3Config::new(
        Targets::AllLinear,
        Targets::AllLinear,
    ));
    for (label, cfg) in [("lora", lora(false)), ("dora", lora(true)), ("ia3", ia3)] {
        let (mut q2, _, _) = hf::load_qlora(&path, &Device::Cpu).unwrap();
        let mut f2 = hf::load(&path, &Device::Cpu, &|_| true).unwrap();
        let s = AdapterSwitch::default();
        let grads = |m: &mut hf::LoadedModel| {
            Adapters::attach(&mut m.model, &mut m.store, &cfg, 3, &s).unwrap();
            // B starts at zero: move the adapters so every gradient is informative.
            for p in m.store.params() {
                if p.kind == ParamKind::Adapter {
                    let t = p.var.as_tensor();
                    p.var
                        .set(&(t + Tensor::full(0.05f32, t.dims(), t.device()).unwrap()).unwrap())
                        .unwrap();
                }
            }
            let loss = lm_loss(&m.model.forward(&ids).unwrap(), &ids);
            let g = m.store.grads(&loss.backward().unwrap());
            m.store
                .params()
                .iter()
                .zip(g.0)
                .map(|(p, g)| (p.name.clone(), p.kind, g))
                .collect::<Vec<_>>()
        };
        let gq = grads(&mut q2);
        let gf: std::collections::HashMap<_, _> = grads(&mut f2)
            .into_iter()
            .map(|(n, k, g)| (n, (k, g)))
            .collect();
        let mut compared = 0;
        for (name, kind, g) in gq {
            let (_, want) = &gf[&name];
            if kind != ParamKind::Adapter {
                assert!(
                    g.is_none() && want.is_none(),
                    "{label}: frozen {name} got a gradient"
                );
                continue;
            }
            let (g, want) = (g.unwrap(), want.as_ref().unwrap());
            let d = max_abs_diff(&g, want);
            assert!(
                d <= 1e-4 * max_abs(want).max(1e-3),
                "{label}: {name} differs by {d}"
            );
            compared += 1;
        }
        assert!(compared > 0, "{label}");
    }
}

#[test]
fn sft_with_qlora_trains_and_the_adapter_works_on_the_gguf_model() {
    let d = tmpdir("qlora_cli");
    let data = d.join("train.jsonl");
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q: {i}?\nA:"), "completion": " yes"}))
        .collect();
    write_jsonl(&data, &rows);
    let gguf = fixture("gguf").join("llama_q8_0.gguf");
    let (g, dt) = (gguf.to_str().unwrap(), data.to_str().unwrap());
    let out = d.join("run");
    let err = ok(&[
        "sft",
        "--model",
        g,
        "--data",
        dt,
        "--out",
        out.to_str().unwrap(),
        "--peft",
        "lora",
        "--qlora",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
    ]);
    assert!(
        err.contains("QLoRA:") && err.contains("GGUF blocks"),
        "{err}"
    );
    let adapter = out.join("adapter");
    // The same adapter on the dequantized GGUF model (score --adapter loads it that way).
    let text = d.join("t.txt");
    std::fs::write(&text, "Q: 3?\nA: yes").unwrap();
    let o = lmforge(&[
        "score",
        "--model",
        g,
        "--adapter",
        adapter.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Misuse is named.
    let e = fails(&[
        "sft",
        "--model",
        g,
        "--data",
        dt,
        "--out",
        d.join("x").to_str().unwrap(),
        "--qlora",
    ]);
    assert!(e.contains("--qlora"), "{e}");
    let e = fails(&[
        "sft",
        "--model",
        fixture("llama_tiny").to_str().unwrap(),
        "--data",
        dt,
        "--out",
        d.join("y").to_str().unwrap(),
        "--peft",
        "lora",
        "--qlora",
    ]);
    assert!(e.contains(".gguf"), "{e}");
}
