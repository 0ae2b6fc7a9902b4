//! Parameter-efficient fine-tuning: one module per method. Each attaches to the model's
//! `Linear` layers through `layers::LinearAdapter`, trains only its own weights (the base is
//! built frozen: no gradient, no weight-gradient GEMM), and saves them in the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`) that Python `peft` loads.
//!
//! `AdapterSwitch::set_enabled(false)` turns every adapter off at once: the same model is then
//! the base model, which DPO and PPO use as their reference.

pub mod ia3;
pub mod lora;

use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Shared by every adapter of a model: on/off, and train mode (dropout) with its key.
#[derive(Debug, Default)]
pub struct SwitchState {
    disabled: AtomicBool,
    training: AtomicBool,
    /// Keys this forward's dropout masks; set per micro-batch so runs are reproducible.
    dropout_key: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct AdapterSwitch(pub Arc<SwitchState>);

impl AdapterSwitch {
    pub fn set_enabled(&self, on: bool) {
        self.0.disabled.store(!on, Ordering::SeqCst);
    }
    pub fn enabled(&self) -> bool {
        !self.0.disabled.load(Ordering::SeqCst)
    }
    /// Train mode applies adapter dropout with masks keyed by `key` (e.g. hash of step, micro).
    pub fn set_training(&self, on: bool, key: u64) {
        self.0.training.store(on, Ordering::SeqCst);
        self.0.dropout_key.store(key, Ordering::SeqCst);
    }
    pub fn training(&self) -> Option<u64> {
        self.0
            .training
            .load(Ordering::SeqCst)
            .then(|| self.0.dropout_key.load(Ordering::SeqCst))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PeftKind {
    Lora,
    Ia3,
}

/// The PEFT options of every fine-tuning method: flags and the `[peft]` config section.
#[derive(clap::Args, Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct PeftArgs {
    /// Parameter-efficient method (default: every weight trains).
    #[arg(long = "peft", value_enum)]
    pub method: Option<PeftKind>,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Comma-separated module names (q_proj,v_proj) or all-linear (IA³: PEFT's modules for the
    /// architecture, e.g. Llama's k_proj, v_proj, down_proj).
    #[arg(long, default_value = "all-linear")]
    pub target_modules: String,
    /// IA³: the targets whose input, not output, is rescaled (all-linear: the MLP's down
    /// projection).
    #[arg(long, default_value = "all-linear")]
    pub feedforward_modules: String,
    /// LoRA scaling α/√r instead of α/r.
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA: LoRA with a learned magnitude per output row (PEFT's `use_dora`).
    #[arg(long)]
    pub use_dora: bool,
    /// With --peft: also write the merged model to OUT/model.
    #[arg(long)]
    pub merge: bool,
}

crate::clap_default!(PeftArgs);

impl PeftArgs {
    /// A method's default learning rate: `full` for a full fine-tune, `peft` with adapters.
    pub fn lr(&self, full: f64, peft: f64) -> f64 {
        if self.method.is_some() {
            peft
        } else {
            full
        }
    }

    /// The LoRA configuration, or None for a full fine-tune; other methods are refused (the
    /// trainers that take them use `config`).
    pub fn lora(&self) -> Result<Option<lora::LoraConfig>> {
        match self.config()? {
            None => Ok(None),
            Some(PeftConfig::Lora(c)) => Ok(Some(c)),
            Some(other) => bail!(
                "--peft {}: this command supports LoRA only so far",
                other.name()
            ),
        }
    }

    /// The method's configuration, or None for a full fine-tune.
    pub fn config(&self) -> Result<Option<PeftConfig>> {
        let cfg = match self.method {
            Some(PeftKind::Lora) => Some(PeftConfig::Lora(lora::LoraConfig {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: lora::Targets::parse(&self.target_modules)?,
                use_rslora: self.use_rslora,
                use_dora: self.use_dora,
            })),
            Some(PeftKind::Ia3) => Some(PeftConfig::Ia3(ia3::Ia3Config::new(
                lora::Targets::parse(&self.target_modules)?,
                lora::Targets::parse(&self.feedforward_modules)?,
            ))),
            None => None,
        };
        if self.merge && cfg.is_none() {
            bail!("peft.merge (--merge) needs a PEFT method (--peft lora|ia3)");
        }
        if self.use_dora && self.method != Some(PeftKind::Lora) {
            bail!("peft.use_dora (--use-dora) is a LoRA option: give --peft lora");
        }
        Ok(cfg)
    }
}

/// A PEFT method's configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftConfig {
    Lora(lora::LoraConfig),
    Ia3(ia3::Ia3Config),
}

impl PeftConfig {
    pub fn name(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "lora",
            PeftConfig::Ia3(_) => "ia3",
        }
    }
}

/// The adapters attached to a model, whichever the method.
pub enum Adapters {
    Lora(lora::Lora),
    Ia3(ia3::Ia3),
}

impl Adapters {
    /// Attaches `cfg`'s adapters to a decoder (fresh: LoRA's A from `seed`, IA³'s vectors at 1).
    pub fn attach(
        model: &mut DecoderModel,
        store: &mut ParamStore,
        cfg: &PeftConfig,
        seed: u64,
        switch: &AdapterSwitch,
    ) -> Result<Self> {
        Ok(match cfg {
            PeftConfig::Lora(c) => {
                Adapters::Lora(lora::attach(model, store, c, None, seed, switch)?)
            }
            PeftConfig::Ia3(c) => {
                let c = c.resolve(&model.cfg.model_type);
                Adapters::Ia3(ia3::attach_to(
                    model.linears_mut(),
                    store,
                    &c,
                    None,
                    switch,
                )?)
            }
        })
    }

