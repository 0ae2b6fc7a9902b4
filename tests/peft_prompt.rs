//! Prefix tuning, prompt tuning, P-tuning (against Python peft: adapters and unfolded training
//! weights written by `scripts/make_fixtures.py prompt`) and bottleneck adapters: logits of
//! PEFT's folded files, loss and every trained tensor's gradient from the unfolded weights
//! (projection MLP, MLP and LSTM encoders), no gradient for the frozen base, the switch gives
//! the base, save → load round trip, generation with a cache = full forward, and `sft` with
//! each method.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::model::hf;
use lmforge::model::loader::WeightSource;
use lmforge::model::params::ParamKind;
use lmforge::peft::bottleneck::{ActKind, BottleneckConfig, Variant};
use lmforge::peft::lora::Head;
use lmforge::peft::prefix::PrefixConfig;
use lmforge::peft::prompt::{EncoderKind, PromptConfig};
use lmforge::peft::{AdapterSwitch, Adapters, PeftConfig};

const KINDS: [&str; 5] = [
    "prefix",
    "prefix_proj",
    "prompt",
    "ptuning_mlp",
    "ptuning_lstm",
];

/// The configuration PEFT trained `kind` with (3 virtual tokens).
fn config(kind: &str) -> PeftConfig {
    let prompt = |encoder| {
        PeftConfig::Prompt(PromptConfig {
            num_virtual_tokens: 3,
            init_text: None,
            encoder,
        })
    };
    match kind {
        "prefix" => PeftConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 3,
            projection: None,
        }),
        "prefix_proj" => PeftConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 3,
            projection: Some(16),
        }),
        "prompt" => prompt(None),
        "ptuning_mlp" => prompt(Some((EncoderKind::Mlp, 16, 2))),
        _ => prompt(Some((EncoderKind::Lstm, 8, 2))),
    }
}

fn attach_with(
    m: &mut hf::LoadedModel,
    cfg: &PeftConfig,
    w: Option<&WeightSource>,
    switch: &AdapterSwitch,
) -> Adapters {
    match cfg {
        PeftConfig::Prefix(c) => Adapters::Prefix(
            lmforge::peft::prefix::attach(&mut m.model, &mut m.store, c, w, 0, switch).unwrap(),
        ),
        PeftConfig::Prompt(c) => Adapters::Prompt(
            lmforge::peft::prompt::attach(&mut m.model, &mut m.store, c, w, 0, switch).unwrap(),
        ),
        _ => unreachable!(),
    }
}

#[test]
fn prompt_learning_matches_python_peft_logits_and_gradients() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        for kind in KINDS {
            let label = format!("{base} {kind}");
            let name = format!("peft/{base}_{kind}");
            let r = reference(&name);
            let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
            // PEFT's folded file, loaded by `peft::load`.
            let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            let switch = AdapterSwitch::default();
            lmforge::peft::load(&fixture(&name), &mut m.model, &mut m.store, &switch).unwrap();
            let d = max_abs_diff(&m.model.forward(&ids).unwrap(), &r["logits"]);
            assert!(d < 1e-4, "{label}: folded logits differ from peft by {d}");
            assert!(
                max_abs_diff(&r["logits"], &r["logits_base"]) > 1e-3,
                "{label}: the fixture changes nothing"
            );
            switch.set_enabled(false);
            let d0 = max_abs_diff(&m.model.forward(&ids).unwrap(), &r["logits_base"]);
            assert!(
                d0 < 1e-5,
                "{label}: switched off differs from the base by {d0}"
            );

            // The unfolded training weights: loss and gradients.
            let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            let w = WeightSource::open_files(&[fixture(&name).join("train.safetensors")]).unwrap();
            let switch = AdapterSwitch::default();
            attach_with(&mut m, &config(kind), Some(&w), &switch);
            let logits = m.model.forward(&ids).unwrap();
            let d = max_abs_diff(&logits, &r["logits"]);
            assert!(d < 1e-4, "{label}: training logits differ from peft by {d}");
            let loss = lm_loss(&logits, &ids);
            let want = r["loss"].to_vec1::<f32>().unwrap()[0];
            assert!(
                (loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5,
                "{label}"
            );
            let grads = m.store.grads(&loss.backward().unwrap());
            let mut r = r.clone();
            if let Some(g) = r.remove("grad.prompt_encoder.embedding.weight") {
                if kind == "prefix" || kind == "prompt" {
                    r.insert("grad.prompt_embeddings".into(), g);
                } else {
                    r.insert("grad.prompt_encoder.embedding.weight".into(), g);
                }
            }
            check_grads(&m.store, &grads, &r, &label, |p| {
                p.kind == ParamKind::Adapter
            });
        }
    }
}

