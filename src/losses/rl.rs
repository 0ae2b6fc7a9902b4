//! The formulas of online RL (PPO, GRPO, RLOO) as pure functions: advantages and KL estimates on
//! plain numbers at rollout time (no graph), the clipped objectives on tensors.
//!
//!   GAE (Schulman et al. 2016):  δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t
//!   KL estimators (Schulman 2020, "Approximating KL divergence"), x = log π_ref − log π:
//!       k1 = −x,   k2 = x²/2,   k3 = eˣ − 1 − x
//!   PPO-clip (Schulman et al. 2017):  L = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A),  ρ = π/π_old
//!   clipped value loss:  ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)
//!   GRPO (Shao et al. 2024):  A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)
//!   RLOO (Ahmadian et al. 2024):  A_i = r_i − (Σ_{j≠i} r_j)/(k − 1)
//!
//! Standard deviations are the unbiased ones (torch's `std`), as TRL computes them.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// Generalised advantage estimation over one response: `rewards[t]` and `values[t]` per token.
/// Returns (advantages, returns). The value after the last token is 0 (the episode ends).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next - values[t] as f64;
        last = delta + gamma * lam * last;
        adv[t] = last as f32;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Mean and unbiased standard deviation (0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Whitens values across all rows together (TRL's `masked_whiten`): (x − mean)/√(var + 1e-8),
/// var unbiased; `shift_mean = false` adds the mean back (for rewards).
pub fn whiten(rows: &mut [Vec<f32>], shift_mean: bool) {
    let all: Vec<f64> = rows.iter().flatten().map(|&x| x as f64).collect();
    let (mean, std) = mean_std(&all);
    let inv = 1.0 / (std * std + 1e-8).sqrt();
    for x in rows.iter_mut().flatten() {
        let w = (*x as f64 - mean) * inv;
        *x = if shift_mean { w } else { w + mean } as f32;
    }
}

/// Which estimator of KL(π ‖ π_ref) per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

/// The per-token KL estimate from the sampled token's log-probs under the policy and reference.
pub fn kl(est: KlEstimator, logp: f32, ref_logp: f32) -> f32 {
    let x = (ref_logp - logp) as f64;
    (match est {
        KlEstimator::K1 => -x,
        KlEstimator::K2 => 0.5 * x * x,
        KlEstimator::K3 => x.exp_m1() - x,
    }) as f32
}

/// How GRPO scales group-centred rewards (TRL's `scale_rewards`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the group's standard deviation (the paper).
    Group,
    /// By the whole batch's standard deviation.
    Batch,
    /// Not at all (Dr. GRPO).
    None,
}

/// GRPO's advantages of rewards laid out as consecutive groups of `k` samples per prompt.
pub fn group_advantages(rewards: &[f64], k: usize, scale: ScaleRewards) -> Result<Vec<f64>> {
    if k == 0 || !rewards.len().is_multiple_of(k) {
        bail!("{} rewards do not form groups of {k}", rewards.len());
    }
    let (_, batch_std) = mean_std(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(k) {
        let (mean, std) = mean_std(g);
        let s = match scale {
            ScaleRewards::Group => std,
            ScaleRewards::Batch => batch_std,
            ScaleRewards::None => 0.0,
        };
        for r in g {
            out.push(match scale {
                ScaleRewards::None => r - mean,
                _ => (r - mean) / (s + 1e-4),
            });
        }
    }
    Ok(out)
}

/// RLOO's leave-one-out advantages over groups of `k`; `normalize` then whitens them over the
/// batch ((A − mean)/(std + 1e-4)), as TRL's `normalize_advantages`.
pub fn rloo_advantages(rewards: &[f64], k: usize, normalize: bool) -> Result<Vec<f64>> {
    if k < 2 || !rewards.len().is_multiple_of(k) {
        bail!(
            "RLOO needs groups of at least 2 samples per prompt ({} rewards, k = {k})",
            rewards.len()
        );
    }
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(k) {
        let sum: f64 = g.iter().sum();
        out.extend(g.iter().map(|r| r - (sum - r) / (k - 1) as f64));
    }
    if normalize {
        let (mean, std) = mean_std(&out);
        out.iter_mut().for_each(|a| *a = (*a - mean) / (std + 1e-4));
    }
    Ok(out)
}

/// 1 − Var(returns − values)/Var(returns): how much of the returns the value head explains.
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let diff: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let (_, sr) = mean_std(returns);
    let (_, sd) = mean_std(&diff);
    if sr == 0.0 {
        return f64::NAN;
    }
    1.0 - sd * sd / (sr * sr)
}

/// The KL coefficient of PPO: fixed, or adapted towards a target KL (Ziegler et al. 2019):
/// e = clip(KL/target − 1, ±0.2),  β ← β·(1 + e·n/horizon), n = samples since the last update.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct KlController {
    pub value: f64,
    /// (target, horizon) when adaptive.
    pub adaptive: Option<(f64, f64)>,
}

