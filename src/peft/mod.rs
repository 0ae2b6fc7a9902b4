//! Parameter-efficient fine-tuning: one module per method. Each attaches to the model's
//! `Linear` layers through `layers::LinearAdapter`, trains only its own weights (the base is
//! built frozen: no gradient, no weight-gradient GEMM), and saves them in the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`) that Python `peft` loads.
//!
//! `AdapterSwitch::set_enabled(false)` turns every adapter off at once: the same model is then
//! the base model, which DPO and PPO use as their reference.

pub mod bottleneck;
pub mod ia3;
pub mod lora;
mod lstm;
pub mod prefix;
pub mod prompt;

use crate::model::loader::WeightSource;
use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
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

/// The adapters attached to a model, whichever the method.
pub enum Adapters {
    Lora(lora::Lora),
    Ia3(ia3::Ia3),
    Prefix(prefix::Prefix),
    Prompt(prompt::Prompt),
    Bottleneck(bottleneck::Bottleneck),
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
            PeftConfig::Prefix(c) => {
                Adapters::Prefix(prefix::attach(model, store, c, None, seed, switch)?)
            }
            PeftConfig::Prompt(c) => {
                Adapters::Prompt(prompt::attach(model, store, c, None, seed, switch)?)
            }
            PeftConfig::Bottleneck(c) => Adapters::Bottleneck(bottleneck::attach(
                model.linears_mut(),
                store,
                c,
                None,
                seed,
                switch,
            )?),
        })
    }

    /// Attaches a method that lives on linear layers (LoRA, DoRA, IA³, bottleneck adapters) to
    /// `linears` — a task model's body, encoder or decoder; `model_type` picks IA³'s defaults.
    /// `weights` loads them (an adapter directory), otherwise they start fresh from `seed`.
    pub fn attach_linears(
        linears: Vec<&mut crate::model::layers::Linear>,
        store: &mut ParamStore,
        cfg: &PeftConfig,
        model_type: &str,
        weights: Option<&WeightSource>,
        seed: u64,
        switch: &AdapterSwitch,
    ) -> Result<Self> {
        Ok(match cfg {
            PeftConfig::Lora(c) => {
                Adapters::Lora(lora::attach_to(linears, store, c, weights, seed, switch)?)
            }
            PeftConfig::Ia3(c) => Adapters::Ia3(ia3::attach_to(
                linears,
                store,
                &c.resolve(model_type),
                weights,
                switch,
            )?),
            PeftConfig::Bottleneck(c) => Adapters::Bottleneck(bottleneck::attach(
                linears, store, c, weights, seed, switch,
            )?),
            PeftConfig::Prefix(_) | PeftConfig::Prompt(_) => bail!(
                "--peft {}: virtual tokens attach to a model, not to its linear layers",
                cfg.name()
            ),
        })
    }

    /// Attaches any method to a task model's body: virtual tokens to the model itself (prompt
    /// tuning on encoders and decoders, prefix tuning on decoders), the others to its linear
    /// layers.
    pub fn attach_backbone(
        body: &mut crate::model::backbone::Backbone,
        store: &mut ParamStore,
        cfg: &PeftConfig,
        weights: Option<&WeightSource>,
        seed: u64,
        switch: &AdapterSwitch,
    ) -> Result<Self> {
        use crate::model::backbone::Backbone;
        match (cfg, body) {
            (PeftConfig::Prompt(c), Backbone::Encoder(e)) => {
                let ec = &e.cfg;
                let host = prompt::Host {
                    hidden: ec.hidden_size,
                    vocab: ec.vocab_size,
                    n_heads: ec.num_heads,
                    n_layers: ec.num_layers,
                    embed: &|ids| e.word.forward(ids),
                };
                let p = prompt::attach_to(&host, store, c, weights, seed, switch)?;
                e.virtual_tokens = Some(p.tokens());
                Ok(Adapters::Prompt(p))
            }
            (PeftConfig::Prompt(c), Backbone::Decoder(d)) => Ok(Adapters::Prompt(
                prompt::attach(d, store, c, weights, seed, switch)?,
            )),
            (PeftConfig::Prefix(c), Backbone::Decoder(d)) => Ok(Adapters::Prefix(
                prefix::attach(d, store, c, weights, seed, switch)?,
            )),
            (PeftConfig::Prefix(_), Backbone::Encoder(_)) => bail!(
                "--peft prefix: prefix tuning of an encoder is not supported (Python PEFT has none for BERT either); use --peft prompt or p-tuning"
            ),
            (cfg, body) => {
                let model_type = body.model_type().to_string();
                Self::attach_linears(body.linears_mut(), store, cfg, &model_type, weights, seed, switch)
            }
        }
    }

    /// `merge` for a task model's body.
    pub fn merge_linears(
        &self,
        linears: Vec<&mut crate::model::layers::Linear>,
        store: &ParamStore,
    ) -> Result<()> {
        match self {
            Adapters::Lora(a) => a.merge_into(linears, store),
            Adapters::Ia3(a) => a.merge_into(linears, store),
            _ => bail!(
                "{} cannot be merged: it adds computation, not a weight change",
                self.name()
            ),
        }
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
            Adapters::Prefix(a) => a.describe(),
            Adapters::Prompt(a) => a.describe(),
            Adapters::Bottleneck(a) => a.describe(),
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
            Adapters::Bottleneck(a) => a.write_files(dir, store, base, head),
            Adapters::Prefix(a) => a.write_files(dir, store, base, head),
            Adapters::Prompt(a) => a.write_files(dir, store, base, head),
        }
    }

    /// Folds the adapters into the base weights (the model is then a plain model).
    pub fn merge(&self, model: &mut DecoderModel, store: &ParamStore) -> Result<()> {
        match self {
            Adapters::Lora(a) => a.merge(model, store),
            Adapters::Ia3(a) => a.merge(model, store),
            Adapters::Prefix(_) | Adapters::Prompt(_) | Adapters::Bottleneck(_) => bail!(
                "{} cannot be merged: it adds computation, not a weight change",
                self.name()
            ),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Adapters::Lora(_) => "LoRA",
            Adapters::Ia3(_) => "IA³",
            Adapters::Prefix(_) => "prefix tuning",
            Adapters::Prompt(p) if p.cfg.is_p_tuning() => "P-tuning",
            Adapters::Prompt(_) => "prompt tuning",
            Adapters::Bottleneck(_) => "a bottleneck adapter",
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
        "PREFIX_TUNING" => Ok(Adapters::Prefix(prefix::load(
            dir, &v, model, store, switch,
        )?)),
        "PROMPT_TUNING" | "P_TUNING" => Ok(Adapters::Prompt(prompt::load(
            dir, &v, model, store, switch,
        )?)),
        bottleneck::PEFT_TYPE => Ok(Adapters::Bottleneck(bottleneck::load(
            dir, &v, model, store, switch,
        )?)),
        _ => Ok(Adapters::Lora(lora::load_with(
            dir, &v, model, store, switch,
        )?)),
    }
}

