//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").
//!
//!   h = W₀x + s·B·A·dropout(x),   A ∈ ℝ^{r×in} Kaiming-uniform (a=√5, PEFT's init), B ∈ ℝ^{out×r} = 0
//!   s = α/r  (rsLoRA, Kalajdzievski 2023: s = α/√r)
//!
//! B = 0 makes the adapted model start exactly at the base model. The base weights are built
//! frozen, so the fused linear backward skips their weight-gradient GEMMs; only A and B train.
//! Weights are stored under PEFT's names (`base_model.model.<module>.lora_A.weight`), so the
//! parameter store *is* the adapter file. Merging folds s·B·A into W₀ (transposed for GPT-2's
//! Conv1D layout, PEFT's `fan_in_fan_out`).
//!
//! DoRA (Liu et al. 2024, `use_dora`): the adapted weight is split into a direction and a learned
//! magnitude m ∈ ℝ^out,  h = m ⊙ (W₀ + s·B·A)x / ‖W₀ + s·B·A‖_row + b,  m starting at the row
//! norms of W₀ (so training starts at the base model). As PEFT (and the paper, §4.3), the norm is
//! treated as a constant in the backward; it is computed from W₀'s row norms, W₀·Aᵀ and A·Aᵀ
//! without forming W₀ + s·B·A. The base + adapter product stays the fused LoRA op; the
//! rescaling is element-wise. With dropout the magnitude's correction also sees the dropped input,
//! as PEFT computes it. Saved as PEFT's `lora_magnitude_vector`.
//!
//! Deviation: dropout masks come from lmforge's keyed RNG (reproducible per step), not torch's.

pub(crate) use super::files::{available, save_adapter_tensors};
pub use super::files::{Head, Targets};
use super::AdapterSwitch;
use crate::fsutil::write_json;
use crate::model::layers::{xwt, Layout, Linear, LinearAdapter};
use crate::model::loader::WeightSource;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::{DecoderModel, ParamStore};
use crate::outdir::write_output;
use crate::rng::{fnv1a, Rng};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Targets,
    pub use_rslora: bool,
    /// DoRA: a learned magnitude per output row.
    pub use_dora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }
}

/// PEFT's names for a module's A and B.
pub fn key_a(module: &str) -> String {
    format!("base_model.model.{module}.lora_A.weight")
}
pub fn key_b(module: &str) -> String {
    format!("base_model.model.{module}.lora_B.weight")
}
pub fn key_m(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// A layer's weight as (out, in), detached, whatever its layout.
fn out_in(lin: &Linear) -> Result<Tensor> {
    if let Some(q) = &lin.qbase {
        return Ok(q.dequantize()?); // QLoRA: DoRA's ‖W₀‖², once at attach
    }
    Ok(match lin.layout {
        Layout::OutIn => lin.weight.detach(),
        Layout::InOut => lin.weight.detach().t()?,
    })
}

/// One adapted layer.
#[derive(Clone)]
struct Layer {
    a: Tensor,
    b: Tensor,
    /// DoRA's magnitude (1, out) and ‖W₀‖²_row (out): the frozen part of the norm, once.
    m: Option<Tensor>,
    w_sq: Option<Tensor>,
    scale: f64,
    dropout: f32,
    key: u64,
    switch: AdapterSwitch,
}

impl Layer {
    /// (p, key) of this forward's input dropout: train mode and p > 0 only.
    fn dropout_spec(&self) -> Option<(f32, u64)> {
        match self.switch.training() {
            Some(k) if self.dropout > 0.0 => {
                Some((self.dropout, Rng::keyed(&[k, self.key]).next_u64()))
            }
            _ => None,
        }
    }
}

impl LinearAdapter for Layer {
    fn detached(&self) -> std::sync::Arc<dyn LinearAdapter> {
        std::sync::Arc::new(Layer {
            a: self.a.detach(),
            b: self.b.detach(),
            m: self.m.as_ref().map(Tensor::detach),
            ..self.clone()
        })
    }

    fn delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        // DoRA rescales the whole output: `fused` computes it.
        if !self.switch.enabled() || self.m.is_some() {
            return Ok(None);
        }
        let x = match self.dropout_spec() {
            Some((p, key)) => dropout(x, p, key)?,
            None => x.clone(),
        };
        // (N, in)·Aᵀ -> (N, r); scaling the rank-r activations is cheaper than the (N, out) output.
        let h = (xwt(&x, &self.a)? * self.scale)?;
        Ok(Some(xwt(&h, &self.b)?)) // (N, out)
    }

    /// One op for base + adapter on the CPU when the base is frozen (`kernels::lora`): only the
    /// output is kept for the backward instead of base output, adapter output and their sum.
    fn fused(&self, lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.switch.enabled() {
            return Ok(None);
        }
        if let (Some(m), Some(w_sq)) = (&self.m, &self.w_sq) {
            return Ok(Some(self.dora(lin, x, m, w_sq)?));
        }
        self.base_plus_adapter(lin, x)
    }
}

