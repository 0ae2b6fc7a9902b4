//! The advantage formulas and clipped losses of `losses::rl` against TRL's, on the fixture
//! `scripts/make_rl_fixtures.py` writes (GRPO/RLOO from TRL 1.16, PPO's GAE and losses from TRL 0.x).
mod common;
use candle_core::{DType, Device, Tensor};
use lmforge::losses::rl::{self, KlEstimator, ScaleRewards};
use std::collections::HashMap;

fn fx() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        common::fixture("rl").join("advantages.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn v64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs TRL {w}"
        );
    }
}

#[test]
fn grpo_and_rloo_advantages_match_trl() {
    let f = fx();
    let r = v64(&f["in.rewards"]);
    for (s, name) in [
        (ScaleRewards::Group, "group"),
        (ScaleRewards::Batch, "batch"),
        (ScaleRewards::None, "none"),
    ] {
        let a = rl::group_advantages(&r, 4, s).unwrap();
        close(&a, &v64(&f[&format!("grpo.{name}")]), 1e-7, name);
    }
    for norm in [false, true] {
        let a = rl::rloo_advantages(&r, 4, norm).unwrap();
        close(
            &a,
            &v64(&f[&format!("rloo.norm{}", norm as u8)]),
            1e-7,
            "rloo",
        );
    }
    // The KL-penalised rewards: score − β Σ_t k1 over each row's tokens.
    let old: Vec<Vec<f32>> = f["in.rloo.old"].to_vec2().unwrap();
    let rf: Vec<Vec<f32>> = f["in.rloo.ref"].to_vec2().unwrap();
    let lens: Vec<i64> = f["in.rloo.lens"].to_vec1().unwrap();
    let got: Vec<f64> = (0..r.len())
        .map(|i| {
            let n = lens[i] as usize;
            let kl: f64 = (0..n)
                .map(|t| rl::kl(KlEstimator::K1, old[i][t], rf[i][t]) as f64)
                .sum();
            r[i] - 0.05 * kl
        })
        .collect();
    close(&got, &v64(&f["rloo.kl_rewards"]), 1e-6, "rloo kl rewards");
    assert!(rl::rloo_advantages(&r, 1, false).is_err());
    assert!(rl::group_advantages(&r[..7], 4, ScaleRewards::Group).is_err());
}

#[test]
fn gae_whitening_and_clipped_losses_match_trl_ppo() {
    let f = fx();
    let rw: Vec<Vec<f32>> = f["in.ppo.rewards"].to_vec2().unwrap();
    let vs: Vec<Vec<f32>> = f["in.ppo.values"].to_vec2().unwrap();
    for (g, l) in [(1.0, 0.95), (0.9, 0.8)] {
        let key = |s: &str| format!("ppo.g{g:?}.l{l}.{s}");
        let (mut adv, mut ret) = (Vec::new(), Vec::new());
        for (r, v) in rw.iter().zip(&vs) {
            let (a, x) = rl::gae(r, v, g, l);
            adv.push(a);
            ret.push(x);
        }
        let flat = |x: &Vec<Vec<f32>>| x.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
        close(&flat(&adv), &v64(&f[&key("adv")]), 1e-5, "gae advantages");
        close(&flat(&ret), &v64(&f[&key("ret")]), 1e-5, "gae returns");
        rl::whiten(&mut adv, true);
        close(&flat(&adv), &v64(&f[&key("white")]), 1e-5, "whitened");
    }
    let t = |k: &str| f[&format!("in.ppo.{k}")].clone();
    let pg = rl::clipped_surrogate(&t("new"), &t("old"), &t("adv"), 0.2, 0.2).unwrap();
    close(&v64(&pg), &v64(&f["ppo.pg_losses"]), 1e-5, "policy loss");
    let vf = rl::clipped_value_loss(&t("vpred"), &t("vold"), &t("ret"), 0.2).unwrap();
    close(&v64(&vf), &v64(&f["ppo.vf_losses"]), 1e-5, "value loss");
}
