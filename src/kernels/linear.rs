//! The linear map `y = x·Wᵀ` (weight stored (out, in), HF `nn.Linear`) or `y = x·W` (stored
//! (in, out), GPT-2's `Conv1D`) as one op whose backward knows which weights are frozen.
//!
//!   forward:  y = x·Wᵀ                 (a streaming GEMV when x has ≤ 16 rows, else GEMM)
//!   backward: dx = dy·W,  dW = dyᵀ·x   (dW only when W is trained)
//!
//! candle's own matmul backward always computes both products, so a frozen base weight under
//! LoRA or a reference model would still pay a weight-gradient GEMM per layer (a third of the
//! training FLOPs) only for it to be discarded. Here the backward asks whether W is tracked.
//!
//! Decoding is bound by reading the weights once per token; a blocked GEMM packs panels of W
//! before using them, which for m = 1 doubles the memory traffic (measured: SmolLM2-135M decode
//! at 20 tok/s through candle's matmul, 32 tok/s here). The GEMV reads every weight row once,
//! straight from where it lies, and dots it with all m input rows while it is in L1.

use super::{slice, sum_partials, CHUNK};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Largest number of input rows routed here; above it a blocked GEMM wins.
pub const MAX_ROWS: usize = 16;

/// How the weight is stored: `torch.nn.Linear` keeps (out, in), GPT-2's `Conv1D` keeps
/// (in, out). Weights stay in the file's orientation, so saving needs no transposes and the
/// products read the transpose through strides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    OutIn,
    InOut,
}

struct Op(WeightLayout);

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // 16 independent lanes: the compiler keeps them in vector registers (no reassociation
    // needed), and the remainder is summed scalar.
    let mut acc = [0f32; 16];
    let n = a.len() / 16 * 16;
    for (ca, cb) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

/// Rows `j0..j0 + out.len() / m` of the output, written transposed as out[(j - j0) * m + i].
#[inline(always)]
fn block_generic(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) {
    for (jj, o) in out.chunks_mut(m).enumerate() {
        let row = &w[(j0 + jj) * k..(j0 + jj + 1) * k];
        for (i, o) in o.iter_mut().enumerate() {
            *o = dot(&x[i * k..(i + 1) * k], row);
        }
    }
}

super::vmath::dispatch! {
    fn block(x: &[f32], w: &[f32], k: usize, m: usize, j0: usize, out: &mut [f32]) -> () = block_generic;
}

/// y (m, n) = x (m, k) · wᵀ for w (n, k), parallel over blocks of weight rows.
fn gemv(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    // Blocks are stored j-major and transposed into (m, n) afterwards (m·n floats, negligible
    // next to reading W).
    let rows_per_task = (CHUNK / k.max(1)).clamp(8, 256);
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(c, out)| block(x, w, k, m, c * rows_per_task, out));
    if m == 1 {
        return t;
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = t[j * m + i];
        }
    }
    y
}

impl CustomOp2 for Op {
    fn name(&self) -> &'static str {
        "lmforge-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = match self.0 {
            WeightLayout::OutIn => l2.shape().dims2()?,
            WeightLayout::InOut => {
                let (i, o) = l2.shape().dims2()?;
                (o, i)
            }
        };
        if k != k2 {
            candle_core::bail!("linear: x is (_, {k}) but the weight takes {k2} inputs");
        }
        if m <= MAX_ROWS && self.0 == WeightLayout::OutIn {
            return Ok((CpuStorage::F32(gemv(x, w, m, k, n)), Shape::from((m, n))));
        }
        // candle's CPU GEMM (the `gemm` crate) on Wᵀ as a strided view: measured at 170–186
        // GFLOP/s on the bench model's shapes on the 2-core dev machine, as fast as PyTorch's.
        let wt = match self.0 {
            WeightLayout::OutIn => l2.transpose(0, 1)?,
            WeightLayout::InOut => l2.clone(),
        };
        s1.matmul(s2, (1, m, n, k), l1, &wt)
            .map(|y| (y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // (m, n) -> dx (m, k); dW in the weight's own layout, only for a trained weight.
        let dx = match (x.track_op(), self.0) {
            (false, _) => None,
            (true, WeightLayout::OutIn) => Some(g.matmul(w)?),
            (true, WeightLayout::InOut) => Some(g.matmul(&w.t()?)?),
        };
        let dw = match (w.track_op(), self.0) {
            (false, _) => None,
            (true, WeightLayout::OutIn) => Some(g.t()?.matmul(x)?),
            (true, WeightLayout::InOut) => Some(x.t()?.matmul(g)?),
        };
        Ok((dx, dw))
    }
}

/// `x (m, k)` times the weight (see [`WeightLayout`]); both f32 on the CPU (callers check
/// `kernels::fusable`), `w` contiguous.
pub fn linear(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, Op(layout))
}

/// `y + b` for y (m, n) and a bias b (n): the backward's column sum of dy (db) runs in
/// parallel over row blocks, where candle's broadcast backward reduces over the rows on one
/// thread with a strided walk.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "lmforge-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, b) = (slice(s1, l1)?, slice(s2, l2)?);
        let n = b.len();
        let mut out = y.to_vec();
        let rows = (CHUNK / n.max(1)).max(1) * n;
        out.par_chunks_mut(rows).for_each(|o| {
            for r in o.chunks_mut(n) {
                r.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = if b.track_op() {
            Some(
                g.contiguous()?
                    .apply_op1_no_bwd(&ColumnSum(b.elem_count()))?,
            )
        } else {
            None
        };
        Ok((y.track_op().then(|| g.clone()), db))
    }
}

struct ColumnSum(usize);

impl candle_core::CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "lmforge-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, n) = (slice(s, l)?, self.0);
        let rows = (CHUNK / n.max(1)).max(1) * n;
        let parts = g.par_chunks(rows).map(|g| {
            let mut acc = vec![0f32; n];
            for r in g.chunks(n) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            acc
        });
        let sum = sum_partials(parts, n);
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

/// `y (m, n) + b (n)` broadcast over rows, both contiguous f32 on the CPU.
pub fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}
