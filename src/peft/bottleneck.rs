//! Bottleneck adapters: Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP")
//! and Pfeiffer et al. 2021 ("AdapterFusion").
//!
//!   h' = h + W_up · act(W_down · h + b_down) + b_up,   h = a sublayer's output projection,
//!   W_down (C/r, C), W_up (C, C/r) starting at zero (so training starts at the base model)
//!
//! Houlsby: an adapter after the attention output projection and one after the MLP's; Pfeiffer:
//! after the MLP only. Both sit before the residual addition, as in the papers. The
//! nonlinearity is one of the fused activations (SiLU — "swish", adapter-transformers' default
//! — or tanh-GELU); linear parts run through the fused linear kernel, and the frozen
//! projection does no weight-gradient work.
//!
//! Format: Python PEFT has no bottleneck adapters, so the directory is lmforge's own, in PEFT's
//! shape: `adapter_config.json` with `peft_type = "LMFORGE_BOTTLENECK"`, the variant, reduction
//! factor, nonlinearity and module list, and `adapter_model.safetensors` with
//! `base_model.model.<module>.adapter_{down,up}.{weight,bias}`. Merging is impossible by
//! design: the nonlinearity between the projections is not a weight change.

use super::lora::Head;
use super::AdapterSwitch;
use crate::kernels::act::{apply, Act};
use crate::kernels::linear::linear_bias;
use crate::model::layers::{Layout, Linear, LinearAdapter};
use crate::model::loader::WeightSource;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

pub const PEFT_TYPE: &str = "LMFORGE_BOTTLENECK";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Houlsby,
    Pfeiffer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActKind {
    Silu,
    Gelu,
}

impl ActKind {
    fn act(self) -> Act {
        match self {
            ActKind::Silu => Act::Silu,
            ActKind::Gelu => Act::GeluTanh,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ActKind::Silu => "silu",
            ActKind::Gelu => "gelu_new",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BottleneckConfig {
    pub variant: Variant,
    pub reduction_factor: usize,
    pub act: ActKind,
}

/// Which sublayer output `name` is: attention's or the MLP's output projection.
fn sublayer(name: &str) -> Option<&'static str> {
    if name.ends_with("self_attn.o_proj")
        || name.ends_with("attn.c_proj")
        || name.ends_with("attention.output.dense")
    {
        Some("attention")
    } else if name.ends_with("mlp.down_proj")
        || name.ends_with("mlp.c_proj")
        || name.ends_with(".output.dense")
    {
        Some("mlp")
    } else {
        None
    }
}

fn key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.adapter_{part}")
}

#[derive(Clone)]
struct Layer {
    down: (Tensor, Tensor), // (m, C), (m)
    up: (Tensor, Tensor),   // (C, m), (C)
    act: Act,
    switch: AdapterSwitch,
}

impl LinearAdapter for Layer {
    fn detached(&self) -> Arc<dyn LinearAdapter> {
        let d = |p: &(Tensor, Tensor)| (p.0.detach(), p.1.detach());
        Arc::new(Layer {
            down: d(&self.down),
            up: d(&self.up),
            ..self.clone()
        })
    }