impl Layer {
    /// W₀x + b + s·B·A·dropout(x) as the fused op, when it applies.
    fn base_plus_adapter(&self, lin: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        let frozen = !lin.weight.track_op() && lin.bias.as_ref().is_none_or(|b| !b.track_op());
        let mut ts = vec![x, &lin.weight, &self.a, &self.b];
        ts.extend(lin.bias.as_ref());
        if !frozen || !crate::kernels::fusable(&ts) {
            return Ok(None);
        }
        let op = crate::kernels::lora::LoraLinear {
            w: lin.weight.contiguous()?,
            q: lin.qbase.clone(),
            bias: lin.bias.clone(),
            layout: lin.layout,
            scale: self.scale,
            dropout: self.dropout_spec(),
        };
        Ok(Some(x.contiguous()?.apply_op3(&self.a, &self.b, op)?))
    }

    /// DoRA: m/‖W₀ + s·B·A‖ (norm held constant) times the adapted product, plus the bias.
    fn dora(&self, lin: &Linear, x: &Tensor, m: &Tensor, w_sq: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.a.detach(), self.b.detach());
        // ‖w_i + s·b_i·A‖² = ‖w_i‖² + 2s·(w_i·Aᵀ)·b_i + s²·b_i·(A·Aᵀ)·b_i
        let wa = match &lin.qbase {
            // QLoRA: (A·W₀ᵀ)ᵀ through the quantized GEMM, no f32 copy of W₀.
            Some(q) => crate::kernels::qlinear::qlinear(&a.contiguous()?, q)?.t()?,
            None => out_in(lin)?.matmul(&a.t()?)?,
        }; // (out, r)
        let aat = a.matmul(&a.t()?)?; // (r, r)
        let sq = ((w_sq + ((wa * &b)?.sum(1)? * (2.0 * self.scale))?)?
            + ((b.matmul(&aat)? * &b)?.sum(1)? * (self.scale * self.scale))?)?;
        let g = m.broadcast_div(&sq.sqrt()?.unsqueeze(0)?)?; // (1, out)
                                                             // With dropout, PEFT's DoRA applies the magnitude's correction to the dropped input too:
                                                             // W₀x + b + (g − 1)·W₀·drop(x) + g·s·B·A·drop(x) — one more product, as PEFT pays.
        if let Some((p, key)) = self.dropout_spec() {
            let xd = dropout(x, p, key)?;
            let base_x = lin.base(x)?;
            let base_d = match &lin.bias {
                Some(bias) => lin.base(&xd)?.broadcast_sub(bias)?,
                None => lin.base(&xd)?,
            };
            let lora_d = xwt(&(xwt(&xd, &self.a)? * self.scale)?, &self.b)?;
            return Ok((base_x
                + base_d.broadcast_mul(&(&g - 1.0)?)?
                + lora_d.broadcast_mul(&g)?)?);
        }
        let y = match self.base_plus_adapter(lin, x)? {
            Some(y) => y,
            None => {
                let xd = match self.dropout_spec() {
                    Some((p, key)) => dropout(x, p, key)?,
                    None => x.clone(),
                };
                let h = (xwt(&xd, &self.a)? * self.scale)?;
                (lin.base(x)? + xwt(&h, &self.b)?)?
            }
        };
        Ok(match &lin.bias {
            Some(bias) => y
                .broadcast_sub(bias)?
                .broadcast_mul(&g)?
                .broadcast_add(bias)?,
            None => y.broadcast_mul(&g)?,
        })
    }
}

