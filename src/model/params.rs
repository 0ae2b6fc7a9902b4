//! Every weight of a model lives in one `ParamStore`, keyed by its Hugging Face tensor name.
//!
//! Layers receive plain `Tensor`s: the store's `Var` for trainable weights (so autograd tracks
//! them) or a detached view of it for frozen ones (so backward never reaches them). Gradients
//! are gathered back into one `Grads` vector ordered like the store — the single place an
//! optimizer, a clipper or a data-parallel reducer reads from.

use super::loader::WeightSource;
use crate::rng::{fnv1a, Rng};
use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// What a parameter is, which decides weight decay (none for norms, biases and embeddings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    Norm,
    Embedding,
    /// A PEFT method's weight (LoRA A/B): trained, decayed, saved apart from the base model.
    Adapter,
    /// A training method's own weight outside the model (PPO's value head): trained, not
    /// decayed, saved by the method, in neither the model nor an adapter.
    Aux,
}

impl ParamKind {
    pub fn decays(self) -> bool {
        matches!(self, ParamKind::Weight | ParamKind::Adapter)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f64),
    /// U(−b, b), e.g. Kaiming-uniform.
    Uniform(f64),
    Zeros,
    Ones,
}

pub struct Param {
    pub name: String,
    pub var: Var,
    pub kind: ParamKind,
    pub trainable: bool,
}

/// Where a model's weights come from while it is built.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// Fresh initialisation; each tensor's stream is keyed by (seed, name), independent of order.
    Random {
        seed: u64,
    },
    Weights(&'a WeightSource),
}

pub struct ParamStore {
    pub device: Device,
    params: Vec<Param>,
    index: HashMap<String, usize>,
}

/// Gradients of one step, aligned with `ParamStore::params()`; `None` for frozen parameters.
pub struct Grads(pub Vec<Option<Tensor>>);

impl ParamStore {
    pub fn new(device: Device) -> Self {
        Self {
            device,
            params: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    pub fn num_trainable(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.var.elem_count())
            .sum()
    }

    /// Creates (or loads) a parameter and returns the tensor a layer should hold.
    pub fn add(
        &mut self,
        source: &Source,
        name: &str,
        shape: &[usize],
        kind: ParamKind,
        init: Init,
        trainable: bool,
    ) -> Result<Tensor> {
        if self.index.contains_key(name) {
            bail!("internal error: parameter {name} created twice");
        }
        let t = match source {
            Source::Random { seed } => init_tensor(*seed, name, shape, init, &self.device)?,
            Source::Weights(w) => w.load(name, shape, &self.device)?,
        };
        let var = Var::from_tensor(&t)?;
        let out = if trainable {
            var.as_tensor().clone()
        } else {
            var.as_detached_tensor()
        };
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(Param {
            name: name.to_string(),
            var,
            kind,
            trainable,
        });
        Ok(out)
    }

    /// Pulls this step's gradients out of candle's store, in parameter order.
    pub fn grads(&self, gs: &GradStore) -> Grads {
        Grads(
            self.params
                .iter()
                // Detached: a gradient computed by autograd still references the step's whole
                // graph; optimizer moments built from it would chain every step's graph together.
                .map(|p| {
                    if p.trainable {
                        gs.get(p.var.as_tensor()).map(Tensor::detach)
                    } else {
                        None
                    }
                })
                .collect(),
        )
    }

    /// The trainable parameters (adapters included) by name: what a checkpoint must keep.
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), p.var.as_detached_tensor()))
            .collect()
    }

    /// Copies a checkpoint's values into every trainable parameter (same names and shapes);
    /// frozen ones keep the base model's values.
    pub fn assign_trainable(&self, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        for p in self.params.iter().filter(|p| p.trainable) {
            let t = tensors
                .get(&p.name)
                .with_context(|| format!("{what}: missing trainable tensor {}", p.name))?;
            if t.dims() != p.var.dims() {
                bail!(
                    "{what}: tensor {} has shape {:?}, the model expects {:?}",
                    p.name,
                    t.dims(),
                    p.var.dims()
                );
            }
            p.var
                .set(&t.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Writes the model's parameters (not adapters) as an HF-compatible `model.safetensors`
    /// (f32, `format: pt`).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        self.save_safetensors_where(path, |_| true)
    }

    /// `save_safetensors` of the parameters whose names `keep` accepts.
    pub fn save_safetensors_where(&self, path: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .filter(|p| !matches!(p.kind, ParamKind::Adapter | ParamKind::Aux) && keep(&p.name))
            .map(|p| (p.name.clone(), p.var.as_detached_tensor()))
            .collect();
        save_tensors(&tensors, path)
    }
}

impl Grads {
    /// Global L2 norm over every gradient (for clipping and logging).
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for g in self.0.iter().flatten() {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }

    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.0.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
        Ok(())
    }

    /// Adds another micro-batch's gradients (gradient accumulation).
    pub fn accumulate(&mut self, other: Grads) -> Result<()> {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = match (a.take(), b) {
                (Some(x), Some(y)) => Some((x + y)?),
                (x, y) => x.or(y),
            };
        }
        Ok(())
    }
}

/// Safetensors with the `{"format": "pt"}` metadata transformers insists on.
pub fn save_tensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut data = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        data.push((n.as_str(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    safetensors::serialize_to_file(data, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))
}

fn init_tensor(seed: u64, name: &str, shape: &[usize], init: Init, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, DType::F32, dev)?,
        Init::Ones => Tensor::ones(shape, DType::F32, dev)?,
        Init::Normal(std) => {
            let mut rng = Rng::keyed(&[seed, fnv1a(name.as_bytes())]);
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        Init::Uniform(b) => {
            let mut rng = Rng::keyed(&[seed, fnv1a(name.as_bytes())]);
            let v: Vec<f32> = (0..n)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * b) as f32)
                .collect();
            Tensor::from_vec(v, shape, dev)?
        }
    };
    Ok(t)
}