#[test]
fn prompt_learning_round_trips_generates_with_a_cache_and_refuses_merge() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        for kind in KINDS {
            let label = format!("{base} {kind}");
            let ids = reference(base)["input_ids"].to_dtype(DType::U32).unwrap();
            let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            let switch = AdapterSwitch::default();
            let a =
                Adapters::attach(&mut m.model, &mut m.store, &config(kind), 7, &switch).unwrap();
            let full = m.model.forward(&ids).unwrap();
            // Decoding token by token through a cache = one full forward.
            let one = ids.narrow(0, 0, 1).unwrap();
            let t = one.dim(1).unwrap();
            let mut cache = lmforge::model::KvCache::new(m.model.blocks.len());
            let mut steps = Vec::new();
            for i in 0..t {
                let x = m.model.embed(&one.narrow(1, i, 1).unwrap()).unwrap();
                let h = m
                    .model
                    .hidden_states(
                        &x,
                        lmforge::model::ForwardOpts {
                            cache: Some(&mut cache),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                steps.push(m.model.logits(&h).unwrap());
            }
            let stepped = Tensor::cat(&steps, 1).unwrap();
            let d = max_abs_diff(&stepped, &full.narrow(0, 0, 1).unwrap());
            assert!(d < 1e-4, "{label}: cached decoding differs by {d}");
            // Saved in PEFT's layout, loaded back: the same model.
            let dir = tmpdir(&format!("prompt_rt_{base}_{kind}"));
            a.write_files(&dir, &m.store, "base", &Head::causal_lm())
                .unwrap();
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            let want_type = match kind {
                "prefix" | "prefix_proj" => "PREFIX_TUNING",
                "prompt" => "PROMPT_TUNING",
                _ => "P_TUNING",
            };
            assert_eq!(cfg["peft_type"], want_type, "{label}");
            let mut m2 = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            lmforge::peft::load(&dir, &mut m2.model, &mut m2.store, &switch).unwrap();
            let d = max_abs_diff(&m2.model.forward(&ids).unwrap(), &full);
            assert!(d < 1e-5, "{label}: round trip differs by {d}");
            let e = a.merge(&mut m.model, &m.store).unwrap_err().to_string();
            assert!(e.contains("cannot be merged"), "{e}");
        }
    }
}

