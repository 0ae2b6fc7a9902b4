//! The training engine: the loop every method shares. A method (`Method`) says only what is its
//! own — how draws of examples become a batch, the batch's summed loss, its evaluation and what
//! a user loads from a checkpoint — and the engine does the rest:
//!
//!   for step:  lr ← schedule(step)
//!              N ← Σ units of the step's micro-batches          (trained tokens, examples, …)
//!              for micro-batch b:  g += ∇ (Σ_b loss / N)         (one graph alive at a time)
//!              reduce(g, N)                                      (data-parallel hook; no-op here)
//!              NaN/Inf → stop or skip;  clip ‖g‖;  AdamW(lr)
//!              log · evaluate · checkpoint (cadence, Ctrl-C, --stop-at-step)
//!
//! Two rules keep a run reproducible however a step is split: example k of step s is draw
//! `s·P + k` of one seeded stream (P = batch_size · grad_accum), whatever the micro-batch (or,
//! later, rank) that computes it; and a step's loss is the sum over all its units divided by
//! their total count N, not a mean of per-micro-batch means. Nothing random is stored: data order
//! and dropout are keyed by (seed, draw/step), so a checkpoint (weights, AdamW moments, step) is
//! all an exact `--resume` needs.

pub mod checkpoint;
mod options;

pub use options::{NanPolicy, Schedule, TrainArgs, TrainConfig};

use crate::model::params::save_tensors;
use crate::model::{Grads, ParamStore};
use crate::rng::{Rng, Stream};
use crate::train::optim::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use checkpoint::TrainerState;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a training method supplies.
pub trait Method {
    /// One micro-batch, built from draws before any forward pass so the step's unit count is
    /// known up front.
    type Batch;
    fn store(&self) -> &ParamStore;
    /// Examples in one epoch (draws are indices into them, in a fresh seeded permutation per
    /// epoch), or None when every draw is its own random example (pre-training windows; draws
    /// are then positions in an endless stream).
    fn epoch_len(&self) -> Option<usize>;
    fn batch(&mut self, draws: &[usize]) -> Result<Self::Batch>;
    /// The units the batch's loss sums over (trained tokens, labelled words, examples).
    fn units(&self, b: &Self::Batch) -> usize;
    /// Tokens the batch processes (throughput reports); the units by default.
    fn tokens(&self, b: &Self::Batch) -> usize {
        self.units(b)
    }
    /// The batch's loss summed over its units: a scalar tensor with a graph.
    fn loss(&mut self, b: &Self::Batch) -> Result<Tensor>;
    /// Dropout on (with the key of this micro-batch) or off.
    fn train_mode(&self, _key: Option<u64>) {}
    /// Held-out metrics, headline first; empty when there is nothing to evaluate on.
    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }
    /// Files a user can load (an HF model directory, …) written into each checkpoint.
    fn export(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Text to show after a step (e.g. a sample), if any.
    fn after_step(&mut self, _step: u64, _last: bool) -> Result<Option<String>> {
        Ok(None)
    }
}

/// Between backward and clipping: where data-parallel ranks will sum their unit counts, losses
/// and gradients. One process has nothing to add.
pub trait Reduce {
    fn units(&mut self, local: usize) -> Result<usize>;
    fn loss(&mut self, local_sum: f64) -> Result<f64>;
    fn grads(&mut self, g: &mut Grads) -> Result<()>;
}

/// The single-process reducer.
pub struct Local;

impl Reduce for Local {
    fn units(&mut self, local: usize) -> Result<usize> {
        Ok(local)
    }
    fn loss(&mut self, local_sum: f64) -> Result<f64> {
        Ok(local_sum)
    }
    fn grads(&mut self, _g: &mut Grads) -> Result<()> {
        Ok(())
    }
}

