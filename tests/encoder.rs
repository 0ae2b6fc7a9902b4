//! BERT against transformers (hidden states, MLM logits, loss, every parameter's gradient, with
//! padding and token types), WordPiece tokenization, save/load round trip, and masked-LM masking
//! statistics.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::model::encoder::Heads;
use lmforge::model::hf;
use lmforge::train::pretrain::masked::{mask_tokens, MaskSpec};

const MLM: Heads = Heads {
    mlm: true,
    pooler: false,
};

#[test]
fn bert_matches_transformers_logits_loss_and_gradients() {
    let m = hf::load_encoder(&fixture("bert_tiny"), &Device::Cpu, MLM, &|_| false).unwrap();
    assert!(m.fresh.is_empty(), "{:?}", m.fresh);
    let r = reference("bert_tiny");
    let u32s = |k: &str| r[k].to_dtype(DType::U32).unwrap();
    let (ids, mask, types) = (
        u32s("input_ids"),
        u32s("attention_mask"),
        u32s("token_type_ids"),
    );
    let h = m.model.forward(&ids, Some(&types), Some(&mask)).unwrap();
    let dh = max_abs_diff(&h, &r["hidden"]);
    assert!(dh < 1e-4, "hidden states differ by {dh}");
    let logits = m.model.mlm_logits(&h).unwrap();
    let dl = max_abs_diff(&logits, &r["logits"]);
    assert!(dl < 1e-4, "logits differ by {dl}");

    let labels: Vec<i64> = r["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let (b, t) = ids.dims2().unwrap();
    let v = m.model.cfg.vocab_size;
    let sel: Vec<u32> = (0..b * t)
        .filter(|&i| labels[i] >= 0)
        .map(|i| i as u32)
        .collect();
    let tgt: Vec<u32> = sel.iter().map(|&i| labels[i as usize] as u32).collect();
    let idx = Tensor::new(sel.as_slice(), &Device::Cpu).unwrap();
    let picked = logits
        .reshape((b * t, v))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    let loss = lmforge::losses::cross_entropy(
        &picked,
        &Tensor::new(tgt.as_slice(), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    let grads = m.store.grads(&loss.backward().unwrap());
    check_grads(&m.store, &grads, &r, "bert_tiny", |_| true);
}

#[test]
fn wordpiece_tokenizer_and_round_trip() {
    let m = hf::load_encoder(&fixture("bert_tiny"), &Device::Cpu, MLM, &|_| true).unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("bert_tiny/tokenizer_reference.json")).unwrap(),
    )
    .unwrap();
    let enc = m
        .tok
        .inner
        .encode(("To be, or not to be", "that is the question"), true)
        .unwrap();
    let ids: Vec<u64> = enc.get_ids().iter().map(|&x| x as u64).collect();
    assert_eq!(serde_json::json!(ids), want["ids"]);
    let d = tmpdir("bert_roundtrip");
    hf::save_encoder(&d.join("m"), &m.model, &m.store, &m.tok, "BertForMaskedLM").unwrap();
    let m2 = hf::load_encoder(&d.join("m"), &Device::Cpu, MLM, &|_| true).unwrap();
    let ids = reference("bert_tiny")["input_ids"]
        .to_dtype(DType::U32)
        .unwrap();
    let a = m
        .model
        .mlm_logits(&m.model.forward(&ids, None, None).unwrap())
        .unwrap();
    let b = m2
        .model
        .mlm_logits(&m2.model.forward(&ids, None, None).unwrap())
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Asking for a pooler this checkpoint lacks initialises one and says so.
    let with_pool = hf::load_encoder(
        &fixture("bert_tiny"),
        &Device::Cpu,
        Heads {
            mlm: true,
            pooler: true,
        },
        &|_| true,
    )
    .unwrap();
    assert_eq!(with_pool.fresh, vec!["bert.pooler".to_string()]);
}

#[test]
fn mlm_masking_follows_15_80_10_10() {
    let spec = MaskSpec {
        prob: 0.15,
        mask_id: 4,
        vocab: 300,
        special: vec![0, 2, 3],
    };
    let n = 200_000;
    let ids: Vec<u32> = (0..n)
        .map(|i| if i % 50 == 0 { 2 } else { 5 + (i % 290) as u32 })
        .collect();
    let (inp, labels) = mask_tokens(&ids, &spec, 7);
    let selected: Vec<usize> = (0..n).filter(|&i| labels[i] >= 0).collect();
    let eligible = ids.iter().filter(|&&x| x != 2).count() as f64;
    let frac = selected.len() as f64 / eligible;
    assert!((frac - 0.15).abs() < 0.005, "selected {frac}");
    assert!(
        selected.iter().all(|&i| ids[i] != 2),
        "special tokens are never selected"
    );
    assert!(
        selected.iter().all(|&i| labels[i] == ids[i] as i64),
        "labels are the originals"
    );
    assert!(
        (0..n).filter(|&i| labels[i] < 0).all(|i| inp[i] == ids[i]),
        "unselected unchanged"
    );
    let k = selected.len() as f64;
    let masked = selected.iter().filter(|&&i| inp[i] == 4).count() as f64 / k;
    let kept = selected.iter().filter(|&&i| inp[i] == ids[i]).count() as f64 / k;
    let random = 1.0 - masked - kept;
    // A random replacement can draw the original token (1/vocab of the 10%): counted as kept.
    assert!((masked - 0.8).abs() < 0.01, "masked {masked}");
    assert!((kept - 0.1).abs() < 0.01, "kept {kept}");
    assert!((random - 0.1).abs() < 0.01, "random {random}");
    assert!(selected
        .iter()
        .all(|&i| inp[i] < 300 && !spec.special.contains(&inp[i])));
    // Deterministic per seed, different across seeds.
    assert_eq!(mask_tokens(&ids, &spec, 7), (inp, labels.clone()));
    assert_ne!(mask_tokens(&ids, &spec, 8).1, labels);
}

#[test]
fn pretrain_objective_mlm_trains_a_bert_that_reloads() {
    let d = tmpdir("mlm_cli");
    let corpus = small_corpus(&d, 60_000);
    let out = d.join("run");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lmforge"))
        .args([
            "pretrain",
            "--objective",
            "mlm",
            "--quiet",
            "--data",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "30",
        ])
        .args([
            "--set",
            "model.d_model=32",
            "--set",
            "model.n_layer=1",
            "--set",
            "model.n_head=2",
            "--set",
            "model.ctx=32",
        ])
        .args([
            "--set",
            "data.seq_len=32",
            "--set",
            "train.batch_size=8",
            "--set",
            "tokenizer.vocab_size=400",
            "--set",
            "train.lr=3e-3",
            "--set",
            "train.warmup_steps=2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = hf::load_encoder(&out.join("model"), &Device::Cpu, MLM, &|_| true).unwrap();
    assert!(m.fresh.is_empty());
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss")?
                .as_f64()
        })
        .collect();
    assert_eq!(losses.len(), 30);
    // Starts at ln(vocab) and learns something.
    assert!((losses[0] - (400f64).ln()).abs() < 0.3, "{}", losses[0]);
    let tail = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(tail < losses[0] - 0.3, "{losses:?}");
}
