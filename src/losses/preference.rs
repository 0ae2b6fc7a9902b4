//! Preference losses as pure functions of sequence log-probabilities, with TRL's (1.16)
//! definitions and names. Inputs are (B,) tensors of one pair per entry; every function returns
//! the per-pair (or per-example) losses, which a method sums (the engine divides by the count).
//! Arithmetic runs in f64 (the log-prob sums are large and their differences small) and the
//! result comes back in the input's dtype.
//!
//! DPO family (Rafailov et al. 2023 and relatives), with Δ = (π_c − ref_c) − (π_r − ref_r):
//!   sigmoid       −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)      (ε > 0: cDPO, Mitchell 2023)
//!   robust        (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)      (rDPO, Chowdhury 2024)
//!   hinge         max(0, 1 − βΔ)                          (SLiC, Zhao 2023)
//!   ipo           (Δ̄ − 1/(2β))², Δ̄ with each side divided by its completion length (Azar 2023)
//!   exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, discopop: as TRL.
//! Reference-free: ORPO (Hong 2024) −λ·log σ(log odds_c − log odds_r) on length-averaged
//! log-probs, plus the chosen NLL; SimPO (Meng 2024) −log σ(β(p̄_c − p̄_r) − γ).
//! KTO (Ethayarajh 2024): 1 − σ(β(r − z)) for desirable, 1 − σ(β(z − r)) for undesirable, z the
//! detached, clamped KL estimate. Reward models: Bradley–Terry −log σ(r⁺ − r⁻ − m) + c·(r⁺ + r⁻)².
//!
//! Deliberate deviation: TRL 1.16 dropped label smoothing from `sigmoid`; here ε > 0 gives the
//! cDPO loss of earlier TRL releases (ε = 0, the default, is TRL 1.16 exactly).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// One log-prob (or length) per chosen and per rejected completion, (B,) each.
pub struct Pair {
    pub chosen: Tensor,
    pub rejected: Tensor,
}

/// The pairwise losses of `lmforge dpo --loss`, TRL's `loss_type` names; `orpo` and `simpo` are
/// the reference-free losses of TRL's `ORPOTrainer` and `CPOTrainer(loss_type="simpo")`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum PairLoss {
    Sigmoid,
    Robust,
    Ipo,
    Hinge,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    ApoZero,
    ApoDown,
    SigmoidNorm,
    Discopop,
    Orpo,
    Simpo,
}

impl PairLoss {
    /// ORPO and SimPO need no reference model.
    pub fn needs_reference(self) -> bool {
        !matches!(self, PairLoss::Orpo | PairLoss::Simpo)
    }

    /// ORPO and SimPO score completions by their mean token log-prob, the rest by the sum.
    pub fn length_averaged(self) -> bool {
        !self.needs_reference()
    }

    pub fn name(self) -> &'static str {
        match self {
            PairLoss::Sigmoid => "sigmoid",
            PairLoss::Robust => "robust",
            PairLoss::Ipo => "ipo",
            PairLoss::Hinge => "hinge",
            PairLoss::ExoPair => "exo_pair",
            PairLoss::NcaPair => "nca_pair",
            PairLoss::BcoPair => "bco_pair",
            PairLoss::SppoHard => "sppo_hard",
            PairLoss::ApoZero => "apo_zero",
            PairLoss::ApoDown => "apo_down",
            PairLoss::SigmoidNorm => "sigmoid_norm",
            PairLoss::Discopop => "discopop",
            PairLoss::Orpo => "orpo",
            PairLoss::Simpo => "simpo",
        }
    }
}

/// The constants of the pairwise losses.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// β (DPO's KL weight; ORPO's λ; IPO's τ).
    pub beta: f64,
    /// ε: the probability that a label is flipped (sigmoid = cDPO, robust, exo_pair, simpo).
    pub label_smoothing: f64,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ.
    pub discopop_tau: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
        }
    }
}

impl Params {
    pub fn check(&self, loss: PairLoss) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("beta must be positive and finite, got {}", self.beta);
        }
        let ls = self.label_smoothing;
        let ok = match loss {
            PairLoss::Robust => (0.0..0.5).contains(&ls),
            PairLoss::ExoPair => ls > 0.0 && ls < 0.5,
            _ => (0.0..0.5).contains(&ls),
        };
        if !ok {
            bail!(
                "label_smoothing {ls} is out of range for the {} loss ({})",
                loss.name(),
                if loss == PairLoss::ExoPair {
                    "exo_pair needs 0 < ε < 0.5"
                } else {
                    "0 ≤ ε < 0.5"
                }
            );
        }
        if !(self.simpo_gamma.is_finite()
            && self.discopop_tau.is_finite()
            && self.discopop_tau > 0.0)
        {
            bail!("simpo_gamma must be finite and discopop_tau positive");
        }
        Ok(())
    }
}

