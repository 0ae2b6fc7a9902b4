//! A bidirectional multi-layer LSTM with PyTorch's `nn.LSTM` parameters and gate order, for
//! P-tuning's prompt encoder (PEFT's `lstm_head`).
//!
//!   [i f g o] = W_ih·x_t + b_ih + W_hh·h_{t-1} + b_hh
//!   c_t = σ(f)⊙c_{t-1} + σ(i)⊙tanh(g),   h_t = σ(o)⊙tanh(c_t)
//!
//! The reverse direction reads the sequence backwards; a layer's output is [h→ ; h←]. It runs
//! over P ≤ a few dozen virtual tokens once per forward, so composite candle ops (with their
//! backward) are fast enough: no fused kernel. σ(x) = (1 + tanh(x/2))/2.

use crate::model::params::{Init, ParamKind, Source};
use crate::model::ParamStore;
use anyhow::Result;
use candle_core::{Tensor, D};

#[derive(Clone)]
struct Direction {
    w_ih: Tensor, // (4h, in)
    w_hh: Tensor, // (4h, h)
    bias: (Tensor, Tensor),
}

#[derive(Clone)]
pub struct Lstm {
    /// Per layer: forward and reverse direction.
    layers: Vec<[Direction; 2]>,
    hidden: usize,
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(((x * 0.5)?.tanh()? + 1.0)?.affine(0.5, 0.0)?)
}

impl Lstm {
    /// PyTorch's names under `prefix`: `weight_ih_l{k}[_reverse]`, `weight_hh_…`, `bias_ih_…`,
    /// `bias_hh_…`; fresh weights U(±1/√h) as PyTorch's.
    pub fn new(
        store: &mut ParamStore,
        src: &Source,
        prefix: &str,
        input: usize,
        hidden: usize,
        n_layers: usize,
    ) -> Result<Self> {
        let init = Init::Uniform(1.0 / (hidden as f64).sqrt());
        let mut layers = Vec::new();
        for k in 0..n_layers.max(1) {
            let inp = if k == 0 { input } else { 2 * hidden };
            let mut dir = |suffix: &str| -> Result<Direction> {
                let mut p = |what: &str, shape: &[usize]| {
                    let name = format!("{prefix}.{what}_l{k}{suffix}");
                    store.add(src, &name, shape, ParamKind::Adapter, init, true)
                };
                Ok(Direction {
                    w_ih: p("weight_ih", &[4 * hidden, inp])?,
                    w_hh: p("weight_hh", &[4 * hidden, hidden])?,
                    bias: (p("bias_ih", &[4 * hidden])?, p("bias_hh", &[4 * hidden])?),
                })
            };
            layers.push([dir("")?, dir("_reverse")?]);
        }
        Ok(Lstm { layers, hidden })
    }

    pub fn detached(&self) -> Self {
        let d = |x: &Direction| Direction {
            w_ih: x.w_ih.detach(),
            w_hh: x.w_hh.detach(),
            bias: (x.bias.0.detach(), x.bias.1.detach()),
        };
        Lstm {
            layers: self.layers.iter().map(|[f, r]| [d(f), d(r)]).collect(),
            hidden: self.hidden,
        }
    }

    /// x (T, in) -> (T, 2h).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for [fwd, rev] in &self.layers {
            let a = self.direction(&h, fwd, false)?;
            let b = self.direction(&h, rev, true)?;
            h = Tensor::cat(&[&a, &b], D::Minus1)?;
        }
        Ok(h)
    }

    /// One direction over the whole sequence: x (T, in) -> (T, h).
    fn direction(&self, x: &Tensor, d: &Direction, reverse: bool) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        let n = self.hidden;
        // Input contributions of every step at once: (T, 4h).
        let xin = x
            .matmul(&d.w_ih.t()?)?
            .broadcast_add(&(&d.bias.0 + &d.bias.1)?)?;
        let mut h = Tensor::zeros((1, n), x.dtype(), x.device())?;
        let mut c = h.clone();
        let mut out = vec![None; t];
        let steps: Vec<usize> = if reverse {
            (0..t).rev().collect()
        } else {
            (0..t).collect()
        };
        for s in steps {
            let g = (xin.narrow(0, s, 1)? + h.matmul(&d.w_hh.t()?)?)?; // (1, 4h)
            let gate = |i: usize| g.narrow(1, i * n, n);
            let (i, f, gg, o) = (
                sigmoid(&gate(0)?)?,
                sigmoid(&gate(1)?)?,
                gate(2)?.tanh()?,
                sigmoid(&gate(3)?)?,
            );
            c = ((f * &c)? + (i * gg)?)?;
            h = (o * c.tanh()?)?;
            out[s] = Some(h.clone());
        }
        let out: Vec<Tensor> = out.into_iter().flatten().collect();
        Ok(Tensor::cat(&out, 0)?)
    }
}
