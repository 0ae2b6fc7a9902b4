//! Interop with the Python world: GGUF files read against the `gguf` package and transformers
//! (fixtures in tests/fixtures/gguf from scripts/make_fixtures.py), HF directories that re-load
//! bit-identically, and corrupted files that give errors instead of panics.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::chat::Message;
use lmforge::model::gguf::{llama, GgufFile};
use lmforge::model::hf;
use lmforge::model::loader::WeightSource;
use lmforge::rng::Rng;
use std::path::Path;

fn gguf_ref() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture("gguf").join("llama_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn gguf_llama_logits_match_reference_for_f32_and_q8_0() {
    let r = gguf_ref();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    for q in ["f32", "q8_0"] {
        let path = fixture("gguf").join(format!("llama_{q}.gguf"));
        let m = hf::load(&path, &Device::Cpu, &|_| true).unwrap();
        let d = max_abs_diff(&m.model.forward(&ids).unwrap(), &r[&format!("logits_{q}")]);
        println!("gguf {q}: max |logits - reference| = {d:e}");
        assert!(d < 1e-4, "{q}: logits differ by {d}");
    }
    // The F32 file holds the llama_tiny fixture's weights: same logits as the HF directory.
    let hf_ref = reference("llama_tiny");
    assert!(max_abs_diff(&r["logits_f32"], &hf_ref["logits"]) < 1e-5);
}

