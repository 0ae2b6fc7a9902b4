//! Parameter-efficient fine-tuning: one module per method. Each attaches to the model's
//! `Linear` layers through `layers::LinearAdapter`, trains only its own weights (the base is
//! built frozen: no gradient, no weight-gradient GEMM), and saves them in the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`) that Python `peft` loads.
//!
//! `AdapterSwitch::set_enabled(false)` turns every adapter off at once: the same model is then
//! the base model, which DPO and PPO use as their reference.

pub mod lora;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
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
    /// Comma-separated module names (q_proj,v_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub target_modules: String,
    /// LoRA scaling α/√r instead of α/r.
    #[arg(long)]
    pub use_rslora: bool,
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

    /// The LoRA configuration, or None for a full fine-tune.
    pub fn lora(&self) -> Result<Option<lora::LoraConfig>> {
        let cfg = match self.method {
            Some(PeftKind::Lora) => Some(lora::LoraConfig {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: lora::Targets::parse(&self.target_modules)?,
                use_rslora: self.use_rslora,
            }),
            None => None,
        };
        if self.merge && cfg.is_none() {
            bail!("peft.merge (--merge) needs peft.method = \"lora\" (--peft lora)");
        }
        Ok(cfg)
    }
}
