//! AdamW's update in place: three streaming passes per parameter (m, v, θ) and no temporaries,
//! instead of a dozen allocating tensor ops. Same formula as `train::optim`:
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ(1 − ηλ) − η·(m/bc₁)/(√(v/bc₂) + ε)

use super::{slice, CHUNK};
use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

fn dst_slice<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("fused AdamW: expected f32 storage");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused AdamW: expected a contiguous tensor");
    };
    Ok(&mut v[a..b])
}

/// x ← a·x + b·f(g) with f = identity or square.
struct Ema {
    a: f32,
    b: f32,
    square: bool,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "lmforge-adamw-moment"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let x = dst_slice(dst, dl)?;
        let g = slice(s2, l2)?;
        if x.len() != g.len() {
            bail!(
                "fused AdamW: gradient has {} elements, moment {}",
                g.len(),
                x.len()
            );
        }
        let (a, b, sq) = (self.a, self.b, self.square);
        x.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(x, g)| {
                for (x, &g) in x.iter_mut().zip(g) {
                    *x = a * *x + b * if sq { g * g } else { g };
                }
            });
        Ok(())
    }
}

struct Update {
    decay: f32,
    lr: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "lmforge-adamw-update"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let th = dst_slice(dst, dl)?;
        let m = slice(s2, l2)?;
        let v = slice(s3, l3)?;
        if th.len() != m.len() || th.len() != v.len() {
            bail!("fused AdamW: parameter and moments differ in size");
        }
        let Update {
            decay,
            lr,
            bc1,
            bc2,
            eps,
        } = *self;
        th.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(th, (m, v))| {
                for ((t, &m), &v) in th.iter_mut().zip(m).zip(v) {
                    *t = *t * decay - lr * (m / bc1) / ((v / bc2).sqrt() + eps);
                }
            });
        Ok(())
    }
}

/// One AdamW step for one parameter, in place (all contiguous f32 CPU tensors).
#[allow(clippy::too_many_arguments)]
pub fn step(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    (beta1, beta2, eps): (f64, f64, f64),
    lr: f64,
    decay: f64,
    (bc1, bc2): (f64, f64),
) -> Result<()> {
    let g = g.contiguous()?;
    m.inplace_op2(
        &g,
        &Ema {
            a: beta1 as f32,
            b: (1.0 - beta1) as f32,
            square: false,
        },
    )?;
    v.inplace_op2(
        &g,
        &Ema {
            a: beta2 as f32,
            b: (1.0 - beta2) as f32,
            square: true,
        },
    )?;
    theta.inplace_op3(
        m,
        v,
        &Update {
            decay: decay as f32,
            lr: lr as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
            eps: eps as f32,
        },
    )
}
