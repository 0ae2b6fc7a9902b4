//! The engine's options, shared by every training method: one struct that is both the CLI flags
//! (`#[derive(clap::Args)]`, flattened into each training subcommand) and the `[train]` section
//! of a TOML config. Every field is optional there; a method supplies its own defaults
//! (`TrainConfig`) and `TrainArgs::resolve` fills the gaps, so defaults live in the library.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// The learning-rate schedule after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to `min_lr` at the last step (nanoGPT, Chinchilla).
    Cosine,
    /// Linear decay from `lr` to `min_lr` at the last step (transformers' default).
    Linear,
    /// `lr` throughout.
    Constant,
}

/// What a step whose loss or gradient norm is NaN/Inf does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NanPolicy {
    /// Stop with an error naming the step (the last checkpoint stays the latest).
    Stop,
    /// Leave the weights and moments untouched, count the step as skipped and go on
    /// (ten in a row stop the run).
    Skip,
}

macro_rules! train_options {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Engine flags / the `[train]` section: all optional, a method's defaults fill the rest.
        #[derive(Args, Serialize, Deserialize, Default, Clone, Debug)]
        #[serde(deny_unknown_fields)]
        pub struct TrainArgs {
            $( $(#[$doc])* #[arg(long)]
               #[serde(default, skip_serializing_if = "Option::is_none")]
               pub $name: Option<$ty>, )*
        }

        /// The resolved engine options of one run.
        #[derive(Clone, Debug, PartialEq)]
        pub struct TrainConfig {
            $( pub $name: $ty, )*
        }

        impl TrainArgs {
            /// The options given, the method's `defaults` for the rest.
            pub fn resolve(&self, defaults: &TrainConfig) -> Result<TrainConfig> {
                let c = TrainConfig { $( $name: self.$name.clone().unwrap_or(defaults.$name.clone()), )* };
                c.validate()?;
                Ok(c)
            }
        }

        impl From<&TrainConfig> for TrainArgs {
            /// Every option spelled out (what a run saves as its config).
            fn from(c: &TrainConfig) -> Self {
                Self { $( $name: Some(c.$name.clone()), )* }
            }
        }
    };
}

train_options! {
    /// Seed of initialisation, data order and dropout.
    seed: u64,
    /// Optimizer steps (0: as many as --epochs take; pre-training needs a number).
    max_steps: u64,
    /// Passes over the training data when --max-steps is 0.
    epochs: u64,
    /// Examples per micro-batch.
    batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    grad_accum: usize,
    /// Peak learning rate.
    lr: f64,
    /// Learning rate at the last step (cosine / linear schedules).
    min_lr: f64,
    /// Decay after the warm-up: cosine, linear or constant.
    #[arg(value_enum)]
    schedule: Schedule,
    /// Steps of linear warm-up from 0 to --lr.
    warmup_steps: u64,
    /// AdamW's decoupled weight decay (matrices only).
    weight_decay: f64,
    /// AdamW β₁.
    beta1: f64,
    /// AdamW β₂.
    beta2: f64,
    /// AdamW ε.
    eps: f64,
    /// Maximum global gradient norm (0: no clipping).
    grad_clip: f64,
    /// A step with a NaN/Inf loss or gradient: stop (default) or skip it.
    #[arg(value_enum)]
    nan_policy: NanPolicy,
    /// Evaluate every N steps (0: at each epoch's end, or only at the end).
    eval_every: u64,
    /// Write a checkpoint every N steps (0: only at the end).
    checkpoint_every: u64,
    /// Checkpoints kept (the newest; at least 1).
    keep_checkpoints: usize,
    /// Under mpirun: gradients are summed over the ranks in buckets of this many MiB.
    allreduce_bucket_mb: f64,
    /// Under mpirun: compare the ranks' weights (a checksum) every N steps and at every
    /// checkpoint (0: only at the start and at checkpoints).
    dist_check_every: u64,
}

