//! Data parallelism across processes (PyTorch DDP's model, on MPI): `mpirun -np N lmforge sft …`
//! starts N ranks; each computes the gradients of its share of every step's examples, and the
//! training engine sums them over the ranks before clipping and the optimizer step:
//!
//!   step s, rank r:  draws s·P + r·(b·a) … s·P + (r+1)·(b·a) − 1     (P = N·b·a, global order)
//!                    N_s ← Σ_ranks units;   g ← Σ_ranks ∇(Σ_r loss / N_s)   (bucketed all-reduce)
//!                    clip, AdamW: the same update on every rank
//!
//! so N ranks × batch b is the step of one process with batch N·b (the same examples, the same
//! sum over units; only the order of the floating-point additions differs), and `--resume` with
//! another N re-shards the same global order. Rank 0 writes the run (checkpoints, metrics,
//! outputs); the others write only `RUN/logs/rank-R.log`. Weights are compared across ranks by
//! checksum at the start, at checkpoints and every `train.dist_check_every` steps, the options
//! at the start.
//!
//! A rank that fails calls `MPI_Abort`, and `mpirun` ends the others (a killed rank: mpirun
//! names it); nobody waits on a dead peer. Without `mpirun` nothing here runs and no MPI
//! library is loaded (`mpi.rs`).
//!
//! Deviation from DDP: candle's backward has no per-parameter hooks, so the all-reduce cannot
//! start while the backward still runs; it starts right after (see docs/distributed.md for what
//! the overlap would buy).

pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;

use crate::model::{Grads, ParamStore};
use crate::train::engine::Reduce;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// This process's place among the ranks.
pub struct World {
    pub rank: usize,
    pub size: usize,
    mpi: Option<mpi::Mpi>,
}

static WORLD: OnceLock<World> = OnceLock::new();
/// Rank 0 has let the others go (`release_others`), or a rank > 0 has waited (`wait_for_main`):
/// each side passes that barrier once.
static PASSED: AtomicBool = AtomicBool::new(false);

fn lone() -> World {
    World {
        rank: 0,
        size: 1,
        mpi: None,
    }
}

/// Joins the ranks when started by `mpirun` (`OMPI_COMM_WORLD_SIZE` > 1); a lone process
/// otherwise. Called once, first thing.
pub fn init() -> Result<&'static World> {
    let size = |var: &str| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let w = match (size("OMPI_COMM_WORLD_SIZE"), size("PMI_SIZE")) {
        (Some(n), _) if n > 1 => {
            let m = mpi::Mpi::open()?;
            if m.size != n {
                bail!(
                    "OMPI_COMM_WORLD_SIZE is {n} but MPI reports {} ranks",
                    m.size
                );
            }
            World {
                rank: m.rank,
                size: m.size,
                mpi: Some(m),
            }
        }
        (None, Some(n)) if n > 1 => bail!(
            "started by an MPI launcher other than Open MPI's mpirun (PMI_SIZE={n}); lmforge \
             speaks Open MPI's ABI: launch it with Open MPI's mpirun"
        ),
        _ => lone(),
    };
    if WORLD.set(w).is_err() {
        bail!("internal error: dist::init after the world was in use");
    }
    Ok(world())
}

/// The world this process joined (a lone process before `init`).
pub fn world() -> &'static World {
    WORLD.get_or_init(lone)
}

impl World {
    /// Rank 0: the one that writes the run.
    pub fn writes(&self) -> bool {
        self.rank == 0
    }

    /// The engine's reducer for this world: NCCL when the weights are on a CUDA device (the
    /// `cuda` feature), MPI otherwise, nothing for a lone process.
    pub fn reducer(
        &'static self,
        bucket_mb: f64,
        dev: &candle_core::Device,
    ) -> Result<Box<dyn Reduce>> {
        match &self.mpi {
            Some(m) => Ok(Box::new(Ranks::new(m, bucket_mb, dev)?)),
            None => Ok(Box::new(crate::train::engine::Local)),
        }
    }

    /// On an error: ends the whole job (a lone process just returns).
    pub fn abort_job(&self, code: i32) {
        if let Some(m) = &self.mpi {
            m.abort(code);
        }
    }

