//! Preference losses against TRL 1.16 (values and gradients written by
//! `scripts/make_pref_fixtures.py` from TRL's own code on fixed tensors), DPO's hand-checkable
//! properties, and a LoRA reward model's rewards and gradients against PyTorch + PEFT.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use lmforge::losses::preference::{self as pl, Pair, PairLoss, Params};
use std::collections::HashMap;

fn fx() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("preference/losses.safetensors"), &Device::Cpu).unwrap()
}

fn get(f: &HashMap<String, Tensor>, k: &str) -> Tensor {
    f.get(k)
        .unwrap_or_else(|| panic!("fixture has no {k}"))
        .clone()
}

fn var(f: &HashMap<String, Tensor>, k: &str) -> Var {
    Var::from_tensor(&get(f, k).to_dtype(DType::F32).unwrap()).unwrap()
}

/// |a − b| ≤ 1e-6·max(1, |b|) elementwise, in f64.
fn close(what: &str, a: &Tensor, b: &Tensor) {
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * y.abs().max(1.0),
            "{what}[{i}]: {x} vs TRL {y}"
        );
    }
}

const DPO: [(&str, PairLoss); 12] = [
    ("sigmoid", PairLoss::Sigmoid),
    ("hinge", PairLoss::Hinge),
    ("ipo", PairLoss::Ipo),
    ("robust", PairLoss::Robust),
    ("exo_pair", PairLoss::ExoPair),
    ("nca_pair", PairLoss::NcaPair),
    ("bco_pair", PairLoss::BcoPair),
    ("sppo_hard", PairLoss::SppoHard),
    ("apo_zero", PairLoss::ApoZero),
    ("apo_down", PairLoss::ApoDown),
    ("sigmoid_norm", PairLoss::SigmoidNorm),
    ("discopop", PairLoss::Discopop),
];