    /// The adapter reads the projection's output, not its input: `fused`.
    fn delta(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn fused(&self, lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.switch.enabled() {
            return Ok(None);
        }
        let h = lin.base(x)?; // (N, C)
        let z = linear_bias(&h, &self.down.0, Some(&self.down.1), Layout::OutIn)?; // (N, m)
        let z = apply(&z, self.act)?;
        let y = linear_bias(&z, &self.up.0, Some(&self.up.1), Layout::OutIn)?; // (N, C)
        Ok(Some((h + y)?))
    }
}

/// The adapters attached to a model.
pub struct Bottleneck {
    pub cfg: BottleneckConfig,
    pub modules: Vec<String>,
    pub size: usize,
}

/// Attaches adapters after the sublayers `cfg.variant` selects; `weights` loads them,
/// otherwise W_down is U(±1/√C) from `seed` and W_up, the biases zero.
pub fn attach(
    linears: Vec<&mut Linear>,
    store: &mut ParamStore,
    cfg: &BottleneckConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Bottleneck> {
    let src = weights.map_or(Source::Random { seed }, Source::Weights);
    let mut modules = Vec::new();
    let mut size = 0;
    for lin in linears {
        let wanted = matches!(
            (sublayer(&lin.name), cfg.variant),
            (Some("mlp"), _) | (Some("attention"), Variant::Houlsby)
        );
        if !wanted {
            continue;
        }
        let c = lin.out_dim;
        let m = (c / cfg.reduction_factor.max(1)).max(1);
        size = m;
        let mut add = |part: &str, shape: &[usize], init: Init| {
            store.add(
                &src,
                &key(&lin.name, part),
                shape,
                ParamKind::Adapter,
                init,
                true,
            )
        };
        let u = Init::Uniform(1.0 / (c as f64).sqrt());
        let down = (
            add("down.weight", &[m, c], u)?,
            add("down.bias", &[m], Init::Zeros)?,
        );
        let up = (
            add("up.weight", &[c, m], Init::Zeros)?,
            add("up.bias", &[c], Init::Zeros)?,
        );
        lin.adapter = Some(Arc::new(Layer {
            down,
            up,
            act: cfg.act.act(),
            switch: switch.clone(),
        }));
        modules.push(lin.name.clone());
    }
    if modules.is_empty() {
        bail!("bottleneck adapters found no attention or MLP output projection in this model");
    }
    if let Some(w) = weights {
        w.check_all_used(|_| false)?;
    }
    Ok(Bottleneck {
        cfg: cfg.clone(),
        modules,
        size,
    })
}

impl Bottleneck {
    pub fn describe(&self) -> String {
        format!(
            ", {:?} bottleneck adapters (size {}) after {} projections",
            self.cfg.variant,
            self.size,
            self.modules.len()
        )
    }

    /// Writes lmforge's adapter directory (see the module doc).
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &Head,
    ) -> Result<()> {
        let variant = match self.cfg.variant {
            Variant::Houlsby => "houlsby",
            Variant::Pfeiffer => "pfeiffer",
        };
        let c = json!({
            "peft_type": PEFT_TYPE,
            "task_type": head.task_type,
            "base_model_name_or_path": base,
            "variant": variant,
            "reduction_factor": self.cfg.reduction_factor,
            "bottleneck_size": self.size,
            "non_linearity": self.cfg.act.name(),
            "target_modules": self.modules,
            "modules_to_save": if head.modules.is_empty() { Value::Null } else { json!(head.modules) },
            "format": "lmforge bottleneck adapters: h + up(act(down(h))) on each target module's output; not a Python PEFT format",
        });
        crate::fsutil::write_json(&dir.join("adapter_config.json"), &c)?;
        super::lora::save_adapter_tensors(store, head, dir)
    }
}

/// Reads the configuration of an lmforge bottleneck directory.
pub fn read_config(dir: &Path, v: &Value) -> Result<BottleneckConfig> {
    let path = dir.join("adapter_config.json");
    let s = |k: &str| -> Result<&str> {
        v.get(k)
            .and_then(Value::as_str)
            .with_context(|| format!("{}: {k} missing or not a string", path.display()))
    };
    let variant = match s("variant")? {
        "houlsby" => Variant::Houlsby,
        "pfeiffer" => Variant::Pfeiffer,
        other => bail!(
            "{}: variant {other:?} is not houlsby or pfeiffer",
            path.display()
        ),
    };
    let act = match s("non_linearity")? {
        "silu" | "swish" => ActKind::Silu,
        "gelu_new" | "gelu" => ActKind::Gelu,
        other => bail!(
            "{}: non_linearity {other:?} is not silu or gelu_new",
            path.display()
        ),
    };
    let reduction_factor = match v.get("reduction_factor").and_then(Value::as_u64) {
        Some(r) if r > 0 => r as usize,
        _ => bail!(
            "{}: reduction_factor missing or not a positive integer",
            path.display()
        ),
    };
    super::refuse_set(v, &["modules_to_save"], dir, "bottleneck adapters")?;
    Ok(BottleneckConfig {
        variant,
        reduction_factor,
        act,
    })
}

/// Loads an lmforge bottleneck directory onto a decoder (trainable: training continues it).
pub fn load(
    dir: &Path,
    v: &Value,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Bottleneck> {
    let cfg = read_config(dir, v)?;
    let w = super::open_adapter_weights(dir)?;
    attach(model.linears_mut(), store, &cfg, Some(&w), 0, switch)
}
