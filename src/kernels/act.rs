//! Activations as one pass over memory each way: GELU (tanh form, GPT-2) and SiLU.
//!
//!   gelu(x) = ½x(1 + tanh u),  u = √(2/π)(x + 0.044715x³)
//!   gelu'(x) = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)
//!   silu(x) = x·σ(x),  silu'(x) = σ(x)(1 + x(1 − σ(x)))
//!
//! candle's own `gelu` computes x³ with `powf` and calls `tanhf`; here tanh u = 1 − 2/(e^{2u}+1)
//! (exact in f32 to a few ulps, saturating correctly for large |u|).

use super::{slice, vmath, CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const C: f32 = 0.044_715;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    GeluTanh,
    Silu,
}

#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (vmath::exp(2.0 * u) + 1.0)
}

#[inline(always)]
fn fwd(a: Act, x: f32) -> f32 {
    match a {
        Act::GeluTanh => 0.5 * x * (1.0 + tanh_fast(SQRT_2_OVER_PI * (x + C * x * x * x))),
        Act::Silu => x / (1.0 + vmath::exp(-x)),
    }
}

#[inline(always)]
fn deriv(a: Act, x: f32) -> f32 {
    match a {
        Act::GeluTanh => {
            let t = tanh_fast(SQRT_2_OVER_PI * (x + C * x * x * x));
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * C * x * x)
        }
        Act::Silu => {
            let s = 1.0 / (1.0 + vmath::exp(-x));
            s * (1.0 + x * (1.0 - s))
        }
    }
}

#[inline(always)]
fn fwd_chunk_generic(a: Act, x: &[f32], y: &mut [f32]) {
    match a {
        Act::GeluTanh => y
            .iter_mut()
            .zip(x)
            .for_each(|(y, &x)| *y = fwd(Act::GeluTanh, x)),
        Act::Silu => y
            .iter_mut()
            .zip(x)
            .for_each(|(y, &x)| *y = fwd(Act::Silu, x)),
    }
}

#[inline(always)]
fn bwd_chunk_generic(a: Act, x: &[f32], g: &[f32], d: &mut [f32]) {
    let it = d.iter_mut().zip(x).zip(g);
    match a {
        Act::GeluTanh => it.for_each(|((d, &x), &g)| *d = g * deriv(Act::GeluTanh, x)),
        Act::Silu => it.for_each(|((d, &x), &g)| *d = g * deriv(Act::Silu, x)),
    }
}

vmath::dispatch! {
    fn fwd_chunk(a: Act, x: &[f32], y: &mut [f32]) -> () = fwd_chunk_generic;
}
vmath::dispatch! {
    fn bwd_chunk(a: Act, x: &[f32], g: &[f32], d: &mut [f32]) -> () = bwd_chunk_generic;
}

struct Fwd(Act);
struct Bwd(Act);

impl CustomOp1 for Fwd {
    fn name(&self) -> &'static str {
        "lmforge-act"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        let a = self.0;
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| fwd_chunk(a, x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &Bwd(self.0))?))
    }
}

impl CustomOp2 for Bwd {
    fn name(&self) -> &'static str {
        "lmforge-act-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut dx = vec![0f32; x.len()];
        let a = self.0;
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(d, (x, g))| bwd_chunk(a, x, g, d));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The fused activation of a contiguous f32 CPU tensor (callers check `kernels::fusable`).
pub fn apply(x: &Tensor, a: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Fwd(a))
}