#[test]
fn bottleneck_adapters_start_at_the_base_train_round_trip_and_switch_off() {
    for base in ["llama_tiny", "gpt2_tiny"] {
        for (variant, n) in [(Variant::Houlsby, 4), (Variant::Pfeiffer, 2)] {
            let label = format!("{base} {variant:?}");
            let ids = reference(base)["input_ids"].to_dtype(DType::U32).unwrap();
            let plain = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            let want = plain.model.forward(&ids).unwrap();
            let mut m = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            let cfg = PeftConfig::Bottleneck(BottleneckConfig {
                variant,
                reduction_factor: 4,
                act: ActKind::Silu,
            });
            let switch = AdapterSwitch::default();
            let a = Adapters::attach(&mut m.model, &mut m.store, &cfg, 3, &switch).unwrap();
            let Adapters::Bottleneck(b) = &a else {
                panic!()
            };
            assert_eq!(b.modules.len(), n, "{label}: two layers");
            let fresh = max_abs_diff(&m.model.forward(&ids).unwrap(), &want);
            assert_eq!(fresh, 0.0, "{label}: a fresh adapter is the base");
            // One SGD step on the up-projections moves the model; only adapters get gradients.
            let loss = lm_loss(&m.model.forward(&ids).unwrap(), &ids);
            let grads = m.store.grads(&loss.backward().unwrap());
            for (p, g) in m.store.params().iter().zip(&grads.0) {
                let adapter = p.kind == ParamKind::Adapter;
                assert_eq!(g.is_some(), adapter, "{label}: {}", p.name);
                if adapter && p.name.contains("adapter_up") {
                    let g = g.as_ref().unwrap();
                    assert!(max_abs(g) > 0.0, "{label}: {} got a zero gradient", p.name);
                    p.var
                        .set(&(p.var.as_tensor() - (g * 0.5).unwrap()).unwrap())
                        .unwrap();
                }
            }
            let trained = m.model.forward(&ids).unwrap();
            assert!(max_abs_diff(&trained, &want) > 1e-4, "{label}: no change");
            switch.set_enabled(false);
            assert_eq!(max_abs_diff(&m.model.forward(&ids).unwrap(), &want), 0.0);
            switch.set_enabled(true);
            let dir = tmpdir(&format!("bottleneck_{base}_{variant:?}"));
            a.write_files(&dir, &m.store, "base", &Head::causal_lm())
                .unwrap();
            let mut m2 = hf::load_dir(&fixture(base), &Device::Cpu, &|_| true).unwrap();
            lmforge::peft::load(&dir, &mut m2.model, &mut m2.store, &switch).unwrap();
            assert_eq!(
                max_abs_diff(&m2.model.forward(&ids).unwrap(), &trained),
                0.0
            );
            let e = a.merge(&mut m.model, &m.store).unwrap_err().to_string();
            assert!(e.contains("cannot be merged"), "{e}");
        }
    }
}

#[test]
fn sft_trains_each_prompt_method_and_the_adapters() {
    let d = tmpdir("prompt_cli");
    let data = d.join("train.jsonl");
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"prompt": format!("Q: {i}?\nA:"), "completion": " yes"}))
        .collect();
    write_jsonl(&data, &rows);
    let base = fixture("llama_tiny");
    let b = base.to_str().unwrap();
    for (flags, says) in [
        (
            &["--peft", "prefix", "--prefix-projection"][..],
            "prefix of 4 virtual tokens (through",
        ),
        (
            &[
                "--peft",
                "prompt",
                "--prompt-init-text",
                "Answer the question",
            ][..],
            "prompt tuning: 4",
        ),
        (
            &["--peft", "p-tuning", "--encoder-type", "lstm"][..],
            "P-tuning (LSTM encoder): 4",
        ),
        (
            &["--peft", "bottleneck", "--adapter-variant", "houlsby"][..],
            "Houlsby bottleneck",
        ),
    ] {
        let out = d.join(flags[1]);
        let mut a = vec!["sft", "--model", b, "--data", data.to_str().unwrap()];
        a.extend(["--out", out.to_str().unwrap(), "--num-virtual-tokens", "4"]);
        a.extend_from_slice(flags);
        a.extend(["--max-steps", "4", "--batch-size", "2", "--lr", "1e-2"]);
        let err = ok(&a);
        assert!(err.contains(says), "{flags:?}: {err}");
        let adapter = out.join("adapter");
        let gen = lmforge(&[
            "generate",
            "--model",
            b,
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "Q: 3?\nA:",
            "--temperature",
            "0",
            "--max-new-tokens",
            "4",
        ]);
        assert!(
            gen.status.success(),
            "{}",
            String::from_utf8_lossy(&gen.stderr)
        );
    }
    // Misplaced options are errors naming them.
    for (flags, says) in [
        (&["--peft", "prompt", "--merge"][..], "cannot be merged"),
        (
            &["--peft", "lora", "--prefix-projection"][..],
            "--prefix-projection",
        ),
    ] {
        let out = d.join("bad");
        let mut a = vec!["sft", "--model", b, "--data", data.to_str().unwrap()];
        a.extend(["--out", out.to_str().unwrap()]);
        a.extend_from_slice(flags);
        let e = fails(&a);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
}

