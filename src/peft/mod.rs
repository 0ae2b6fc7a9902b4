//! Parameter-efficient fine-tuning: one module per method. Each attaches to the model's
//! `Linear` layers through `layers::LinearAdapter`, trains only its own weights (the base is
//! built frozen: no gradient, no weight-gradient GEMM), and saves them in the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`) that Python `peft` loads.
//!
//! `AdapterSwitch::set_enabled(false)` turns every adapter off at once: the same model is then
//! the base model, which DPO and PPO use as their reference.

pub mod lora;

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
