//! LoRA against Python peft (adapters written by `scripts/make_fixtures.py`) and its invariants:
//! logits with the adapter on and off, loss, the gradient of every LoRA weight, frozen base
//! weights get none; B = 0 is the base model exactly; merged = unmerged; save/load round trip;
//! optimizer state and checkpoints hold adapter weights only.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::model::hf;
use lmforge::model::params::ParamKind;
use lmforge::peft::lora::{self, LoraConfig, Targets};
use lmforge::peft::AdapterSwitch;
use lmforge::train::optim::{AdamW, AdamWConfig};

fn logits_of(m: &hf::LoadedModel, ids: &Tensor) -> Tensor {
    m.model.forward(ids).unwrap()
}

fn check_against_peft(base: &str) {
    let dir = fixture(&format!("peft/{base}_lora"));
    let r = reference(&format!("peft/{base}_lora"));
    let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
    let switch = AdapterSwitch::default();
    let l = lora::load(&dir, &mut m.model, &mut m.store, &switch).unwrap();
    assert_eq!(l.cfg.r, 4);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = logits_of(&m, &ids);
    let d = max_abs_diff(&logits, &r["logits"]);
    assert!(
        d < 1e-4,
        "{base}: logits with the adapter differ from peft by {d}"
    );
    switch.set_enabled(false);
    let d0 = max_abs_diff(&logits_of(&m, &ids), &r["logits_base"]);
    assert!(
        d0 < 1e-4,
        "{base}: adapter switched off differs from the base by {d0}"
    );
    assert!(
        max_abs_diff(&r["logits"], &r["logits_base"]) > 1e-3,
        "{base}: the fixture's adapter changes nothing"
    );
    switch.set_enabled(true);

    let loss = lm_loss(&logits, &ids);
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    let grads = m.store.grads(&loss.backward().unwrap());
    check_grads(&m.store, &grads, &r, base, |p| p.kind == ParamKind::Adapter);
}

#[test]
fn peft_adapters_match_python_logits_and_gradients() {
    check_against_peft("llama_tiny");
    check_against_peft("gpt2_tiny"); // Conv1D weights: fan_in_fan_out
}

fn cfg(r: usize, alpha: f64, targets: &str) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        targets: Targets::parse(targets).unwrap(),
        use_rslora: false,
        use_dora: false,
    }
}

#[test]
fn fresh_adapter_is_exactly_the_base_model() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        let ids = reference(base)["input_ids"].to_dtype(DType::U32).unwrap();
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let before = logits_of(&m, &ids);
        let l = lora::attach(
            &mut m.model,
            &mut m.store,
            &cfg(8, 16.0, "all-linear"),
            None,
            1,
            &AdapterSwitch::default(),
        )
        .unwrap();
        assert_eq!(
            max_abs_diff(&before, &logits_of(&m, &ids)),
            0.0,
            "{base}: B = 0 must change nothing"
        );
        // all-linear: every linear layer but the output head.
        assert_eq!(
            l.modules.len(),
            m.model.linears().len() - usize::from(m.model.lm_head.is_some())
        );
        // A is Kaiming-uniform: |a| ≤ 1/√in, not all zero.
        let p = m
            .store
            .params()
            .iter()
            .find(|p| p.name.ends_with("lora_A.weight"))
            .unwrap();
        let bound = 1.0 / (p.var.dims()[1] as f32).sqrt();
        assert!(max_abs(p.var.as_tensor()) <= bound && max_abs(p.var.as_tensor()) > 0.5 * bound);
    }
}

#[test]
fn merged_and_unmerged_agree_and_adapters_round_trip() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        let dir = fixture(&format!("peft/{base}_lora"));
        let ids = reference(base)["input_ids"].to_dtype(DType::U32).unwrap();
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let l = lora::load(&dir, &mut m.model, &mut m.store, &AdapterSwitch::default()).unwrap();
        assert_ne!(l.cfg.alpha, l.cfg.r as f64);
        let unmerged = logits_of(&m, &ids);

        // Save with lmforge, load again: identical outputs, same tensors.
        let out = tmpdir(&format!("peft_roundtrip_{base}"));
        l.save(&out.join("adapter"), &m.store, base).unwrap();
        let mut m2 = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let l2 = lora::load(
            &out.join("adapter"),
            &mut m2.model,
            &mut m2.store,
            &AdapterSwitch::default(),
        )
        .unwrap();
        assert_eq!(l2.cfg, l.cfg);
        assert_eq!(max_abs_diff(&unmerged, &logits_of(&m2, &ids)), 0.0);

        l.merge(&mut m.model, &m.store).unwrap();
        assert!(m.model.linears().iter().all(|x| x.adapter.is_none()));
        let merged = logits_of(&m, &ids);
        let d = max_abs_diff(&merged, &unmerged);
        assert!(d < 1e-5, "{base}: merged vs unmerged differ by {d}");
        // The merged model written as a plain HF directory has no adapter tensors.
        hf::save_loaded(&out.join("merged"), &m).unwrap();
        let plain = hf::load_dir(&out.join("merged"), &Device::Cpu, &|_| true).unwrap();
        assert!(max_abs_diff(&logits_of(&plain, &ids), &merged) < 1e-6);

        // The adapter file is a small fraction of the model's.
        let size = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().len();
        let (a, full) = (
            size(out.join("adapter/adapter_model.safetensors")),
            size(out.join("merged/model.safetensors")),
        );
        assert!(a * 5 < full, "adapter {a} bytes vs model {full}");
    }
}

