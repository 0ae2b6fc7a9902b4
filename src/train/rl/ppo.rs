//! PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT), with
//! the semantics of TRL's last `PPOTrainer` (0.x; TRL 1.x has none):
//!
//!   per-token reward  r_t = −β·(log π_old(y_t) − log π_ref(y_t))  (+ score at the last token,
//!                     − missing_eos_penalty when the response hit the length limit)
//!   GAE(γ, λ) on the value head's V_t → A_t, R_t = A_t + V_t;  A whitened over the rollout
//!   loss  = mean_t −min(ρ_t·A_t, clip(ρ_t, 1±ε)·A_t) + c_v · mean_t ½·max((V−R)², (V_clip−R)²)
//!
//! over `ppo_epochs` passes of minibatches of each rollout; β fixed or adapted towards
//! `target_kl` (Ziegler et al.'s proportional controller, summed-sequence KL).
//!
//! The value head is a scalar linear head on the policy's own trunk (as TRL's older
//! `AutoModelForCausalLMWithValueHead`), not TRL 0.x's separate critic initialised from the reward
//! model: one model in memory (with LoRA, one frozen base shared by policy, reference and critic),
//! at the cost of the value loss also shaping the shared trunk (scaled by `vf_coef`).
//! Deviations: the episode ends at the response's last token (V = 0 after it; TRL bootstraps
//! from the value of the first padding position); losses are means over the whole minibatch's
//! tokens, not averages of micro-batch means.

use super::rollout::{Forward, Rollout};
use super::{Algo, Common, RewardArgs, RolloutArgs, StepStats, Summary};
use crate::losses::rl::{self, KlController};
use crate::peft::PeftArgs;
use crate::train::engine::{Control, TrainArgs};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `lmforge ppo`'s options: its flags and its TOML config.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct PpoOptions {
    /// Policy (and reference) model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts: JSONL of {"prompt", "answer"?}, preference pairs or conversations.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out prompts, scored greedily before training, every --eval-every steps, at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value = "runs/ppo")]
    pub out: PathBuf,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// β, the KL penalty's coefficient (the starting value with --target-kl).
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// Adapt β towards this summed KL per sequence (Ziegler et al.'s controller).
    #[arg(long)]
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive controller, in samples.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// ε of the clipped policy loss.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    /// Clip of the value loss.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Whiten the per-token rewards over the rollout (mean kept).
    #[arg(long)]
    pub whiten_rewards: bool,
    /// Subtracted from the score of a response that hit --max-new-tokens without EOS.
    #[arg(long)]
    pub missing_eos_penalty: Option<f64>,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub reward: RewardArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

crate::clap_default!(PpoOptions);

pub struct Ppo {
    pub kl: KlController,
    pub gamma: f64,
    pub lam: f64,
    pub clip: f64,
    pub clip_v: f64,
    pub vf_coef: f64,
    pub epochs: usize,
    pub whiten_rewards: bool,
    pub missing_eos_penalty: Option<f64>,
}

impl Algo for Ppo {
    fn needs_reference(&self) -> bool {
        true
    }
    fn needs_old(&self) -> bool {
        true
    }
    fn value_head(&self) -> bool {
        true
    }
    fn k(&self) -> usize {
        1
    }
    fn epochs(&self) -> usize {
        self.epochs
    }

    fn advantages(&mut self, r: &mut Rollout) -> Result<Vec<(&'static str, f64)>> {
        let beta = self.kl.value;
        let n = r.rows();
        let mut rewards: Vec<Vec<f32>> = Vec::with_capacity(n);
        let (mut kl_sum, mut score_sum) = (0.0, 0.0);
        for i in 0..n {
            let kl = r.k1(i);
            kl_sum += kl.iter().map(|&x| x as f64).sum::<f64>();
            let mut score = r.scores[i];
            if let (Some(p), false) = (self.missing_eos_penalty, r.eos[i]) {
                score -= p;
            }
            score_sum += score;
            let mut rw: Vec<f32> = kl.iter().map(|&x| (-beta * x as f64) as f32).collect();
            let last = rw.last_mut().context("internal error: an empty response")?;
            *last += score as f32;
            rewards.push(rw);
        }
        if self.whiten_rewards {
            rl::whiten(&mut rewards, false);
        }
        let (mut adv, mut ret) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (rw, v) in rewards.iter().zip(&r.values) {
            let (a, x) = rl::gae(rw, v, self.gamma, self.lam);
            adv.push(a);
            ret.push(x);
        }
        let flat = |x: &[Vec<f32>]| x.iter().flatten().map(|&v| v as f64).collect::<Vec<_>>();
        let ev = rl::explained_variance(&flat(&r.values), &flat(&ret));
        rl::whiten(&mut adv, true);
        r.adv = adv;
        r.returns = ret;
        let nf = n.max(1) as f64;
        let kl_mean = kl_sum / nf;
        let st = vec![
            ("objective/kl", kl_mean),
            ("objective/non_score_reward", -beta * kl_mean),
            ("objective/rlhf_reward", score_sum / nf - beta * kl_mean),
            ("objective/scores", score_sum / nf),
            ("kl_coef", beta),
            ("val/explained_variance", ev),
        ];
        self.kl.update(kl_mean, n);
        Ok(st)
    }

