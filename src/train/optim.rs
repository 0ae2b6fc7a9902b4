//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay. (The schedule is the engine's.)
//!
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ(1 − η·λ) − η · m̂ / (√v̂ + ε)
//!
//! λ applies only to matrices (`ParamKind::Weight`): norms, biases and embeddings are not
//! decayed. Moments exist only for trainable parameters, so frozen weights cost no memory here.

use crate::model::params::{Grads, ParamStore};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates applied so far (bias correction uses it).
    pub t: u64,
    moments: Vec<Option<(Tensor, Tensor)>>,
}

impl AdamW {
    pub fn new(store: &ParamStore, cfg: AdamWConfig) -> Result<Self> {
        let moments = store
            .params()
            .iter()
            .map(|p| {
                if !p.trainable {
                    return Ok(None);
                }
                // Two allocations: the fused step updates m and v in place.
                let z = || Tensor::zeros(p.var.shape(), DType::F32, p.var.device());
                Ok(Some((z()?, z()?)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, t: 0, moments })
    }

    pub fn step(&mut self, store: &ParamStore, grads: &Grads, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for ((p, g), mom) in store
            .params()
            .iter()
            .zip(&grads.0)
            .zip(self.moments.iter_mut())
        {
            let (Some(g), Some((m, v))) = (g, mom.as_mut()) else {
                continue;
            };
            let wd = if p.kind.decays() { c.weight_decay } else { 0.0 };
            let theta = p.var.as_tensor();
            if crate::kernels::fusable(&[theta, g, m, v]) && theta.is_contiguous() {
                crate::kernels::adamw::step(
                    theta,
                    g,
                    m,
                    v,
                    (c.beta1, c.beta2, c.eps),
                    lr,
                    1.0 - lr * wd,
                    (bc1, bc2),
                )?;
                continue;
            }
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&*v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&*m / bc1)? / denom)?;
            let decayed = if wd > 0.0 {
                (theta * (1.0 - lr * wd))?
            } else {
                theta.clone()
            };
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`) for checkpoints.
    pub fn state_tensors(&self, store: &ParamStore) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (p, mom) in store.params().iter().zip(&self.moments) {
            if let Some((m, v)) = mom {
                out.push((format!("exp_avg.{}", p.name), m.clone()));
                out.push((format!("exp_avg_sq.{}", p.name), v.clone()));
            }
        }
        out
    }

    pub fn load_state(
        &mut self,
        store: &ParamStore,
        t: u64,
        tensors: &HashMap<String, Tensor>,
        what: &str,
    ) -> Result<()> {
        for (p, mom) in store.params().iter().zip(self.moments.iter_mut()) {
            let Some((m, v)) = mom.as_mut() else { continue };
            for (slot, key) in [
                (m, format!("exp_avg.{}", p.name)),
                (v, format!("exp_avg_sq.{}", p.name)),
            ] {
                let Some(x) = tensors.get(&key) else {
                    bail!("{what}: missing optimizer tensor {key}")
                };
                if x.dims() != p.var.dims() {
                    bail!(
                        "{what}: optimizer tensor {key} has shape {:?}, parameter has {:?}",
                        x.dims(),
                        p.var.dims()
                    );
                }
                // A fresh copy: the fused step updates moments in place.
                *slot = x.to_dtype(DType::F32)?.to_device(p.var.device())?.copy()?;
            }
        }
        self.t = t;
        Ok(())
    }
}
