//! What the methods that train a causal LM share (SFT, DPO and its relatives, KTO): loading the
//! model with its chat template, attaching LoRA, and the outputs — an HF model directory (full
//! fine-tune) or a PEFT adapter directory (optionally merged too). The forgetting report is
//! `eval::score::Forgetting`, shared with the task heads.

use crate::chat::ChatTemplate;
use crate::model::hf;
use crate::outdir::{self, write_output};
use crate::peft::lora;
use crate::peft::{AdapterSwitch, Adapters, BaseLoad, PeftConfig};
use crate::train::engine::Control;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// A causal LM being trained: the loaded model, its adapters (if any) and the switch that turns
/// them off (the reference model of DPO/KTO).
pub struct Policy {
    pub m: hf::LoadedModel,
    pub switch: AdapterSwitch,
    pub adapters: Option<Adapters>,
    /// The template used (the model's own, `--chat-template`, or none).
    pub template: Option<String>,
    pub model_path: PathBuf,
}

impl Policy {
    /// Loads `path` (every weight frozen when `lora` is set) and resolves the chat template:
    /// `chat_template` if given, else the model's own.
    pub fn load(
        path: &Path,
        chat_template: Option<&Path>,
        base: BaseLoad,
        ctl: &Control,
    ) -> Result<Self> {
        let mut m = match base {
            BaseLoad::Trainable => hf::load(path, &ctl.device, &|_| false)?,
            BaseLoad::Frozen => hf::load(path, &ctl.device, &|_| true)?,
            BaseLoad::Quantized => {
                let (m, n, bytes) = hf::load_qlora(path, &ctl.device)?;
                eprintln!(
                    "QLoRA: {n} linear layers kept as GGUF blocks ({:.1} MiB), the rest in f32",
                    bytes as f64 / (1 << 20) as f64
                );
                m
            }
        };
        let template = match chat_template {
            Some(p) => Some(crate::input::read_text(p, crate::input::MAX_CONFIG_BYTES)?),
            None => m.chat_template.clone(),
        };
        m.chat_template = template.clone();
        Ok(Self {
            m,
            switch: AdapterSwitch::default(),
            adapters: None,
            template,
            model_path: path.to_path_buf(),
        })
    }

    /// Falls back to the ChatML template when the model has none and none was given; true if
    /// it did (callers with conversations in their data say so).
    pub fn use_default_template(&mut self) -> bool {
        if self.template.is_some() {
            return false;
        }
        self.template = Some(crate::data::sft::DEFAULT_TEMPLATE.to_string());
        self.m.chat_template = self.template.clone();
        true
    }

    /// The chat template with this model's special tokens, if there is one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        match self.template {
            Some(_) => Ok(Some(self.m.chat("chat template")?)),
            None => Ok(None),
        }
    }

    /// The end-of-sequence id appended to completions, also used as padding.
    pub fn eos(&self) -> Option<u32> {
        self.m.eos_ids.first().copied().or(self.m.tok.eos_id)
    }

    /// Attaches the PEFT method's adapters (the base was loaded frozen).
    pub fn attach_peft(&mut self, cfg: &PeftConfig, seed: u64) -> Result<()> {
        let mut cfg = cfg.clone();
        cfg.tokenize(&self.m.tok)?;
        let a = Adapters::attach(
            &mut self.m.model,
            &mut self.m.store,
            &cfg,
            seed,
            &self.switch,
        )?;
        self.adapters = Some(a);
        Ok(())
    }

    /// The longest sequence a method trains on: `requested`, within the context the PEFT
    /// method's virtual tokens leave (they are attached later).
    pub fn max_len(&self, requested: usize, peft: Option<&PeftConfig>) -> Result<usize> {
        let ctx = self.context(peft);
        let max_len = requested.min(ctx);
        if max_len < 2 {
            anyhow::bail!("max_len must be at least 2 (the context left is {ctx})");
        }
        Ok(max_len)
    }

    /// Positions left for real tokens once `peft`'s virtual tokens are attached.
    pub fn context(&self, peft: Option<&PeftConfig>) -> usize {
        let virt = peft.map_or(0, PeftConfig::virtual_positions);
        self.m
            .model
            .cfg
            .max_position_embeddings
            .saturating_sub(virt)
    }

    /// Every weight of the model: the store's and the GGUF blocks of QLoRA's frozen layers.
    pub fn num_params(&self) -> usize {
        self.m.store.num_params() + self.m.model.quantized_params()
    }

    /// "trainable parameters: …" for the log.
    pub fn describe(&self) -> String {
        let (t, n) = (self.m.store.num_trainable(), self.num_params());
        format!(
            "trainable parameters: {t} of {n} ({:.3}%){}",
            100.0 * t as f64 / n as f64,
            self.adapters
                .as_ref()
                .map_or(String::new(), Adapters::describe)
        )
    }

    /// Writes `run/adapter` (LoRA; with `merge` also `run/model` merged) or `run/model`.
    pub fn write_outputs(&mut self, run_dir: &Path, merge: bool, ctl: &Control) -> Result<PathBuf> {
        let base = self.model_path.display().to_string();
        let m = &mut self.m;
        let out = match &self.adapters {
            Some(a) => {
                let dir = outdir::entry(run_dir, "adapter")?;
                let template = self.template.clone();
                write_output(&dir, "adapter", |tmp| {
                    a.write_files(tmp, &m.store, &base, &lora::Head::causal_lm())?;
                    m.tok.save(&tmp.join("tokenizer.json"))?;
                    if let Some(t) = &template {
                        std::fs::write(tmp.join("chat_template.jinja"), t)?;
                    }
                    Ok(())
                })?;
                if merge {
                    a.merge(&mut m.model, &m.store)?;
                    let merged = outdir::entry(run_dir, "model")?;
                    hf::save_loaded(&merged, m)?;
                    ctl.say(&format!("merged model written to {}", merged.display()));
                }
                dir
            }
            None => {
                let dir = outdir::entry(run_dir, "model")?;
                hf::save_loaded(&dir, m)?;
                dir
            }
        };
        ctl.say(&format!("wrote {}", out.display()));
        Ok(out)
    }
}
