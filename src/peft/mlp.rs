//! The small MLPs of PEFT's prompt encoders — prefix tuning's projection (Linear, Tanh, Linear)
//! and P-tuning's heads (Linear, ReLU, …) — with `nn.Sequential`'s parameter names
//! (`{prefix}.0`, `{prefix}.2`, …) and PyTorch's `nn.Linear` init, U(±1/√fan_in) for weight
//! and bias. They run once per forward over P ≤ a few dozen rows: composite activations.

use crate::kernels::linear::linear_bias;
use crate::model::layers::Layout;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::ParamStore;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone, Copy)]
pub(super) enum Act {
    Relu,
    Tanh,
}

#[derive(Clone)]
pub(super) struct Mlp {
    layers: Vec<(Tensor, Tensor)>, // (out, in) weight and (out) bias each
    act: Act,
}

impl Mlp {
    /// Linear layers through `widths` (input first), `act` between them.
    pub(super) fn new(
        store: &mut ParamStore,
        src: &Source,
        prefix: &str,
        widths: &[usize],
        act: Act,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, w) in widths.windows(2).enumerate() {
            let (inp, out) = (w[0], w[1]);
            let u = Init::Uniform(1.0 / (inp as f64).sqrt());
            let mut add = |what: &str, shape: &[usize]| {
                let name = format!("{prefix}.{}.{what}", 2 * i);
                store.add(src, &name, shape, ParamKind::Adapter, u, true)
            };
            layers.push((add("weight", &[out, inp])?, add("bias", &[out])?));
        }
        Ok(Mlp { layers, act })
    }

    /// x (N, in) -> (N, out).
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            if i > 0 {
                h = match self.act {
                    Act::Relu => h.relu()?,
                    Act::Tanh => h.tanh()?,
                };
            }
            h = linear_bias(&h, w, Some(b), Layout::OutIn)?;
        }
        Ok(h)
    }

    pub(super) fn detached(&self) -> Self {
        Mlp {
            layers: self
                .layers
                .iter()
                .map(|(w, b)| (w.detach(), b.detach()))
                .collect(),
            act: self.act,
        }
    }
}