    /// ", LoRA r=8 on 28 layers" for the log.
    pub fn describe(&self) -> String {
        match self {
            Adapters::Lora(a) => format!(
                ", {} r={} on {} layers",
                if a.cfg.use_dora { "DoRA" } else { "LoRA" },
                a.cfg.r,
                a.modules.len()
            ),
            Adapters::Ia3(a) => format!(
                ", IA³ on {} layers ({} feed-forward)",
                a.modules.len(),
                a.modules.iter().filter(|(_, f)| *f).count()
            ),
        }
    }

    /// The PEFT directory's files (`adapter_config.json`, `adapter_model.safetensors`).
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &lora::Head,
    ) -> Result<()> {
        match self {
            Adapters::Lora(a) => a.write_files(dir, store, base, head),
            Adapters::Ia3(a) => a.write_files(dir, store, base, head),
        }
    }

    /// Folds the adapters into the base weights (the model is then a plain model).
    pub fn merge(&self, model: &mut DecoderModel, store: &ParamStore) -> Result<()> {
        match self {
            Adapters::Lora(a) => a.merge(model, store),
            Adapters::Ia3(a) => a.merge(model, store),
        }
    }
}

/// Loads a PEFT adapter directory onto a decoder, the method read from its
/// `adapter_config.json` (`peft_type`).
pub fn load(
    dir: &Path,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Adapters> {
    let v = crate::input::read_json(&dir.join("adapter_config.json"))?;
    match v.get("peft_type").and_then(|t| t.as_str()).unwrap_or("") {
        "IA3" => Ok(Adapters::Ia3(ia3::load(dir, &v, model, store, switch)?)),
        _ => Ok(Adapters::Lora(lora::load_with(
            dir, &v, model, store, switch,
        )?)),
    }
}

/// Refuses an adapter config that sets any of `keys` (features that change what the weights
/// mean): better an error naming the key than weights loaded wrongly.
pub(crate) fn refuse_set(
    v: &serde_json::Value,
    keys: &[&str],
    dir: &Path,
    method: &str,
) -> Result<()> {
    for k in keys {
        let set = match v.get(*k) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        if set {
            bail!(
                "{}: {k} is not supported by lmforge's {method}",
                dir.join("adapter_config.json").display()
            );
        }
    }
    Ok(())
}
