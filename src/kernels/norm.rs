//! LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the last dimension as
//! one pass each way, rows in parallel.
//!
//!   LayerNorm: x̂ = (x − μ)·r,  r = 1/√(var + ε),  y = x̂·w + b
//!              dx = r·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·w,  dw = Σ dy·x̂,  db = Σ dy
//!   RMSNorm:   x̂ = x·r,  r = 1/√(mean(x²) + ε),  y = x̂·w
//!              dx = r·(g − x̂·mean(g·x̂)),  dw = Σ dy·x̂
//!
//! The composite (eight candle ops for LayerNorm) spends most of its time in candle's
//! single-threaded reductions, above all the column sums for dw and db in the backward. The
//! backward recomputes μ and r from x (one read of x) instead of keeping them.

use super::{rows_per_task, slice, sum_partials, uninit, vmath};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Layer,
    Rms,
}

#[inline(always)]
fn stats(x: &[f32], kind: Kind, eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    match kind {
        Kind::Layer => {
            let mu = vmath::sum_map(x, |v| v) / n;
            let var = vmath::sum_map(x, |v| (v - mu) * (v - mu)) / n;
            (mu, 1.0 / (var + eps).sqrt())
        }
        Kind::Rms => {
            let ms = vmath::sum_map(x, |v| v * v) / n;
            (0.0, 1.0 / (ms + eps).sqrt())
        }
    }
}

/// Normalises the rows of x (each `w.len()` long) into y.
#[inline(always)]
fn forward_rows_generic(
    x: &[f32],
    y: &mut [f32],
    w: &[f32],
    b: Option<&[f32]>,
    kind: Kind,
    eps: f32,
) {
    let c = w.len();
    for (y, x) in y.chunks_mut(c).zip(x.chunks(c)) {
        let (mu, r) = stats(x, kind, eps);
        match b {
            Some(b) => {
                for i in 0..c {
                    y[i] = (x[i] - mu) * r * w[i] + b[i];
                }
            }
            None => {
                for i in 0..c {
                    y[i] = x[i] * r * w[i];
                }
            }
        }
    }
}

vmath::dispatch! {
    fn forward_rows(x: &[f32], y: &mut [f32], w: &[f32], b: Option<&[f32]>, kind: Kind, eps: f32) -> () = forward_rows_generic;
}

fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, kind: Kind, eps: f32) -> Vec<f32> {
    let c = w.len();
    // SAFETY: written in full below before anything reads it.
    let mut y = unsafe { uninit(x.len()) };
    let rows = rows_per_task(c) * c;
    y.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .for_each(|(y, x)| forward_rows(x, y, w, b, kind, eps));
    y
}

/// The backward of the rows of one task: writes dx, adds Σ dy·x̂ (and Σ dy) into `acc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows_generic(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    w: &[f32],
    xh: &mut [f32],
    acc: &mut [f32],
    kind: Kind,
    eps: f32,
) {
    let c = w.len();
    let with_b = matches!(kind, Kind::Layer);
    for (dx, (x, dy)) in dx.chunks_mut(c).zip(x.chunks(c).zip(dy.chunks(c))) {
        let (mu, r) = stats(x, kind, eps);
        for i in 0..c {
            xh[i] = (x[i] - mu) * r;
            acc[i] += dy[i] * xh[i];
        }
        // Σ g and Σ g·x̂ (g = dy·w) in eight lanes each, as `vmath::sum_map`.
        let (mut sg, mut sgx) = ([0f32; 8], [0f32; 8]);
        let n8 = c / 8 * 8;
        for ((dy, w), xh) in dy[..n8]
            .chunks_exact(8)
            .zip(w[..n8].chunks_exact(8))
            .zip(xh[..n8].chunks_exact(8))
        {
            for l in 0..8 {
                let g = dy[l] * w[l];
                sg[l] += g;
                sgx[l] += g * xh[l];
            }
        }
        for i in n8..c {
            let g = dy[i] * w[i];
            sg[0] += g;
            sgx[0] += g * xh[i];
        }
        if with_b {
            for i in 0..c {
                acc[c + i] += dy[i];
            }
        }
        let (sg, sgx) = (sg.iter().sum::<f32>(), sgx.iter().sum::<f32>());
        let (mg, mgx) = (sg / c as f32, sgx / c as f32);
        let mg = if with_b { mg } else { 0.0 };
        for i in 0..c {
            dx[i] = r * (dy[i] * w[i] - mg - xh[i] * mgx);
        }
    }
}