/// The optimizer, the step counter and the data order: the state a checkpoint saves.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub opt: AdamW,
    pub state: TrainerState,
    pub total_steps: u64,
    order: Option<Stream>,
    consecutive_bad: u32,
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepOut {
    /// Mean loss per unit (NaN when the step had no units).
    pub loss: f32,
    pub grad_norm: f64,
    pub lr: f64,
    pub units: usize,
    pub tokens: usize,
    /// The update was not applied (non-finite loss/gradient under `skip`, or no units).
    pub skipped: bool,
    pub seconds: f64,
}

impl Trainer {
    pub fn new<M: Method>(m: &M, cfg: TrainConfig) -> Result<Self> {
        let total_steps = match (cfg.max_steps, m.epoch_len()) {
            (s, _) if s > 0 => s,
            (_, Some(n)) => (cfg.epochs as usize * n).div_ceil(cfg.per_step()) as u64,
            (_, None) => bail!("train.max_steps must be positive: this method has no epochs"),
        };
        if total_steps == 0 {
            bail!("nothing to do: 0 steps (check train.epochs / train.max_steps)");
        }
        let order = match m.epoch_len() {
            Some(0) => bail!("no training examples"),
            Some(n) => Some(Stream::new(cfg.seed, n)),
            None => None,
        };
        Ok(Self {
            opt: AdamW::new(m.store(), cfg.adamw())?,
            cfg,
            state: TrainerState {
                lmforge_version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
            total_steps,
            order,
            consecutive_bad: 0,
        })
    }

    /// Steps in one epoch (None for endless data).
    pub fn steps_per_epoch<M: Method>(&self, m: &M) -> Option<u64> {
        m.epoch_len()
            .map(|n| (n.div_ceil(self.cfg.per_step()) as u64).max(1))
    }

    /// The draws of micro-batch `micro` of step `step`: a slice of the one global order.
    fn draws(&mut self, step: u64, micro: usize) -> Vec<usize> {
        let b = self.cfg.batch_size;
        let first = step as usize * self.cfg.per_step() + micro * b;
        (first..first + b)
            .map(|p| match self.order.as_mut() {
                Some(s) => s.get(p),
                None => p,
            })
            .collect()
    }

    /// One optimizer step of `m`: accumulate, reduce, check, clip, update.
    pub fn step<M: Method>(&mut self, m: &mut M, reduce: &mut dyn Reduce) -> Result<StepOut> {
        let t0 = Instant::now();
        let step = self.state.step;
        let lr = self.cfg.lr_at(step, self.total_steps);
        let batches = (0..self.cfg.grad_accum)
            .map(|i| {
                let d = self.draws(step, i);
                m.batch(&d)
            })
            .collect::<Result<Vec<_>>>()?;
        let local: usize = batches.iter().map(|b| m.units(b)).sum();
        let tokens: usize = batches.iter().map(|b| m.tokens(b)).sum();
        let n = reduce.units(local)?;
        let mut grads: Option<Grads> = None;
        let mut sum = 0f64;
        for (i, b) in batches.iter().enumerate() {
            if m.units(b) == 0 {
                continue;
            }
            m.train_mode(Some(
                Rng::keyed(&[self.cfg.seed, 0xD209, step, i as u64]).next_u64(),
            ));
            let l = m.loss(b);
            m.train_mode(None);
            let l = l?;
            sum += l.to_scalar::<f32>()? as f64;
            let g = m.store().grads(&(l / n as f64)?.backward()?);
            match grads.as_mut() {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
        }
        let sum = reduce.loss(sum)?;
        let loss = if n > 0 {
            (sum / n as f64) as f32
        } else {
            f32::NAN
        };
        let mut out = StepOut {
            loss,
            grad_norm: f64::NAN,
            lr,
            units: n,
            tokens,
            skipped: true,
            seconds: 0.0,
        };
        if let (Some(mut g), true) = (grads, n > 0) {
            reduce.grads(&mut g)?;
            out.grad_norm = g.global_norm()?;
            if loss.is_finite() && out.grad_norm.is_finite() {
                if self.cfg.grad_clip > 0.0 && out.grad_norm > self.cfg.grad_clip {
                    g.scale(self.cfg.grad_clip / out.grad_norm)?;
                }
                self.opt.step(m.store(), &g, lr)?;
                out.skipped = false;
                self.consecutive_bad = 0;
            } else {
                let what = format!(
                    "step {}: the loss ({loss}) or the gradient norm ({}) is not finite",
                    step + 1,
                    out.grad_norm
                );
                match self.cfg.nan_policy {
                    NanPolicy::Stop => bail!(
                        "{what}; lower train.lr, keep train.grad_clip on, or set train.nan_policy = \"skip\""
                    ),
                    NanPolicy::Skip => {
                        self.consecutive_bad += 1;
                        if self.consecutive_bad >= 10 {
                            bail!("{what}, the tenth step in a row; stopping (lower train.lr)");
                        }
                    }
                }
            }
        }
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        self.state.skipped_steps += u64::from(out.skipped);
        out.seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Restores weights, moments and counters from a verified checkpoint.
    pub fn restore<M: Method>(&mut self, m: &M, ckpt: &Path, state: TrainerState) -> Result<()> {
        let dev = m.store().device.clone();
        let what = ckpt.display().to_string();
        let weights = candle_core::safetensors::load(ckpt.join("trainable.safetensors"), &dev)
            .with_context(|| format!("{what}: cannot read trainable.safetensors"))?;
        assign_trainable(m.store(), &weights, &what)?;
        let moments = candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &dev)
            .with_context(|| format!("{what}: cannot read optimizer.safetensors"))?;
        self.opt.load_state(
            m.store(),
            state.step - state.skipped_steps.min(state.step),
            &moments,
            &what,
        )?;
        if state.step > self.total_steps {
            bail!(
                "{what} is at step {}, past this run's {} steps (raise train.max_steps to continue)",
                state.step,
                self.total_steps
            );
        }
        self.state = state;
        Ok(())
    }

    fn save<M: Method>(&self, m: &mut M, run: &RunFiles) -> Result<PathBuf> {
        let mut state = self.state.clone();
        state.command = run.command.to_string();
        checkpoint::save(run.run_dir, &state, self.cfg.keep_checkpoints, |tmp| {
            let trainable: Vec<(String, Tensor)> = m
                .store()
                .params()
                .iter()
                .filter(|p| p.trainable)
                .map(|p| (p.name.clone(), p.var.as_detached_tensor()))
                .collect();
            save_tensors(&trainable, &tmp.join("trainable.safetensors"))?;
            crate::fsutil::abort_point("checkpoint");
            save_tensors(
                &self.opt.state_tensors(m.store()),
                &tmp.join("optimizer.safetensors"),
            )?;
            std::fs::write(tmp.join("config.toml"), run.config_toml)?;
            m.export(tmp)
        })
    }
}

/// Copies a checkpoint's values into every trainable parameter (frozen ones are the base
/// model's, rebuilt from the run's options).
fn assign_trainable(store: &ParamStore, t: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    for p in store.params().iter().filter(|p| p.trainable) {
        let x = t
            .get(&p.name)
            .with_context(|| format!("{what}: missing trainable tensor {}", p.name))?;
        if x.dims() != p.var.dims() {
            bail!(
                "{what}: tensor {} has shape {:?}, the model expects {:?}",
                p.name,
                x.dims(),
                p.var.dims()
            );
        }
        p.var.set(&x.to_dtype(p.var.dtype())?)?;
    }
    Ok(())
}

/// The flags of every training subcommand that are not options of the run itself: where the
/// options come from, resuming, stopping, the device.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// A TOML config (the same keys as the flags; unknown keys are errors).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set train.lr=1e-3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from a checkpoint directory or a run directory (its latest checkpoint), with
    /// the options saved in it; flags and --set still override.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write a checkpoint and stop after this step, as if interrupted.
    #[arg(long)]
    pub stop_at_step: Option<u64>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
}

/// How a run is driven from outside: device, resume, when to stop, how much to say.
pub struct Control {
    pub device: candle_core::Device,
    /// The verified checkpoint to continue from (`open_resume`).
    pub resume: Option<(PathBuf, TrainerState)>,
    /// Stop (with a checkpoint) after this step, as if interrupted.
    pub stop_at: Option<u64>,
    /// Set by Ctrl-C: finish the current step, checkpoint, return.
    pub interrupt: Arc<AtomicBool>,
    pub quiet: bool,
}

impl Control {
    /// A plain run on `device`: no resume, no stop, no interrupt flag set.
    pub fn new(device: candle_core::Device, quiet: bool) -> Self {
        Self {
            device,
            resume: None,
            stop_at: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            quiet,
        }
    }