#[test]
fn gguf_dequantization_matches_the_gguf_package() {
    let g = GgufFile::open(&fixture("gguf").join("quants.gguf")).unwrap();
    let r = candle_core::safetensors::load(
        fixture("gguf").join("quants_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut seen = Vec::new();
    for t in &g.tensors {
        let got = g.dequantize(t).unwrap();
        let want = &r[&t.name];
        let d = max_abs_diff(&got, want);
        let scale = max_abs(want).max(1e-6);
        assert!(
            d <= 1e-6 * scale,
            "{}: differs by {d} (max |ref| {scale})",
            t.name
        );
        seen.push(t.name.clone());
    }
    seen.sort();
    for q in [
        "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
        "Q5_K",
    ] {
        assert!(seen.iter().any(|s| s == q), "quant type {q} not covered");
    }
}

#[test]
fn gguf_tokenizer_and_chat_template_match_hf() {
    let g = GgufFile::open(&fixture("gguf").join("llama_f32.gguf")).unwrap();
    let m = llama::load(&g).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer").join("reference.json")).unwrap(),
    )
    .unwrap();
    let text = want["text"].as_str().unwrap();
    let ids: Vec<u32> = want["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(m.tok.encode(text, true).unwrap(), ids);
    assert_eq!(
        m.tok.decode(&ids, false).unwrap(),
        want["decoded"].as_str().unwrap()
    );
    assert_eq!(
        m.eos_ids,
        vec![m.tok.inner.token_to_id("<|endoftext|>").unwrap()]
    );

    let loaded = hf::load(
        &fixture("gguf").join("llama_f32.gguf"),
        &Device::Cpu,
        &|_| true,
    )
    .unwrap();
    let chat = loaded.chat("fixture").unwrap();
    let s = chat.render(&[Message::new("user", "hi")], true).unwrap();
    assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

/// Every parameter of two loaded models, compared bit for bit.
fn assert_same_params(a: &hf::LoadedModel, b: &hf::LoadedModel, what: &str) {
    assert_eq!(a.store.params().len(), b.store.params().len(), "{what}");
    for (p, q) in a.store.params().iter().zip(b.store.params()) {
        assert_eq!(p.name, q.name, "{what}");
        let x: Vec<f32> = p.var.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = q.var.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(u, v)| u.to_bits() == v.to_bits()),
            "{what}: {} changed in the round trip",
            p.name
        );
    }
}

#[test]
fn saved_models_reload_bit_identically() {
    let d = tmpdir("interop_roundtrip");
    for name in ["gpt2_tiny", "llama_tiny", "qwen2_tiny", "mistral_tiny"] {
        let a = hf::load_dir(&fixture(name), &Device::Cpu, &|_| true).unwrap();
        let out = d.join(name);
        hf::save_loaded(&out, &a).unwrap();
        let b = hf::load_dir(&out, &Device::Cpu, &|_| true).unwrap();
        assert_same_params(&a, &b, name);
        assert_eq!(
            b.model.cfg.sliding_window, a.model.cfg.sliding_window,
            "{name}"
        );
        assert_eq!(
            b.model.cfg.tie_word_embeddings,
            a.model.cfg.tie_word_embeddings
        );
        let ids = Tensor::new(&[[3u32, 17, 99, 5, 250]], &Device::Cpu).unwrap();
        let la = a.model.forward(&ids).unwrap();
        assert_eq!(max_abs_diff(&la, &b.model.forward(&ids).unwrap()), 0.0);
    }
}

#[test]
fn gguf_converts_to_an_hf_directory_with_the_same_model() {
    let d = tmpdir("interop_convert");
    let g = hf::load(
        &fixture("gguf").join("llama_q8_0.gguf"),
        &Device::Cpu,
        &|_| true,
    )
    .unwrap();
    hf::save_loaded(&d.join("hf"), &g).unwrap();
    let h = hf::load(&d.join("hf"), &Device::Cpu, &|_| true).unwrap();
    assert_same_params(&g, &h, "converted");
    assert_eq!(h.chat_template, g.chat_template);
    assert_eq!(h.eos_ids, g.eos_ids);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("hf/tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("hf/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["num_key_value_heads"], 2);
}

#[test]
fn llama_cpp_qk_permutation_is_undone() {
    // Rows of head h in HF order are [first half | second half]; llama.cpp interleaves them.
    let (heads, hd, cols) = (2usize, 4usize, 3usize);
    let hf_rows: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
    let w = Tensor::from_vec(hf_rows.clone(), (heads * hd, cols), &Device::Cpu).unwrap();
    let permuted = w
        .reshape((heads, 2, hd / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((heads * hd, cols))
        .unwrap();
    assert_ne!(
        permuted.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        hf_rows
    );
    let back = llama::unpermute_rows(&permuted, heads).unwrap();
    assert_eq!(
        back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        hf_rows
    );
}

// ---- corrupted files -------------------------------------------------------------------

/// A minimal GGUF v3 writer for hand-made broken files.
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl Gguf {
    fn new() -> Self {
        Self {
            kv: vec![],
            n_kv: 0,
            infos: vec![],
            n_tensors: 0,
            data: vec![],
        }
    }
    fn str(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }
    fn kv_str(mut self, k: &str, v: &str) -> Self {
        Self::str(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        Self::str(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, bytes: usize) -> Self {
        Self::str(&mut self.infos, name);
        self.infos.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(vec![0u8; bytes.div_ceil(32) * 32]);
        self.n_tensors += 1;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.infos);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(&self.data);
        b
    }
}

fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let e = match GgufFile::open(&p) {
        Ok(g) => llama::load(&g).err().expect("expected an error"),
        Err(e) => e,
    };
    let msg = format!("{e:#}");
    assert!(msg.contains(name), "error does not name the file: {msg}");
    msg
}

#[test]
fn broken_gguf_files_are_clear_errors() {
    let d = tmpdir("interop_bad_gguf");
    let ok = Gguf::new()
        .kv_str("general.architecture", "llama")
        .tensor("a", &[32, 2], 0, 256);
    assert!(GgufFile::open(&{
        let p = d.join("ok.gguf");
        std::fs::write(&p, ok.bytes()).unwrap();
        p
    })
    .is_ok());

    let m = open_err(&d, "dup.gguf", &ok.tensor("a", &[32], 0, 128).bytes());
    assert!(m.contains("tensor a appears twice"), "{m}");
    let m = open_err(
        &d,
        "type.gguf",
        &Gguf::new().tensor("w", &[32], 99, 128).bytes(),
    );
    assert!(m.contains("tensor w") && m.contains("GGML type 99"), "{m}");
    let m = open_err(
        &d,
        "blocks.gguf",
        &Gguf::new().tensor("w", &[33, 2], 8, 128).bytes(),
    );
    assert!(m.contains("tensor w") && m.contains("Q8_0"), "{m}");
    let full = Gguf::new().tensor("w", &[32, 4], 0, 512).bytes();
    let m = open_err(&d, "short.gguf", &full[..full.len() - 100]);
    assert!(m.contains("tensor w") && m.contains("past the end"), "{m}");
    let m = open_err(&d, "trunc.gguf", &full[..40]);
    assert!(m.contains("truncated"), "{m}");
    let mut huge = full.clone();
    huge[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let m = open_err(&d, "count.gguf", &huge);
    assert!(
        m.contains("tensor count") && m.contains("cannot fit"),
        "{m}"
    );
    let m = open_err(&d, "magic.gguf", b"GGML\x03\x00\x00\x00");
    assert!(m.contains("magic"), "{m}");
    let m = open_err(
        &d,
        "arch.gguf",
        &Gguf::new().kv_str("general.architecture", "mamba").bytes(),
    );
    assert!(
        m.contains("general.architecture") && m.contains("mamba"),
        "{m}"
    );
}

fn no_panic<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> T {
    std::panic::catch_unwind(f).unwrap_or_else(|_| panic!("panicked on {what}"))
}

#[test]
fn corrupted_gguf_and_safetensors_never_panic() {
    let d = tmpdir("interop_fuzz");
    let gg = std::fs::read(fixture("gguf").join("llama_q8_0.gguf")).unwrap();
    let st = std::fs::read(fixture("llama_tiny").join("model.safetensors")).unwrap();
    let mut rng = Rng::keyed(&[7]);
    let (mut loaded, mut refused) = (0, 0);
    // The metadata and tensor table of the GGUF fixture span its first few KiB;
    // the safetensors header its first ~1.5 KiB.
    for i in 0..400u64 {
        for (src, name) in [(&gg, "f.gguf"), (&st, "model.safetensors")] {
            let mut b = src.clone();
            let head = b.len().min(if name == "f.gguf" { 12_000 } else { 2_000 });
            match i % 3 {
                0 => b.truncate(rng.below(b.len() as u64) as usize),
                1 => {
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(head as u64) as usize;
                        b[at] = rng.below(256) as u8;
                    }
                }
                _ => {
                    let at = rng.below(head as u64 - 8) as usize;
                    b[at..at + 8].copy_from_slice(&rng.below(u64::MAX).to_le_bytes());
                }
            }
            let p = d.join(name);
            std::fs::write(&p, &b).unwrap();
            if name == "f.gguf" {
                let ok = no_panic(&format!("gguf case {i}"), || {
                    GgufFile::open(&p).and_then(|g| llama::load(&g)).is_ok()
                });
                if ok {
                    loaded += 1
                } else {
                    refused += 1
                }
            } else {
                no_panic(&format!("safetensors case {i}"), || {
                    if let Ok(w) = WeightSource::open_files(std::slice::from_ref(&p)) {
                        let _ = w.load("model.embed_tokens.weight", &[320, 32], &Device::Cpu);
                        let _ = w.load("model.norm.weight", &[32], &Device::Cpu);
                    }
                });
            }
        }
    }
    // Both outcomes occur: some corruptions hit bytes that do not matter (e.g. weight
    // values), most are refused.
    println!("gguf: {loaded} loaded, {refused} refused");
    assert!(loaded > 0 && refused > 0);
}

#[test]
fn gpt2_vocab_json_and_merges_txt_load_like_the_slow_tokenizer() {
    let d = fixture("tokenizer_legacy");
    assert!(!d.join("tokenizer.json").exists());
    let tok = lmforge::tokenizer::load_from_dir(&d).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference.json")).unwrap()).unwrap();
    let ids: Vec<u32> = want["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        tok.encode(want["text"].as_str().unwrap(), true).unwrap(),
        ids
    );
    assert_eq!(tok.eos_id, tok.inner.token_to_id("<|endoftext|>"));
}

#[test]
fn config_fields_that_change_the_math_are_refused() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama_tiny").join("config.json")).unwrap(),
    )
    .unwrap();
    for (key, val, needle) in [
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            "rope_type",
        ),
        ("hidden_act", serde_json::json!("gelu_quick"), "hidden_act"),
    ] {
        let mut c = base.clone();
        c[key] = val;
        let e = lmforge::model::ModelConfig::from_hf_json(c).unwrap_err();
        assert!(format!("{e:#}").contains(needle), "{key}: {e:#}");
    }
}