/// Whether `name` is a tensor of a linear-layer method (not a module trained in full).
pub fn is_adapter_tensor(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.ends_with(".lora_magnitude_vector")
        || name.ends_with(".ia3_l")
        || name.contains(".adapter_down.")
        || name.contains(".adapter_up.")
        || name == prefix::FLAT
}

/// A task model's adapter directory: the method, the base model's name, and the modules
/// trained in full (`modules_to_save`). Prompt-learning methods come back as plain prompt
/// tuning (their encoders are folded) of P tokens; prefix tuning as its folded prefix.
pub fn read_head_config(dir: &Path) -> Result<(PeftConfig, Option<String>, Vec<String>)> {
    let mut v = crate::input::read_json(&dir.join("adapter_config.json"))?;
    let kind = v
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let heads: Vec<String> = match v.get("modules_to_save") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    };
    let base = v
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .map(String::from);
    if let Some(o) = v.as_object_mut() {
        o.remove("modules_to_save");
    }
    let cfg = match kind.as_str() {
        "IA3" => PeftConfig::Ia3(ia3::read_config(dir, &v)?.0),
        bottleneck::PEFT_TYPE => PeftConfig::Bottleneck(bottleneck::read_config(dir, &v)?),
        "PROMPT_TUNING" | "P_TUNING" => PeftConfig::Prompt(prompt::PromptConfig {
            num_virtual_tokens: positive(&v, "num_virtual_tokens", dir)?,
            init_text: None,
            encoder: None,
        }),
        "PREFIX_TUNING" => PeftConfig::Prefix(prefix::PrefixConfig {
            num_virtual_tokens: positive(&v, "num_virtual_tokens", dir)?,
            projection: None,
        }),
        _ => PeftConfig::Lora(lora::read_config_with_heads(dir)?.0),
    };
    Ok((cfg, base, heads))
}

