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

/// A prompt's samples packed into one row (the prompt once) score and differentiate exactly as
/// the same sequences in separate rows, also when the packed row is longer than the context
/// (each sequence is not); a sliding-window model is not packed.
#[test]
fn packed_samples_of_a_prompt_match_separate_rows() {
    use lmforge::train::rl::rollout::{forward, packs, Rollout};
    let long: Vec<u32> = (0..18).map(|i| (i * 7 % 50 + 1) as u32).collect();
    type Case<'a> = (&'a str, Vec<&'a [u32]>, Vec<usize>);
    let cases: [Case; 3] = [
        (
            "llama_tiny",
            vec![&[4, 6, 1], &[11], &[3, 3, 9, 12], &[7, 7], &[1, 2, 3]],
            vec![0, 0, 0, 1, 1],
        ),
        (
            "gpt2_tiny",
            vec![&[4, 6, 1], &[11], &[3, 3, 9, 12], &[7, 7], &[1, 2, 3]],
            vec![0, 0, 0, 1, 1],
        ),
        // 4 + 4 × 17 = 72 packed columns; the tiny llama's context is 64.
        (
            "llama_tiny",
            vec![&long, &long[1..], &long[2..], &long[..17]],
            vec![0, 0, 0, 0],
        ),
    ];
    for (name, resps, owner) in cases {
        let m = lmforge::model::hf::load(&fixture(name), &Device::Cpu, &|_| false).unwrap();
        assert!(packs(&m.model));
        let prompts = [vec![5u32, 9, 3, 7], vec![2u32, 8]];
        let mut r = Rollout::default();
        for (resp, &p) in resps.iter().zip(&owner) {
            r.prompt.push(p);
            r.prompt_len.push(prompts[p].len());
            r.seqs
                .push(prompts[p].iter().chain(resp.iter()).copied().collect());
        }
        let rows: Vec<usize> = if owner.len() == 5 {
            vec![3, 0, 1, 4, 2]
        } else {
            vec![2, 0, 3, 1]
        };
        let dev = Device::Cpu;
        let packed = r.batch(&rows, 0, &dev, true).unwrap();
        let groups = if owner.len() == 5 { 2 } else { 1 };
        assert!(
            packed.packing.is_some() && packed.b == groups,
            "{name}: {groups} packed rows"
        );
        if groups == 1 {
            assert!(
                packed.t > m.model.cfg.max_position_embeddings,
                "the row is longer than the context"
            );
        }
        let weights: Vec<f32> = (0..packed.targets.len())
            .map(|i| 0.3 + 0.1 * i as f32)
            .collect();
        let run = |s: &lmforge::train::logps::SeqBatch| {
            let f = forward(&m.model, None, s, 0.7).unwrap();
            let w = Tensor::from_slice(&weights, weights.len(), &dev).unwrap();
            let loss = (&f.logps * w).unwrap().sum_all().unwrap();
            let g = m.store.grads(&loss.backward().unwrap());
            (f.logps.to_vec1::<f32>().unwrap(), g)
        };
        let (lp_packed, g_packed) = run(&packed);
        // The same rows one by one (no packing).
        let mut lp_rows = Vec::new();
        let mut g_rows: Option<lmforge::model::Grads> = None;
        let mut k = 0;
        for &row in &rows {
            let s = r.batch(&[row], 0, &dev, true).unwrap();
            assert!(s.packing.is_none());
            let n = s.targets.len();
            let f = forward(&m.model, None, &s, 0.7).unwrap();
            let w = Tensor::from_slice(&weights[k..k + n], n, &dev).unwrap();
            let loss = (&f.logps * w).unwrap().sum_all().unwrap();
            let g = m.store.grads(&loss.backward().unwrap());
            match g_rows.as_mut() {
                Some(acc) => acc.accumulate(g).unwrap(),
                None => g_rows = Some(g),
            }
            lp_rows.extend(f.logps.to_vec1::<f32>().unwrap());
            k += n;
        }
        assert_eq!(lp_packed.len(), lp_rows.len());
        for (a, b) in lp_packed.iter().zip(&lp_rows) {
            assert!(
                (a - b).abs() < 1e-5,
                "{name}: log-prob {a} packed, {b} alone"
            );
        }
        let gr = g_rows.unwrap();
        let mut n = 0;
        for ((p, a), b) in m.store.params().iter().zip(&g_packed.0).zip(&gr.0) {
            let (Some(a), Some(b)) = (a, b) else {
                assert!(
                    a.is_none() && b.is_none(),
                    "{name}: {} has a gradient in one layout only",
                    p.name
                );
                continue;
            };
            let name_p = &p.name;
            let d = common::max_abs_diff(a, b);
            let scale = common::max_abs(b).max(1e-3);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "{name}: gradient of {name_p} differs by {d}"
            );
            n += 1;
        }
        assert!(n > 5, "{name}: gradients compared: {n}");
    }
    let mistral =
        lmforge::model::hf::load(&fixture("mistral_tiny"), &Device::Cpu, &|_| true).unwrap();
    assert!(
        !packs(&mistral.model),
        "a sliding window must not be packed"
    );
}
