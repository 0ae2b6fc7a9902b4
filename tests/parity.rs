//! lmforge against transformers: logits, loss and the gradient of every parameter after one
//! backward, for tiny random models of each supported type (fixtures from
//! scripts/make_fixtures.py). A gradient that stops at some op shows up here as a mismatch.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::model::hf;

fn check(name: &str, frozen: &dyn Fn(&str) -> bool) {
    check_on(name, frozen, &Device::Cpu)
}

/// On `dev`: on the CPU through the fused kernels, elsewhere (CUDA) through the composite ops.
fn check_on(name: &str, frozen: &dyn Fn(&str) -> bool, dev: &Device) {
    let m = hf::load_dir(&fixture(name), dev, frozen).unwrap();
    let r = reference(name);
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let logits = m.model.forward(&ids).unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let d = max_abs_diff(&cpu(&logits), &r["logits"]);
    println!("{name}: max |logits - transformers| = {d:e}");
    assert!(d < 1e-4, "{name}: logits differ by {d}");

    let loss = lm_loss(&logits, &ids);
    let ref_loss = r["loss"].to_vec1::<f32>().unwrap()[0];
    let l = cpu(&loss).to_scalar::<f32>().unwrap();
    assert!(
        (l - ref_loss).abs() < 1e-5,
        "{name}: loss {l} vs {ref_loss}"
    );

    let gs = loss.backward().unwrap();
    let grads = m.store.grads(&gs);
    let mut compared = 0;
    for (p, g) in m.store.params().iter().zip(&grads.0) {
        let want = &r[&format!("grad.{}", p.name)];
        if !p.trainable {
            assert!(g.is_none(), "{name}: frozen {} got a gradient", p.name);
            continue;
        }
        let g = &cpu(g
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: {} got no gradient", p.name)));
        let scale = max_abs(want).max(1e-3);
        let d = max_abs_diff(g, want);
        assert!(
            d <= 2e-4 * scale + 1e-7,
            "{name}: gradient of {} differs by {d} (max |ref| {scale})",
            p.name
        );
        assert!(max_abs(g) > 0.0, "{name}: gradient of {} is zero", p.name);
        compared += 1;
    }
    let n_ref = r.keys().filter(|k| k.starts_with("grad.")).count();
    let n_frozen = m.store.params().iter().filter(|p| !p.trainable).count();
    assert_eq!(compared + n_frozen, n_ref, "{name}: parameter sets differ");
}

/// The same comparisons on a CUDA device (the `cuda` feature and a GPU); said and skipped
/// otherwise.
#[test]
fn every_model_matches_transformers_on_cuda() {
    let dev = match lmforge::device("cuda") {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    for name in ["gpt2_tiny", "llama_tiny", "qwen2_tiny", "mistral_tiny"] {
        check_on(name, &|_| false, &dev);
    }
    // The engine on the GPU (composite AdamW, clipping, the loss): the CPU's curve.
    let d = tmpdir("parity_cuda_sft");
    let data = tiny_sft(&d, 8);
    let run = |device: &str| {
        let out = d.join(device);
        let extra = [
            "--max-steps",
            "5",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--device",
            device,
        ];
        let a = tiny_sft_args(&data, &out, &extra);
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        metrics(&out)
            .iter()
            .filter_map(|v| v.get("loss")?.as_f64())
            .collect::<Vec<_>>()
    };
    let (c, g) = (run("cpu"), run("cuda"));
    assert_eq!(c.len(), 5);
    for (x, y) in c.iter().zip(&g) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "cpu {c:?} vs cuda {g:?}");
    }
}

#[test]
fn gpt2_matches_transformers() {
    check("gpt2_tiny", &|_| false);
}

#[test]
fn llama_gqa_matches_transformers() {
    check("llama_tiny", &|_| false);
}

#[test]
fn qwen2_bias_tied_matches_transformers() {
    check("qwen2_tiny", &|_| false);
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    check("mistral_tiny", &|_| false);
}

#[test]
fn frozen_weights_get_no_gradient_and_the_rest_still_match() {
    check("llama_tiny", &|n| {
        n.contains("self_attn") || n.contains("embed_tokens")
    });
    check("gpt2_tiny", &|n| n.contains(".mlp."));
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for name in ["gpt2_tiny", "llama_tiny", "mistral_tiny"] {
        let m = hf::load_dir(&fixture(name), &Device::Cpu, &|_| true).unwrap();
        let ids = reference(name)["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        let full = m.model.forward(&ids).unwrap();
        let mut cache = lmforge::model::KvCache::new(m.model.cfg.num_layers);
        let t = ids.dim(1).unwrap();
        let mut steps = Vec::new();
        // Prompt of 4 tokens, then one at a time.
        let mut pos = 0;
        for len in std::iter::once(4).chain(std::iter::repeat(1)).take(t - 3) {
            let x = ids.narrow(1, pos, len).unwrap();
            let opts = lmforge::model::ForwardOpts {
                cache: Some(&mut cache),
                ..Default::default()
            };
            let h = m
                .model
                .hidden_states(&m.model.embed(&x).unwrap(), opts)
                .unwrap();
            steps.push(m.model.logits(&h).unwrap());
            pos += len;
        }
        let inc = Tensor::cat(&steps, 1).unwrap();
        let d = max_abs_diff(&inc, &full);
        assert!(d < 1e-5, "{name}: cached decoding differs by {d}");
    }
}

#[test]
fn future_tokens_do_not_change_past_logits_and_padding_is_masked() {
    let m = hf::load_dir(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let a = Tensor::new(&[[5u32, 9, 13, 2, 7, 11]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[5u32, 9, 13, 200, 100, 50]], &Device::Cpu).unwrap();
    let la = m.model.forward(&a).unwrap().narrow(1, 0, 3).unwrap();
    let lb = m.model.forward(&b).unwrap().narrow(1, 0, 3).unwrap();
    assert_eq!(max_abs_diff(&la, &lb), 0.0);
    // A masked key has no influence: only the masked token differs between c and d.
    let c = Tensor::new(&[[5u32, 9, 2, 13]], &Device::Cpu).unwrap();
    let d = Tensor::new(&[[5u32, 9, 200, 13]], &Device::Cpu).unwrap();
    let keep = Tensor::new(&[[1u32, 1, 0, 1]], &Device::Cpu).unwrap();
    let last = |x: &Tensor, mask: Option<&Tensor>| {
        let opts = lmforge::model::ForwardOpts {
            key_padding: mask,
            ..Default::default()
        };
        let h = m
            .model
            .hidden_states(&m.model.embed(x).unwrap(), opts)
            .unwrap();
        m.model.logits(&h).unwrap().narrow(1, 3, 1).unwrap()
    };
    assert!(max_abs_diff(&last(&c, Some(&keep)), &last(&d, Some(&keep))) < 1e-6);
    assert!(
        max_abs_diff(&last(&c, None), &last(&d, None)) > 1e-4,
        "unmasked keys must matter"
    );
}