fn positive(v: &Value, key: &str, dir: &Path) -> Result<usize> {
    match v.get(key).and_then(Value::as_u64) {
        Some(n) if n > 0 => Ok(n as usize),
        _ => bail!(
            "{}: {key} missing or not a positive integer",
            dir.join("adapter_config.json").display()
        ),
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

// ------------------------------------------------------- prompt-learning files (PEFT layout)

/// The `adapter_config.json` keys PEFT's prompt-learning configs share.
pub(crate) fn virtual_json(
    peft_type: &str,
    task_type: &str,
    base: &str,
    p: usize,
    token_dim: usize,
    n_heads: usize,
    n_layers: usize,
) -> Value {
    json!({
        "peft_type": peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base,
        "num_virtual_tokens": p,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": n_heads,
        "num_layers": n_layers,
        "inference_mode": true,
        "modules_to_save": null,
        "revision": null,
    })
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` holding `prompt_embeddings`.
/// With `head`'s modules trained in full saved as PEFT saves them for prompt learning:
/// `base_model.<name>` (no `.model`), listed in `modules_to_save`.
pub(crate) fn write_virtual(
    dir: &Path,
    config: &mut Value,
    embeddings: &Tensor,
    store: &ParamStore,
    head: &lora::Head,
) -> Result<()> {
    let mut tensors = vec![(prefix::FLAT.to_string(), embeddings.contiguous()?)];
    for p in store.params() {
        if head.saves(&p.name) {
            tensors.push((format!("base_model.{}", p.name), p.var.as_detached_tensor()));
        }
    }
    if !head.modules.is_empty() {
        config["modules_to_save"] = json!(head.modules);
    }
    crate::fsutil::write_json(&dir.join("adapter_config.json"), config)?;
    crate::model::params::save_tensors(&tensors, &dir.join("adapter_model.safetensors"))
}

/// Checks a prompt-learning config against the model; returns P.
pub(crate) fn check_virtual_json(
    dir: &Path,
    v: &Value,
    n_layers: usize,
    token_dim: usize,
    n_heads: Option<usize>,
) -> Result<usize> {
    let path = dir.join("adapter_config.json");
    let int = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let p = match int("num_virtual_tokens") {
        Some(p) if p > 0 => p,
        _ => bail!(
            "{}: num_virtual_tokens missing or not a positive integer",
            path.display()
        ),
    };
    let mut want = vec![
        ("num_transformer_submodules", 1),
        ("token_dim", token_dim),
        ("num_layers", n_layers),
    ];
    want.extend(n_heads.map(|h| ("num_attention_heads", h)));
    for (k, expect) in want {
        if let Some(got) = int(k) {
            if got != expect {
                bail!(
                    "{}: {k} is {got}, this model needs {expect}",
                    path.display()
                );
            }
        }
    }
    Ok(p)
}

/// A PEFT directory's `adapter_model.safetensors`.
pub(crate) fn open_adapter_weights(dir: &Path) -> Result<WeightSource> {
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        bail!("{}: adapter_model.safetensors is missing", dir.display());
    }
    WeightSource::open_files(&[file])
}
