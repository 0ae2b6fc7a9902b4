//! RLOO (Ahmadian et al. 2024, "Back to Basics"), as TRL 1.16's `RLOOTrainer`: k samples per
//! prompt, each judged against the mean of the others; the KL to the reference is a penalty on
//! the reward (k1 summed over the sequence); the ratio is of whole sequences:
//!
//!   r_i = score_i − β·Σ_t (log π_old(y_t) − log π_ref(y_t))
//!   A_i = r_i − (Σ_{j≠i} r_j)/(k − 1)             (then whitened over the batch if normalize_advantages)
//!   ℓ_i = −min(ρ_i·A_i, clip(ρ_i, 1−ε, 1+ε_high)·A_i),  ρ_i = π(y_i)/π_old(y_i)
//!
//! averaged over sequences.

use super::rollout::{Forward, Rollout};
use super::{spread, Algo, Common, RewardArgs, RolloutArgs, StepStats, Summary};
use crate::losses::rl;
use crate::peft::PeftArgs;
use crate::train::engine::{Control, TrainArgs};
use crate::train::logps::row_sums;
use anyhow::{bail, Result};
use candle_core::Tensor;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `lmforge rloo`'s options: its flags and its TOML config.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RlooOptions {
    /// Policy (and reference) model: an HF directory or a .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts: JSONL of {"prompt", "answer"?}, preference pairs or conversations.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out prompts, scored greedily before training, every --eval-every steps, at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value = "runs/rloo")]
    pub out: PathBuf,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Samples per prompt, k ≥ 2 (TRL's num_generations).
    #[arg(long, default_value_t = 2)]
    pub num_generations: usize,
    /// β, weight of the sequence KL penalty in the reward (0: no reference model).
    #[arg(long, default_value_t = 0.05)]
    pub beta: f64,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// Whiten the advantages over the rollout.
    #[arg(long)]
    pub normalize_advantages: bool,
    /// Passes over each rollout (TRL's num_iterations).
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

crate::clap_default!(RlooOptions);

pub struct Rloo {
    pub k: usize,
    pub beta: f64,
    pub eps_low: f64,
    pub eps_high: f64,
    pub normalize: bool,
    pub epochs: usize,
}

impl Algo for Rloo {
    fn needs_reference(&self) -> bool {
        self.beta != 0.0
    }
    fn needs_old(&self) -> bool {
        self.beta != 0.0
    }
    fn k(&self) -> usize {
        self.k
    }
    fn epochs(&self) -> usize {
        self.epochs
    }

    fn advantages(&mut self, r: &mut Rollout) -> Result<Vec<(&'static str, f64)>> {
        let mut rewards = r.scores.clone();
        let mut st = Vec::new();
        if self.beta != 0.0 {
            let (mut total, mut tokens) = (0.0, 0usize);
            for (i, x) in rewards.iter_mut().enumerate() {
                let kl: f64 = r.k1(i).iter().map(|&x| x as f64).sum();
                *x -= self.beta * kl;
                total += kl;
                tokens += r.old[i].len();
            }
            // TRL's `kl`: the mean per token.
            st.push(("kl", total / tokens.max(1) as f64));
        }
        let a = rl::rloo_advantages(&rewards, self.k, self.normalize)?;
        r.adv = spread(r, &a);
        let n = rewards.len().max(1) as f64;
        st.push(("rlhf_reward", rewards.iter().sum::<f64>() / n));
        Ok(st)
    }

    fn units(&self, _r: &Rollout, rows: &[usize]) -> usize {
        rows.len()
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
        let counts: Vec<usize> = rows.iter().map(|&i| r.response_len(i)).collect();
        let lp = row_sums(&f.logps, &counts, dev)?; // (B,)
        let old = row_sums(old, &counts, dev)?;
        let a: Vec<f32> = rows.iter().map(|&i| r.adv[i][0]).collect();
        let adv = Tensor::from_vec(a, rows.len(), dev)?;
        let l = rl::clipped_surrogate(&lp, &old, &adv, self.eps_low, self.eps_high)?;
        st.add_clip_ratios(&lp, &old, &adv, (self.eps_low, self.eps_high))?;
        Ok(l.sum_all()?)
    }
}

pub fn run(o: RlooOptions, ctl: Control) -> Result<Summary> {
    // TRL's RLOOConfig: lr 1e-6 for a full fine-tune.
    let cfg = o.train.resolve(&super::train_defaults(&o.peft, 1e-6))?;
    if o.num_generations < 2 {
        bail!("num_generations must be at least 2: RLOO's baseline is the other samples' mean");
    }
    super::check_clip(o.num_iterations, o.epsilon, o.epsilon_high)?;
    let algo = Rloo {
        k: o.num_generations,
        beta: o.beta,
        eps_low: o.epsilon,
        eps_high: o.epsilon_high.unwrap_or(o.epsilon),
        normalize: o.normalize_advantages,
        epochs: o.num_iterations,
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
    super::run(c, algo, cfg, (&o, "rloo", &o.out), ctl)
}