vmath::dispatch! {
    #[allow(clippy::too_many_arguments)]
    fn backward_rows(x: &[f32], dy: &[f32], dx: &mut [f32], w: &[f32], xh: &mut [f32], acc: &mut [f32], kind: Kind, eps: f32) -> () = backward_rows_generic;
}

/// Returns [dx | dw | db] (db only for LayerNorm).
fn backward(x: &[f32], w: &[f32], dy: &[f32], kind: Kind, eps: f32) -> Vec<f32> {
    let c = w.len();
    let with_b = matches!(kind, Kind::Layer);
    let np = if with_b { 2 * c } else { c };
    // SAFETY: written in full below before anything reads it.
    let mut flat = unsafe { uninit(x.len() + np) };
    let (dx, tail) = flat.split_at_mut(x.len());
    // At least 32 rows a task: the partials are kept until summed in order.
    let rows = rows_per_task(c).max(32) * c;
    let parts = dx
        .par_chunks_mut(rows)
        .zip(x.par_chunks(rows).zip(dy.par_chunks(rows)))
        .map(|(dx, (x, dy))| {
            let mut acc = vec![0f32; np];
            let mut xh = vec![0f32; c];
            backward_rows(x, dy, dx, w, &mut xh, &mut acc, kind, eps);
            acc
        });
    tail.copy_from_slice(&sum_partials(parts, np));
    flat
}

/// Runs the backward kernel and splits its flat [dx | dw | db] output.
fn grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    kind: Kind,
    eps: f32,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let flat = x.apply_op3_no_bwd(w, &g.contiguous()?, &Bwd(kind, eps))?;
    let (n, c) = (x.elem_count(), w.elem_count());
    let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
    // dw and db are copied out: as views they would keep the activation-sized dx buffer alive
    // until the optimizer step. (`Tensor::copy` would not do: it clones the whole storage
    // under the view, two activation-sized copies per norm.)
    let own = |at: usize| -> Result<Tensor> {
        Tensor::from_vec(
            flat.narrow(0, at, c)?.to_vec1::<f32>()?,
            w.shape(),
            w.device(),
        )
    };
    let dw = own(n)?;
    let db = match kind {
        Kind::Layer => Some(own(n + c)?),
        Kind::Rms => None,
    };
    Ok((dx, dw, db))
}

/// A gradient only for tensors that take part in autograd: frozen weights get none.
fn keep(t: &Tensor, g: Tensor) -> Option<Tensor> {
    t.track_op().then_some(g)
}

struct LayerFwd(f32);
struct RmsFwd(f32);
struct Bwd(Kind, f32);

impl CustomOp3 for LayerFwd {
    fn name(&self) -> &'static str {
        "lmforge-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let y = forward(x, w, Some(b), Kind::Layer, self.0);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = grads(x, w, g, Kind::Layer, self.0)?;
        Ok((keep(x, dx), keep(w, dw), db.and_then(|db| keep(b, db))))
    }
}

impl CustomOp2 for RmsFwd {
    fn name(&self) -> &'static str {
        "lmforge-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let y = forward(x, w, None, Kind::Rms, self.0);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = grads(x, w, g, Kind::Rms, self.0)?;
        Ok((keep(x, dx), keep(w, dw)))
    }
}

impl CustomOp3 for Bwd {
    fn name(&self) -> &'static str {
        "lmforge-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let out = backward(x, w, dy, self.0, self.1);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Fused LayerNorm over the last dimension (f32 CPU; callers check `kernels::fusable`).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerFwd(eps as f32))
}

/// Fused RMSNorm over the last dimension (f32 CPU; callers check `kernels::fusable`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsFwd(eps as f32))
}