fn f64s(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?)
}

/// log(1 + eˣ) without overflow: exact below 30, x + log(1 + e⁻³⁰) ≈ x above (and smooth at 0,
/// unlike forms built on |x|, whose gradient vanishes there).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let low = ((x.minimum(30.0)?.exp()? + 1.0)?.log())?;
    Ok((low + (x - 30.0)?.relu()?)?)
}

/// log σ(x).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(softplus(&x.neg()?)?.neg()?)
}

/// σ(x).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// log(1 − eˣ) for x < 0 (ORPO's log odds); x is clamped to −1e−9 so a completion the model is
/// certain of gives a large finite value, not −∞.
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    Ok(((x.minimum(-1e-9)?.exp()?.neg()? + 1.0)?.log())?)
}

/// −(1−ε)·log σ(z) − ε·log σ(−z).
fn smoothed(z: &Tensor, eps: f64) -> Result<Tensor> {
    let clean = (log_sigmoid(z)? * -(1.0 - eps))?;
    if eps == 0.0 {
        return Ok(clean);
    }
    Ok((clean - (log_sigmoid(&z.neg()?)? * eps)?)?)
}

/// Per-pair losses of a reference-based pairwise loss: `lens` are the completion token counts
/// (IPO and sigmoid_norm divide by them). Errors for ORPO/SimPO (see `orpo`, `simpo`).
pub fn dpo(
    loss: PairLoss,
    p: &Params,
    policy: &Pair,
    reference: &Pair,
    lens: &Pair,
) -> Result<Tensor> {
    let dtype = policy.chosen.dtype();
    let beta = p.beta;
    let eps = p.label_smoothing;
    let lc = (f64s(&policy.chosen)? - f64s(&reference.chosen)?)?; // chosen log-ratio
    let lr = (f64s(&policy.rejected)? - f64s(&reference.rejected)?)?;
    let delta = (&lc - &lr)?;
    let per_len = || -> Result<Tensor> {
        let c = (&lc / f64s(&lens.chosen)?.maximum(1.0)?)?;
        let r = (&lr / f64s(&lens.rejected)?.maximum(1.0)?)?;
        Ok((c - r)?)
    };
    let out = match loss {
        PairLoss::Sigmoid => smoothed(&(&delta * beta)?, eps)?,
        PairLoss::Hinge => ((&delta * -beta)? + 1.0)?.relu()?,
        PairLoss::Ipo => (per_len()? - 1.0 / (2.0 * beta))?.sqr()?,
        PairLoss::ExoPair => {
            let z = (&delta * beta)?;
            let (lq_w, lq_l) = (log_sigmoid(&z)?, log_sigmoid(&z.neg()?)?);
            let w = (lq_w.exp()? * (&lq_w - (1.0 - eps).ln())?)?;
            (w + (lq_l.exp()? * (&lq_l - eps.ln())?)?)?
        }
        PairLoss::NcaPair => {
            let (c, r) = ((&lc * beta)?, (&lr * beta)?);
            let a = log_sigmoid(&c)?.neg()?;
            let b = (log_sigmoid(&c.neg()?)? * 0.5)?;
            ((a - b)? - (log_sigmoid(&r.neg()?)? * 0.5)?)?
        }
        PairLoss::Robust => {
            let z = (&delta * beta)?;
            let clean = (log_sigmoid(&z)? * -(1.0 - eps))?;
            let flipped = (log_sigmoid(&z.neg()?)? * -eps)?;
            ((clean - flipped)? / (1.0 - 2.0 * eps))?
        }
        PairLoss::BcoPair => {
            let a = log_sigmoid(&(&lc * beta)?)?;
            (a + log_sigmoid(&(&lr * -beta)?)?)?.neg()?
        }
        PairLoss::SppoHard => {
            let w = (&lc - 0.5 / beta)?.sqr()?;
            (w + (&lr + 0.5 / beta)?.sqr()?)?
        }
        PairLoss::ApoZero => {
            let c = (sigmoid(&(&lc * beta)?)?.neg()? + 1.0)?;
            (c + sigmoid(&(&lr * beta)?)?)?
        }
        PairLoss::ApoDown => {
            let c = sigmoid(&(&lc * beta)?)?;
            (c + (sigmoid(&(&delta * beta)?)?.neg()? + 1.0)?)?
        }
        PairLoss::SigmoidNorm => log_sigmoid(&(per_len()? * beta)?)?.neg()?,
        PairLoss::Discopop => {
            let z = (&delta * beta)?;
            let m = sigmoid(&(&z / p.discopop_tau)?)?;
            let logistic = log_sigmoid(&z)?.neg()?;
            let exp = z.neg()?.exp()?;
            ((logistic * (m.neg()? + 1.0)?)? + (exp * m)?)?
        }
        PairLoss::Orpo | PairLoss::Simpo => {
            bail!(
                "the {} loss has no reference model: use losses::preference::{}",
                loss.name(),
                loss.name()
            )
        }
    };
    Ok(out.to_dtype(dtype)?)
}

