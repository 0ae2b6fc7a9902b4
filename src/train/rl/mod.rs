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

use crate::generate::Sampling;
use crate::losses::sum_f64;
use crate::model::layers::Linear;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::ParamStore;
use crate::peft::PeftArgs;
use crate::train::engine::{self, Control, Method, Metrics, Outcome, RunFiles, TrainConfig};
use crate::train::lm::Policy;
use crate::train::logps::Reference;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use prompts::Prompt;
use rewards::{Rewards, Rule, Source as RewardSource};
use rollout::{Forward, Rollout};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Sampling and rollout sizes: flags and the `[rollout]` config section.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutArgs {
    /// Longest response, in tokens (TRL's max_completion_length / response_length).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Prompts keep their last this-many tokens.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_len: usize,
    /// Prompts per rollout (default: one optimizer step's rows / samples per prompt).
    #[arg(long)]
    pub prompts_per_rollout: Option<usize>,
    /// Rows decoded together.
    #[arg(long, default_value_t = 32)]
    pub generation_batch: usize,
}

crate::clap_default!(RolloutArgs);

/// What is maximised: flags and the `[reward]` config section.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RewardArgs {
    /// A rule reward (repeatable): number, contains:TEXT, avoids:TEXT, length:MIN-MAX, json, eos.
    #[arg(long = "reward")]
    pub rules: Vec<String>,
    /// A reward model from `lmforge reward` (or transformers/PEFT).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// With an adapter reward model: its base (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub reward_model_base: Option<PathBuf>,
    /// Weights of the rules then the reward model, in order (default: all 1).
    #[arg(long, value_delimiter = ',')]
    pub reward_weights: Vec<f64>,
}

crate::clap_default!(RewardArgs);

impl RewardArgs {
    pub fn build(&self, dev: &candle_core::Device) -> Result<Rewards> {
        let mut sources = Vec::new();
        for r in &self.rules {
            sources.push(RewardSource::Rule(r.parse::<Rule>()?));
        }
        if let Some(p) = &self.reward_model {
            let m = rewards::RewardModel::load(p, self.reward_model_base.as_deref(), dev)?;
            sources.push(RewardSource::Model(Box::new(m)));
        }
        if sources.is_empty() {
            bail!("no reward: give --reward RULE (number, contains:TEXT, …) and/or --reward-model DIR");
        }
        let w = &self.reward_weights;
        if w.iter().any(|x| !x.is_finite()) {
            bail!("reward_weights must be finite numbers, got {w:?}");
        }
        if !w.is_empty() && w.len() != sources.len() {
            bail!(
                "reward_weights has {} values for {} rewards",
                w.len(),
                sources.len()
            );
        }
        Ok(Rewards {
            sources: sources
                .into_iter()
                .enumerate()
                .map(|(i, s)| (s, w.get(i).copied().unwrap_or(1.0)))
                .collect(),
        })
    }
}

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
}

/// What one online method adds to the shared loop.
pub trait Algo {
    fn name(&self) -> &'static str;
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

/// PPO-style clipping settings every method checks the same way.
pub fn check_clip(passes: usize, eps: f64, eps_high: Option<f64>) -> Result<()> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if passes == 0 || !ok(eps) || eps_high.is_some_and(|e| !ok(e)) {
        bail!(
            "the passes over a rollout must be positive, epsilon and epsilon_high finite and >= 0"
        );
    }
    Ok(())
}

/// The inputs every online method reads from its options.
pub struct Common<'a> {
    pub model: Option<&'a Path>,
    pub data: Option<&'a Path>,
    pub eval_data: Option<&'a Path>,
    pub chat_template: Option<&'a Path>,
    pub rollout: &'a RolloutArgs,
    pub reward: &'a RewardArgs,
    pub peft: &'a PeftArgs,
}

