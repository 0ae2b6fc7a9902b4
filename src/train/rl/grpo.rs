//! GRPO (Shao et al. 2024, "DeepSeekMath"), as TRL 1.16's `GRPOTrainer`: k samples per prompt, no
//! critic; each sample's advantage is its reward against its group's,
//!
//!   A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)            (scale_rewards = group)
//!   ℓ_t = −min(ρ_t·A_i, clip(ρ_t, 1−ε_low, 1+ε_high)·A_i) + β·k3_t,  ρ_t = π(y_t)/π_old(y_t)
//!   k3_t = exp(log π_ref − log π) − (log π_ref − log π) − 1
//!
//! summed per `loss_type`: `grpo` averages each sequence's tokens then the sequences; `dr_grpo`
//! divides the token sum by rows × max_new_tokens (Dr. GRPO, Liu et al. 2025); `dapo` (TRL's
//! default) by the step's token count (Yu et al. 2025). β = 0 (TRL's default) loads no reference.
//! Deviation: the normalisers are over the whole optimizer step, not per micro-batch, so a step
//! does not depend on how it is split (TRL's `grpo` and `dr_grpo` average per-micro-batch values).

use super::rollout::{Forward, Rollout};
use super::{spread, Algo, Common, RewardArgs, RolloutArgs, StepStats, Summary};
use crate::losses::rl::{self, ScaleRewards};
use crate::peft::PeftArgs;
use crate::train::engine::{Control, TrainArgs};
use crate::train::logps::row_sums;
use anyhow::{bail, Result};
use candle_core::Tensor;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How the per-token losses of a step are summed and divided (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum GrpoLoss {
    /// Per-sequence token mean, then the mean over sequences.
    #[value(name = "grpo")]
    #[serde(rename = "grpo")]
    Grpo,
    /// Token sum / (sequences × max_new_tokens).
    #[value(name = "dr_grpo")]
    #[serde(rename = "dr_grpo")]
    DrGrpo,
    /// Token sum / tokens.
    #[value(name = "dapo")]
    #[serde(rename = "dapo")]
    Dapo,
}

/// `lmforge grpo`'s options: its flags and its TOML config.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoOptions {
    /// Policy (and reference) model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts: JSONL of {"prompt", "answer"?}, preference pairs or conversations.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out prompts: greedy responses scored before training, every --eval-every steps
    /// and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Run directory: metrics.jsonl, checkpoints/, and model/ (full) or adapter/ (LoRA).
    #[arg(long, default_value = "runs/grpo")]
    pub out: PathBuf,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Samples per prompt, k (TRL's num_generations).
    #[arg(long, default_value_t = 4)]
    pub num_generations: usize,
    /// β, weight of the k3 KL term (0: no reference model).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    /// ε: the ratio is clipped to [1 − ε, 1 + ε_high].
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// Upper clip ε_high (default ε; DAPO uses 0.28).
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    #[arg(long, value_enum, default_value = "dapo")]
    pub loss_type: GrpoLoss,
    #[arg(long, value_enum, default_value = "group")]
    pub scale_rewards: ScaleRewards,
    /// Passes over each rollout (TRL's num_iterations, μ).
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    #[command(flatten)]
    pub rollout: RolloutArgs,
    #[command(flatten)]
    pub reward: RewardArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub train: TrainArgs,
}

crate::clap_default!(GrpoOptions);

pub struct Grpo {
    pub k: usize,
    pub beta: f64,
    pub eps_low: f64,
    pub eps_high: f64,
    pub loss_type: GrpoLoss,
    pub scale: ScaleRewards,
    pub epochs: usize,
    pub max_new_tokens: usize,
}

impl Algo for Grpo {
    fn needs_reference(&self) -> bool {
        self.beta != 0.0
    }
    fn k(&self) -> usize {
        self.k
    }
    fn epochs(&self) -> usize {
        self.epochs
    }

    fn advantages(&mut self, r: &mut Rollout) -> Result<Vec<(&'static str, f64)>> {
        let a = rl::group_advantages(&r.scores, self.k, self.scale)?;
        r.adv = spread(r, &a);
        let zero_std = r
            .scores
            .chunks(self.k)
            .filter(|g| rl::mean_std(g).1 < 1e-12)
            .count() as f64;
        Ok(vec![(
            "frac_reward_zero_std",
            zero_std / (r.rows() / self.k).max(1) as f64,
        )])
    }

    fn units(&self, r: &Rollout, rows: &[usize]) -> usize {
        match self.loss_type {
            GrpoLoss::Grpo => rows.len(),
            GrpoLoss::DrGrpo => rows.len() * self.max_new_tokens,
            GrpoLoss::Dapo => rows.iter().map(|&i| r.response_len(i)).sum(),
        }
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
        let mut per_token =
            rl::clipped_surrogate(&f.logps, old, &adv, self.eps_low, self.eps_high)?;
        if self.beta != 0.0 {
            let refs = r.gather(&r.refs, rows, dev)?;
            let kl = rl::kl_k3(&f.logps, &refs)?;
            st.add_mean("kl", &kl.detach())?;
            per_token = (per_token + (kl * self.beta)?)?;
        }
        st.add_clip_ratios(&f.logps, old, &adv, (self.eps_low, self.eps_high))?;
        match self.loss_type {
            GrpoLoss::Grpo => {
                let counts: Vec<usize> = rows.iter().map(|&i| r.response_len(i)).collect();
                let lens: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
                let lens = Tensor::from_vec(lens, counts.len(), dev)?;
                Ok((row_sums(&per_token, &counts, dev)? / lens)?.sum_all()?)
            }
            GrpoLoss::DrGrpo | GrpoLoss::Dapo => Ok(per_token.sum_all()?),
        }
    }
}

pub fn run(o: GrpoOptions, ctl: Control) -> Result<Summary> {
    // TRL's GRPOConfig: lr 1e-6 for a full fine-tune.
    let cfg = o.train.resolve(&super::train_defaults(&o.peft, 1e-6))?;
    if o.num_generations < 2 {
        bail!("num_generations must be at least 2: GRPO compares samples of the same prompt");
    }
    super::check_clip(o.num_iterations, o.epsilon, o.epsilon_high)?;
    let algo = Grpo {
        k: o.num_generations,
        beta: o.beta,
        eps_low: o.epsilon,
        eps_high: o.epsilon_high.unwrap_or(o.epsilon),
        loss_type: o.loss_type,
        scale: o.scale_rewards,
        epochs: o.num_iterations,
        max_new_tokens: o.rollout.max_new_tokens,
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
    super::run(c, algo, cfg, (&o, "grpo", &o.out), ctl)
}
