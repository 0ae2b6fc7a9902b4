//! Batched generation (`generate_batch`): left-padded rows with their own positions, one KV
//! cache, rows that stop leave the batch. Every row is checked against a full forward pass of
//! its own prompt + tokens, alone: a wrong position, mask or dropped cache row changes it.
mod common;
use candle_core::{DType, Device, Tensor};
use common::fixture;
use lmforge::generate::{generate, generate_batch, Sampled, Sampling, Stop};
use lmforge::model::DecoderModel;

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 9, 3],
        vec![7, 1, 2, 8, 4, 6, 11],
        vec![13],
        vec![2, 2, 5, 17, 9],
    ]
}

/// log-softmax(logits / T) of every next token of `ids`, one row alone, no cache.
fn alone(m: &DecoderModel, ids: &[u32], temp: f64) -> Vec<Vec<f32>> {
    let x = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let l = (m.forward(&x).unwrap().squeeze(0).unwrap() / temp).unwrap();
    let l = candle_nn::ops::log_softmax(&l, 1).unwrap();
    l.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

#[test]
fn batched_rows_match_each_prompt_alone() {
    for name in ["gpt2_tiny", "llama_tiny", "mistral_tiny", "qwen2_tiny"] {
        let m = lmforge::model::hf::load(&fixture(name), &Device::Cpu, &|_| true).unwrap();
        let s = Sampling {
            max_new_tokens: 9,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 3,
        };
        let ps = prompts();
        let out = generate_batch(&m.model, &ps, &s, &[]).unwrap();
        for (p, o) in ps.iter().zip(&out) {
            assert_eq!(o.tokens.len(), 9, "{name}");
            assert_eq!(o.stop, Stop::MaxTokens);
            let ids: Vec<u32> = p.iter().chain(&o.tokens).copied().collect();
            let lp = alone(&m.model, &ids, 1.0);
            for (k, (&t, &got)) in o.tokens.iter().zip(&o.logps).enumerate() {
                let want = lp[p.len() - 1 + k][t as usize];
                assert!(
                    (want - got).abs() < 2e-4,
                    "{name}: token {k} of {p:?}: log-prob {got} in the batch, {want} alone"
                );
            }
        }
        // Greedy: the batch picks what one-at-a-time decoding picks.
        let g = Sampling {
            temperature: 0.0,
            ..s.clone()
        };
        let out = generate_batch(&m.model, &ps, &g, &[]).unwrap();
        for (p, o) in ps.iter().zip(&out) {
            let (one, _) = generate(&m.model, p, &g, &[], |_| Ok(())).unwrap();
            assert_eq!(o.tokens, one, "{name}: greedy row of {p:?}");
        }
    }
}

/// Same tokens and stop; log-probs equal up to rounding (other batch shapes, other sums).
fn same(a: &Sampled, b: &Sampled) -> bool {
    a.tokens == b.tokens
        && a.stop == b.stop
        && a.logps
            .iter()
            .zip(&b.logps)
            .all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn rows_stop_independently_and_do_not_depend_on_the_batch() {
    let m = lmforge::model::hf::load(&fixture("llama_tiny"), &Device::Cpu, &|_| true).unwrap();
    let s = Sampling {
        max_new_tokens: 12,
        temperature: 0.9,
        top_k: Some(20),
        top_p: Some(0.95),
        seed: 11,
    };
    let ps = prompts();
    let all = generate_batch(&m.model, &ps, &s, &[]).unwrap();
    // Row 1 with a different neighbour at row 0 and none after it: the same tokens.
    let other = vec![vec![3, 3, 3, 3, 3, 3, 3, 3, 3, 3], ps[1].clone()];
    let two = generate_batch(&m.model, &other, &s, &[]).unwrap();
    assert!(same(&two[1], &all[1]), "{:?} vs {:?}", two[1], all[1]);
    // Rows of one prompt share its prefill: row 1 is the same with a copy of its prompt at
    // row 0, and that copy samples something else.
    let dup = vec![ps[1].clone(), ps[1].clone(), ps[0].clone()];
    let d = generate_batch(&m.model, &dup, &s, &[]).unwrap();
    assert!(same(&d[1], &all[1]), "{:?} vs {:?}", d[1], all[1]);
    assert_ne!(d[0].tokens, d[1].tokens);
    // An EOS that is row 2's fourth token: row 2 stops there (EOS kept), the others go on
    // unchanged up to their own first EOS, after the batch shrank.
    let eos = all[2].tokens[3];
    let cut = generate_batch(&m.model, &ps, &s, &[eos]).unwrap();
    for (a, c) in all.iter().zip(&cut) {
        match a.tokens.iter().position(|&t| t == eos) {
            Some(i) => {
                assert_eq!(c.stop, Stop::Eos);
                assert_eq!(c.tokens, a.tokens[..=i]);
            }
            None => assert!(same(c, a), "{c:?} vs {a:?}"),
        }
    }
    assert_eq!(cut[2].tokens.len(), 4);
    // Same seed, same rows; another seed, other rows.
    assert_eq!(generate_batch(&m.model, &ps, &s, &[]).unwrap(), all);
    let s2 = Sampling { seed: 12, ..s };
    assert_ne!(generate_batch(&m.model, &ps, &s2, &[]).unwrap(), all);
}

#[test]
fn context_and_empty_prompts_are_errors_or_stops() {
    let m = lmforge::model::hf::load(&fixture("gpt2_tiny"), &Device::Cpu, &|_| true).unwrap();
    let ctx = m.model.cfg.max_position_embeddings;
    let s = Sampling {
        max_new_tokens: 50,
        ..Default::default()
    };
    let e = generate_batch(&m.model, &[vec![1], vec![]], &s, &[]).unwrap_err();
    assert!(e.to_string().contains("prompt 1 is empty"), "{e}");
    let long = vec![1u32; ctx - 3];
    let out = generate_batch(&m.model, &[vec![1, 2], long], &s, &[]).unwrap();
    assert!(out
        .iter()
        .all(|o| o.stop == Stop::ContextFull && o.tokens.len() == 4));
}