#[test]
fn float16_and_bfloat16_weights_compute_in_f32() {
    for name in ["gpt2_tiny_float16", "llama_tiny_bfloat16"] {
        let m = hf::load_dir(&fixture(name), &Device::Cpu, &|_| true).unwrap();
        assert!(m.store.params().iter().all(|p| p.var.dtype() == DType::F32));
        let r = reference(name);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let d = max_abs_diff(&m.model.forward(&ids).unwrap(), &r["logits"]);
        println!("{name}: max |logits - transformers| = {d:e}");
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }
}

fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(vec![0u8; data_len]);
    b
}

#[test]
fn broken_safetensors_and_gguf_versions_are_clear_errors() {
    let d = tmpdir("interop_bad_st");
    let open = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = WeightSource::open_files(std::slice::from_ref(&p))
            .and_then(|w| w.load("w", &[2, 2], &Device::Cpu));
        let msg = format!("{:#}", r.expect_err("expected an error"));
        assert!(msg.contains(name), "{msg}");
        msg
    };
    let mut huge = safetensors_bytes("{}", 0);
    huge[..8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    open("len.safetensors", &huge);
    let m = open(
        "bytes.safetensors",
        &safetensors_bytes(
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#,
            8,
        ),
    );
    assert!(m.contains("not a valid safetensors"), "{m}");
    let m = open(
        "dup.safetensors",
        &safetensors_bytes(
            r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}"#,
            32,
        ),
    );
    assert!(m.contains("w") && m.contains("twice"), "{m}");

    // GGUF v2 has v3's layout; v1 (32-bit counts) is refused.
    let mut v2 = std::fs::read(fixture("gguf").join("llama_f32.gguf")).unwrap();
    v2[4] = 2;
    let p = d.join("v2.gguf");
    std::fs::write(&p, &v2).unwrap();
    assert!(llama::load(&GgufFile::open(&p).unwrap()).is_ok());
    v2[4] = 1;
    std::fs::write(&p, &v2).unwrap();
    let m = format!("{:#}", GgufFile::open(&p).err().unwrap());
    assert!(m.contains("v2.gguf") && m.contains("version 1"), "{m}");
}

