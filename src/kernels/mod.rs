//! Fused CPU kernels written as candle custom ops with a backward (and `qgemv`, decoding from
//! GGUF blocks: forward only, tested against the dequantized weights in `tests/interop.rs`).
//!
//! Each op here has a composite reference in `model::layers` / `losses` built from candle ops;
//! `tests/kernels.rs` compares forward and gradients of the two on random shapes and
//! finite-difference checks the fused backward. The fused path is taken only for contiguous f32
//! tensors on the CPU; anything else (CUDA, other dtypes) runs the composite, so the `cuda`
//! feature keeps working without CUDA kernels.
//!
//! Why these ops and not GEMM: measured on the gpt2 bench config, candle's GEMM was ~30% of a
//! training step; the rest was element-wise passes (GELU's `powf`/`tanhf` alone ~13%),
//! allocation page faults, the materialised attention matrices and per-op AdamW temporaries.

pub mod act;
pub mod adamw;
pub mod attention;
pub mod dropout;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod qgemv;
pub mod qlinear;
pub mod rope;
pub mod vmath;
pub mod xent;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// Switch for the fused kernels (`LMFORGE_FUSED=0` runs the composites, for A/B measurements).
pub fn enabled() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMFORGE_FUSED").map_or(true, |v| v != "0"))
}

/// True when `ts` can go through a fused CPU kernel.
pub fn fusable(ts: &[&Tensor]) -> bool {
    enabled()
        && ts
            .iter()
            .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// The f32 slice of a contiguous CPU tensor argument.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused kernel: expected f32 storage");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused kernel: expected a contiguous tensor");
    };
    Ok(&v[a..b])
}

/// Runs `f` on the f32 slice of a contiguous CPU tensor (a tensor an op holds, not an argument).
pub(crate) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cs) = &*s else {
        candle_core::bail!("fused kernel: expected a CPU tensor");
    };
    f(slice(cs, l)?)
}

/// Element-wise sum of per-task partial vectors of length `n` (column sums, dw/db), added in
/// task order. The tasks are fixed-size chunks, so the result is bit-identical whatever the
/// thread count or scheduling; rayon's `reduce` combines partials in whatever tree work
/// stealing produced, which made two runs with the same seed diverge after a few steps.
pub(crate) fn sum_partials(
    parts: impl rayon::iter::IndexedParallelIterator<Item = Vec<f32>>,
    n: usize,
) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = parts.collect();
    let mut acc = vec![0f32; n];
    for p in &parts {
        acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    acc
}

/// Elements per rayon task for element-wise work: large enough to amortise scheduling.
pub(crate) const CHUNK: usize = 1 << 14;

/// Rows of `row_len` elements per rayon task: about `CHUNK` elements, at least one row.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (CHUNK / row_len.max(1)).max(1)
}

/// `n` floats for an output that the caller writes in full before anything reads it.
///
/// `vec![0f32; n]` is `calloc`, and since `tune_allocator` keeps freed memory, that is a
/// `memset` on the calling thread while the other core waits (measured on the gpt2 bench: ~2%
/// of a step on one thread before the parallel kernels start). candle's CPU backend allocates
/// its own outputs this way (`alloc_uninit`).
///
/// # Safety
/// Every element must be written before any is read (f32 has no invalid bit patterns; the
/// contents are unspecified, not a valid value, until then).
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the caller's contract.
    unsafe { v.set_len(n) };
    v
}

/// `y = f(x)` element-wise in parallel, `CHUNK` elements per task: `f(start, x, y)` gets the
/// offset of its chunk, its piece of x and the matching piece of y.
///
/// # Safety
/// `f` must write every element of its `y` (the output is `uninit`).
pub(crate) unsafe fn map1(
    x: &[f32],
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    use rayon::prelude::*;
    // SAFETY: the caller's contract; the chunks of y cover it.
    let mut y = unsafe { uninit(x.len()) };
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (y, x))| f(c * CHUNK, x, y));
    y
}

/// `y = f(a, b)` element-wise in parallel over two inputs of one length, `CHUNK` per task.
///
/// # Safety
/// `f` must write every element of its `y` (the output is `uninit`).
pub(crate) unsafe fn map2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync + Send,
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    if a.len() != b.len() {
        candle_core::bail!("element-wise op: {} vs {} elements", a.len(), b.len());
    }
    // SAFETY: the caller's contract; the chunks of y cover it (a and b are as long as y).
    let mut y = unsafe { uninit(a.len()) };
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| f(a, b, y));
    Ok(y)
}

/// Makes glibc's malloc keep freed memory instead of returning it to the kernel after every
/// large tensor: without this each op's output is fresh `mmap`ed pages that the kernel must
/// zero (measured: ~15% of a training step in page faults and `clear_page`).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; called before any threads.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Gives candle's own CPU thread pool no threads unless `CANDLE_NUM_THREADS` says otherwise.
/// candle 0.11 runs its element-wise ops on a pool whose workers spin after every op, beside
/// rayon's threads that run GEMM and the fused kernels; on the 2-core machine that spinning
/// cost more than the ops it parallelised (gpt2 bench: median +2% tokens/s over 8 paired runs).
/// The vendored candle runs those ops on rayon's pool instead (`vendor/README.md`); its own
/// pool is left to callers of `BarrierPool::execute` (AArch64 quantized kernels).
/// Call before any candle op, while the process has one thread.
pub fn quiet_candle_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    /// The partials of fixed chunks, summed under pools of 1–4 threads, many times: always the
    /// in-order sum, bit for bit (floats of very different sizes, so any other association shows).
    #[test]
    fn partial_sums_do_not_depend_on_threads() {
        let n = 7;
        let data: Vec<f32> = (0..64 * n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 10f32.powi((i % 9) as i32 - 4))
            .collect();
        let want = {
            let mut acc = vec![0f32; n];
            for chunk in data.chunks(4 * n) {
                let mut p = vec![0f32; n];
                chunk
                    .chunks(n)
                    .for_each(|r| p.iter_mut().zip(r).for_each(|(a, v)| *a += v));
                acc.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
            }
            acc
        };
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..20 {
                let got = pool.install(|| {
                    let parts = data.par_chunks(4 * n).map(|c| {
                        let mut p = vec![0f32; n];
                        c.chunks(n)
                            .for_each(|r| p.iter_mut().zip(r).for_each(|(a, v)| *a += v));
                        p
                    });
                    super::sum_partials(parts, n)
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{threads} threads");
            }
        }
    }
}