#[test]
fn optimizer_state_covers_only_adapter_weights() {
    let mut m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let l = lora::attach(
        &mut m.model,
        &mut m.store,
        &cfg(2, 4.0, "q_proj,v_proj"),
        None,
        0,
        &AdapterSwitch::default(),
    )
    .unwrap();
    assert_eq!(l.modules.len(), 4);
    let opt = AdamW::new(
        &m.store,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    let state = opt.state_tensors(&m.store);
    assert_eq!(state.len(), 2 * 2 * 4, "m and v for A and B of 4 layers");
    assert!(
        state.iter().all(|(n, _)| n.contains(".lora_")),
        "{:?}",
        state.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert_eq!(m.store.num_trainable(), l.num_params(&m.store));
}

#[test]
fn bad_targets_and_configs_are_named() {
    let mut m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let e = lora::attach(
        &mut m.model,
        &mut m.store,
        &cfg(2, 4.0, "q_proj,qkv"),
        None,
        0,
        &AdapterSwitch::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("\"qkv\"") && e.contains("q_proj") && e.contains("down_proj"),
        "{e}"
    );
    let d = tmpdir("peft_bad_cfg");
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"lora_bias":true}"#,
    )
    .unwrap();
    let e = format!("{:#}", lora::read_config(&d).unwrap_err());
    assert!(
        e.contains("lora_bias") && e.contains("adapter_config.json"),
        "{e}"
    );
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"peft_type":"PREFIX_TUNING"}"#,
    )
    .unwrap();
    assert!(format!("{:#}", lora::read_config(&d).unwrap_err()).contains("PREFIX_TUNING"));
}

#[test]
fn lora_step_computes_no_base_weight_gradients() {
    // Every base weight is a constant: backward returns gradients for the adapters only.
    let mut m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    lora::attach(
        &mut m.model,
        &mut m.store,
        &cfg(4, 8.0, "all-linear"),
        None,
        3,
        &AdapterSwitch::default(),
    )
    .unwrap();
    let ids = reference("llama_tiny")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap();
    let loss = m.model.forward(&ids).unwrap().sum_all().unwrap();
    let gs = loss.backward().unwrap();
    for p in m.store.params() {
        let got = gs.get(p.var.as_tensor()).is_some();
        assert_eq!(got, p.kind == ParamKind::Adapter, "{}", p.name);
    }
}

#[test]
fn fused_lora_linear_matches_base_plus_delta_with_dropout() {
    // Both weight layouts (Llama Linear, GPT-2 Conv1D), dropout on, in train mode.
    for (base, module) in [
        ("llama_tiny", "model.layers.0.mlp.down_proj"),
        ("gpt2_tiny", "transformer.h.1.attn.c_attn"),
    ] {
        let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
        let mut c = cfg(4, 12.0, "all-linear");
        c.dropout = 0.3;
        let sw = AdapterSwitch::default();
        lora::attach(&mut m.model, &mut m.store, &c, None, 5, &sw).unwrap();
        // Non-zero B so the adapter matters.
        for p in m
            .store
            .params()
            .iter()
            .filter(|p| p.name.contains("lora_B"))
        {
            p.var
                .set(&Tensor::randn(0f32, 0.1, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let lin = m
            .model
            .linears()
            .into_iter()
            .find(|l| l.name == module)
            .unwrap()
            .clone();
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (7, lin.in_dim), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let w = Tensor::randn(0f32, 1.0, (7, lin.out_dim), &Device::Cpu).unwrap();
        sw.set_training(true, 42);
        let plain = lmforge::model::layers::Linear {
            adapter: None,
            ..lin.clone()
        };
        let run = |fused: bool| {
            let y = if fused {
                lin.forward(x.as_tensor()).unwrap()
            } else {
                (plain.forward(x.as_tensor()).unwrap()
                    + lin
                        .adapter
                        .as_ref()
                        .unwrap()
                        .delta(x.as_tensor())
                        .unwrap()
                        .unwrap())
                .unwrap()
            };
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let mut grads = vec![g.get(x.as_tensor()).unwrap().clone()];
            for suffix in ["lora_A.weight", "lora_B.weight"] {
                let p = m
                    .store
                    .get(&format!("base_model.model.{module}.{suffix}"))
                    .unwrap();
                grads.push(g.get(p.var.as_tensor()).unwrap().clone());
            }
            (y, grads)
        };
        let ((yf, gf), (yc, gc)) = (run(true), run(false));
        assert!(max_abs_diff(&yf, &yc) < 1e-5, "{base}: forward");
        for (a, b) in gf.iter().zip(&gc) {
            let d = max_abs_diff(a, b);
            assert!(
                d < 1e-4 * max_abs(b).max(1.0),
                "{base}: gradient differs by {d}"
            );
        }
        assert!(max_abs(&gf[1]) > 0.0);
    }
}
