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
mod run;

pub use options::{NanPolicy, Schedule, TrainArgs, TrainConfig};
pub use run::{open_resume, peak_rss_mib, run, Control, Metrics, Outcome, RunArgs, RunFiles};

use crate::model::params::save_tensors;
use crate::model::{Grads, ParamStore};
use crate::rng::{Rng, Stream};
use crate::train::optim::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use checkpoint::TrainerState;
use std::path::{Path, PathBuf};
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
    /// Before the step's forward passes, with all its micro-batches: for a statistic of the
    /// whole step that the loss needs without a gradient (KTO's KL estimate), so it does not
    /// depend on how the step is split.
    /// Under data parallelism `batches` are this rank's; `reduce` sums over the ranks.
    fn begin_step(&mut self, _batches: &[Self::Batch], _reduce: &mut dyn Reduce) -> Result<()> {
        Ok(())
    }
    /// The batch's loss summed over its units: a scalar tensor with a graph.
    fn loss(&mut self, b: &Self::Batch) -> Result<Tensor>;
    /// Dropout on (with the key of this micro-batch) or off.
    fn train_mode(&self, _key: Option<u64>) {}
    /// Held-out metrics, headline first; empty when there is nothing to evaluate on.
    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }
    /// Evaluate once before the first step of a fresh run too (logged as step 0).
    fn eval_on_start(&self) -> bool {
        false
    }
    /// Files a user can load (an HF model directory, …) written into each checkpoint.
    fn export(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Text to show after a step (e.g. a sample), if any.
    fn after_step(&mut self, _step: u64, _last: bool) -> Result<Option<String>> {
        Ok(None)
    }
    /// Statistics of the step just taken (e.g. DPO's reward margin), for its metrics line.
    fn step_stats(&mut self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// State of the method's own that a resumed run needs (e.g. an adaptive KL coefficient);
    /// saved in `trainer_state.json`, handed back by `restore_state`.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// What data-parallel ranks share (`crate::dist`): sums of counts and losses, the gradients
/// between backward and clipping, and checks that their weights agree. One process has nothing
/// to share (`Local`).
pub trait Reduce {
    /// Processes taking part.
    fn ranks(&self) -> usize {
        1
    }
    /// Element-wise sums over the ranks, in place.
    fn sum(&mut self, _xs: &mut [f64]) -> Result<()> {
        Ok(())
    }
    /// Sums every trainable parameter's gradient over the ranks (a missing one counts as zeros;
    /// afterwards every trainable parameter has one).
    fn grads(&mut self, _store: &ParamStore, _g: &mut Grads) -> Result<()> {
        Ok(())
    }
    /// Fails, naming the ranks, unless `x` (e.g. a checksum of the weights) is the same on all.
    fn same(&mut self, _what: &str, _x: u64) -> Result<()> {
        Ok(())
    }
    /// Seconds spent exchanging gradients since the last call: in all (packing buffers
    /// included), and inside the transport's calls.
    fn take_comm(&mut self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// The single-process reducer.
pub struct Local;

impl Reduce for Local {}

/// The optimizer, the step counter and the data order: the state a checkpoint saves.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub opt: AdamW,
    pub state: TrainerState,
    pub total_steps: u64,
    order: Option<Stream>,
    /// This process's rank and the number of ranks: a step's draws are split among them.
    shard: (usize, usize),
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
    /// The method's statistics of this step.
    pub stats: Vec<(&'static str, f64)>,
}

impl Trainer {
    pub fn new<M: Method>(m: &M, cfg: TrainConfig) -> Result<Self> {
        Self::sharded(m, cfg, 0, 1)
    }

    /// Rank `rank` of `ranks` (each computes `batch_size · grad_accum` of a step's draws).
    pub fn sharded<M: Method>(m: &M, cfg: TrainConfig, rank: usize, ranks: usize) -> Result<Self> {
        let epoch_len = m.epoch_len();
        let per_step = cfg.per_step() * ranks;
        let total_steps = match (cfg.max_steps, epoch_len) {
            (s, _) if s > 0 => s,
            (_, Some(n)) => (cfg.epochs as usize * n).div_ceil(per_step) as u64,
            (_, None) => bail!("train.max_steps must be positive: this method has no epochs"),
        };
        if total_steps == 0 {
            bail!("nothing to do: 0 steps (check train.epochs / train.max_steps)");
        }
        let order = match epoch_len {
            Some(0) => bail!("no training examples"),
            Some(n) => Some(Stream::new(cfg.seed, n)),
            None => None,
        };
        Ok(Self {
            opt: AdamW::new(m.store(), cfg.adamw())?,
            state: TrainerState {
                lmforge_version: env!("CARGO_PKG_VERSION").into(),
                epoch_len: epoch_len.unwrap_or(0) as u64,
                per_step: per_step as u64,
                ..Default::default()
            },
            cfg,
            total_steps,
            order,
            shard: (rank, ranks),
        })
    }

    /// Steps in one epoch (None for endless data).
    pub fn steps_per_epoch(&self) -> Option<u64> {
        let n = self.state.epoch_len as usize;
        (n > 0).then(|| (n.div_ceil(self.state.per_step as usize) as u64).max(1))
    }

    /// The index in the global order of the first draw of this rank's micro-batch `micro` of
    /// step `step` (ranks take consecutive slices of `batch_size · grad_accum` draws).
    fn first_draw(&self, step: u64, micro: usize) -> usize {
        let b = self.cfg.batch_size;
        step as usize * self.state.per_step as usize
            + self.shard.0 * self.cfg.per_step()
            + micro * b
    }

    /// The draws of micro-batch `micro` of step `step`: a slice of the one global order.
    fn draws(&mut self, step: u64, micro: usize) -> Vec<usize> {
        let b = self.cfg.batch_size;
        let first = self.first_draw(step, micro);
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
        m.begin_step(&batches, reduce)?;
        let units: Vec<usize> = batches.iter().map(|b| m.units(b)).collect();
        let mut count = [units.iter().sum::<usize>() as f64];
        reduce.sum(&mut count)?;
        let n = count[0] as usize;
        let mut grads: Option<Grads> = None;
        let mut sum = 0f64;
        for (i, b) in batches.iter().enumerate() {
            if units[i] == 0 {
                continue;
            }
            // Keyed by the micro-batch's first draw, not its index, so a mask belongs to data.
            let first = self.first_draw(step, i) as u64;
            m.train_mode(Some(Rng::keyed(&[self.cfg.seed, 0xD209, first]).next_u64()));
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
        let mut sums = [
            sum,
            batches.iter().map(|b| m.tokens(b)).sum::<usize>() as f64,
        ];
        reduce.sum(&mut sums)?;
        let (sum, tokens) = (sums[0], sums[1] as usize);
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
            stats: Vec::new(),
        };
        if n > 0 {
            // A rank may have had no units this step (no gradient) while the others had some.
            let mut g = grads.unwrap_or_else(|| Grads(vec![None; m.store().params().len()]));
            reduce.grads(m.store(), &mut g)?;
            out.grad_norm = g.global_norm()?;
            if loss.is_finite() && out.grad_norm.is_finite() {
                if self.cfg.grad_clip > 0.0 && out.grad_norm > self.cfg.grad_clip {
                    g.scale(self.cfg.grad_clip / out.grad_norm)?;
                }
                self.opt.step(m.store(), &g, lr)?;
                out.skipped = false;
                self.state.bad_in_a_row = 0;
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
                        self.state.bad_in_a_row += 1;
                        if self.state.bad_in_a_row >= 10 {
                            bail!("{what}, the tenth step in a row; stopping (lower train.lr)");
                        }
                    }
                }
            }
        }
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;
        self.state.skipped_steps += u64::from(out.skipped);
        out.stats = m.step_stats();
        out.seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Restores weights, moments, counters and the method's state from a verified checkpoint.
    /// Returns a warning when the data order cannot be the uninterrupted run's.
    pub fn restore<M: Method>(
        &mut self,
        m: &mut M,
        ckpt: &Path,
        state: TrainerState,
    ) -> Result<Option<String>> {
        let dev = m.store().device.clone();
        let what = ckpt.display().to_string();
        let weights = candle_core::safetensors::load(ckpt.join("trainable.safetensors"), &dev)
            .with_context(|| format!("{what}: cannot read trainable.safetensors"))?;
        m.store().assign_trainable(&weights, &what)?;
        let moments = candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &dev)
            .with_context(|| format!("{what}: cannot read optimizer.safetensors"))?;
        self.opt.load_state(
            m.store(),
            state.step - state.skipped_steps.min(state.step),
            &moments,
            &what,
        )?;
        m.restore_state(&state.method_state)?;
        if state.step > self.total_steps {
            bail!(
                "{what} is at step {}, past this run's {} steps (raise train.max_steps to continue)",
                state.step,
                self.total_steps
            );
        }
        let (now, then) = (&self.state, &state);
        let warn = (now.epoch_len != then.epoch_len || now.per_step != then.per_step).then(|| {
            format!(
                "warning: the checkpoint drew from {} examples per epoch, {} per step; this run has {}, {}: \
                 the examples it sees from here differ from an uninterrupted run's",
                then.epoch_len, then.per_step, now.epoch_len, now.per_step
            )
        });
        // The counters continue; what the data order depends on is this run's.
        self.state = TrainerState {
            epoch_len: self.state.epoch_len,
            per_step: self.state.per_step,
            ..state
        };
        Ok(warn)
    }

    fn save<M: Method>(&self, m: &mut M, run: &RunFiles) -> Result<PathBuf> {
        let mut state = self.state.clone();
        state.command = run.command.to_string();
        state.method_state = m.state();
        checkpoint::save(&run.run_dir, &state, self.cfg.keep_checkpoints, |tmp| {
            save_tensors(
                &m.store().trainable_tensors(),
                &tmp.join("trainable.safetensors"),
            )?;
            crate::fsutil::abort_point("checkpoint");
            save_tensors(
                &self.opt.state_tensors(m.store()),
                &tmp.join("optimizer.safetensors"),
            )?;
            std::fs::write(tmp.join("config.toml"), &run.config_toml)?;
            m.export(tmp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{Init, ParamKind, Source};

    /// Fits w in y = 3x; example k weighs `k % 3 + 1` units (as if it had that many tokens), and
    /// the example `poison` gives a NaN loss.
    struct Toy {
        store: ParamStore,
        w: Tensor,
        poison: Option<usize>,
    }

    impl Toy {
        fn new() -> Self {
            let mut store = ParamStore::new(candle_core::Device::Cpu);
            let src = Source::Random { seed: 0 };
            let w = store
                .add(&src, "w", &[1], ParamKind::Weight, Init::Zeros, true)
                .unwrap();
            Self {
                store,
                w,
                poison: None,
            }
        }
    }

    impl Method for Toy {
        type Batch = Vec<usize>;
        fn store(&self) -> &ParamStore {
            &self.store
        }
        fn epoch_len(&self) -> Option<usize> {
            Some(10)
        }
        fn batch(&mut self, draws: &[usize]) -> Result<Vec<usize>> {
            Ok(draws.to_vec())
        }
        fn units(&self, b: &Vec<usize>) -> usize {
            b.iter().map(|k| k % 3 + 1).sum()
        }
        fn loss(&mut self, b: &Vec<usize>) -> Result<Tensor> {
            let dev = &self.store.device;
            let x: Vec<f32> = b.iter().map(|&k| (k % 5 + 1) as f32 * 0.1).collect();
            let u: Vec<f32> = b.iter().map(|&k| (k % 3 + 1) as f32).collect();
            let n = b.len();
            let x = Tensor::from_vec(x, n, dev)?;
            let err = (self.w.broadcast_mul(&x)? - (&x * 3.0)?)?;
            let l = (err.sqr()? * Tensor::from_vec(u, n, dev)?)?.sum_all()?;
            if self.poison.is_some_and(|p| b.contains(&p)) {
                return Ok((l * f64::NAN)?);
            }
            Ok(l)
        }
    }

    fn cfg(batch_size: usize, grad_accum: usize) -> TrainConfig {
        TrainConfig {
            max_steps: 6,
            batch_size,
            grad_accum,
            lr: 0.1,
            grad_clip: 0.0,
            ..TrainConfig::base()
        }
    }

    fn train(m: &mut Toy, c: TrainConfig) -> Result<(Vec<f32>, f32, u64)> {
        let mut t = Trainer::new(m, c)?;
        let mut losses = Vec::new();
        while t.state.step < t.total_steps {
            losses.push(t.step(m, &mut Local)?.loss);
        }
        let w = m.w.flatten_all()?.to_vec1::<f32>()?[0];
        Ok((losses, w, t.state.skipped_steps))
    }

    #[test]
    fn a_step_is_the_same_however_it_is_split() {
        let (l4, w4, _) = train(&mut Toy::new(), cfg(4, 1)).unwrap();
        for (b, a) in [(2, 2), (1, 4)] {
            let (l, w, _) = train(&mut Toy::new(), cfg(b, a)).unwrap();
            for (x, y) in l.iter().zip(&l4) {
                assert!((x - y).abs() <= 1e-6 * y.abs(), "{b}×{a}: {l:?} vs {l4:?}");
            }
            assert!((w - w4).abs() < 1e-6, "{b}×{a}: w {w} vs {w4}");
        }
        // A mean of per-micro-batch means would weigh units differently: not what we do.
        assert!(w4 > 0.2, "w moved towards 3: {w4}");
    }

    /// Ranks as threads of one process: sums through a shared buffer between barriers.
    struct Threads {
        n: usize,
        bar: std::sync::Arc<std::sync::Barrier>,
        buf: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
    }

    impl Threads {
        fn exchange(&self, xs: &mut [f64]) {
            {
                let mut b = self.buf.lock().unwrap();
                b.resize(xs.len(), 0.0);
                b.iter_mut().zip(xs.iter()).for_each(|(a, x)| *a += x);
            }
            self.bar.wait();
            xs.copy_from_slice(&self.buf.lock().unwrap());
            if self.bar.wait().is_leader() {
                self.buf.lock().unwrap().clear();
            }
            self.bar.wait();
        }
    }

    impl Reduce for Threads {
        fn ranks(&self) -> usize {
            self.n
        }
        fn sum(&mut self, xs: &mut [f64]) -> Result<()> {
            self.exchange(xs);
            Ok(())
        }
        fn grads(&mut self, store: &ParamStore, g: &mut Grads) -> Result<()> {
            crate::dist::all_reduce_grads(store, g, 3, &mut |b| {
                let mut x: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                self.exchange(&mut x);
                b.iter_mut().zip(x).for_each(|(v, x)| *v = x as f32);
                Ok(())
            })
        }
    }

    #[test]
    fn ranks_share_a_step_as_one_process_with_their_batches_together() {
        let (l4, w4, _) = train(&mut Toy::new(), cfg(4, 1)).unwrap();
        for (ranks, b, a) in [(2, 2, 1), (2, 1, 2), (4, 1, 1)] {
            let bar = std::sync::Arc::new(std::sync::Barrier::new(ranks));
            let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let outs: Vec<(Vec<f32>, f32)> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..ranks)
                    .map(|r| {
                        let mut red = Threads {
                            n: ranks,
                            bar: bar.clone(),
                            buf: buf.clone(),
                        };
                        sc.spawn(move || {
                            let mut m = Toy::new();
                            let mut t = Trainer::sharded(&m, cfg(b, a), r, ranks).unwrap();
                            let mut losses = Vec::new();
                            while t.state.step < t.total_steps {
                                losses.push(t.step(&mut m, &mut red).unwrap().loss);
                            }
                            (
                                losses,
                                m.w.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0],
                            )
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (l, w) in &outs {
                for (x, y) in l.iter().zip(&l4) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "{ranks}×{b}×{a}: {l:?} vs {l4:?}"
                    );
                }
                assert!((w - w4).abs() < 1e-6, "{ranks}×{b}×{a}: w {w} vs {w4}");
            }
        }
    }

    #[test]
    fn nan_policy_stops_or_skips() {
        let mut m = Toy::new();
        m.poison = Some(7);
        let e = train(&mut m, cfg(4, 1)).unwrap_err().to_string();
        assert!(e.contains("not finite") && e.contains("nan_policy"), "{e}");
        let mut m = Toy::new();
        m.poison = Some(7);
        let skip = TrainConfig {
            nan_policy: NanPolicy::Skip,
            ..cfg(4, 1)
        };
        let (losses, w, skipped) = train(&mut m, skip).unwrap();
        assert!(skipped >= 1, "{losses:?}");
        assert!(
            w.is_finite() && losses.iter().filter(|l| !l.is_finite()).count() as u64 == skipped
        );
    }
}
