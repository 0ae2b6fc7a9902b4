//! Parameter-efficient fine-tuning: one module per method. Each attaches to the model's
//! `Linear` layers through `layers::LinearAdapter`, trains only its own weights (the base is
//! built frozen: no gradient, no weight-gradient GEMM), and saves them in the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`) that Python `peft` loads.
//!
//! `AdapterSwitch::set_enabled(false)` turns every adapter off at once: the same model is then
//! the base model, which DPO and PPO use as their reference.

mod adapters;
pub mod bottleneck;
mod files;
pub mod ia3;
pub mod lora;
mod lstm;
mod mlp;
pub mod prefix;
pub mod prompt;

pub use adapters::{load, Adapters};
pub(crate) use files::{
    check_virtual_json, open_adapter_weights, refuse_set, virtual_json, write_virtual,
};
pub use files::{is_adapter_tensor, read_head_config};

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
    Ia3,
    /// Trained key/value prefixes in every layer.
    Prefix,
    /// Trained input embeddings ahead of the text.
    Prompt,
    /// Prompt tuning through a prompt encoder (MLP or LSTM).
    #[value(name = "p-tuning")]
    #[serde(rename = "p-tuning")]
    PTuning,
    /// Houlsby / Pfeiffer bottleneck adapters (lmforge's format: PEFT has none).
    Bottleneck,
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
    /// Prefix, prompt and P-tuning: the number of virtual tokens.
    #[arg(long, default_value_t = 20)]
    pub num_virtual_tokens: usize,
    /// Prefix tuning: train the prefix through PEFT's reparameterisation MLP
    /// (`prefix_projection`); it is saved folded.
    #[arg(long)]
    pub prefix_projection: bool,
    /// Hidden size of the prefix projection or the P-tuning encoder (0: the model's width).
    #[arg(long, default_value_t = 0)]
    pub encoder_hidden_size: usize,
    /// P-tuning's prompt encoder (PEFT's `encoder_reparameterization_type`).
    #[arg(long, value_enum, default_value = "mlp")]
    pub encoder_type: prompt::EncoderKind,
    /// P-tuning's LSTM layers.
    #[arg(long, default_value_t = 2)]
    pub encoder_num_layers: usize,
    /// Prompt tuning: start the virtual tokens as this text's token embeddings (PEFT's TEXT
    /// init; default N(0, 1), PEFT's RANDOM).
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// Bottleneck adapters: houlsby (after attention and after the MLP) or pfeiffer (after
    /// the MLP).
    #[arg(long, value_enum, default_value = "pfeiffer")]
    pub adapter_variant: bottleneck::Variant,
    /// Bottleneck adapters: hidden size / bottleneck size.
    #[arg(long, default_value_t = 16)]
    pub reduction_factor: usize,
    /// Bottleneck adapters' nonlinearity.
    #[arg(long, value_enum, default_value = "silu")]
    pub adapter_act: bottleneck::ActKind,
    /// QLoRA: keep a .gguf model's quantized linear weights in their blocks (frozen, read by
    /// the quantized GEMM, never dequantized to f32); the adapters train in f32.
    #[arg(long)]
    pub qlora: bool,
    /// With --peft: also write the merged model to OUT/model.
    #[arg(long)]
    pub merge: bool,
}

