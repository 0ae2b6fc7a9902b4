//! A LoRA-adapted linear layer as one op: y = x·W₀ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ.
//!
//! Built from separate ops, autograd keeps the base output, the adapter output and their sum
//! alive (plus the dropped-out input), three or four activation-sized tensors per adapted layer;
//! measured on MiniLM with LoRA on every linear layer that made LoRA use more memory than a full
//! fine-tune. Here only the output exists; the backward recomputes drop(x) (the mask is a
//! function of its key, see `dropout`) and the rank-r product x·Aᵀ, which cost N·in·r.
//!
//!   backward, with G = ∂L/∂y and Ĝ = s·G·B (N, r):
//!     ∂A = Ĝᵀ·drop(x),   ∂B = s·Gᵀ·(drop(x)·Aᵀ),   ∂x = G·W₀ + drop'(Ĝ·A)
//!
//! W₀ and b must be frozen (no gradient is produced for them); callers check.

use super::linear::{self, linear, Mat, WeightLayout};
use super::{slice, with_slice};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

pub struct LoraLinear {
    /// W₀ (0 elements when `q` holds it).
    pub w: Tensor,
    /// QLoRA: W₀ as GGUF blocks (`qlinear`), layout (out, in).
    pub q: Option<std::sync::Arc<super::qlinear::QMatrix>>,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
    pub scale: f64,
    /// (p, key) of the input dropout in train mode.
    pub dropout: Option<(f32, u64)>,
}

impl LoraLinear {
    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        match self.dropout {
            Some((p, key)) => super::dropout::dropout(x, p, key),
            None => Ok(x.clone()),
        }
    }

    /// The whole forward on slices: x (n, k), A (r, k), B (out, r) -> y (n, out).
    fn compute(
        &self,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        (n, k, r, out): (usize, usize, usize, usize),
    ) -> Result<Vec<f32>> {
        with_slice(&self.w, |w| {
            let base = |bias: Option<&[f32]>| match &self.q {
                Some(q) => {
                    let mut y = super::qlinear::forward(x, n, q);
                    if let Some(b) = bias {
                        linear::add_bias_rows(&mut y, b);
                    }
                    Ok(y)
                }
                None => linear::forward(x, w, bias, self.layout, (n, k, out)),
            };
            let mut y = match &self.bias {
                Some(bias) => with_slice(bias, |bias| base(Some(bias)))?,
                None => base(None)?,
            };
            let dropped;
            let xd = match self.dropout {
                Some((p, key)) => {
                    dropped = super::dropout::masked(x, p, key);
                    &dropped[..]
                }
                None => x,
            };
            let mut h = linear::forward(xd, a, None, WeightLayout::OutIn, (n, k, r))?; // (n, r)
            h.iter_mut().for_each(|v| *v *= self.scale as f32);
            // y += h · Bᵀ, accumulated by the GEMM onto the base output.
            let hm = Mat {
                data: &h,
                rs: r,
                cs: 1,
            };
            let bt = Mat {
                data: b,
                rs: 1,
                cs: r,
            };
            // SAFETY: y is (n, out), h (n, r) and B (out, r), as checked by the caller.
            unsafe { linear::gemm_into(y.as_mut_ptr(), (n, out, r), true, hm, bt) };
            Ok(y)
        })
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lmforge-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lx.shape().dims2()?;
        let (r, ka) = la.shape().dims2()?;
        let (out, rb) = lb.shape().dims2()?;
        let (wout, wk) = match (&self.q, self.layout) {
            (Some(q), _) => (q.rows(), q.cols()),
            (None, WeightLayout::OutIn) => (self.w.dim(0)?, self.w.elem_count() / out.max(1)),
            (None, WeightLayout::InOut) => (self.w.dim(1)?, self.w.elem_count() / out.max(1)),
        };
        if ka != k || rb != r || out != wout || wk != k {
            candle_core::bail!(
                "lora: x (_, {k}), A {:?}, B {:?} and W {:?} do not fit together",
                la.shape(),
                lb.shape(),
                self.w.shape()
            );
        }
        let (x, a, b) = (slice(sx, lx)?, slice(sa, la)?, slice(sb, lb)?);
        let y = self.compute(x, a, b, (n, k, r, out))?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, av, bv, g) = (x.detach(), a.detach(), b.detach(), g.detach().contiguous()?);
        let xd = self.drop(&xs)?;
        let gb = (g.matmul(&bv)? * self.scale)?; // (N, r)
        let da = a.track_op().then(|| gb.t()?.matmul(&xd)).transpose()?; // (r, in)
        let db = if b.track_op() {
            let h = linear(&xd, &av, WeightLayout::OutIn)?; // (N, r)
            Some((g.t()?.matmul(&h)? * self.scale)?) // (out, r)
        } else {
            None
        };
        let dx = if x.track_op() {
            // G·W₀ through the linear kernel: W₀ read in the other orientation.
            let flipped = match self.layout {
                WeightLayout::OutIn => WeightLayout::InOut,
                WeightLayout::InOut => WeightLayout::OutIn,
            };
            let base = match &self.q {
                Some(q) => super::qlinear::input_grad(&g, q)?,
                None => linear(&g, &self.w, flipped)?,
            };
            Some((base + self.drop(&gb.matmul(&av)?)?)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}
