//! Online RL: the policy samples responses, a reward scores them, the policy is updated on them.
//! One loop for PPO (`ppo`), GRPO (`grpo`) and RLOO (`rloo`); each of those files says only its
//! advantages and its loss (`Algo`). The loop runs on the shared training engine:
//!
//!   rollout g:  P prompts (a seeded stream over the prompt file) × k samples each, generated in
//!               batches (`generate_batch`), scored by the reward (`rewards`); then, when an update
//!               needs them, the policy's old log-probs (and values), the reference's log-probs
//!               (`rollout::score`), and the method's advantages.
//!   steps:      the rollout's R = P·k rows serve `epochs` passes of R / M optimizer steps of M
//!               rows each (M = batch_size · grad_accum), rows shuffled per pass; step s uses
//!               rollout s / steps_per_rollout, so a run is a function of (seed, step) and resumes
//!               exactly (a rollout in use is saved with the checkpoint).
//!
//! Log-probs are of logits / temperature, the distribution sampled from (TRL does the same).
//! Dropout is off throughout (TRL's `disable_dropout`), so "old" log-probs computed in the first
//! pass's micro-batches equal the first update's own: the ratio is exactly 1 there. When a rollout
//! serves a single step, that step's forward gives them (TRL skips the extra pass likewise).
//! The reference is the policy with its LoRA adapters off, or a frozen copy for a full fine-tune.

pub mod grpo;
pub mod ppo;
pub mod prompts;
pub mod rewards;
pub mod rloo;
pub mod rollout;
mod setup;

pub use setup::{check_clip, run, train_defaults, Common, RewardArgs, RolloutArgs, Summary};

use crate::generate::Sampling;
use crate::losses::sum_f64;
use crate::model::layers::Linear;
use crate::model::ParamStore;
use crate::train::engine::{Method, Reduce};
use crate::train::lm::Policy;
use crate::train::logps::Reference;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use prompts::Prompt;
use rewards::Rewards;
use rollout::{Forward, Rollout};
use serde_json::json;