    /// The run directory: the resumed checkpoint's run, or `out`.
    pub fn run_dir(&self, out: &Path) -> Result<PathBuf> {
        match &self.resume {
            Some((ck, _)) => checkpoint::run_dir_of(ck),
            None => Ok(out.to_path_buf()),
        }
    }

    /// Prints unless quiet.
    pub fn say(&self, s: &str) {
        if !self.quiet {
            eprintln!("{s}");
        }
    }
}

/// Where a run writes: its directory, its options (saved in every checkpoint for `--resume`)
/// and the subcommand (for the `--resume` hints).
pub struct RunFiles<'a> {
    pub run_dir: &'a Path,
    pub config_toml: &'a str,
    pub command: &'a str,
}

/// What a finished (or stopped) run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub steps: u64,
    pub total_steps: u64,
    /// (step, mean loss) of the steps this invocation ran.
    pub losses: Vec<(u64, f32)>,
    /// The last evaluation's metrics.
    pub eval: Vec<(&'static str, f64)>,
    pub skipped: u64,
    pub interrupted: bool,
    /// Seconds of training, across resumes.
    pub seconds: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    /// Where the last checkpoint went.
    pub checkpoint: Option<PathBuf>,
}

impl Outcome {
    /// All steps done: the method writes its final outputs.
    pub fn finished(&self) -> bool {
        !self.interrupted && self.steps == self.total_steps
    }
}