#[test]
fn gguf_blocks_decode_like_their_dequantized_weights() {
    use lmforge::kernels::qgemv::QWeight;
    let g = GgufFile::open(&fixture("gguf").join("quants.gguf")).unwrap();
    let r = candle_core::safetensors::load(
        fixture("gguf").join("quants_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut kinds = 0;
    for t in &g.tensors {
        let Some(q) = QWeight::from_gguf(t.dtype, g.bytes(t), &t.shape) else {
            continue;
        };
        kinds += 1;
        let want = &r[&t.name]; // (rows, cols) from the gguf package
        let w = Tensor::from_vec(q.dequantize(), t.shape.as_slice(), &Device::Cpu).unwrap();
        assert!(
            max_abs_diff(&w, want) <= 1e-6 * max_abs(want),
            "{}: blocks",
            t.name
        );
        for m in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (m, q.cols()), &Device::Cpu).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = Tensor::from_vec(q.gemv(&xs, m), (m, q.rows()), &Device::Cpu).unwrap();
            let yref = x.matmul(&want.t().unwrap()).unwrap();
            let d = max_abs_diff(&y, &yref);
            assert!(d <= 1e-5 * max_abs(&yref).max(1.0), "{} m={m}: {d}", t.name);
        }
    }
    assert_eq!(kinds, 3, "Q4_0, Q4_1 and Q8_0 are read");
    // Row permutation (llama.cpp's Q/K order) moves whole rows of blocks, like the f32 one.
    let t = g.tensors.iter().find(|t| t.name == "Q4_1").unwrap();
    let q = QWeight::from_gguf(t.dtype, g.bytes(t), &t.shape).unwrap();
    let f = Tensor::from_vec(q.dequantize(), t.shape.as_slice(), &Device::Cpu).unwrap();
    let u = q.unpermute_rows(1).unwrap().dequantize();
    let want = llama::unpermute_rows(&f, 1).unwrap();
    let got = Tensor::from_vec(u, t.shape.as_slice(), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&got, &want), 0.0);
}