#[test]
fn every_dpo_loss_type_matches_trl_with_gradients() {
    let f = fx();
    let mut checked = 0;
    for (name, kind) in DPO {
        for beta in ["0.1", "0.5"] {
            for ls in ["0", "0.2"] {
                let key = format!("dpo.{name}.b{beta}.ls{ls}");
                if !f.contains_key(&format!("{key}.loss")) {
                    continue;
                }
                let (pc, pr) = (var(&f, "in.policy_chosen"), var(&f, "in.policy_rejected"));
                let policy = Pair {
                    chosen: pc.as_tensor().clone(),
                    rejected: pr.as_tensor().clone(),
                };
                let reference = Pair {
                    chosen: get(&f, "in.ref_chosen"),
                    rejected: get(&f, "in.ref_rejected"),
                };
                let lens = Pair {
                    chosen: get(&f, "in.chosen_len"),
                    rejected: get(&f, "in.rejected_len"),
                };
                let p = Params {
                    beta: beta.parse().unwrap(),
                    label_smoothing: ls.parse().unwrap(),
                    ..Default::default()
                };
                p.check(kind).unwrap();
                let l = pl::dpo(kind, &p, &policy, &reference, &lens).unwrap();
                close(&format!("{key}.loss"), &l, &get(&f, &format!("{key}.loss")));
                let g = l.sum_all().unwrap().backward().unwrap();
                close(
                    &format!("{key}.grad_chosen"),
                    g.get(&pc).unwrap(),
                    &get(&f, &format!("{key}.grad_chosen")),
                );
                close(
                    &format!("{key}.grad_rejected"),
                    g.get(&pr).unwrap(),
                    &get(&f, &format!("{key}.grad_rejected")),
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 27,
        "only {checked} DPO cases found in the fixture"
    );
    let policy = Pair {
        chosen: get(&f, "in.policy_chosen"),
        rejected: get(&f, "in.policy_rejected"),
    };
    let reference = Pair {
        chosen: get(&f, "in.ref_chosen"),
        rejected: get(&f, "in.ref_rejected"),
    };
    let (c, r) = pl::implicit_rewards(0.1, &policy, &reference).unwrap();
    close("rewards_chosen", &c, &get(&f, "dpo.b0.1.rewards_chosen"));
    close(
        "rewards_rejected",
        &r,
        &get(&f, "dpo.b0.1.rewards_rejected"),
    );
}

#[test]
fn dpo_is_ln2_at_the_reference_with_equal_and_opposite_gradients() {
    let x = Tensor::new(&[-12.5f32, -3.0, -40.25], &Device::Cpu).unwrap();
    let y = Tensor::new(&[-7.0f32, -9.5, -41.0], &Device::Cpu).unwrap();
    let (c, r) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&y).unwrap());
    let policy = Pair {
        chosen: c.as_tensor().clone(),
        rejected: r.as_tensor().clone(),
    };
    let reference = Pair {
        chosen: x.clone(),
        rejected: y.clone(),
    };
    let lens = Pair {
        chosen: x.ones_like().unwrap(),
        rejected: x.ones_like().unwrap(),
    };
    let p = Params {
        beta: 0.3,
        ..Default::default()
    };
    let l = pl::dpo(PairLoss::Sigmoid, &p, &policy, &reference, &lens).unwrap();
    for v in l.to_vec1::<f32>().unwrap() {
        assert!(
            (v as f64 - std::f64::consts::LN_2).abs() < 1e-7,
            "loss {v} ≠ ln 2"
        );
    }
    let g = l.sum_all().unwrap().backward().unwrap();
    let (gc, gr) = (
        g.get(&c).unwrap().to_vec1::<f32>().unwrap(),
        g.get(&r).unwrap().to_vec1::<f32>().unwrap(),
    );
    for (a, b) in gc.iter().zip(&gr) {
        // ∂L/∂π_c = −β·σ(−βΔ) = −β/2 at Δ = 0; the rejected side the opposite.
        assert!(
            (a + 0.15).abs() < 1e-7 && (a + b).abs() < 1e-7,
            "gradients {a} and {b}"
        );
    }
    // Label smoothing (cDPO) keeps the value at the reference: −(1−ε)·log ½ − ε·log ½ = ln 2.
    let p = Params {
        beta: 0.3,
        label_smoothing: 0.2,
        ..Default::default()
    };
    let l = pl::dpo(PairLoss::Sigmoid, &p, &policy, &reference, &lens).unwrap();
    assert!((l.to_vec1::<f32>().unwrap()[0] as f64 - std::f64::consts::LN_2).abs() < 1e-7);
}

#[test]
fn orpo_and_simpo_match_trl() {
    let f = fx();
    let (c, r) = (var(&f, "in.avg_chosen"), var(&f, "in.avg_rejected"));
    let avg = Pair {
        chosen: c.as_tensor().clone(),
        rejected: r.as_tensor().clone(),
    };
    let (term, log_odds) = pl::orpo(0.1, &avg).unwrap();
    // TRL returns λ·log σ(log odds) and minimises NLL − mean(that): our term is its negation.
    close(
        "orpo.losses",
        &term.neg().unwrap(),
        &get(&f, "orpo.b0.1.losses"),
    );
    close("orpo.log_odds", &log_odds, &get(&f, "orpo.b0.1.log_odds"));
    let g = term.sum_all().unwrap().backward().unwrap();
    close(
        "orpo.grad_chosen",
        g.get(&c).unwrap(),
        &get(&f, "orpo.b0.1.grad_chosen"),
    );
    close(
        "orpo.grad_rejected",
        g.get(&r).unwrap(),
        &get(&f, "orpo.b0.1.grad_rejected"),
    );
    for gamma in ["0.5", "1.0"] {
        for ls in ["0", "0.1"] {
            let key = format!("simpo.b2.0.g{gamma}.ls{ls}");
            let p = Params {
                beta: 2.0,
                simpo_gamma: gamma.parse().unwrap(),
                label_smoothing: ls.parse().unwrap(),
                ..Default::default()
            };
            let l = pl::simpo(&p, &avg).unwrap();
            close(&format!("{key}.loss"), &l, &get(&f, &format!("{key}.loss")));
            let g = l.sum_all().unwrap().backward().unwrap();
            close(
                &format!("{key}.grad_chosen"),
                g.get(&c).unwrap(),
                &get(&f, &format!("{key}.grad_chosen")),
            );
            close(
                &format!("{key}.grad_rejected"),
                g.get(&r).unwrap(),
                &get(&f, &format!("{key}.grad_rejected")),
            );
        }
    }
}

#[test]
fn orpo_and_simpo_edge_cases() {
    let dev = Device::Cpu;
    // Equal completions: log odds 0, ORPO's term λ·ln 2, SimPO's −log σ(−γ).
    let x = Tensor::new(&[-0.7f32, -2.0], &dev).unwrap();
    let avg = Pair {
        chosen: x.clone(),
        rejected: x.clone(),
    };
    let (term, lo) = pl::orpo(0.5, &avg).unwrap();
    for (t, o) in term
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(lo.to_vec1::<f32>().unwrap())
    {
        assert!(o.abs() < 1e-7 && (*t as f64 - 0.5 * std::f64::consts::LN_2).abs() < 1e-7);
    }
    let p = Params {
        beta: 2.0,
        simpo_gamma: 1.0,
        ..Default::default()
    };
    let l = pl::simpo(&p, &avg).unwrap().to_vec1::<f32>().unwrap();
    let want = (1.0f64 + 1f64.exp()).ln(); // −log σ(−1)
    assert!(
        l.iter().all(|v| (*v as f64 - want).abs() < 1e-6),
        "{l:?} vs {want}"
    );
    // A completion the model is certain of (mean log-prob 0) stays finite.
    let sure = Pair {
        chosen: Tensor::new(&[0f32], &dev).unwrap(),
        rejected: Tensor::new(&[-1f32], &dev).unwrap(),
    };
    let (term, _) = pl::orpo(0.1, &sure).unwrap();
    assert!(term.to_vec1::<f32>().unwrap()[0].is_finite());
}

#[test]
fn kto_matches_trl() {
    let f = fx();
    for case in ["a", "b"] {
        let sfx = if case == "a" { "" } else { "_b" };
        let kl = pl::kto_kl(
            &get(&f, &format!("in.kto_policy_kl{sfx}")),
            &get(&f, &format!("in.kto_ref_kl{sfx}")),
        )
        .unwrap();
        for (wd, wu) in [("1.0", "1.0"), ("1.33", "1.0")] {
            let key = format!("kto.{case}.b0.1.wd{wd}.wu{wu}");
            let want_kl = get(&f, &format!("{key}.kl"))
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0];
            assert!((kl - want_kl).abs() < 1e-6, "{key}: KL {kl} vs {want_kl}");
            if case == "b" {
                assert_eq!(kl, 0.0, "a negative estimate is clamped to 0");
            }
            let (pc, pr) = (
                var(&f, "in.kto_policy_chosen"),
                var(&f, "in.kto_policy_rejected"),
            );
            let rc = (pc.as_tensor() - get(&f, "in.kto_ref_chosen")).unwrap();
            let rr = (pr.as_tensor() - get(&f, "in.kto_ref_rejected")).unwrap();
            let (lc, lr) = pl::kto(0.1, &rc, &rr, kl).unwrap();
            close(
                &format!("{key}.chosen_losses"),
                &lc,
                &get(&f, &format!("{key}.chosen_losses")),
            );
            close(
                &format!("{key}.rejected_losses"),
                &lr,
                &get(&f, &format!("{key}.rejected_losses")),
            );
            // TRL: weights applied outside, then a plain mean over all examples.
            let (wd, wu): (f64, f64) = (wd.parse().unwrap(), wu.parse().unwrap());
            let n = (lc.dim(0).unwrap() + lr.dim(0).unwrap()) as f64;
            let mean = (((lc.sum_all().unwrap() * wd).unwrap()
                + (lr.sum_all().unwrap() * wu).unwrap())
            .unwrap()
                / n)
                .unwrap();
            let g = mean.backward().unwrap();
            close(
                &format!("{key}.grad_chosen"),
                g.get(&pc).unwrap(),
                &get(&f, &format!("{key}.grad_chosen")),
            );
            close(
                &format!("{key}.grad_rejected"),
                g.get(&pr).unwrap(),
                &get(&f, &format!("{key}.grad_rejected")),
            );
        }
    }
}

