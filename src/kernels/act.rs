//! Activations as one pass over memory each way: GELU (tanh form, GPT-2) and SiLU, and the
//! gated form of the Llama MLP (SwiGLU, Shazeer 2020) as one op.
//!
//!   gelu(x) = ½x(1 + tanh u),  u = √(2/π)(x + 0.044715x³)
//!   gelu'(x) = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)
//!   silu(x) = x·σ(x),  silu'(x) = σ(x)(1 + x(1 − σ(x)))
//!   gated:  y = act(a) ⊙ b,  da = g ⊙ b ⊙ act'(a),  db = g ⊙ act(a)
//!
//! The gated op replaces an activation and a product (two activation-sized outputs, and in
//! the backward two products and the activation's derivative: three passes) by one pass each
//! way.
//! candle's own `gelu` computes x³ with `powf` and calls `tanhf`; here tanh u = 1 − 2/(e^{2u}+1)
//! (exact in f32 to a few ulps, saturating correctly for large |u|).

use super::{map1, map2, slice, uninit, vmath, CHUNK};
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

#[inline(always)]
fn gated_fwd_generic(a: Act, x: &[f32], u: &[f32], y: &mut [f32]) {
    let it = y.iter_mut().zip(x).zip(u);
    match a {
        Act::GeluTanh => it.for_each(|((y, &x), &u)| *y = fwd(Act::GeluTanh, x) * u),
        Act::Silu => it.for_each(|((y, &x), &u)| *y = fwd(Act::Silu, x) * u),
    }
}

#[inline(always)]
fn gated_bwd_generic(a: Act, x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) {
    let it = dx.iter_mut().zip(du.iter_mut()).zip(x.iter().zip(u).zip(g));
    match a {
        Act::GeluTanh => it.for_each(|((dx, du), ((&x, &u), &g))| {
            *dx = g * u * deriv(Act::GeluTanh, x);
            *du = g * fwd(Act::GeluTanh, x);
        }),
        Act::Silu => it.for_each(|((dx, du), ((&x, &u), &g))| {
            // σ once for both: silu = xσ, silu' = σ(1 + x(1 − σ)).
            let s = 1.0 / (1.0 + vmath::exp(-x));
            *dx = g * u * s * (1.0 + x * (1.0 - s));
            *du = g * x * s;
        }),
    }
}

vmath::dispatch! {
    fn fwd_chunk(a: Act, x: &[f32], y: &mut [f32]) -> () = fwd_chunk_generic;
}
vmath::dispatch! {
    fn gated_fwd(a: Act, x: &[f32], u: &[f32], y: &mut [f32]) -> () = gated_fwd_generic;
}
vmath::dispatch! {
    fn gated_bwd(a: Act, x: &[f32], u: &[f32], g: &[f32], dx: &mut [f32], du: &mut [f32]) -> () = gated_bwd_generic;
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
        let a = self.0;
        // SAFETY: fwd_chunk writes every element of its y.
        let y = unsafe { map1(slice(s, l)?, |_, x, y| fwd_chunk(a, x, y)) };
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
        let a = self.0;
        // SAFETY: bwd_chunk writes every element of its d.
        let dx = unsafe {
            map2(slice(s1, l1)?, slice(s2, l2)?, |x, g, d| {
                bwd_chunk(a, x, g, d)
            })?
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The fused activation of a contiguous f32 CPU tensor (callers check `kernels::fusable`).
pub fn apply(x: &Tensor, a: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Fwd(a))
}

struct Gated(Act);
struct GatedBwd(Act);

fn same_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        candle_core::bail!("gated activation: {} vs {} elements", a.len(), b.len());
    }
    Ok(())
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "lmforge-gated-act"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = self.0;
        // SAFETY: gated_fwd writes every element of its y.
        let y = unsafe {
            map2(slice(s1, l1)?, slice(s2, l2)?, |x, u, y| {
                gated_fwd(a, x, u, y)
            })?
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let flat = x.apply_op3_no_bwd(u, &g.contiguous()?, &GatedBwd(self.0))?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let du = flat.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dx), Some(du)))
    }
}

impl candle_core::CustomOp3 for GatedBwd {
    fn name(&self) -> &'static str {
        "lmforge-gated-act-bwd"
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
        let (x, u, g) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        same_len(x, u)?;
        same_len(x, g)?;
        let n = x.len();
        // [dx | du]: both go to their projections' backward right away, so sharing one
        // buffer keeps nothing alive longer.
        // SAFETY: written in full below before anything reads it.
        let mut flat = unsafe { uninit(2 * n) };
        let (dx, du) = flat.split_at_mut(n);
        let a = self.0;
        dx.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(
                x.par_chunks(CHUNK)
                    .zip(u.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((dx, du), ((x, u), g))| gated_bwd(a, x, u, g, dx, du));
        Ok((CpuStorage::F32(flat), Shape::from(2 * n)))
    }
}

/// `act(x) ⊙ u` for contiguous f32 CPU tensors of one shape (callers check `kernels::fusable`).
pub fn gated(x: &Tensor, u: &Tensor, a: Act) -> Result<Tensor> {
    if x.shape() != u.shape() {
        candle_core::bail!("gated activation: {:?} vs {:?}", x.shape(), u.shape());
    }
    x.contiguous()?.apply_op2(&u.contiguous()?, Gated(a))
}
