//! Rotary position embedding (Su et al. 2021, RoFormer) in the HF "rotate half" convention as
//! one op with a backward.
//!
//!   forward:  y = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half([x₁, x₂]) = [−x₂, x₁]
//!   backward: dx₁ = g₁ ⊙ cos₁ + g₂ ⊙ sin₂,   dx₂ = g₂ ⊙ cos₂ − g₁ ⊙ sin₁
//!
//! (subscripts 1 and 2: the first and second half of the head dimension). The composite
//! (`model::layers::Rope::rotate`: two narrows, a negation, a concatenation, two broadcast
//! products and an add) makes six activation-sized tensors per call and as many again in the
//! backward, for q and k in every layer. The tables are constants: they get no gradient.

use super::{rows_per_task, slice, uninit, with_slice};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Op {
    /// (1 or B, T, 1, D) contiguous tables.
    cos: Tensor,
    sin: Tensor,
    /// The backward: the transpose of the forward map (rotation by −θ when the two halves of
    /// the tables are equal, as in HF's).
    inverse: bool,
}

impl Op {
    fn run(&self, x: &[f32], (b, t, h, d): (usize, usize, usize, usize)) -> Result<Vec<f32>> {
        let tb = self.cos.dim(0)?;
        if self.cos.dims() != [tb, t, 1, d] || self.sin.dims() != self.cos.dims() {
            bail!(
                "rope: tables {:?} / {:?} do not fit x ({b}, {t}, {h}, {d})",
                self.cos.dims(),
                self.sin.dims()
            );
        }
        if (tb != 1 && tb != b) || d % 2 != 0 {
            bail!("rope: tables for {tb} rows (x has {b}), head size {d} must be even");
        }
        let half = d / 2;
        let row = h * d; // one (b, t) position
        let per_task = rows_per_task(row) * row;
        // SAFETY: written in full below before anything reads it.
        let mut y = unsafe { uninit(x.len()) };
        with_slice(&self.cos, |cos| {
            with_slice(&self.sin, |sin| {
                y.par_chunks_mut(per_task.max(1))
                    .zip(x.par_chunks(per_task.max(1)))
                    .enumerate()
                    .for_each(|(c, (ys, xs))| {
                        let first = c * per_task / row.max(1);
                        for (p, (yr, xr)) in ys.chunks_mut(row).zip(xs.chunks(row)).enumerate() {
                            let pos = first + p; // b·T + t
                            let ti = if tb == 1 { pos % t } else { pos };
                            let (c, s) = (&cos[ti * d..ti * d + d], &sin[ti * d..ti * d + d]);
                            for (yh, xh) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                                let (y1, y2) = yh.split_at_mut(half);
                                let (x1, x2) = xh.split_at(half);
                                if self.inverse {
                                    for j in 0..half {
                                        y1[j] = x1[j] * c[j] + x2[j] * s[half + j];
                                        y2[j] = x2[j] * c[half + j] - x1[j] * s[j];
                                    }
                                } else {
                                    for j in 0..half {
                                        y1[j] = x1[j] * c[j] - x2[j] * s[j];
                                        y2[j] = x2[j] * c[half + j] + x1[j] * s[half + j];
                                    }
                                }
                            }
                        }
                    });
                Ok(())
            })
        })?;
        Ok(y)
    }
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "lmforge-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.run(slice(s, l)?, l.shape().dims4()?)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Op {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// x (B, T, H, D) rotated by tables (1 or B, T, 1, D); f32 on the CPU (callers check
/// `kernels::fusable`). Returns a contiguous tensor.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Op {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: false,
    })
}