    fn units(&self, r: &Rollout, rows: &[usize]) -> usize {
        rows.iter().map(|&i| r.response_len(i)).sum()
    }

    fn loss(
        &mut self,
        r: &Rollout,
        rows: &[usize],
        f: &Forward,
        old: &Tensor,
        st: &mut StepStats,
    ) -> Result<Tensor> {
        let dev = f.logps.device();
        let adv = r.gather(&r.adv, rows, dev)?;
        let pg = rl::clipped_surrogate(&f.logps, old, &adv, self.clip, self.clip)?;
        let v = f
            .values
            .as_ref()
            .context("internal error: PPO without values")?;
        let old_v = r.gather(&r.values, rows, dev)?;
        let ret = r.gather(&r.returns, rows, dev)?;
        let vf = rl::clipped_value_loss(v, &old_v, &ret, self.clip_v)?;
        // Statistics, TRL's names.
        let diff = (&f.logps - old)?.detach();
        let ratio = diff.exp()?;
        let unclipped = (&ratio * &adv)?.neg()?;
        let pg_d = pg.detach();
        let clipped = pg_d.gt(&unclipped)?.to_dtype(DType::F32)?;
        st.add_mean("policy/clipfrac_avg", &clipped)?;
        st.add_mean("policy/approxkl_avg", &(diff.sqr()? * 0.5)?)?;
        st.add_mean("loss/policy_avg", &pg_d)?;
        st.add_mean("loss/value_avg", &vf.detach())?;
        let vd = v.detach();
        let v_clipped = (&vd - &old_v)?
            .abs()?
            .gt(self.clip_v)?
            .to_dtype(DType::F32)?;
        st.add_mean("val/clipfrac_avg", &v_clipped)?;
        st.add_mean("val/ratio", &ratio)?;
        Ok((pg.sum_all()? + (vf.sum_all()? * self.vf_coef)?)?)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.kl).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<()> {
        if !v.is_null() {
            self.kl = serde_json::from_value(v.clone()).context("checkpoint: the KL controller")?;
        }
        Ok(())
    }
}

pub fn run(o: PpoOptions, ctl: Control) -> Result<Summary> {
    // TRL 0.x's PPOConfig: lr 3e-6 for a full fine-tune.
    let cfg = o.train.resolve(&super::train_defaults(&o.peft, 3e-6))?;
    if o.ppo_epochs == 0 {
        bail!("ppo_epochs must be positive");
    }
    let finite = [
        o.kl_coef,
        o.gamma,
        o.lam,
        o.cliprange,
        o.cliprange_value,
        o.vf_coef,
    ];
    if finite.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
        bail!(
            "kl_coef, gamma, lam, cliprange, cliprange_value and vf_coef must be finite and >= 0"
        );
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if o.target_kl.is_some_and(|t| !positive(t)) || !positive(o.kl_horizon) {
        bail!("target_kl and kl_horizon must be positive");
    }
    let algo = Ppo {
        kl: KlController {
            value: o.kl_coef,
            adaptive: o.target_kl.map(|t| (t, o.kl_horizon)),
        },
        gamma: o.gamma,
        lam: o.lam,
        clip: o.cliprange,
        clip_v: o.cliprange_value,
        vf_coef: o.vf_coef,
        epochs: o.ppo_epochs,
        whiten_rewards: o.whiten_rewards,
        missing_eos_penalty: o.missing_eos_penalty,
    };
    let c = Common {
        model: o.model.as_deref(),
        data: o.data.as_deref(),
        eval_data: o.eval_data.as_deref(),
        chat_template: o.chat_template.as_deref(),
        rollout: &o.rollout,
        reward: &o.reward,
        peft: &o.peft,
    };
    super::run(c, algo, cfg, (&o, "ppo", &o.out), ctl)
}
