//! Driving a run: the flags every training command shares, the control a caller holds (device,
//! resume point, Ctrl-C, stop step), and the loop around `Trainer::step` — logging, progress,
//! evaluation cadence, checkpoints — with `metrics.jsonl`.

use super::checkpoint::{self, TrainerState};
use super::{Method, Reduce, TrainConfig, Trainer};
use crate::dist;
use crate::outdir;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
    /// Also write every step's metrics as TensorBoard event files (RUN/tensorboard/).
    #[arg(long)]
    pub tensorboard: bool,
    /// Start afresh in an --out that holds an earlier lmforge run: its files (listed in its
    /// manifest) are removed first; files lmforge did not write are kept.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// After training, run these evaluation tasks (built-in names or task files, comma-
    /// separated) on the base model and on the result, print the change per task and write it
    /// to RUN/eval_suite/ (`lmforge eval --baseline`; causal-LM trainers).
    #[arg(long, value_delimiter = ',')]
    pub eval_suite: Vec<String>,
    /// With --eval-suite: the first N items of each task.
    #[arg(long, requires = "eval_suite")]
    pub eval_suite_limit: Option<usize>,
    /// With --eval-suite: where built-in tasks find their data.
    #[arg(long, default_value = "data/eval")]
    pub eval_data_dir: PathBuf,
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
    /// `--overwrite`: a new run may replace an earlier lmforge run in `out`.
    pub overwrite: bool,
    /// `--tensorboard`: event files beside metrics.jsonl.
    pub tensorboard: bool,
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
            overwrite: false,
            tensorboard: false,
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
pub struct RunFiles {
    pub run_dir: PathBuf,
    /// Held while the run writes its directory (by rank 0 only under `mpirun`).
    pub lock: Option<outdir::RunLock>,
    pub config_toml: String,
    pub command: &'static str,
}

