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

use super::linear::{linear, WeightLayout};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};

pub struct LoraLinear {
    pub w: Tensor,
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

    /// The whole forward on untracked tensors.
    fn compute(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut y = linear(x, &self.w, self.layout)?;
        if let Some(bias) = &self.bias {
            y = super::linear::bias_add(&y, bias)?;
        }
        let h = (linear(&self.drop(x)?, a, WeightLayout::OutIn)? * self.scale)?; // (N, r)
        y + linear(&h, b, WeightLayout::OutIn)?
    }
}

fn tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    Tensor::from_slice(super::slice(s, l)?, l.shape(), &Device::Cpu)
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
        let y = self.compute(&tensor(sx, lx)?, &tensor(sa, la)?, &tensor(sb, lb)?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
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
            let base = match self.layout {
                WeightLayout::OutIn => g.matmul(&self.w)?,
                WeightLayout::InOut => g.matmul(&self.w.t()?)?,
            };
            Some((base + self.drop(&gb.matmul(&av)?)?)?)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}