/// Reads and checks the checkpoint a run resumes from (its options come from `config.toml`).
pub fn open_resume(path: &Path, command: &str) -> Result<(PathBuf, TrainerState)> {
    let ckpt = checkpoint::resolve(path)?;
    let state = checkpoint::verify(&ckpt, command)?;
    if !state.command.is_empty() && state.command != command {
        bail!(
            "{}: a checkpoint of `lmforge {}`, not of `lmforge {command}`",
            ckpt.display(),
            state.command
        );
    }
    Ok((ckpt, state))
}

/// Runs `m` from the trainer's step to its last: the loop of every method.
pub fn run<M: Method>(
    m: &mut M,
    t: &mut Trainer,
    ctl: &Control,
    run: &RunFiles,
) -> Result<Outcome> {
    std::fs::create_dir_all(run.run_dir)
        .with_context(|| format!("creating {}", run.run_dir.display()))?;
    let metrics_path = run.run_dir.join("metrics.jsonl");
    if let Some((ck, state)) = &ctl.resume {
        let step = state.step;
        t.restore(m, ck, state.clone())?;
        truncate_metrics(&metrics_path, step)?;
        ctl.say(&format!("resumed from {} at step {step}", ck.display()));
    } else {
        crate::fsutil::write_file(&metrics_path, b"")?;
    }
    let mut metrics = Metrics::open(run.run_dir)?;
    let total = t.total_steps;
    let pb = if ctl.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(t.state.step);
    let log = |msg: &str| {
        if ctl.quiet {
        } else if pb.is_hidden() {
            eprintln!("{msg}");
        } else {
            pb.println(msg);
        }
    };
    let per_epoch = t.steps_per_epoch(m);
    let mut out = Outcome {
        total_steps: total,
        ..Default::default()
    };
    let mut times = Vec::new();
    let started = Instant::now();
    let elapsed_before = t.state.elapsed_s;
    while t.state.step < total {
        let s = t.step(m, &mut Local)?;
        let step = t.state.step;
        t.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        times.push(s.seconds);
        let tps = s.tokens as f64 / s.seconds.max(1e-9);
        out.losses.push((step, s.loss));
        metrics.line(
            &json!({"step": step, "loss": finite(s.loss as f64), "lr": s.lr,
            "grad_norm": finite(s.grad_norm), "units": s.units, "tokens_per_s": tps,
            "skipped": s.skipped, "elapsed_s": t.state.elapsed_s}),
        )?;
        if s.skipped && s.units > 0 {
            log(&format!(
                "step {step}: skipped (loss {}, gradient norm {}); {} skipped so far",
                s.loss, s.grad_norm, t.state.skipped_steps
            ));
        }
        pb.set_message(format!("loss {:.4} lr {:.2e} {tps:.0} tok/s", s.loss, s.lr));
        pb.set_position(step);
        if pb.is_hidden() && !ctl.quiet && step.is_multiple_of((total / 20).max(1)) {
            eprintln!(
                "step {step:>6}/{total}  loss {:.4}  lr {:.2e}  {tps:.0} tok/s",
                s.loss, s.lr
            );
        }
        let last = step == total;
        let eval_now = match (t.cfg.eval_every, per_epoch) {
            (e, _) if e > 0 => step.is_multiple_of(e),
            (_, Some(p)) => step.is_multiple_of(p),
            _ => false,
        };
        if eval_now || last {
            let ev = m.evaluate()?;
            if !ev.is_empty() {
                let mut line = json!({"step": step});
                let mut text = format!("step {step:>6}  train loss {:.4}", s.loss);
                for (k, v) in &ev {
                    line[*k] = json!(finite(*v));
                    text.push_str(&format!("  {k} {v:.4}"));
                }
                metrics.line(&line)?;
                log(&text);
                out.eval = ev;
            }
        }
        if let Some(text) = m.after_step(step, last)? {
            log(&text);
        }
        let stop_now = ctl.stop_at == Some(step);
        out.interrupted = ctl.interrupt.load(Ordering::SeqCst) || (stop_now && !last);
        if (t.cfg.checkpoint_every > 0 && step.is_multiple_of(t.cfg.checkpoint_every))
            || last
            || stop_now
            || out.interrupted
        {
            let dir = t.save(m, run)?;
            if out.interrupted {
                log(&format!(
                    "stopped at step {step}; checkpoint written to {}; continue with\n  lmforge {} --resume {}",
                    dir.display(),
                    run.command,
                    run.run_dir.display()
                ));
            }
            out.checkpoint = Some(dir);
            if out.interrupted {
                break;
            }
        }
    }
    pb.finish_and_clear();
    times.sort_by(f64::total_cmp);
    out.steps = t.state.step;
    out.skipped = t.state.skipped_steps;
    out.seconds = t.state.elapsed_s;
    out.step_s_median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    out.peak_rss_mib = peak_rss_mib();
    Ok(out)
}

fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

/// `run/metrics.jsonl`: one JSON object per line, appended.
pub struct Metrics(std::fs::File);

impl Metrics {
    pub fn open(run_dir: &Path) -> Result<Self> {
        let p = run_dir.join("metrics.jsonl");
        Ok(Self(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))?,
        ))
    }

    pub fn line(&mut self, v: &Value) -> Result<()> {
        writeln!(self.0, "{v}")?;
        Ok(())
    }
}

/// Keeps only the metrics of steps ≤ `step` (a resumed run rewrites what came after).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::fsutil::write_file(path, out.as_bytes())
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0)
}