impl KlController {
    pub fn update(&mut self, kl: f64, n: usize) {
        if let Some((target, horizon)) = self.adaptive {
            if kl.is_finite() {
                let e = (kl / target - 1.0).clamp(-0.2, 0.2);
                self.value *= 1.0 + e * n as f64 / horizon;
            }
        }
    }
}

/// PPO's clipped surrogate per token (or per sequence): −min(ρ·A, clip(ρ)·A) with
/// ρ = exp(logp − old). All (N,); `logp` carries the graph.
pub fn clipped_surrogate(
    logp: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<Tensor> {
    let ratio = (logp - old)?.exp()?;
    let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)?;
    let a = (&ratio * adv)?;
    let b = (clipped * adv)?;
    Ok(a.minimum(&b)?.neg()?)
}

/// The clipped value loss per token: ½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²).
pub fn clipped_value_loss(v: &Tensor, old: &Tensor, returns: &Tensor, clip: f64) -> Result<Tensor> {
    let vc = (old + (v - old)?.clamp(-clip, clip)?)?;
    let l1 = (v - returns)?.sqr()?;
    let l2 = (vc - returns)?.sqr()?;
    Ok((l1.maximum(&l2)? * 0.5)?)
}

/// k3 of each token as a tensor (GRPO's KL term in the loss, with the gradient through `logp`).
pub fn kl_k3(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let x = (ref_logp - logp)?;
    Ok(((x.exp()? - 1.0)? - x)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_by_hand() {
        // γ = 0.9, λ = 0.5; values 1, 2, 3; reward only at the end.
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[1.0, 2.0, 3.0], 0.9, 0.5);
        let d = [0.0 + 0.9 * 2.0 - 1.0, 0.0 + 0.9 * 3.0 - 2.0, 1.0 - 3.0];
        let a2 = d[2];
        let a1 = d[1] + 0.45 * a2;
        let a0 = d[0] + 0.45 * a1;
        for (x, y) in a.iter().zip([a0, a1, a2]) {
            assert!((*x as f64 - y).abs() < 1e-6, "{a:?}");
        }
        assert!((r[0] - (a[0] + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn whitened_to_mean_0_std_1() {
        let mut rows = vec![vec![1.0, 5.0, -2.0], vec![0.5], vec![3.0, 3.0]];
        whiten(&mut rows, true);
        let all: Vec<f64> = rows.iter().flatten().map(|&x| x as f64).collect();
        let (m, s) = mean_std(&all);
        assert!(m.abs() < 1e-6 && (s - 1.0).abs() < 1e-4, "{m} {s}");
    }

    #[test]
    fn kl_estimators_are_their_formulas() {
        let (lp, rp) = (-1.2f32, -0.7f32);
        let x = (rp - lp) as f64;
        assert!((kl(KlEstimator::K1, lp, rp) as f64 - (-x)).abs() < 1e-7);
        assert!((kl(KlEstimator::K2, lp, rp) as f64 - x * x / 2.0).abs() < 1e-7);
        assert!((kl(KlEstimator::K3, lp, rp) as f64 - (x.exp() - 1.0 - x)).abs() < 1e-7);
        assert_eq!(kl(KlEstimator::K3, -0.3, -0.3), 0.0);
    }

    #[test]
    fn adaptive_kl_moves_towards_target() {
        let mut c = KlController {
            value: 0.1,
            adaptive: Some((6.0, 10000.0)),
        };
        c.update(12.0, 100);
        assert!((c.value - 0.1 * (1.0 + 0.2 * 100.0 / 10000.0)).abs() < 1e-12);
        c.update(3.0, 100);
        assert!(c.value < 0.1 * 1.002);
    }
}
