//! IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning"): learned vectors that rescale activations.
//!
//!   keys, values (targeted layers):   h = l ⊙ (W₀x + b),   l ∈ ℝ^out
//!   feed-forward (down projection):   h = W₀(l ⊙ x) + b,   l ∈ ℝ^in
//!
//! l starts at 1, so training starts at the base model. PEFT's layout: one tensor per layer,
//! `base_model.model.<module>.ia3_l`, shaped (out, 1) or (1, in); `adapter_config.json` with
//! `peft_type = "IA3"`, `target_modules` and `feedforward_modules`. Merging scales W₀'s rows and
//! the bias (output vectors) or its columns (feed-forward vectors), exactly.
//!
//! `--target-modules all-linear` (the default) means the architecture's IA³ modules from PEFT's
//! table: keys (Qwen2: queries), values and the MLP's down projection; GPT-2: `c_attn` (queries,
//! keys and values) and `mlp.c_proj`. The base layer runs through the fused linear kernel (no
//! weight-gradient work for the frozen W₀); the rescaling is one element-wise product.
//! Deviation: PEFT's `all-linear` for IA³ means every linear layer; here it means the table's
//! modules (give the names to rescale others).

use super::lora::{available, Targets};
use super::AdapterSwitch;
use crate::fsutil::write_json;
use crate::model::layers::{Layout, Linear, LinearAdapter};
use crate::model::loader::WeightSource;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