impl TrainConfig {
    /// Defaults shared by the methods; each changes what differs (`TrainConfig { lr: …, ..base() }`).
    pub fn base() -> Self {
        Self {
            seed: 0,
            max_steps: 0,
            epochs: 1,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            min_lr: 0.0,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            nan_policy: NanPolicy::Stop,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            allreduce_bucket_mb: 25.0,
            dist_check_every: 100,
        }
    }

    /// Rejects values no run can use, naming the key.
    pub fn validate(&self) -> Result<()> {
        let checks: [(bool, &str); 10] = [
            (self.batch_size > 0, "train.batch_size must be positive"),
            (self.grad_accum > 0, "train.grad_accum must be positive"),
            (
                self.lr.is_finite() && self.lr > 0.0,
                "train.lr must be a positive number",
            ),
            (
                self.min_lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr),
                "train.min_lr must be in [0, train.lr]",
            ),
            (
                (0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2),
                "train.beta1 and train.beta2 must be in [0, 1)",
            ),
            (
                self.eps.is_finite() && self.eps > 0.0,
                "train.eps must be positive",
            ),
            (
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
                "train.weight_decay must be non-negative",
            ),
            (
                self.grad_clip.is_finite() && self.grad_clip >= 0.0,
                "train.grad_clip must be non-negative (0 disables clipping)",
            ),
            (
                self.max_steps > 0 || self.epochs > 0,
                "train.max_steps or train.epochs must be positive",
            ),
            (
                self.allreduce_bucket_mb.is_finite() && self.allreduce_bucket_mb > 0.0,
                "train.allreduce_bucket_mb must be positive",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{msg}");
            }
        }
        Ok(())
    }

    /// Examples in one optimizer step.
    pub fn per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    pub fn adamw(&self) -> crate::train::optim::AdamWConfig {
        crate::train::optim::AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The learning rate of the update at 0-based `step` of `total`: linear warm-up from 0 to
    /// `lr` over `warmup_steps`, then the schedule down to `min_lr` at `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let (lr, min_lr, warmup) = (self.lr, self.min_lr, self.warmup_steps);
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        if self.schedule == Schedule::Constant {
            return lr;
        }
        if step >= total {
            return min_lr;
        }
        let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
        let shape = match self.schedule {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => 1.0 - progress,
            Schedule::Constant => 1.0,
        };
        min_lr + shape * (lr - min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            schedule,
            ..TrainConfig::base()
        }
    }

    #[test]
    fn schedule_shapes() {
        let c = sched(Schedule::Cosine);
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(55, 100) - 0.55).abs() < 1e-9);
        assert!((c.lr_at(100, 100) - 0.1).abs() < 1e-12);
        let l = sched(Schedule::Linear);
        assert!((l.lr_at(55, 100) - 0.55).abs() < 1e-9);
        assert!((l.lr_at(32, 100) - (0.1 + 0.9 * (1.0 - 22.0 / 90.0))).abs() < 1e-9);
        let k = sched(Schedule::Constant);
        assert!((k.lr_at(5, 100) - 0.6).abs() < 1e-12);
        assert_eq!(k.lr_at(99, 100), 1.0);
    }

    #[test]
    fn nonsense_values_are_refused_by_key() {
        for (args, key) in [
            (
                TrainArgs {
                    beta1: Some(5.0),
                    ..Default::default()
                },
                "train.beta1",
            ),
            (
                TrainArgs {
                    grad_clip: Some(-1.0),
                    ..Default::default()
                },
                "train.grad_clip",
            ),
            (
                TrainArgs {
                    weight_decay: Some(-0.1),
                    ..Default::default()
                },
                "train.weight_decay",
            ),
            (
                TrainArgs {
                    lr: Some(f64::NAN),
                    ..Default::default()
                },
                "train.lr",
            ),
        ] {
            let e = args.resolve(&TrainConfig::base()).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