impl RunFiles {
    /// Creates the run directory (the resumed checkpoint's run, or `out`, claimed under the
    /// output policy of `outdir`) and saves the options there as `config.toml`. Under
    /// `mpirun`, ranks > 0 wait until rank 0 has prepared the directory, then only log there.
    pub fn create<T: serde::Serialize>(
        ctl: &Control,
        out: &Path,
        opts: &T,
        command: &'static str,
    ) -> Result<Self> {
        let run_dir = ctl.run_dir(out)?;
        let config_toml = crate::config::to_toml(opts)?;
        let world = dist::world();
        if !world.writes() {
            dist::wait_for_main()?;
            dist::log_to_file(&run_dir)?;
            return Ok(Self {
                run_dir,
                lock: None,
                config_toml,
                command,
            });
        }
        let lock = if ctl.resume.is_some() {
            outdir::adopt(&run_dir, command)?
        } else {
            let claim = outdir::Claim {
                kind: command,
                overwrite: ctl.overwrite,
                resumable: true,
            };
            outdir::start_run(&run_dir, claim)?
        };
        let path = outdir::entry(&run_dir, "config.toml")?;
        crate::fsutil::write_file(&path, config_toml.as_bytes())?;
        if world.size > 1 {
            outdir::entry(&run_dir, "logs")?;
        }
        Ok(Self {
            run_dir,
            lock: Some(lock),
            config_toml,
            command,
        })
    }
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
    /// The evaluation before the first step (`Method::eval_on_start`).
    pub eval_start: Vec<(&'static str, f64)>,
    pub skipped: u64,
    /// Stopped by Ctrl-C before the last step (a checkpoint was written).
    pub interrupted: bool,
    /// Stopped by `--stop-at-step` before the last step (a checkpoint was written).
    pub stopped: bool,
    /// Seconds of training, across resumes.
    pub seconds: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    /// Where the last checkpoint went.
    pub checkpoint: Option<PathBuf>,
}

impl Outcome {
    /// All steps done and this process writes the run (rank 0 under `mpirun`): the method
    /// writes its final outputs.
    pub fn finished(&self) -> bool {
        self.steps == self.total_steps && dist::world().writes()
    }
}

/// Reads and checks the checkpoint a run resumes from (its options come from `config.toml`).
pub fn open_resume(path: &Path, command: &str) -> Result<(PathBuf, TrainerState)> {
    let ckpt = checkpoint::resolve(path, command)?;
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

/// Trains `m` with `cfg` from its first step (or the resumed one) to its last: the loop of
/// every method.
pub fn run<M: Method>(
    m: &mut M,
    cfg: TrainConfig,
    ctl: &Control,
    run: &RunFiles,
) -> Result<Outcome> {
    let world = dist::world();
    // Rank 0 has prepared the run directory: the others may read it now.
    dist::release_others()?;
    let writer = world.writes();
    let mut reduce = world.reducer(cfg.allreduce_bucket_mb, &ctl.device)?;
    let reduce = reduce.as_mut();
    let mut trainer = Trainer::sharded(m, cfg, world.rank, world.size)?;
    let t = &mut trainer;
    if let Some((ck, state)) = &ctl.resume {
        if let Some(w) = t.restore(m, ck, state.clone())? {
            eprintln!("{w}");
        }
        ctl.say(&format!(
            "resumed from {} at step {}",
            ck.display(),
            state.step
        ));
    }
    if writer {
        // A fresh run starts an empty file; a resumed one keeps the lines up to its step.
        let path = outdir::entry(&run.run_dir, "metrics.jsonl")?;
        match &ctl.resume {
            Some((_, state)) => truncate_metrics(&path, state.step)?,
            None => crate::fsutil::write_file(&path, b"")?,
        }
    }
    let mut metrics = Metrics::open_for(&run.run_dir, writer, ctl.tensorboard)?;
    if world.size > 1 {
        ctl.say(&format!(
            "rank {} of {}: {} examples per step ({} per rank)",
            world.rank,
            world.size,
            t.state.per_step,
            t.cfg.per_step()
        ));
    }
    let check = |reduce: &mut dyn Reduce, m: &M, when: &str| -> Result<()> {
        if reduce.ranks() > 1 {
            reduce.same(&format!("weights {when}"), dist::checksum(m.store())?)?;
        }
        Ok(())
    };
    check(reduce, m, &format!("at step {}", t.state.step))?;
    if reduce.ranks() > 1 {
        // Ranks with the same weights but other options (seed, batch) would draw overlapping
        // shards without the weights ever telling.
        let opts = crate::rng::fnv1a(run.config_toml.as_bytes());
        reduce.same("options (config.toml)", opts)?;
    }
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
    // Above the progress bar, or to stderr when there is no bar (not a terminal).
    let log = |msg: &str| match (ctl.quiet, pb.is_hidden()) {
        (true, _) => {}
        (false, true) => eprintln!("{msg}"),
        (false, false) => pb.println(msg),
    };
    let per_epoch = t.steps_per_epoch();
    let mut out = Outcome {
        total_steps: total,
        ..Default::default()
    };
    if writer && ctl.resume.is_none() && m.eval_on_start() {
        // Before any update (TRL's eval_on_start): the baseline, logged as step 0.
        let ev = m.evaluate()?;
        if !ev.is_empty() {
            let mut line = json!({"step": 0});
            let mut text = "step      0 ".to_string();
            for (k, v) in &ev {
                line[*k] = finite(*v);
                text.push_str(&format!("  {k} {v:.4}"));
            }
            metrics.line(&line)?;
            ctl.say(&text);
            out.eval_start = ev;
        }
    }
    let mut times = Vec::new();
    let started = Instant::now();
    let elapsed_before = t.state.elapsed_s;
    while t.state.step < total {
        let s = t.step(m, reduce)?;
        let step = t.state.step;
        t.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        times.push(s.seconds);
        let (comm, transport) = reduce.take_comm();
        let tps = s.tokens as f64 / s.seconds.max(1e-9);
        out.losses.push((step, s.loss));
        let mut line = json!({"step": step, "loss": finite(s.loss as f64), "lr": s.lr,
            "grad_norm": finite(s.grad_norm), "units": s.units, "tokens": t.state.tokens_seen,
            "tokens_per_s": tps, "step_s": s.seconds, "skipped": s.skipped,
            "elapsed_s": t.state.elapsed_s, "peak_rss_mib": peak_rss_mib()});
        for (k, v) in &s.stats {
            line[*k] = finite(*v);
        }
        if world.size > 1 {
            line["ranks"] = json!(world.size);
            line["allreduce_s"] = json!(comm);
            line["allreduce_transport_s"] = json!(transport);
        }
        metrics.line(&line)?;
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
        if writer && (eval_now || last) {
            let ev = m.evaluate()?;
            if !ev.is_empty() {
                let mut line = json!({"step": step});
                if let Some(p) = per_epoch {
                    line["epoch"] = json!(step.div_ceil(p));
                }
                let mut text = format!("step {step:>6}  train loss {:.4}", s.loss);
                for (k, v) in &ev {
                    line[*k] = finite(*v);
                    text.push_str(&format!("  {k} {v:.4}"));
                }
                metrics.line(&line)?;
                log(&text);
                out.eval = ev;
            }
        }
        if writer {
            if let Some(text) = m.after_step(step, last)? {
                log(&text);
            }
        }
        // At the last step a stop request changes nothing: the run finishes. Every rank stops
        // at the same step: an interrupt seen by any of them counts.
        let mut flag = [f64::from(u8::from(ctl.interrupt.load(Ordering::SeqCst)))];
        reduce.sum(&mut flag)?;
        out.stopped = ctl.stop_at == Some(step) && !last;
        out.interrupted = flag[0] > 0.0 && !last;
        let early = out.stopped || out.interrupted;
        let save = (t.cfg.checkpoint_every > 0 && step.is_multiple_of(t.cfg.checkpoint_every))
            || last
            || early;
        let every = t.cfg.dist_check_every;
        if save || (every > 0 && step.is_multiple_of(every)) {
            check(reduce, m, &format!("after step {step}"))?;
        }
        if save && writer {
            let dir = t.save(m, run)?;
            if early {
                log(&format!(
                    "stopped at step {step}; checkpoint written to {}; continue with\n  lmforge {} --resume {}",
                    dir.display(),
                    run.command,
                    run.run_dir.display()
                ));
            }
            out.checkpoint = Some(dir);
        }
        if early {
            break;
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

/// `run/metrics.jsonl`: one JSON object per line, appended (by rank 0 only); with
/// `--tensorboard`, the step lines go to an event file too.
pub struct Metrics {
    /// None where this process does not write the run (a data-parallel rank > 0).
    file: Option<std::fs::File>,
    path: PathBuf,
    tensorboard: Option<crate::view::tensorboard::EventWriter>,
}

impl Metrics {
    /// Appends to the run's metrics (a method's lines after training).
    pub fn open(run_dir: &Path) -> Result<Self> {
        Self::open_for(run_dir, dist::world().writes(), false)
    }

    /// The file (nothing to write to when this process does not write the run), and an event
    /// file beside it with `tensorboard`.
    fn open_for(run_dir: &Path, writer: bool, tensorboard: bool) -> Result<Self> {
        if !writer {
            return Ok(Self {
                file: None,
                path: run_dir.join("metrics.jsonl"),
                tensorboard: None,
            });
        }
        let path = outdir::entry(run_dir, "metrics.jsonl")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let tensorboard = match tensorboard {
            true => Some(crate::view::tensorboard::EventWriter::create(
                &outdir::entry(run_dir, "tensorboard")?,
            )?),
            false => None,
        };
        Ok(Self {
            file: Some(file),
            path,
            tensorboard,
        })
    }

    pub fn line(&mut self, v: &Value) -> Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            tb.line(v)?;
        }
        match &mut self.file {
            Some(f) => {
                writeln!(f, "{v}").with_context(|| format!("writing {}", self.path.display()))
            }
            None => Ok(()),
        }
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