/// PEFT's IA³ modules for an architecture (`model_type`), and which of them are feed-forward
/// (input-scaled): `TRANSFORMERS_MODELS_TO_IA3_*_MODULES_MAPPING`.
fn defaults(model_type: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match model_type {
        "gpt2" => (&["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
        "qwen2" => (&["q_proj", "v_proj", "down_proj"], &["down_proj"]),
        // PEFT's suffix "output.dense" is both BERT's attention output and its FFN output.
        "bert" => (&["key", "value", "output.dense"], &["output.dense"]),
        _ => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// Layers that get a vector; `AllLinear` = the architecture's defaults.
    pub targets: Targets,
    /// The targets whose input (not output) is rescaled.
    pub feedforward: Targets,
}

impl Ia3Config {
    /// `--target-modules` (all-linear: the defaults) and `--feedforward-modules`.
    pub fn new(targets: Targets, feedforward: Targets) -> Self {
        Ia3Config {
            targets,
            feedforward,
        }
    }

    /// The configuration with `all-linear` replaced by the architecture's defaults.
    pub fn resolve(&self, model_type: &str) -> Self {
        let (t, f) = defaults(model_type);
        let pick = |x: &Targets, d: &[&str]| match x {
            Targets::AllLinear => Targets::Names(names(d)),
            other => other.clone(),
        };
        Ia3Config {
            targets: pick(&self.targets, t),
            feedforward: pick(&self.feedforward, f),
        }
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// PEFT's name for a layer's vector.
pub fn key(module: &str) -> String {
    format!("base_model.model.{module}.ia3_l")
}

/// One rescaled layer.
#[derive(Clone)]
struct Layer {
    /// (1, out) or (1, in): broadcast over the rows of x.
    l: Tensor,
    feedforward: bool,
    switch: AdapterSwitch,
}

impl LinearAdapter for Layer {
    fn detached(&self) -> Arc<dyn LinearAdapter> {
        Arc::new(Layer {
            l: self.l.detach(),
            ..self.clone()
        })
    }

    /// IA³ adds nothing: it rescales (`fused`).
    fn delta(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn fused(&self, lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.switch.enabled() {
            return Ok(None);
        }
        Ok(Some(if self.feedforward {
            lin.base(&x.broadcast_mul(&self.l)?)? // (N, in) ⊙ (1, in)
        } else {
            lin.base(x)?.broadcast_mul(&self.l)? // (N, out) ⊙ (1, out)
        }))
    }
}

/// The IA³ vectors attached to a model.
pub struct Ia3 {
    pub cfg: Ia3Config,
    /// Rescaled module names, in model order, and whether each is feed-forward.
    pub modules: Vec<(String, bool)>,
    pub fan_in_fan_out: bool,
}

/// Attaches vectors to the layers `cfg` selects; `weights` loads them (a PEFT directory),
/// otherwise they start at 1.
pub fn attach_to(
    linears: Vec<&mut Linear>,
    store: &mut ParamStore,
    cfg: &Ia3Config,
    weights: Option<&WeightSource>,
    switch: &AdapterSwitch,
) -> Result<Ia3> {
    let all: Vec<String> = linears.iter().map(|l| l.name.clone()).collect();
    for (what, t) in [("target", &cfg.targets), ("feed-forward", &cfg.feedforward)] {
        if let Targets::Names(ns) = t {
            for n in ns {
                if !all
                    .iter()
                    .any(|l| Targets::Names(vec![n.clone()]).matches(l))
                {
                    bail!(
                        "IA³ {what} module {n:?} matches no linear layer of this model; available: {}",
                        available(&all)
                    );
                }
            }
        }
    }
    let src = weights.map_or(Source::Random { seed: 0 }, Source::Weights);
    let mut modules = Vec::new();
    let mut fan_in_fan_out = false;
    for lin in linears {
        if lin.name == "lm_head" || !cfg.targets.matches(&lin.name) {
            continue;
        }
        let ff = cfg.feedforward.matches(&lin.name);
        let shape = if ff {
            [1, lin.in_dim]
        } else {
            [lin.out_dim, 1]
        };
        let l = store.add(
            &src,
            &key(&lin.name),
            &shape,
            ParamKind::Adapter,
            Init::Ones,
            true,
        )?;
        let l = l.reshape((1, shape[0] * shape[1]))?;
        fan_in_fan_out |= lin.layout == Layout::InOut;
        lin.adapter = Some(Arc::new(Layer {
            l,
            feedforward: ff,
            switch: switch.clone(),
        }));
        modules.push((lin.name.clone(), ff));
    }
    if modules.is_empty() {
        bail!(
            "IA³ targets {:?} match no linear layer; available: {}",
            cfg.targets,
            available(&all)
        );
    }
    // PEFT requires the feed-forward modules to be among the targets.
    if let Targets::Names(ns) = &cfg.feedforward {
        for n in ns {
            let t = Targets::Names(vec![n.clone()]);
            if !modules.iter().any(|(m, _)| t.matches(m)) {
                bail!("IA³ feed-forward module {n:?} is not among the target modules");
            }
        }
    }
    if let Some(w) = weights {
        w.check_all_used(|_| false)?;
    }
    Ok(Ia3 {
        cfg: cfg.clone(),
        modules,
        fan_in_fan_out,
    })
}

impl Ia3 {
    fn config_json(&self, base: &str, task_type: &str, heads: &[&str]) -> Value {
        // Full module paths: unambiguous in PEFT's suffix matching.
        let targets: Vec<&str> = self.modules.iter().map(|(n, _)| n.as_str()).collect();
        let ff: Vec<&str> = self
            .modules
            .iter()
            .filter(|(_, f)| *f)
            .map(|(n, _)| n.as_str())
            .collect();
        json!({
            "peft_type": "IA3",
            "task_type": task_type,
            "base_model_name_or_path": base,
            "target_modules": targets,
            "feedforward_modules": ff,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_ia3_weights": true,
            "inference_mode": true,
            "modules_to_save": if heads.is_empty() { Value::Null } else { json!(heads) },
            "revision": null,
        })
    }

    /// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir`.
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &super::lora::Head,
    ) -> Result<()> {
        write_json(
            &dir.join("adapter_config.json"),
            &self.config_json(base, head.task_type, &head.modules),
        )?;
        super::lora::save_adapter_tensors(store, head, dir)
    }

    /// Folds every vector into its layer (rows and bias, or columns) and detaches it.
    pub fn merge_into(&self, linears: Vec<&mut Linear>, store: &ParamStore) -> Result<()> {
        for lin in linears {
            let Some((_, ff)) = self.modules.iter().find(|(n, _)| *n == lin.name) else {
                continue;
            };
            if lin.qbase.is_some() {
                bail!("{}: cannot merge into GGUF blocks (QLoRA); merge the adapter into the model loaded without --qlora (`lmforge merge`)", lin.name);
            }
            // Merged already: the vector is in the weight.
            if lin.adapter.take().is_none() {
                continue;
            }
            let k = key(&lin.name);
            let l = store
                .get(&k)
                .with_context(|| format!("missing parameter {k}"))?
                .var
                .as_detached_tensor()
                .flatten_all()?;
            // Which axis of the stored weight the vector runs along.
            let along_rows = match (lin.layout, *ff) {
                (Layout::OutIn, false) | (Layout::InOut, true) => true,
                (Layout::OutIn, true) | (Layout::InOut, false) => false,
            };
            let col = if along_rows {
                l.unsqueeze(1)?
            } else {
                l.unsqueeze(0)?
            };
            let name = format!("{}.weight", lin.name);
            let w = &store
                .get(&name)
                .with_context(|| format!("missing parameter {name}"))?
                .var;
            w.set(&w.as_detached_tensor().broadcast_mul(&col)?)?;
            if !ff {
                let bname = format!("{}.bias", lin.name);
                if let Some(b) = store.get(&bname) {
                    b.var.set(&(b.var.as_detached_tensor() * &l)?)?;
                }
            }
            lin.quant = None;
        }
        Ok(())
    }
}

/// Reads an IA³ `adapter_config.json`: the configuration (target and feed-forward modules as
/// listed) and the base model's name.
pub fn read_config(dir: &Path, v: &Value) -> Result<(Ia3Config, Option<String>)> {
    let path = dir.join("adapter_config.json");
    let list = |k: &str| -> Result<Targets> {
        match v.get(k) {
            Some(Value::Array(a)) => Ok(Targets::Names(
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
            )),
            Some(Value::String(s)) => bail!(
                "{}: {k} as a regular expression ({s:?}) is not supported; give a list",
                path.display()
            ),
            _ => bail!("{}: key {k} missing", path.display()),
        }
    };
    super::refuse_set(
        v,
        &[
            "modules_to_save",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
        ],
        dir,
        "IA³",
    )?;

    let cfg = Ia3Config::new(list("target_modules")?, list("feedforward_modules")?);
    let base = v
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    Ok((cfg, base))
}

/// Loads a PEFT IA³ directory onto `model` (vectors trainable, so training continues it).
pub fn load(
    dir: &Path,
    v: &Value,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Ia3> {
    let (cfg, _) = read_config(dir, v)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        bail!("{}: adapter_model.safetensors is missing", dir.display());
    }
    let w = WeightSource::open_files(&[file])?;
    let cfg = cfg.resolve(&model.cfg.model_type);
    attach_to(model.linears_mut(), store, &cfg, Some(&w), switch)
}
