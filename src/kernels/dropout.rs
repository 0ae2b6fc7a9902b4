//! Inverted dropout whose mask is never stored: it is a pure function of (key, element index),
//! so the backward regenerates it. A stored f32 mask costs one more activation-sized tensor per
//! call (measured on SmolLM2-135M with LoRA on every linear layer: +1.2 GiB of 3.6 GiB peak).
//!
//!   y = x ⊙ m / (1 − p),   m_i ~ Bernoulli(1 − p) from SplitMix64 keyed by (key, i)

use super::{map1, slice, CHUNK};
use crate::rng::Rng;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[derive(Clone, Copy)]
struct Op {
    p: f32,
    key: u64,
}

impl Op {
    /// Applies the mask of elements [start, start + x.len()) to x (scaled), writing y.
    fn apply(&self, start: usize, x: &[f32], y: &mut [f32]) {
        let keep = 1.0 / (1.0 - self.p);
        let mut r = Rng::keyed(&[self.key, (start / CHUNK) as u64]);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = if (r.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32) < self.p {
                0.0
            } else {
                x * keep
            };
        }
    }

    fn run(&self, x: &[f32]) -> Vec<f32> {
        // SAFETY: apply writes every element of its y.
        unsafe { map1(x, |start, x, y| self.apply(start, x, y)) }
    }
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        "lmforge-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.run(slice(s, l)?)), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // d(x ⊙ m·s)/dx = m·s: the same mask applied to the incoming gradient.
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// The dropped-out copy of a slice: the values `dropout(x, p, key)` returns.
pub(crate) fn masked(x: &[f32], p: f32, key: u64) -> Vec<f32> {
    Op { p, key }.run(x)
}

/// Dropout with probability `p` of a contiguous f32 CPU tensor (callers check `fusable`).
pub fn dropout(x: &Tensor, p: f32, key: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Op { p, key })
}