/// The fused dropout (mask regenerated in the backward) on the CPU; elsewhere a stored mask.
fn dropout(x: &Tensor, p: f32, key: u64) -> candle_core::Result<Tensor> {
    if crate::kernels::fusable(&[x]) {
        return crate::kernels::dropout::dropout(x, p, key);
    }
    let mut rng = Rng::new(key);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p as f64 { 0.0 } else { keep })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

/// The adapters attached to a model.
pub struct Lora {
    pub cfg: LoraConfig,
    /// Adapted module names, in model order.
    pub modules: Vec<String>,
    pub switch: AdapterSwitch,
    /// GPT-2's Conv1D layers store W as (in, out): PEFT's `fan_in_fan_out`.
    pub fan_in_fan_out: bool,
}

/// Attaches adapters to the layers `cfg.targets` selects. `weights` loads A and B (a PEFT
/// directory); without it A is Kaiming-uniform from `seed` and B is zero.
pub fn attach(
    model: &mut DecoderModel,
    store: &mut ParamStore,
    cfg: &LoraConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Lora> {
    attach_to(model.linears_mut(), store, cfg, weights, seed, switch)
}

/// `attach` for any set of linear layers (an encoder's, a decoder's).
pub fn attach_to(
    linears: Vec<&mut Linear>,
    store: &mut ParamStore,
    cfg: &LoraConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Lora> {
    cfg.validate()?;
    let names: Vec<String> = linears.iter().map(|l| l.name.clone()).collect();
    if let Targets::Names(ns) = &cfg.targets {
        for n in ns {
            if !names
                .iter()
                .any(|l| Targets::Names(vec![n.clone()]).matches(l))
            {
                bail!(
                    "LoRA target module {n:?} matches no linear layer of this model; available: {}",
                    available(&names)
                );
            }
        }
    }
    let random = Source::Random { seed };
    let mut modules = Vec::new();
    let mut fan_in_fan_out = false;
    for lin in linears {
        if !cfg.targets.matches(&lin.name) {
            continue;
        }
        let (ka, kb) = (key_a(&lin.name), key_b(&lin.name));
        let src = weights.map_or(random, Source::Weights);
        // Kaiming-uniform with a = √5: bound = √(6 / ((1 + a²)·fan_in)) = 1/√fan_in.
        let bound = 1.0 / (lin.in_dim as f64).sqrt();
        let a = store.add(
            &src,
            &ka,
            &[cfg.r, lin.in_dim],
            ParamKind::Adapter,
            Init::Uniform(bound),
            true,
        )?;
        let b = store.add(
            &src,
            &kb,
            &[lin.out_dim, cfg.r],
            ParamKind::Adapter,
            Init::Zeros,
            true,
        )?;
        let (m, w_sq) = if cfg.use_dora {
            let k = key_m(&lin.name);
            let t = store.add(
                &src,
                &k,
                &[lin.out_dim],
                ParamKind::Adapter,
                Init::Ones,
                true,
            )?;
            let w_sq = out_in(lin)?.sqr()?.sum(1)?;
            if weights.is_none() {
                // m starts at ‖W₀ + s·B·A‖_row = ‖W₀‖_row (B = 0): the base model.
                store
                    .get(&k)
                    .context("the magnitude just created")?
                    .var
                    .set(&w_sq.sqrt()?)?;
            }
            (Some(t.reshape((1, lin.out_dim))?), Some(w_sq))
        } else {
            (None, None)
        };
        fan_in_fan_out |= lin.layout == Layout::InOut;
        lin.adapter = Some(Arc::new(Layer {
            a,
            b,
            m,
            w_sq,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            key: fnv1a(lin.name.as_bytes()),
            switch: switch.clone(),
        }));
        modules.push(lin.name.clone());
    }
    if modules.is_empty() {
        bail!(
            "LoRA targets {:?} match no linear layer; available: {}",
            cfg.targets,
            available(&names)
        );
    }
    if let Some(w) = weights {
        w.check_all_used(|_| false)?;
    }
    Ok(Lora {
        cfg: cfg.clone(),
        modules,
        switch: switch.clone(),
        fan_in_fan_out,
    })
}

impl Lora {
    /// Trainable parameters of the adapters.
    pub fn num_params(&self, store: &ParamStore) -> usize {
        store
            .params()
            .iter()
            .filter(|p| p.kind == ParamKind::Adapter)
            .map(|p| p.var.elem_count())
            .sum()
    }

    fn config_json(&self, base: &str, head: &Head) -> Value {
        // "all-linear" is written out as the adapted modules' full paths: suffixes such as
        // BERT's `dense` would also match layers lmforge did not adapt (the pooler).
        let targets = match &self.cfg.targets {
            Targets::AllLinear => json!(self.modules),
            t => t.to_json(),
        };
        json!({
            "peft_type": "LORA",
            "task_type": head.task_type,
            "base_model_name_or_path": base,
            "r": self.cfg.r,
            "lora_alpha": self.cfg.alpha,
            // Via the shortest decimal, so 0.05 is written as 0.05, not 0.0500000007.
            "lora_dropout": self.cfg.dropout.to_string().parse::<f64>().unwrap_or(0.0),
            "target_modules": targets,
            "use_rslora": self.cfg.use_rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": if head.modules.is_empty() { Value::Null } else { json!(head.modules) },
            "use_dora": self.cfg.use_dora,
            "revision": null,
        })
    }

    /// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` (must exist):
    /// the adapters, and the parameters of `head.modules` (trained in full, PEFT's
    /// `modules_to_save`) under `base_model.model.<name>`.
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &Head,
    ) -> Result<()> {
        write_json(
            &dir.join("adapter_config.json"),
            &self.config_json(base, head),
        )?;
        save_adapter_tensors(store, head, dir)
    }

    /// A complete causal-LM PEFT adapter directory, written atomically.
    pub fn save(&self, dir: &Path, store: &ParamStore, base: &str) -> Result<()> {
        write_output(dir, "adapter", |tmp| {
            self.write_files(tmp, store, base, &Head::causal_lm())
        })
    }

    /// Folds every adapter into its base weight (W₀ += s·B·A) and detaches the adapters:
    /// the model is then a plain model with the fine-tune built in.
    pub fn merge(&self, model: &mut DecoderModel, store: &ParamStore) -> Result<()> {
        self.merge_into(model.linears_mut(), store)
    }

    /// `merge` for any set of linear layers.
    pub fn merge_into(&self, linears: Vec<&mut Linear>, store: &ParamStore) -> Result<()> {
        let s = self.cfg.scale();
        for lin in linears {
            if lin.qbase.is_some() {
                bail!("{}: cannot merge into GGUF blocks (QLoRA); merge the adapter into the model loaded without --qlora (`lmforge merge`)", lin.name);
            }
            if lin.adapter.take().is_none() {
                continue;
            }
            let var = |n: &str| -> Result<&Var> {
                Ok(&store
                    .get(n)
                    .with_context(|| format!("missing parameter {n}"))?
                    .var)
            };
            let a = var(&key_a(&lin.name))?.as_detached_tensor();
            let b = var(&key_b(&lin.name))?.as_detached_tensor();
            let delta = (b.matmul(&a)? * s)?; // (out, in)
            let w = var(&format!("{}.weight", lin.name))?;
            let mut merged = (out_in(lin)? + delta)?; // (out, in)
            if self.cfg.use_dora {
                // W = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row
                let m = var(&key_m(&lin.name))?.as_detached_tensor();
                let norms = merged.sqr()?.sum(1)?.sqrt()?;
                merged = merged.broadcast_mul(&(m / norms)?.unsqueeze(1)?)?;
            }
            let merged = match lin.layout {
                Layout::OutIn => merged,
                Layout::InOut => merged.t()?.contiguous()?,
            };
            w.set(&merged)?;
            // GGUF blocks of the old weight would now decode a different model.
            lin.quant = None;
        }
        Ok(())
    }
}

/// Reads a PEFT LoRA directory's `adapter_config.json` (causal LM: no `modules_to_save`).
pub fn read_config(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
    causal_lm_config(dir, read_config_with_heads(dir)?)
}

/// A causal LM's adapter trains no heads: refuses `modules_to_save`.
fn causal_lm_config(
    dir: &Path,
    (cfg, base, heads): (LoraConfig, Option<String>, Vec<String>),
) -> Result<(LoraConfig, Option<String>)> {
    if !heads.is_empty() {
        bail!(
            "{}: modules_to_save {heads:?} is not supported for a causal LM adapter",
            dir.join("adapter_config.json").display()
        );
    }
    Ok((cfg, base))
}

/// `read_config` of an adapter that may train heads in full (`modules_to_save`, e.g. a reward
/// model's `score`): returns them too.
pub fn read_config_with_heads(dir: &Path) -> Result<(LoraConfig, Option<String>, Vec<String>)> {
    config_from(
        dir,
        &crate::input::read_json(&dir.join("adapter_config.json"))?,
    )
}

/// `read_config_with_heads` of an `adapter_config.json` already parsed.
fn config_from(dir: &Path, v: &Value) -> Result<(LoraConfig, Option<String>, Vec<String>)> {
    let path = dir.join("adapter_config.json");
    let field = |k: &str| v.get(k).filter(|x| !x.is_null());
    let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type {peft_type:?} is not a LoRA adapter (lmforge reads LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, P_TUNING and its LMFORGE_BOTTLENECK)",
            path.display()
        );
    }
    super::refuse_set(
        v,
        &[
            "lora_bias",
            "use_qalora",
            "layers_to_transform",
            "layer_replication",
            "exclude_modules",
            "target_parameters",
            "trainable_token_indices",
        ],
        dir,
        "LoRA",
    )?;
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            bail!(
                "{}: {k} (per-module ranks) is not supported",
                path.display()
            );
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .with_context(|| format!("{}: key r missing", path.display()))?;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .with_context(|| format!("{}: key lora_alpha missing", path.display()))?;
    let targets = match field("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
        Some(Value::String(s)) => bail!(
            "{}: target_modules as a regular expression ({s:?}) is not supported; give a list",
            path.display()
        ),
        Some(Value::Array(a)) => Targets::Names(
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
        ),
        _ => bail!("{}: key target_modules missing", path.display()),
    };
    let cfg = LoraConfig {
        r: r as usize,
        alpha,
        dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
        targets,
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        use_dora: field("use_dora").and_then(Value::as_bool).unwrap_or(false),
    };
    let base = field("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    let heads = super::files::modules_to_save(v);
    Ok((cfg, base, heads))
}

/// Loads a PEFT LoRA directory onto `model` (adapters enabled; A and B are trainable
/// parameters of the store, so loading one and training on continues it).
pub fn load(
    dir: &Path,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Lora> {
    let v = crate::input::read_json(&dir.join("adapter_config.json"))?;
    load_with(dir, &v, model, store, switch)
}

/// `load` of an `adapter_config.json` already parsed (`peft::load` read it for `peft_type`).
pub fn load_with(
    dir: &Path,
    v: &Value,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Lora> {
    let (cfg, _) = causal_lm_config(dir, config_from(dir, v)?)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        bail!("{}: adapter_model.safetensors is missing", dir.display());
    }
    let w = WeightSource::open_files(&[file])?;
    attach(model, store, &cfg, Some(&w), 0, switch)
}
