//! The eval harness against lm-evaluation-harness's own numbers
//! (scripts/make_eval_ref_fixtures.py: lm_eval 0.4.13's HF backend on the tiny fixtures, the
//! CrowS-Pairs paper's pseudo-log-likelihood on the tiny BERT), and KV reuse against none.
//! Task files and the `eval` command: tests/eval_tasks.rs.

mod common;

use common::fixture;
use lmforge::eval::loglik::{loglikelihoods, Opts, Request};
use lmforge::eval::runners::{cut_at_stop, encode, encode_pair, prefix_token};
use lmforge::generate::{generate_batch_until, Sampling};
use lmforge::model::hf;
use serde_json::Value;

fn refs() -> Value {
    let p = fixture("eval").join("lm_eval_ref.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(name: &str) -> hf::LoadedModel {
    hf::load(&fixture(name), &candle_core::Device::Cpu, &|_| true).unwrap()
}

#[test]
fn loglikelihoods_match_lm_eval() {
    let r = refs();
    for name in ["gpt2_tiny", "llama_tiny", "eval/llama_bos"] {
        let m = load(name);
        let want = &r[name];
        assert_eq!(
            prefix_token(&m).unwrap() as u64,
            want["prefix_token_id"].as_u64().unwrap()
        );
        let cases = want["loglikelihood"].as_array().unwrap();
        let reqs: Vec<Request> = cases
            .iter()
            .map(|c| {
                let (ctx, cont) = encode_pair(
                    &m,
                    c["context"].as_str().unwrap(),
                    c["continuation"].as_str().unwrap(),
                )
                .unwrap();
                Request {
                    context: ctx,
                    continuations: vec![cont],
                    prefix_len: 0,
                }
            })
            .collect();
        let (got, _) = loglikelihoods(&m.model, &reqs, &Opts::default()).unwrap();
        for (c, g) in cases.iter().zip(&got) {
            let w = c["logp"].as_f64().unwrap();
            assert!(
                (g[0].logp - w).abs() < 1e-4,
                "{name} {c}: {} vs lm-eval {w}",
                g[0].logp
            );
            assert_eq!(g[0].greedy, c["greedy"].as_bool().unwrap(), "{name} {c}");
        }
    }
}

#[test]
fn kv_reuse_and_shared_contexts_give_the_same_loglikelihoods() {
    for name in ["gpt2_tiny", "llama_tiny"] {
        let m = load(name);
        let enc = |s: &str| m.tok.encode(s, true).unwrap();
        let prefix = enc("Demonstration one. Answer: yes\n\nDemonstration two. Answer: no\n\n");
        let mut reqs = Vec::new();
        for (i, q) in [
            "Is it?",
            "What about this one",
            "And the last question here ok",
            "x",
        ]
        .iter()
        .enumerate()
        {
            let mut ctx = prefix.clone();
            ctx.extend(enc(&format!("{q} Answer:")));
            let conts = vec![enc(" yes"), enc(" no"), enc(" maybe not at all")];
            // Two of the requests share the prefix hint, one claims none, one shares all.
            let prefix_len = if i == 2 { 0 } else { prefix.len() };
            reqs.push(Request {
                context: ctx,
                continuations: conts,
                prefix_len,
            });
        }
        let plain = Opts {
            batch_tokens: 1 << 16,
            reuse_prefix: false,
            share_context: false,
        };
        let (base, s0) = loglikelihoods(&m.model, &reqs, &plain).unwrap();
        for o in [
            Opts::default(),
            Opts {
                batch_tokens: 24,
                ..Opts::default()
            },
            Opts {
                reuse_prefix: false,
                ..Opts::default()
            },
            Opts {
                share_context: false,
                ..Opts::default()
            },
        ] {
            let (got, s) = loglikelihoods(&m.model, &reqs, &o).unwrap();
            for (a, b) in base.iter().flatten().zip(got.iter().flatten()) {
                assert!(
                    (a.logp - b.logp).abs() < 1e-5,
                    "{name} {o:?}: {} vs {}",
                    a.logp,
                    b.logp
                );
                assert_eq!(a.greedy, b.greedy);
            }
            if o.reuse_prefix && o.share_context {
                assert!(
                    s.tokens < s0.tokens,
                    "{name}: reuse ran {} tokens, plain {}",
                    s.tokens,
                    s0.tokens
                );
            }
        }
    }
}

#[test]
fn contexts_longer_than_the_window_are_cut_from_the_left() {
    let m = load("llama_tiny");
    let long: Vec<u32> = (0..100).map(|i| 5 + (i % 50)).collect();
    let cont = vec![7u32, 8, 9];
    let req = Request {
        context: long.clone(),
        continuations: vec![cont.clone()],
        prefix_len: 0,
    };
    let (got, s) = loglikelihoods(&m.model, &[req], &Opts::default()).unwrap();
    assert_eq!(s.truncated, 1);
    // The window holds 64 + 1 tokens: the last 62 of the context, then the continuation.
    let cut = Request {
        context: long[100 - 62..].to_vec(),
        continuations: vec![cont],
        prefix_len: 0,
    };
    let (want, s) = loglikelihoods(&m.model, &[cut], &Opts::default()).unwrap();
    assert_eq!(s.truncated, 0);
    assert!((got[0][0].logp - want[0][0].logp).abs() < 1e-6);
}

#[test]
fn rolling_loglikelihood_matches_lm_eval() {
    let r = refs();
    for name in ["gpt2_tiny", "llama_tiny", "eval/llama_bos"] {
        let m = load(name);
        let p = prefix_token(&m).unwrap();
        for c in r[name]["rolling"].as_array().unwrap() {
            let ids = encode(&m, c["text"].as_str().unwrap()).unwrap();
            assert_eq!(ids.len() as u64, c["tokens"].as_u64().unwrap());
            let s = lmforge::eval::score::score_rolling(&m.model, &ids, p).unwrap();
            let got = -s.nll * s.tokens as f64;
            let w = c["logp"].as_f64().unwrap();
            assert!(
                (got - w).abs() < 2e-4,
                "{name} ({} tokens): {got} vs lm-eval {w}",
                ids.len()
            );
        }
    }
}

#[test]
fn greedy_generation_until_stop_strings_matches_lm_eval() {
    let r = refs();
    for name in ["gpt2_tiny", "llama_tiny", "eval/llama_bos"] {
        let m = load(name);
        for c in r[name]["generate"].as_array().unwrap() {
            let until: Vec<String> = c["until"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap().to_string())
                .collect();
            let s = Sampling {
                max_new_tokens: c["max_gen_toks"].as_u64().unwrap() as usize,
                temperature: 0.0,
                ..Sampling::default()
            };
            let prompt = encode(&m, c["context"].as_str().unwrap()).unwrap();
            let stop = |_: usize, t: &[u32]| {
                m.tok
                    .decode(t, true)
                    .is_ok_and(|x| until.iter().any(|u| x.contains(u.as_str())))
            };
            let o = generate_batch_until(&m.model, &[prompt], &s, &m.stop_ids(), &stop).unwrap();
            let text = m.tok.decode(o[0].text_tokens(), true).unwrap();
            assert_eq!(
                cut_at_stop(&text, &until),
                c["text"].as_str().unwrap(),
                "{name} {c}"
            );
        }
    }
}

#[test]
fn crows_pairs_pseudo_loglikelihood_matches_the_paper() {
    let r = refs();
    let heads = lmforge::model::encoder::Heads {
        mlm: true,
        pooler: false,
    };
    let e = hf::load_encoder(
        &fixture("bert_tiny"),
        &candle_core::Device::Cpu,
        heads,
        &|_| true,
    )
    .unwrap();
    for c in r["crows_pll_bert_tiny"].as_array().unwrap() {
        let (a, b) = lmforge::eval::bias::pseudo_pair(
            &e,
            c["sent_more"].as_str().unwrap(),
            c["sent_less"].as_str().unwrap(),
        )
        .unwrap();
        for (g, k) in [(a, "score_more"), (b, "score_less")] {
            let w = c[k].as_f64().unwrap();
            assert!((g - w).abs() < 1e-4, "{c}: {k} {g} vs {w}");
        }
    }
}

#[test]
fn difflib_matching_blocks() {
    use lmforge::eval::bias::matching_blocks;
    // difflib.SequenceMatcher(None, "abxcd", "abcd").get_matching_blocks() → (0,0,2), (3,2,2).
    let s = |x: &str| x.bytes().map(u32::from).collect::<Vec<_>>();
    assert_eq!(
        matching_blocks(&s("abxcd"), &s("abcd")),
        vec![(0, 0, 2), (3, 2, 2)]
    );
    // Ties: the earliest block in a, then in b.
    assert_eq!(matching_blocks(&s("ab"), &s("ba")), vec![(0, 1, 1)]);
}

#[test]
fn a_cached_prefix_is_skipped_when_the_row_would_not_fit_beside_it() {
    let m = load("llama_tiny");
    // 40 context tokens (30 of them a shared prefix) and three 10-token continuations: the row
    // holds 40 + 3 × 9 = 67 columns, more than the 64-position window, though no position is.
    let ctx: Vec<u32> = (0..40).map(|i| 5 + i % 30).collect();
    let conts: Vec<Vec<u32>> = (0..3)
        .map(|j| (0..10).map(|i| 40 + i + j).collect())
        .collect();
    let reqs: Vec<Request> = (0..2)
        .map(|r| {
            let mut c = ctx.clone();
            c[39] = 90 + r;
            Request {
                context: c,
                continuations: conts.clone(),
                prefix_len: 30,
            }
        })
        .collect();
    let (got, _) = loglikelihoods(&m.model, &reqs, &Opts::default()).unwrap();
    let plain = Opts {
        reuse_prefix: false,
        share_context: false,
        ..Opts::default()
    };
    let (want, _) = loglikelihoods(&m.model, &reqs, &plain).unwrap();
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((a.logp - b.logp).abs() < 1e-5);
    }
    let bad = Request {
        context: vec![1, 2],
        continuations: vec![vec![100_000]],
        prefix_len: 0,
    };
    let e = loglikelihoods(&m.model, &[bad], &Opts::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the model's vocabulary"), "{e}");
}
