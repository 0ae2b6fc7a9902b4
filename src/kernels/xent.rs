//! Softmax cross-entropy fused with the logits: log p(target) of each row of (N, V) logits.
//!
//!   lp_i = x_{i,t_i} − lse_i,   lse_i = m_i + log Σ_j e^(x_ij − m_i),   m_i = max_j x_ij
//!   ∂lp_i/∂x_ij = 1[j = t_i] − e^(x_ij − lse_i)
//!
//! Forward reads each row twice (max, Σ exp) and keeps only lse (N floats) for the backward,
//! which writes the gradient in one pass. The composite (`losses::log_softmax` + gather) makes
//! five (N, V) tensors on the way forward and as many again backward: with the llama bench's
//! 4096-token vocabulary that is 32 MiB each per step.

use super::{rows_per_task, slice, uninit, vmath};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

struct Fwd {
    /// lse per row, written by the forward, read by the backward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, n: usize, v: usize) -> Result<&'a [u32]> {
    let CpuStorage::U32(t) = s else {
        bail!("fused cross-entropy: targets must be u32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused cross-entropy: targets must be contiguous");
    };
    let t = &t[a..b];
    if t.len() != n {
        bail!("fused cross-entropy: {} targets for {n} rows", t.len());
    }
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        bail!("fused cross-entropy: target id {bad} is outside the vocabulary of {v}");
    }
    Ok(t)
}

impl CustomOp2 for Fwd {
    fn name(&self) -> &'static str {
        "lmforge-xent"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let x = slice(sx, lx)?;
        let t = targets_of(st, lt, n, v)?;
        let mut lp = vec![0f32; n];
        let mut lse = vec![0f32; n];
        let r = rows_per_task(v);
        lp.par_chunks_mut(r)
            .zip(lse.par_chunks_mut(r))
            .zip(x.par_chunks(r * v).zip(t.par_chunks(r)))
            .for_each(|((lp, lse), (x, t))| {
                for (i, row) in x.chunks_exact(v).enumerate() {
                    let m = vmath::max(row);
                    lse[i] = m + vmath::sum_exp_shift(row, m).ln();
                    lp[i] = row[t[i] as usize] - lse[i];
                }
            });
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))? = Some(Arc::new(lse));
        Ok((CpuStorage::F32(lp), Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _lp: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?
            .clone();
        let Some(lse) = lse else {
            bail!("fused cross-entropy: backward before forward");
        };
        let dx = x.apply_op3_no_bwd(t, &grad.contiguous()?, &Bwd { lse })?;
        Ok((Some(dx), None))
    }
}

struct Bwd {
    lse: Arc<Vec<f32>>,
}

impl CustomOp3 for Bwd {
    fn name(&self) -> &'static str {
        "lmforge-xent-bwd"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = lx.shape().dims2()?;
        let x = slice(sx, lx)?;
        let t = targets_of(st, lt, n, v)?;
        let g = slice(sg, lg)?;
        if g.len() != n || self.lse.len() != n {
            bail!(
                "fused cross-entropy: backward got {} gradients for {n} rows",
                g.len()
            );
        }
        // SAFETY: written in full below before anything reads it.
        let mut dx = unsafe { uninit(n * v) };
        let r = rows_per_task(v);
        dx.par_chunks_mut(r * v)
            .zip(x.par_chunks(r * v))
            .zip(
                t.par_chunks(r)
                    .zip(g.par_chunks(r).zip(self.lse.par_chunks(r))),
            )
            .for_each(|((dx, x), (t, (g, lse)))| {
                for (i, (d, row)) in dx.chunks_exact_mut(v).zip(x.chunks_exact(v)).enumerate() {
                    vmath::scaled_exp(row, d, lse[i], -g[i]);
                    d[t[i] as usize] += g[i];
                }
            });
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }
}

/// log p(target) per position: logits (..., V) f32 on the CPU, targets (...) of ids → (...).
/// Callers check `kernels::fusable(&[logits])`.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(candle_core::D::Minus1)?;
    let n = targets.elem_count();
    let x = logits.reshape((n, v))?.contiguous()?;
    let t = targets
        .to_dtype(candle_core::DType::U32)?
        .flatten_all()?
        .contiguous()?;
    let fwd = Fwd {
        lse: Mutex::new(None),
    };
    x.apply_op2(&t, fwd)?.reshape(targets.shape())
}