#[test]
fn kto_edge_cases() {
    let dev = Device::Cpu;
    // r = z: both kinds of example lose exactly 1 − σ(0) = ½; far on the right side, ~0.
    let r = Tensor::new(&[0.3f32], &dev).unwrap();
    let (c, u) = pl::kto(0.1, &r, &r, 0.3).unwrap();
    assert_eq!(
        (
            c.to_vec1::<f32>().unwrap()[0],
            u.to_vec1::<f32>().unwrap()[0]
        ),
        (0.5, 0.5)
    );
    let (good, bad) = (
        Tensor::new(&[400f32], &dev).unwrap(),
        Tensor::new(&[-400f32], &dev).unwrap(),
    );
    let (c, u) = pl::kto(0.1, &good, &bad, 0.0).unwrap();
    assert!(c.to_vec1::<f32>().unwrap()[0] < 1e-12 && u.to_vec1::<f32>().unwrap()[0] < 1e-12);
    // The KL estimate is a mean clamped at zero.
    let p = Tensor::new(&[-1f32, -3.0], &dev).unwrap();
    let q = Tensor::new(&[-2f32, -2.5], &dev).unwrap();
    assert!((pl::kto_kl(&p, &q).unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(pl::kto_kl(&q, &p).unwrap(), 0.0);
    // No examples of one kind: an empty loss, not an error.
    let none = Tensor::zeros(0, candle_core::DType::F32, &dev).unwrap();
    let (c, u) = pl::kto(0.1, &r, &none, 0.0).unwrap();
    assert_eq!((c.dim(0).unwrap(), u.dim(0).unwrap()), (1, 0));
}

#[test]
fn bradley_terry_matches_trl() {
    let f = fx();
    for (key, margin, center) in [
        ("bt", false, 0.0),
        ("bt.margin", true, 0.0),
        ("bt.center0.01", false, 0.01),
        ("bt.margin.center0.01", true, 0.01),
    ] {
        let (c, r) = (var(&f, "in.rm_chosen"), var(&f, "in.rm_rejected"));
        let m = get(&f, "in.rm_margin");
        let per =
            pl::bradley_terry(c.as_tensor(), r.as_tensor(), margin.then_some(&m), center).unwrap();
        let loss = per.mean_all().unwrap();
        close(
            &format!("{key}.loss"),
            &loss.reshape(1).unwrap(),
            &get(&f, &format!("{key}.loss")),
        );
        let g = loss.backward().unwrap();
        close(
            &format!("{key}.grad_chosen"),
            g.get(&c).unwrap(),
            &get(&f, &format!("{key}.grad_chosen")),
        );
        close(
            &format!("{key}.grad_rejected"),
            g.get(&r).unwrap(),
            &get(&f, &format!("{key}.grad_rejected")),
        );
    }
}

fn rm_rows(ids: &Tensor, lens: &Tensor) -> Vec<Vec<u32>> {
    let ids: Vec<Vec<i64>> = ids.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
    let lens: Vec<i64> = lens.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
    ids.iter()
        .zip(lens)
        .map(|(r, n)| r[..n as usize].iter().map(|&x| x as u32).collect())
        .collect()
}

/// A LoRA reward model written by PEFT (q/v adapters, `score` in `modules_to_save`): lmforge
/// reads it back, gives PyTorch's rewards, and the Bradley–Terry gradients of every LoRA weight
/// and of the head; the merged `…ForSequenceClassification` directory gives the same rewards.
#[test]
fn lora_reward_model_rewards_and_gradients_match_pytorch() {
    let dir = fixture("preference/llama_tiny_rm");
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let chosen = rm_rows(&r["chosen_ids"], &r["chosen_len"]);
    let rejected = rm_rows(&r["rejected_ids"], &r["rejected_len"]);
    let hm = lmforge::model::backbone::load_head_model(
        &dir.join("adapter"),
        Some(&fixture("llama_tiny")),
        &Device::Cpu,
        true,
    )
    .unwrap();
    let rows: Vec<Vec<u32>> = chosen.iter().chain(&rejected).cloned().collect();
    let rewards = hm
        .head
        .forward(&hm.m.body.features(&rows, hm.pad, &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    let (rc, rr) = (
        rewards.narrow(0, 0, 3).unwrap(),
        rewards.narrow(0, 3, 3).unwrap(),
    );
    assert!(
        max_abs_diff(&rc, &r["rewards_chosen"]) < 1e-5,
        "{rc} vs {}",
        r["rewards_chosen"]
    );
    assert!(max_abs_diff(&rr, &r["rewards_rejected"]) < 1e-5);
    let loss = pl::bradley_terry(&rc, &rr, None, 0.0)
        .unwrap()
        .mean_all()
        .unwrap();
    assert!(max_abs_diff(&loss.reshape(1).unwrap(), &r["loss"]) < 1e-5);
    let gs = loss.backward().unwrap();
    let grad = |n: &str| hm.m.store.get(n).and_then(|p| gs.get(p.var.as_tensor()));
    let mut n = 0;
    for (k, want) in &r {
        let Some(name) = k.strip_prefix("grad.") else {
            continue;
        };
        let ours = name
            .strip_prefix("base_model.model.")
            .filter(|s| *s == "score.weight")
            .unwrap_or(name);
        let g = grad(ours).unwrap_or_else(|| panic!("no gradient for {ours}"));
        let tol = 1e-5 * max_abs(want).max(1.0);
        assert!(
            max_abs_diff(g, want) < tol,
            "{name}: {} vs {}",
            max_abs_diff(g, want),
            tol
        );
        n += 1;
    }
    assert_eq!(n, 9, "8 LoRA weights and the head");
    // The base's own weights are frozen: no gradient.
    assert!(grad("model.layers.0.self_attn.q_proj.weight").is_none());
    let full =
        lmforge::model::backbone::load_head_model(&dir.join("full"), None, &Device::Cpu, false)
            .unwrap();
    let rf = full
        .head
        .forward(
            &full
                .m
                .body
                .features(&chosen, full.pad, &Device::Cpu)
                .unwrap(),
        )
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert!(max_abs_diff(&rf, &r["rewards_chosen_merged"]) < 1e-5);
}
