//! The residual connection `y = x + f(x)` as one parallel pass.
//!
//!   forward:  y = a + b      backward: da = dy,  db = dy
//!
//! candle's add runs on its own element-wise pool, which lmforge keeps at one thread (see
//! `quiet_candle_pool`), so the two residual adds per block summed activation-sized tensors on
//! one core while the other waited (measured on the gpt2 bench: ~0.7% of a step, serial).
//! The composite reference is candle's `add`.

use super::{map2, slice};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "lmforge-residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("residual add: {:?} + {:?}", l1.shape(), l2.shape());
        }
        let add = |a: &[f32], b: &[f32], y: &mut [f32]| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        };
        // SAFETY: the pieces of a, b and y are of one length, so `add` writes all of y.
        let y = unsafe { map2(slice(s1, l1)?, slice(s2, l2)?, add)? };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The same tensor for both sides: gradients are never mutated in place.
        Ok((
            a.track_op().then(|| g.clone()),
            b.track_op().then(|| g.clone()),
        ))
    }
}

/// `a + b` for f32 CPU tensors of one shape (callers check `kernels::fusable`).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("residual add: {:?} + {:?}", a.shape(), b.shape());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Add)
}