/// DPO's implicit rewards β·(π − ref), detached: what TRL logs as `rewards/chosen|rejected`.
pub fn implicit_rewards(beta: f64, policy: &Pair, reference: &Pair) -> Result<(Tensor, Tensor)> {
    let c = ((f64s(&policy.chosen)? - f64s(&reference.chosen)?)? * beta)?.detach();
    let r = ((f64s(&policy.rejected)? - f64s(&reference.rejected)?)? * beta)?.detach();
    Ok((c, r))
}

/// ORPO's odds-ratio term per pair, −λ·log σ(log odds(c) − log odds(r)), on length-averaged
/// log-probs; returns (term, log odds ratio). The method adds the chosen completion's NLL.
pub fn orpo(lambda: f64, avg: &Pair) -> Result<(Tensor, Tensor)> {
    let dtype = avg.chosen.dtype();
    let (c, r) = (f64s(&avg.chosen)?, f64s(&avg.rejected)?);
    let log_odds = ((&c - &r)? - (log1mexp(&c)? - log1mexp(&r)?)?)?;
    let term = (log_sigmoid(&log_odds)? * -lambda)?;
    Ok((term.to_dtype(dtype)?, log_odds.detach().to_dtype(dtype)?))
}

/// SimPO per pair on length-averaged log-probs: smoothed −log σ(β(p̄_c − p̄_r − γ/β)).
pub fn simpo(p: &Params, avg: &Pair) -> Result<Tensor> {
    let dtype = avg.chosen.dtype();
    let logits = ((f64s(&avg.chosen)? - f64s(&avg.rejected)?)? - p.simpo_gamma / p.beta)?;
    Ok(smoothed(&(logits * p.beta)?, p.label_smoothing)?.to_dtype(dtype)?)
}

/// KTO's per-example losses for desirable (`chosen`) and undesirable (`rejected`) log-ratios
/// π − ref, given the KL estimate z (already detached and clamped at 0 by the caller, as TRL
/// does); unweighted (the method multiplies by the desirable/undesirable weights).
pub fn kto(beta: f64, chosen: &Tensor, rejected: &Tensor, kl: f64) -> Result<(Tensor, Tensor)> {
    let one = |x: &Tensor, sign: f64| -> Result<Tensor> {
        let dtype = x.dtype();
        let z = ((f64s(x)? - kl)? * (sign * beta))?;
        Ok((sigmoid(&z)?.neg()? + 1.0)?.to_dtype(dtype)?)
    };
    Ok((one(chosen, 1.0)?, one(rejected, -1.0)?))
}

/// KTO's KL estimate: mean(π − ref) over mismatched prompt/completion pairs, clamped at 0.
pub fn kto_kl(policy: &Tensor, reference: &Tensor) -> Result<f64> {
    let (sum, n) = kto_kl_sum(policy, reference)?;
    Ok(kto_kl_of(sum, n as f64))
}

/// The sum of `policy − reference` and its count: what data-parallel ranks add up before
/// `kto_kl_of` (TRL gathers the per-sequence terms over processes).
pub fn kto_kl_sum(policy: &Tensor, reference: &Tensor) -> Result<(f64, usize)> {
    let d = (f64s(policy)? - f64s(reference)?)?;
    Ok((d.sum_all()?.to_scalar::<f64>()?, d.elem_count()))
}

/// The KL estimate from a sum over `n` sequences: the mean, clamped at 0.
pub fn kto_kl_of(sum: f64, n: f64) -> f64 {
    (sum / n).max(0.0)
}

/// Bradley–Terry reward-model loss per pair: −log σ(r⁺ − r⁻ − m) + c·(r⁺ + r⁻)² (TRL's
/// `RewardTrainer`: optional margin m per pair, `center_rewards_coefficient` c).
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center: f64,
) -> Result<Tensor> {
    let dtype = chosen.dtype();
    let (c, r) = (f64s(chosen)?, f64s(rejected)?);
    let mut d = (&c - &r)?;
    if let Some(m) = margin {
        d = (d - f64s(m)?)?;
    }
    let mut loss = log_sigmoid(&d)?.neg()?;
    if center != 0.0 {
        loss = (loss + ((c + r)?.sqr()? * center)?)?;
    }
    Ok(loss.to_dtype(dtype)?)
}