/// How a trainer loads its base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseLoad {
    /// Every weight trains (full fine-tune).
    Trainable,
    /// Every weight frozen (a PEFT method trains).
    Frozen,
    /// Frozen, linear weights kept as GGUF blocks (QLoRA).
    Quantized,
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

    /// How the base model loads for this method.
    pub fn base_load(&self) -> BaseLoad {
        match (self.method, self.qlora) {
            (None, _) => BaseLoad::Trainable,
            (Some(_), false) => BaseLoad::Frozen,
            (Some(_), true) => BaseLoad::Quantized,
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
            Some(PeftKind::Prefix) => Some(PeftConfig::Prefix(prefix::PrefixConfig {
                num_virtual_tokens: self.num_virtual_tokens,
                projection: self.prefix_projection.then_some(self.encoder_hidden_size),
            })),
            Some(k @ (PeftKind::Prompt | PeftKind::PTuning)) => {
                Some(PeftConfig::Prompt(prompt::PromptConfig {
                    num_virtual_tokens: self.num_virtual_tokens,
                    init_text: self.prompt_init_text.clone().map(|t| (t, Vec::new())),
                    encoder: (k == PeftKind::PTuning).then_some((
                        self.encoder_type,
                        self.encoder_hidden_size,
                        self.encoder_num_layers,
                    )),
                }))
            }
            Some(PeftKind::Bottleneck) => {
                Some(PeftConfig::Bottleneck(bottleneck::BottleneckConfig {
                    variant: self.adapter_variant,
                    reduction_factor: self.reduction_factor,
                    act: self.adapter_act,
                }))
            }
            None => None,
        };
        if self.merge && cfg.is_none() {
            bail!("peft.merge (--merge) needs a PEFT method (--peft lora|ia3)");
        }
        if self.merge && !cfg.as_ref().is_some_and(PeftConfig::mergeable) {
            bail!(
                "peft.merge (--merge): {} adds computation that is not a weight change and cannot be merged (LoRA, DoRA and IA³ can)",
                cfg.as_ref().map_or("", PeftConfig::name)
            );
        }
        if self.prefix_projection && self.method != Some(PeftKind::Prefix) {
            bail!("peft.prefix_projection (--prefix-projection) is a prefix-tuning option: give --peft prefix");
        }
        if self.prompt_init_text.is_some() && self.method != Some(PeftKind::Prompt) {
            bail!("peft.prompt_init_text (--prompt-init-text) is a prompt-tuning option: give --peft prompt");
        }
        if self.qlora && cfg.is_none() {
            bail!("peft.qlora (--qlora) trains adapters over a quantized base: give a PEFT method (--peft lora|…)");
        }
        if self.qlora && self.merge {
            bail!("peft.merge (--merge) with --qlora: the base stays in GGUF blocks; merge the adapter afterwards with `lmforge merge` (which dequantizes the base)");
        }
        if self.encoder_num_layers == 0 {
            bail!("peft.encoder_num_layers (--encoder-num-layers) must be at least 1");
        }
        if self.reduction_factor == 0 {
            bail!("peft.reduction_factor (--reduction-factor) must be at least 1");
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
    Prefix(prefix::PrefixConfig),
    /// Prompt tuning, or P-tuning with an encoder.
    Prompt(prompt::PromptConfig),
    Bottleneck(bottleneck::BottleneckConfig),
}

impl PeftConfig {
    pub fn name(&self) -> &'static str {
        match self {
            PeftConfig::Lora(_) => "lora",
            PeftConfig::Ia3(_) => "ia3",
            PeftConfig::Prefix(_) => "prefix",
            PeftConfig::Prompt(c) if c.is_p_tuning() => "p-tuning",
            PeftConfig::Prompt(_) => "prompt",
            PeftConfig::Bottleneck(_) => "bottleneck",
        }
    }

    /// Positions the method's virtual tokens take ahead of every sequence.
    pub fn virtual_positions(&self) -> usize {
        match self {
            PeftConfig::Prefix(c) => c.num_virtual_tokens,
            PeftConfig::Prompt(c) => c.num_virtual_tokens,
            _ => 0,
        }
    }

    /// Whether the method folds into the base weights.
    pub fn mergeable(&self) -> bool {
        matches!(self, PeftConfig::Lora(_) | PeftConfig::Ia3(_))
    }

    /// Tokenizes prompt tuning's init text (PEFT: `tokenizer(text)["input_ids"]`, with the
    /// tokenizer's special tokens).
    pub fn tokenize(&mut self, tok: &crate::tokenizer::Tok) -> Result<()> {
        if let PeftConfig::Prompt(prompt::PromptConfig {
            init_text: Some((text, ids)),
            ..
        }) = self
        {
            *ids = tok.encode(text, true)?;
        }
        Ok(())
    }
}