    /// After a successful command: the "rank 0 first" barrier if the command never reached
    /// it (every rank takes the same path, so each side passes it once), then MPI_Finalize.
    pub fn finish(&self) -> Result<()> {
        match &self.mpi {
            Some(m) => {
                match self.rank {
                    0 => release_others()?,
                    _ => wait_for_main()?,
                }
                m.finalize()
            }
            None => Ok(()),
        }
    }
}

/// "Rank 0 first" (transformers' `main_process_first`): ranks > 0 wait here until rank 0 has
/// prepared the run directory (claimed it, trained the tokenizer, cached the tokens), then read
/// what it wrote instead of writing it again.
pub fn wait_for_main() -> Result<()> {
    let w = world();
    match &w.mpi {
        Some(m) if w.rank > 0 && !PASSED.swap(true, Ordering::SeqCst) => {
            m.barrier().context("waiting for rank 0")
        }
        _ => Ok(()),
    }
}

/// Rank 0's side of `wait_for_main`: once, when its preparation is done (the engine's start, or
/// the end of the command, whichever comes first).
pub fn release_others() -> Result<()> {
    let w = world();
    match &w.mpi {
        Some(m) if w.rank == 0 && !PASSED.swap(true, Ordering::SeqCst) => {
            m.barrier().context("releasing ranks > 0")
        }
        _ => Ok(()),
    }
}

/// Ranks > 0 send what they print to `RUN/logs/rank-R.log` (stdout and stderr redirected, so
/// errors and progress land there too), headed by the rank, the process id and the host.
pub fn log_to_file(run_dir: &std::path::Path) -> Result<()> {
    let w = world();
    if w.rank == 0 || w.mpi.is_none() {
        return Ok(());
    }
    use std::os::fd::AsRawFd;
    let dir = run_dir.join("logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("rank-{}.log", w.rank));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    extern "C" {
        fn dup2(old: i32, new: i32) -> i32;
    }
    for fd in [1, 2] {
        // SAFETY: both descriptors are open; fd 1 or 2 now writes to the log file.
        if unsafe { dup2(f.as_raw_fd(), fd) } < 0 {
            bail!("redirecting output to {}", path.display());
        }
    }
    eprintln!(
        "rank {} of {}, pid {}, host {}",
        w.rank,
        w.size,
        std::process::id(),
        crate::fsutil::hostname()
    );
    Ok(())
}

/// FNV-1a over the bytes of every trainable parameter, in order: equal on every rank as long as
/// their weights are bit-identical.
pub fn checksum(store: &ParamStore) -> Result<u64> {
    let mut h = crate::rng::Fnv1a::new();
    for (_, t) in store.trainable_tensors() {
        for x in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            h.bytes(&x.to_le_bytes());
        }
    }
    Ok(h.finish())
}

/// The reducer of several ranks: small sums in one MPI call, gradients in buckets of `bucket`
/// numbers — through MPI on the host, or NCCL on the GPUs when the weights are there.
pub struct Ranks {
    mpi: &'static mpi::Mpi,
    bucket: usize,
    /// Seconds spent in gradient all-reduces since the last `take_comm`, and of those in MPI.
    comm_s: f64,
    mpi_s: f64,
    #[cfg(feature = "cuda")]
    nccl: Option<nccl::Nccl>,
}

impl Ranks {
    /// Over `mpi`'s ranks; NCCL carries the gradients when `dev` is a CUDA device.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn new(mpi: &'static mpi::Mpi, bucket_mb: f64, dev: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            mpi,
            bucket: ((bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1),
            comm_s: 0.0,
            mpi_s: 0.0,
            #[cfg(feature = "cuda")]
            nccl: match dev.is_cuda() {
                true => Some(nccl::Nccl::new(mpi, dev)?),
                false => None,
            },
        })
    }
}

impl Reduce for Ranks {
    fn ranks(&self) -> usize {
        self.mpi.size
    }

    fn sum(&mut self, xs: &mut [f64]) -> Result<()> {
        self.mpi.sum_f64(xs)
    }