/// Per-step sums of the update's statistics, as (name, Σ value, Σ weight).
#[derive(Default)]
pub struct StepStats(pub Vec<(&'static str, f64, f64)>);

impl StepStats {
    pub fn add(&mut self, name: &'static str, sum: f64, n: f64) {
        match self.0.iter_mut().find(|e| e.0 == name) {
            Some(e) => {
                e.1 += sum;
                e.2 += n;
            }
            None => self.0.push((name, sum, n)),
        }
    }

    /// Adds the mean of `t` (N,) weighted by N.
    pub fn add_mean(&mut self, name: &'static str, t: &Tensor) -> Result<()> {
        let n = t.elem_count() as f64;
        self.add(name, sum_f64(t)?, n);
        Ok(())
    }

    /// TRL's clip ratios of a PPO-style clipped surrogate: the share of ratios ρ = e^(logp − old)
    /// (per token or per sequence) clipped below (ρ < 1 − lo with A < 0), above (ρ > 1 + hi with
    /// A > 0), and either.
    pub fn add_clip_ratios(
        &mut self,
        logp: &Tensor,
        old: &Tensor,
        adv: &Tensor,
        (lo, hi): (f64, f64),
    ) -> Result<()> {
        let ratio: Vec<f32> = (logp - old)?
            .exp()?
            .detach()
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let adv: Vec<f32> = adv.detach().to_dtype(DType::F32)?.to_vec1()?;
        let (mut l, mut h) = (0.0, 0.0);
        for (&r, &a) in ratio.iter().zip(&adv) {
            l += f64::from(u8::from((r as f64) < 1.0 - lo && a < 0.0));
            h += f64::from(u8::from((r as f64) > 1.0 + hi && a > 0.0));
        }
        let n = ratio.len() as f64;
        self.add("clip_ratio/low_mean", l, n);
        self.add("clip_ratio/high_mean", h, n);
        self.add("clip_ratio/region_mean", l + h, n);
        Ok(())
    }
}

/// Per-row advantages repeated over each row's response tokens (GRPO, RLOO).
pub fn spread(r: &Rollout, adv: &[f64]) -> Vec<Vec<f32>> {
    (0..r.rows())
        .map(|i| vec![adv[i] as f32; r.response_len(i)])
        .collect()
}

/// What one online method adds to the shared loop.
pub trait Algo {
    /// Reference log-probs of every response token are needed at rollout time.
    fn needs_reference(&self) -> bool;
    /// The policy's own log-probs are needed at rollout time even when the rollout serves a
    /// single step (e.g. a KL penalty in the reward).
    fn needs_old(&self) -> bool {
        false
    }
    /// A value head on the policy's trunk (PPO).
    fn value_head(&self) -> bool {
        false
    }
    /// Samples per prompt.
    fn k(&self) -> usize;
    /// Passes over each rollout.
    fn epochs(&self) -> usize;
    /// Fills the rollout's advantages (and returns); the rollout's statistics to log.
    fn advantages(&mut self, r: &mut Rollout) -> Result<Vec<(&'static str, f64)>>;
    /// The units a micro-batch's loss sums over (tokens or sequences).
    fn units(&self, r: &Rollout, rows: &[usize]) -> usize;
    /// The micro-batch's loss summed over its units; `old` are the log-probs before the update.
    fn loss(
        &mut self,
        r: &Rollout,
        rows: &[usize],
        f: &Forward,
        old: &Tensor,
        st: &mut StepStats,
    ) -> Result<Tensor>;
    /// Method state a resumed run needs (PPO's adaptive KL coefficient).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore(&mut self, _v: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// The engine's view of an online method.
pub struct Online<A: Algo> {
    pub p: Policy,
    pub algo: A,
    pub value_head: Option<Linear>,
    prompts: Vec<Prompt>,
    ids: Vec<Vec<u32>>,
    n_train: usize,
    rewards: Rewards,
    reward_names: Vec<&'static str>,
    reference: Option<Reference>,
    sampling: Sampling,
    per_rollout: usize,
    generation_batch: usize,
    /// Rows of an optimizer step over all ranks (batch_size · grad_accum · ranks); rows per
    /// micro-batch.
    rows_per_step: usize,
    micro: usize,
    seed: u64,
    eos: Vec<u32>,
    pad: u32,
    rollout: Option<Rollout>,
    /// The last rollout whose samples the data-parallel ranks compared.
    compared: Option<u64>,
    stats: StepStats,
    pending: Vec<(&'static str, f64)>,
}

impl<A: Algo> Online<A> {
    fn rollout_rows(&self) -> usize {
        self.per_rollout * self.algo.k()
    }

    fn steps_per_rollout(&self) -> u64 {
        (self.algo.epochs() * self.rollout_rows() / self.rows_per_step) as u64
    }

    /// The rows of step `mb` of pass `e` over rollout `r`, in micro-batch order: a seeded
    /// shuffle per pass, then each step's rows grouped by prompt and the groups sorted by length,
    /// so micro-batches pack a prompt's samples together and pad little (a step's loss is the
    /// same however its rows are grouped).
    fn step_rows(&self, r: &Rollout, e: usize, mb: usize) -> Vec<usize> {
        let key = self.seed ^ 0x005E_ED0F_0A11;
        let n = self.rollout_rows();
        let pass = r.index * self.algo.epochs() as u64 + e as u64;
        let order = crate::rng::permutation(key, pass, n);
        let m = self.rows_per_step;
        let mut rows = order[mb * m..(mb + 1) * m].to_vec();
        // Samples of one prompt side by side (they are packed together), groups by length.
        let mut packed: std::collections::HashMap<usize, usize> = Default::default();
        for &i in &rows {
            *packed.entry(r.prompt[i]).or_insert(r.prompt_len[i]) += r.response_len(i);
        }
        rows.sort_by_key(|&i| (packed[&r.prompt[i]], r.prompt[i], i));
        rows
    }

    /// Samples, scores and prepares rollout `g`.
    fn make_rollout(&mut self, g: u64) -> Result<()> {
        let mut stream = crate::rng::Stream::new(self.seed ^ 0x9A07, self.n_train);
        let first = g as usize * self.per_rollout;
        let prompts: Vec<usize> = (first..first + self.per_rollout)
            .map(|i| stream.get(i))
            .collect();
        let s = Sampling {
            seed: crate::rng::Rng::keyed(&[self.seed, 0x0111, g]).next_u64(),
            ..self.sampling.clone()
        };
        let t0 = std::time::Instant::now();
        let model = &self.p.m.model;
        let mut r = rollout::sample(
            model,
            &self.p.m.tok,
            (&self.prompts, &self.ids),
            &prompts,
            self.algo.k(),
            &s,
            &self.eos,
            self.generation_batch,
            &self.rewards,
        )?;
        r.index = g;
        let gen_s = t0.elapsed().as_secs_f64();
        // The first pass's micro-batches, as `batch` will form them.
        let groups: Vec<Vec<usize>> = (0..self.rollout_rows() / self.rows_per_step)
            .flat_map(|mb| {
                let rows = self.step_rows(&r, 0, mb);
                rows.chunks(self.micro)
                    .map(|c| c.to_vec())
                    .collect::<Vec<_>>()
            })
            .collect();
        let policy_pass =
            self.steps_per_rollout() > 1 || self.algo.needs_old() || self.algo.value_head();
        rollout::score(
            &mut r,
            model,
            self.value_head.as_ref(),
            self.reference
                .as_ref()
                .filter(|_| self.algo.needs_reference()),
            &groups,
            self.pad,
            self.sampling.temperature,
            policy_pass,
        )?;
        let mut st = vec![("rollout_s", gen_s)];
        st.extend(rollout_stats(&r, &self.reward_names));
        st.extend(self.algo.advantages(&mut r)?);
        self.pending = st;
        self.rollout = Some(r);
        Ok(())
    }
}

/// Statistics of a rollout, logged with the step that made it.
fn rollout_stats(r: &Rollout, names: &[&'static str]) -> Vec<(&'static str, f64)> {
    let n = r.rows().max(1) as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (_, std) = crate::losses::rl::mean_std(&r.scores);
    let tokens: usize = (0..r.rows()).map(|i| r.response_len(i)).sum();
    let mut v = vec![
        ("reward", mean(&r.scores)),
        ("reward_std", std),
        ("completions/mean_length", tokens as f64 / n),
        (
            "completions/eos_fraction",
            r.eos.iter().filter(|&&e| e).count() as f64 / n,
        ),
    ];
    for (name, each) in names.iter().zip(&r.per_source) {
        v.push((name, mean(each)));
    }
    // Entropy estimated from the sampled tokens: mean −log π(y_t) (TRL's objective/entropy,
    // per token), from the policy's log-probs when computed, else the sampler's.
    let lps = if r.old.is_empty() { &r.sampled } else { &r.old };
    let nll: f64 = lps.iter().flatten().map(|&x| -x as f64).sum();
    v.push(("entropy", nll / tokens.max(1) as f64));
    v
}

impl<A: Algo> Method for Online<A> {
    type Batch = Vec<usize>;

    fn store(&self) -> &ParamStore {
        &self.p.m.store
    }

    fn epoch_len(&self) -> Option<usize> {
        None
    }

    /// Data-parallel ranks each sample the whole rollout and train on their rows of it: they
    /// must have sampled and scored the same one (kernels on other hardware or thread counts
    /// could differ), so its tokens and scores are compared once per rollout.
    fn begin_step(&mut self, _: &[Vec<usize>], reduce: &mut dyn Reduce) -> Result<()> {
        let Some(r) = self
            .rollout
            .as_ref()
            .filter(|r| self.compared != Some(r.index))
        else {
            return Ok(());
        };
        if reduce.ranks() > 1 {
            let mut h = crate::rng::Fnv1a::new();
            for (s, score) in r.seqs.iter().zip(&r.scores) {
                s.iter().for_each(|t| h.bytes(&t.to_le_bytes()));
                h.bytes(&score.to_le_bytes());
            }
            reduce.same(&format!("rollouts {}", r.index), h.finish())?;
        }
        self.compared = Some(r.index);
        Ok(())
    }

    /// `draws` are global: under data parallelism this rank's slice of step `draws[0] / m`.
    fn batch(&mut self, draws: &[usize]) -> Result<Vec<usize>> {
        let m = self.rows_per_step;
        let step = (draws[0] / m) as u64;
        let spr = self.steps_per_rollout();
        let g = step / spr;
        if self.rollout.as_ref().is_none_or(|r| r.index != g) {
            self.make_rollout(g)?;
        }
        let within = (step % spr) as usize;
        let per_epoch = self.rollout_rows() / m;
        let (e, mb) = (within / per_epoch, within % per_epoch);
        let r = self
            .rollout
            .as_ref()
            .context("internal error: no rollout")?;
        let rows = self.step_rows(r, e, mb);
        Ok(draws.iter().map(|&d| rows[d % m]).collect())
    }

    fn units(&self, b: &Vec<usize>) -> usize {
        self.rollout.as_ref().map_or(0, |r| self.algo.units(r, b))
    }

    fn tokens(&self, b: &Vec<usize>) -> usize {
        self.rollout
            .as_ref()
            .map_or(0, |r| b.iter().map(|&i| r.seqs[i].len()).sum())
    }

    fn loss(&mut self, b: &Vec<usize>) -> Result<Tensor> {
        let r = self
            .rollout
            .as_ref()
            .context("internal error: no rollout")?;
        let model = &self.p.m.model;
        let s = r.batch(b, self.pad, model.device(), rollout::packs(model))?;
        let f = rollout::forward(
            model,
            self.value_head.as_ref(),
            &s,
            self.sampling.temperature,
        )?;
        let old = if r.old.is_empty() {
            f.logps.detach()
        } else {
            r.gather(&r.old, b, model.device())?
        };
        self.algo.loss(r, b, &f, &old, &mut self.stats)
    }

    fn train_mode(&self, _key: Option<u64>) {
        // Dropout stays off (TRL's disable_dropout): old and new log-probs must agree.
        self.p.switch.set_training(false, 0);
    }

    fn step_stats(&mut self) -> Vec<(&'static str, f64)> {
        let mut v = std::mem::take(&mut self.pending);
        for (name, sum, n) in std::mem::take(&mut self.stats).0 {
            v.push((name, sum / n.max(1.0)));
        }
        v
    }

    fn eval_on_start(&self) -> bool {
        self.prompts.len() > self.n_train
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.prompts.len() == self.n_train {
            return Ok(Vec::new());
        }
        let s = Sampling {
            temperature: 0.0,
            ..self.sampling.clone()
        };
        let idx: Vec<usize> = (self.n_train..self.prompts.len()).collect();
        let r = rollout::sample(
            &self.p.m.model,
            &self.p.m.tok,
            (&self.prompts, &self.ids),
            &idx,
            1,
            &s,
            &self.eos,
            self.generation_batch,
            &self.rewards,
        )?;
        let st = rollout_stats(&r, &self.reward_names);
        let keep = |k: &str| {
            k == "reward" || k.starts_with("completions/") || self.reward_names.contains(&k)
        };
        Ok(st
            .into_iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (eval_name(k), v))
            .collect())
    }

    fn state(&self) -> serde_json::Value {
        // The rollout in use (more steps may use it), the shape it was made for, and the
        // method's own state.
        json!({"rollout": self.rollout, "algo": self.algo.state(),
            "shape": [self.per_rollout, self.algo.k(), self.rows_per_step]})
    }

    fn restore_state(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(r) = v.get("rollout").filter(|r| !r.is_null()) {
            let shape = [self.per_rollout, self.algo.k(), self.rows_per_step];
            let saved: Option<[usize; 3]> = serde_json::from_value(v["shape"].clone()).ok();
            if saved != Some(shape) {
                bail!(
                    "checkpoint: its rollout was made for {saved:?} (prompts per rollout, samples per prompt, \
                     rows per step), this run has {shape:?}; resume with the settings it was started with"
                );
            }
            let r: Rollout =
                serde_json::from_value(r.clone()).context("checkpoint: the saved rollout")?;
            r.check(self.per_rollout * self.algo.k(), self.prompts.len())
                .context("checkpoint: the saved rollout")?;
            self.rollout = Some(r);
        }
        if let Some(a) = v.get("algo") {
            self.algo.restore(a)?;
        }
        Ok(())
    }
}

/// "eval_" + a metric name, interned (metric names are `&'static str`).
fn eval_name(k: &str) -> &'static str {
    intern(&format!("eval_{k}"))
}

fn intern(s: &str) -> &'static str {
    use std::sync::Mutex;
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = match NAMES.lock() {
        Ok(n) => n,
        Err(p) => p.into_inner(),
    };
    if let Some(n) = names.iter().find(|n| **n == s) {
        return n;
    }
    let n: &'static str = Box::leak(s.to_string().into_boxed_str());
    names.push(n);
    n
}
