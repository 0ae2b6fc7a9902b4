//! The adapters attached to a model, whichever the method: attaching them to a decoder, a task
//! model's body or its linear layers, describing, saving, merging, and loading a directory by its
//! `peft_type`.

use super::{bottleneck, ia3, lora, prefix, prompt, AdapterSwitch, PeftConfig};
use crate::model::loader::WeightSource;
use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Result};
use std::path::Path;

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
        match cfg {
            PeftConfig::Prefix(_) | PeftConfig::Prompt(_) => {
                Self::attach_virtual(model, store, cfg, None, seed, switch)
            }
            _ => {
                let model_type = model.cfg.model_type.clone();
                let linears = model.linears_mut();
                Self::attach_linears(linears, store, cfg, &model_type, None, seed, switch)
            }
        }
    }

    /// Prefix, prompt or P-tuning tokens in front of a decoder's sequences.
    fn attach_virtual(
        model: &mut DecoderModel,
        store: &mut ParamStore,
        cfg: &PeftConfig,
        weights: Option<&WeightSource>,
        seed: u64,
        switch: &AdapterSwitch,
    ) -> Result<Self> {
        Ok(match cfg {
            PeftConfig::Prefix(c) => {
                Adapters::Prefix(prefix::attach(model, store, c, weights, seed, switch)?)
            }
            PeftConfig::Prompt(c) => {
                Adapters::Prompt(prompt::attach(model, store, c, weights, seed, switch)?)
            }
            _ => bail!(
                "internal error: {} is not a virtual-token method",
                cfg.name()
            ),
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
                    max_positions: ec.max_position_embeddings,
                    vocab: ec.vocab_size,
                    n_heads: ec.num_heads,
                    n_layers: ec.num_layers,
                    embed: &|ids| e.word.forward(ids),
                };
                let p = prompt::attach_to(&host, store, c, weights, seed, switch)?;
                e.virtual_tokens = Some(p.tokens());
                Ok(Adapters::Prompt(p))
            }
            (PeftConfig::Prompt(_) | PeftConfig::Prefix(_), Backbone::Decoder(d)) => {
                Self::attach_virtual(d, store, cfg, weights, seed, switch)
            }
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
        self.merge_linears(model.linears_mut(), store)
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