#[test]
fn gguf_decoding_from_blocks_matches_the_f32_model() {
    let path = fixture("gguf").join("llama_q8_0.gguf");
    let ids = gguf_ref()["input_ids"].to_dtype(DType::U32).unwrap();
    // ≤ 3 rows (`kernels::linear::MAX_ROWS`): the quantized GEMV's path.
    let ids = ids.narrow(0, 0, 1).unwrap();
    let ids = ids.narrow(1, 0, ids.dim(1).unwrap().min(3)).unwrap();
    let mut m = hf::load(&path, &Device::Cpu, &|_| true).unwrap();
    let f32_logits = m.model.forward(&ids).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let n = llama::attach_quantized(&mut m.model, &g).unwrap();
    assert!(n >= 7, "only {n} layers got blocks");
    let q_logits = m.model.forward(&ids).unwrap();
    let d = max_abs_diff(&q_logits, &f32_logits);
    // Not bit-identical (another summation order): the blocks were used, and agree.
    assert!(d > 0.0 && d < 1e-4, "logits from blocks differ by {d}");
    // Trained weights never read the (then stale) blocks: the f32 path, bit for bit.
    let mut t = hf::load(&path, &Device::Cpu, &|_| false).unwrap();
    llama::attach_quantized(&mut t.model, &g).unwrap();
    assert_eq!(
        max_abs_diff(&t.model.forward(&ids).unwrap(), &f32_logits),
        0.0
    );
}

#[test]
fn blocks_are_not_used_where_a_gradient_is_needed() {
    use lmforge::kernels::qgemv::QWeight;
    use lmforge::model::layers::{Layout, Linear};
    let g = GgufFile::open(&fixture("gguf").join("quants.gguf")).unwrap();
    let t = g.tensors.iter().find(|t| t.name == "Q8_0").unwrap();
    let q = QWeight::from_gguf(t.dtype, g.bytes(t), &t.shape).unwrap();
    let w = Tensor::from_vec(q.dequantize(), t.shape.as_slice(), &Device::Cpu).unwrap();
    let lin = Linear {
        name: "probe".into(),
        weight: w.clone(), // a constant: frozen
        bias: None,
        layout: Layout::OutIn,
        in_dim: q.cols(),
        out_dim: q.rows(),
        adapter: None,
        quant: Some(std::sync::Arc::new(q)),
        qbase: None,
    };
    let x0 = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu).unwrap();
    // Frozen weight, constant input: decoded from the blocks (close, not bit-identical).
    let y = lin.forward(&x0).unwrap();
    let f32_y = x0.matmul(&w.t().unwrap()).unwrap();
    let d = max_abs_diff(&y, &f32_y);
    assert!(d > 0.0 && d < 1e-4, "{d}");
    // A trained input (e.g. below LoRA layers): the f32 op, with its gradient.
    let x = candle_core::Var::from_tensor(&x0).unwrap();
    let y = lin.forward(x.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).expect("x gets a gradient");
    let want = Tensor::ones((3, 2), DType::F32, &Device::Cpu)
        .unwrap()
        .matmul(&w)
        .unwrap();
    assert!(max_abs_diff(dx, &want) < 1e-4);
}