    fn grads(&mut self, store: &ParamStore, g: &mut Grads) -> Result<()> {
        let t0 = Instant::now();
        #[cfg(feature = "cuda")]
        if let Some(n) = &self.nccl {
            n.all_reduce_grads(store, g, self.bucket)?;
            self.comm_s += t0.elapsed().as_secs_f64();
            return Ok(());
        }
        let (mpi, mpi_s) = (self.mpi, &mut self.mpi_s);
        all_reduce_grads(store, g, self.bucket, &mut |buf| {
            let t = Instant::now();
            let r = mpi.sum_f32(buf);
            *mpi_s += t.elapsed().as_secs_f64();
            r
        })?;
        self.comm_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn same(&mut self, what: &str, x: u64) -> Result<()> {
        same_on_all(self.mpi, what, x)
    }

    fn take_comm(&mut self) -> (f64, f64) {
        let c = std::mem::take(&mut self.comm_s);
        let m = std::mem::take(&mut self.mpi_s);
        // NCCL's calls are not timed apart (they are asynchronous on the stream).
        (c, if m > 0.0 { m } else { c })
    }
}

/// Fails on every rank, listing each rank's value, unless `x` is the same on all.
fn same_on_all(mpi: &mpi::Mpi, what: &str, x: u64) -> Result<()> {
    let (r, n) = (mpi.rank, mpi.size);
    let mut all = vec![0u64; n];
    all[r] = x;
    mpi.sum_u64(&mut all)?;
    if all.iter().any(|&v| v != all[0]) {
        let list: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(r, v)| format!("rank {r}: {v:016x}"))
            .collect();
        bail!(
            "the ranks' {what} differ ({}): they are not training one model (started from \
                 different weights or options, or diverged); stopping (the last checkpoint is \
                 rank 0's)",
            list.join(", ")
        );
    }
    Ok(())
}

/// Consecutive trainable parameters (indices into the store, whose order is the same on every
/// rank) in buckets of at most `bucket` numbers (a larger parameter is a bucket of its own).
pub fn buckets(store: &ParamStore, bucket: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut n = 0;
    for (i, p) in store
        .params()
        .iter()
        .enumerate()
        .filter(|(_, p)| p.trainable)
    {
        let k = p.var.elem_count();
        match out.last_mut() {
            Some(b) if n + k <= bucket => b.push(i),
            _ => {
                out.push(vec![i]);
                n = 0;
            }
        }
        n += k;
    }
    out
}

/// Sums every trainable parameter's gradient over the ranks through `sum` (which reduces a
/// host buffer in place), bucket by bucket (`buckets`); a rank without a gradient for a
/// parameter (no units this step) contributes zeros.
pub fn all_reduce_grads(
    store: &ParamStore,
    g: &mut Grads,
    bucket: usize,
    sum: &mut dyn FnMut(&mut [f32]) -> Result<()>,
) -> Result<()> {
    let params = store.params();
    for b in buckets(store, bucket) {
        let n: usize = b.iter().map(|&i| params[i].var.elem_count()).sum();
        let mut buf: Vec<f32> = Vec::with_capacity(n);
        for &i in &b {
            match g.0[i].take() {
                // Stored gradients are contiguous (vendor/README.md): copied once, in place.
                Some(t) if t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() => {
                    crate::kernels::with_slice(&t, |v| {
                        buf.extend_from_slice(v);
                        Ok(())
                    })?
                }
                Some(t) => buf.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => buf.resize(buf.len() + params[i].var.elem_count(), 0.0),
            }
        }
        sum(&mut buf)?;
        // The summed bucket becomes one tensor without a copy; the gradients are views of it
        // (contiguous, never written in place: vendor/README.md).
        let flat = Tensor::from_vec(buf, n, &candle_core::Device::Cpu)?;
        let mut off = 0;
        for &i in &b {
            let v = &params[i].var;
            let k = v.elem_count();
            let t = flat.narrow(0, off, k)?.reshape(v.shape())?;
            g.0[i] = Some(t.to_device(v.device())?.to_dtype(v.dtype())?);
            off += k;
        }
    }
    Ok(())
}