#[test]
fn a_prompt_tuned_bert_classifier_matches_python_peft() {
    let name = "peft/bert_tiny_prompt_cls";
    let r = reference(name);
    let m = lmforge::model::backbone::load_head_model(
        &fixture(name),
        Some(&fixture("bert_tiny")),
        &Device::Cpu,
        true,
    )
    .unwrap();
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let mask = r["attention_mask"].to_vec2::<i64>().unwrap();
    let rows: Vec<Vec<u32>> = ids
        .iter()
        .zip(&mask)
        .map(|(i, m)| {
            i.iter()
                .zip(m)
                .filter(|(_, &k)| k == 1)
                .map(|(&x, _)| x)
                .collect()
        })
        .collect();
    let feats = m.m.body.features(&rows, m.pad, &Device::Cpu).unwrap();
    let logits = m.head.forward(&feats).unwrap();
    let d = max_abs_diff(&logits, &r["logits"]);
    assert!(d < 1e-5, "logits differ from peft by {d}");
    let labels = r["labels"].to_dtype(DType::U32).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    // The loader trains the prompt and the classifier (the pooler it reads stays frozen).
    let grads = m.m.store.grads(&loss.backward().unwrap());
    let mut r = r.clone();
    r.retain(|k, _| !k.starts_with("grad.bert.pooler"));
    check_grads(&m.m.store, &grads, &r, "bert prompt", |p| {
        p.name == "prompt_embeddings" || p.name.starts_with("classifier.")
    });
}

#[test]
fn virtual_tokens_take_their_positions_from_every_context_budget() {
    // llama_tiny has 64 positions; 8 virtual tokens leave 56 for real ones.
    let mut m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let switch = AdapterSwitch::default();
    let cfg = PeftConfig::Prompt(PromptConfig {
        num_virtual_tokens: 8,
        init_text: None,
        encoder: None,
    });
    Adapters::attach(&mut m.model, &mut m.store, &cfg, 1, &switch).unwrap();
    assert_eq!(m.model.context(), 56);
    // Generation stops when the context is full instead of failing in the forward.
    let prompt: Vec<u32> = (0..50).map(|i| 3 + i % 40).collect();
    let s = lmforge::generate::Sampling {
        max_new_tokens: 20,
        temperature: 0.0,
        ..Default::default()
    };
    let (out, stop) = lmforge::generate::generate(&m.model, &prompt, &s, &[], |_| Ok(())).unwrap();
    assert_eq!(stop, lmforge::generate::Stop::ContextFull);
    // 56 positions fed; the last token is sampled from the 56th and never fed.
    assert_eq!(prompt.len() + out.len(), 57);
    // Perplexity windows fit after the virtual tokens.
    let ids: Vec<u32> = (0..200).map(|i| 3 + i % 50).collect();
    lmforge::eval::score::score_text_ids(&m.model, &ids).unwrap();
    // Too many virtual tokens for the context is an error at attach time.
    let mut m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let big = PeftConfig::Prefix(PrefixConfig {
        num_virtual_tokens: 64,
        projection: None,
    });
    let e = match Adapters::attach(&mut m.model, &mut m.store, &big, 1, &switch) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("64 virtual tokens in a 64-position model"),
    };
    assert!(e.contains("num_virtual_tokens"), "{e}");
    // sft with max_len at the full context trains (rows are cut to leave room for P).
    let d = tmpdir("virtual_context");
    let data = d.join("train.jsonl");
    let long = "word ".repeat(80);
    write_jsonl(
        &data,
        &[serde_json::json!({"prompt": long, "completion": " end"})],
    );
    let out = d.join("run");
    ok(&[
        "sft",
        "--model",
        fixture("llama_tiny").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--peft",
        "prefix",
        "--num-virtual-tokens",
        "8",
        "--max-len",
        "64",
        "--max-steps",
        "2",
        "--train-on-prompt",
    ]);
}