pub struct Summary {
    pub run_dir: PathBuf,
    pub outcome: Outcome,
    pub trainable: usize,
    pub total: usize,
    /// Held-out metrics before training (after: `outcome.eval`).
    pub eval_before: Vec<(&'static str, f64)>,
    pub output: Option<PathBuf>,
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
    /// Rows per optimizer step, per micro-batch.
    rows_per_step: usize,
    micro: usize,
    seed: u64,
    eos: Vec<u32>,
    pad: u32,
    rollout: Option<Rollout>,
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

/// Loads the policy, prompts, rewards and reference, trains `algo` on the engine, and writes the
/// outputs. `opts` are saved as the run's config.
pub fn run<A: Algo, O: Serialize>(
    c: Common,
    algo: A,
    cfg: TrainConfig,
    (opts, command, out): (&O, &'static str, &Path),
    ctl: Control,
) -> Result<Summary> {
    let model_path = c
        .model
        .context("a model is needed: --model DIR (or `model` in the config)")?;
    let data_path = c
        .data
        .context("prompts are needed: --data FILE.jsonl (or `data` in the config)")?;
    let ro = c.rollout;
    let k = algo.k();
    let m = cfg.per_step();
    let per_rollout = match ro.prompts_per_rollout {
        Some(p) => p,
        None if m.is_multiple_of(k) => m / k,
        None => bail!(
            "batch_size × grad_accum = {m} rows per step is not a multiple of {k} samples per prompt; \
             set prompts_per_rollout (rollout rows = prompts × samples must be a multiple of {m})"
        ),
    };
    if per_rollout == 0 || !(per_rollout * k).is_multiple_of(m) {
        bail!(
            "a rollout of {per_rollout} prompts × {k} samples = {} rows does not split into steps of \
             batch_size × grad_accum = {m} rows",
            per_rollout * k
        );
    }
    if ro.max_new_tokens == 0 || ro.max_prompt_len == 0 {
        bail!("max_new_tokens and max_prompt_len must be positive");
    }
    let sampling = Sampling {
        max_new_tokens: ro.max_new_tokens,
        temperature: ro.temperature,
        top_k: ro.top_k,
        top_p: ro.top_p,
        seed: cfg.seed,
    };
    sampling.check()?;
    if ro.temperature == 0.0 {
        bail!(
            "temperature 0 (greedy) gives a rollout nothing to compare: use a positive temperature"
        );
    }
    let lora_cfg = c.peft.lora()?;
    let files = RunFiles::create(&ctl, out, opts, command)?;
    let run_dir = files.run_dir.clone();

    // 1. Policy, prompts, rewards.
    let mut p = Policy::load(model_path, c.chat_template, lora_cfg.is_some(), &ctl)?;
    let mut prompts = prompts::read(data_path)?;
    let n_train = prompts.len();
    if let Some(e) = c.eval_data {
        prompts.extend(prompts::read(e)?);
    }
    let chat = prompts
        .iter()
        .any(|x| matches!(x.text, crate::data::preference::Text::Messages(_)));
    if chat && p.use_default_template() {
        ctl.say(crate::data::sft::DEFAULT_TEMPLATE_NOTE);
    }
    let tpl = p.chat_template()?;
    let max_prompt = ro.max_prompt_len.min(
        p.m.model
            .cfg
            .max_position_embeddings
            .saturating_sub(ro.max_new_tokens),
    );
    if max_prompt == 0 {
        bail!("max_new_tokens leaves no room for a prompt in the model's context");
    }
    let mut ids = Vec::with_capacity(prompts.len());
    let mut cut = 0;
    for x in &prompts {
        let (t, c) = prompts::tokenize(x, &p.m.tok, tpl.as_ref(), max_prompt)?;
        cut += usize::from(c);
        ids.push(t);
    }
    let rewards = c.reward.build(&ctl.device)?;
    rewards.check(&prompts)?;
    let reward_names: Vec<&'static str> = rewards
        .sources
        .iter()
        .map(|(s, _)| intern(&format!("rewards/{}", s.name())))
        .collect();
    ctl.say(&format!(
        "prompts: {n_train} train / {} eval{}; rollouts of {per_rollout} prompts × {k}, {} steps each",
        prompts.len() - n_train,
        if cut > 0 { format!(" ({cut} cut to their last {max_prompt} tokens)") } else { String::new() },
        algo.epochs() * per_rollout * k / m
    ));

    // 2. Adapters, value head, reference.
    if let Some(lc) = &lora_cfg {
        p.attach_lora(lc, cfg.seed)?;
    }
    let value_head = if algo.value_head() {
        let h = p.m.model.cfg.hidden_size;
        let store = &mut p.m.store;
        let src = Source::Random { seed: cfg.seed };
        let w = store.add(
            &src,
            "v_head.weight",
            &[1, h],
            ParamKind::Adapter,
            Init::Zeros,
            true,
        )?;
        let b = store.add(
            &src,
            "v_head.bias",
            &[1],
            ParamKind::Adapter,
            Init::Zeros,
            true,
        )?;
        Some(Linear {
            name: "v_head".into(),
            weight: w,
            bias: Some(b),
            layout: crate::model::layers::Layout::OutIn,
            in_dim: h,
            out_dim: 1,
            adapter: None,
            quant: None,
        })
    } else {
        None
    };
    ctl.say(&p.describe());
    let reference = if algo.needs_reference() {
        Some(Reference::live(&p, &ctl)?)
    } else {
        None
    };
    let eos = p.m.stop_ids();
    if eos.is_empty() {
        ctl.say("warning: the tokenizer has no EOS token: every response runs to max_new_tokens");
    }
    let pad = p.eos().unwrap_or(0);

    // 3. The engine.
    let (trainable, total) = (p.m.store.num_trainable(), p.m.store.num_params());
    let mut method = Online {
        p,
        algo,
        value_head,
        prompts,
        ids,
        n_train,
        rewards,
        reward_names,
        reference,
        sampling,
        per_rollout,
        generation_batch: ro.generation_batch.max(1),
        rows_per_step: m,
        micro: cfg.batch_size,
        seed: cfg.seed,
        eos,
        pad,
        rollout: None,
        stats: StepStats::default(),
        pending: Vec::new(),
    };
    let outcome = engine::run(&mut method, cfg, &ctl, &files)?;
    let eval_before = outcome.eval_start.clone();
    let mut s = Summary {
        run_dir: run_dir.clone(),
        outcome,
        trainable,
        total,
        eval_before,
        output: None,
    };
    if !s.outcome.finished() {
        return Ok(s);
    }

    // 4. Outputs.
    let mut p = method.p;
    s.output = Some(p.write_outputs(&run_dir, c.peft.merge, &ctl)?);
    if let Some(h) = &method.value_head {
        // Beside the policy, for a later run to start its critic from.
        let dest = crate::outdir::entry(&run_dir, "value_head.safetensors")?;
        let mut t = vec![("v_head.weight", h.weight.detach())];
        t.extend(h.bias.iter().map(|b| ("v_head.bias", b.detach())));
        let bytes = safetensors::serialize(t, None)?;
        crate::fsutil::write_file(&dest, &bytes)?;
    }
    let oc = &s.outcome;
    let mut line = json!({"summary": true, "method": command, "steps": oc.steps,
        "final_loss": oc.losses.last().map(|l| l.1), "prompts": n_train,
        "skipped_steps": oc.skipped, "trainable_params": trainable, "total_params": total,
        "seconds": oc.seconds, "step_s_median": oc.step_s_median, "peak_rss_mib": oc.peak_rss_mib});
    for (k, v) in &s.eval_before {
        line[format!("before_{k}")] = json!(v);
    }
    for (k, v) in &oc.eval {
        line[*k] = json!(v);
    }
    Metrics::open(&run_dir)?.line(&line)?;
    Ok(s)
}
