//! Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning") and P-tuning (Liu et al. 2021, "GPT Understands, Too"): P trained input embeddings
//! in front of every sequence, the model frozen.
//!
//!   prompt tuning:  x = [E ; embed(ids)],          E (P, C) trained
//!   P-tuning:       x = [f(E) ; embed(ids)],       f = PEFT's MLP (C→h→h→C, ReLU) or
//!                                                  bidirectional LSTM + MLP head
//!
//! E starts N(0, 1) (PEFT's RANDOM) or as the embeddings of a text's tokens, repeated or cut to P
//! (PEFT's TEXT init). Saved as PEFT saves them: `prompt_embeddings` = E, or f(E) folded for
//! P-tuning (PEFT loads either in inference mode as plain embeddings). The virtual tokens come
//! before the real ones, whose positions start at P; since they attend only to each other,
//! their keys and values are the model's cache over E alone, computed once per forward and
//! handed to every layer as a prefix (`model::virtual_tokens`) — the output keeps the real
//! positions only. Deviation: PEFT's logits include the P virtual positions; lmforge's do not.

use super::lstm::Lstm;
use super::mlp::{Act, Mlp};
use super::{virtual_json, AdapterSwitch};
use crate::model::loader::WeightSource;
use crate::model::params::{Init, ParamKind, Source};
use crate::model::virtual_tokens::{Virtual, VirtualTokens};
use crate::model::{DecoderModel, ParamStore};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

/// P-tuning's prompt encoder (PEFT's `encoder_reparameterization_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Mlp,
    Lstm,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    /// PEFT's TEXT init: the token ids of `prompt_tuning_init_text` (and the text).
    pub init_text: Option<(String, Vec<u32>)>,
    /// P-tuning: the encoder, its hidden size (0: the model's width) and LSTM layers.
    pub encoder: Option<(EncoderKind, usize, usize)>,
}

impl PromptConfig {
    pub fn is_p_tuning(&self) -> bool {
        self.encoder.is_some()
    }
}

/// f of P-tuning.
#[derive(Clone)]
enum Head {
    /// Linear, ReLU, Linear, ReLU, Linear.
    Mlp(Mlp),
    /// Bidirectional LSTM, then Linear(2h, 2h), ReLU, Linear(2h, C).
    Lstm(Lstm, Mlp),
}

#[derive(Clone)]
struct Tokens {
    emb: Tensor, // (P, C)
    head: Option<Head>,
    switch: AdapterSwitch,
}

impl Tokens {
    /// The virtual tokens' input embeddings, (P, C): what PEFT saves.
    fn embeddings(&self) -> Result<Tensor> {
        Ok(match &self.head {
            None => self.emb.clone(),
            Some(Head::Mlp(mlp)) => mlp.forward(&self.emb)?,
            Some(Head::Lstm(lstm, mlp)) => mlp.forward(&lstm.forward(&self.emb)?)?,
        })
    }
}

impl VirtualTokens for Tokens {
    fn active(&self) -> bool {
        self.switch.enabled()
    }
    fn positions(&self) -> usize {
        self.emb.dims()[0]
    }
    fn tensors(&self) -> Result<Virtual> {
        Ok(Virtual::Embeddings(self.embeddings()?))
    }
    fn detached(&self) -> Arc<dyn VirtualTokens> {
        let head = self.head.as_ref().map(|h| match h {
            Head::Mlp(m) => Head::Mlp(m.detached()),
            Head::Lstm(lstm, m) => Head::Lstm(lstm.detached(), m.detached()),
        });
        Arc::new(Tokens {
            emb: self.emb.detach(),
            head,
            switch: self.switch.clone(),
        })
    }
}

/// Prompt-tuning or P-tuning tokens attached to a model.
pub struct Prompt {
    pub cfg: PromptConfig,
    tokens: Tokens,
    n_heads: usize,
    n_layers: usize,
}

const EMB: &str = "prompt_encoder.embedding.weight";

/// Attaches virtual tokens to `model`. `weights`: a PEFT directory's `prompt_embeddings`, or
/// for P-tuning the unfolded encoder under PEFT's names (`prompt_encoder.embedding.weight`,
/// `prompt_encoder.mlp_head.*`, `prompt_encoder.lstm_head.*`).
pub fn attach(
    model: &mut DecoderModel,
    store: &mut ParamStore,
    cfg: &PromptConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Prompt> {
    let c = &model.cfg;
    let host = Host {
        hidden: c.hidden_size,
        max_positions: c.max_position_embeddings,
        vocab: c.vocab_size,
        n_heads: c.num_heads,
        n_layers: c.num_layers,
        embed: &|ids| model.embed(ids),
    };
    let p = attach_to(&host, store, cfg, weights, seed, switch)?;
    model.virtual_tokens = Some(p.tokens());
    Ok(p)
}

/// What prompt tokens need from the model they go in front of (decoder or encoder).
pub struct Host<'a> {
    pub hidden: usize,
    /// The model's context: the virtual tokens must leave room in it.
    pub max_positions: usize,
    pub vocab: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    /// ids (1, n) -> word embeddings (1, n, C), for the TEXT init.
    pub embed: &'a dyn Fn(&Tensor) -> Result<Tensor>,
}

/// `attach` for any host; the caller hands `Prompt::tokens` to its model.
pub fn attach_to(
    host: &Host,
    store: &mut ParamStore,
    cfg: &PromptConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Prompt> {
    let (p, c) = (cfg.num_virtual_tokens, host.hidden);
    if p == 0 || p >= host.max_positions {
        bail!(
            "prompt tuning needs 1 to {} virtual tokens (num_virtual_tokens), not {p}",
            host.max_positions.saturating_sub(1)
        );
    }
    let src = weights.map_or(Source::Random { seed }, Source::Weights);
    let emb_name = if cfg.is_p_tuning() {
        EMB
    } else {
        super::prefix::FLAT
    };
    let mut emb = store.add(
        &src,
        emb_name,
        &[p, c],
        ParamKind::Adapter,
        Init::Normal(1.0),
        true,
    )?;
    if let (Some((_, ids)), None) = (&cfg.init_text, weights) {
        if ids.is_empty() {
            bail!("the prompt-tuning init text has no tokens");
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= host.vocab) {
            bail!("init text token {bad} is outside the vocabulary");
        }
        let ids: Vec<u32> = ids.iter().copied().cycle().take(p).collect();
        let idx = Tensor::from_slice(&ids, p, emb.device())?;
        let init = (host.embed)(&idx.unsqueeze(0)?)?.squeeze(0)?.detach();
        let param = store
            .get(emb_name)
            .ok_or_else(|| anyhow::anyhow!("internal error: {emb_name} missing"))?;
        param.var.set(&init)?;
        emb = param.var.as_tensor().clone();
    }
    let head = match cfg.encoder {
        None => None,
        Some((kind, h, n_layers)) => {
            let h = if h == 0 { c } else { h };
            let m = "prompt_encoder.mlp_head";
            Some(match kind {
                EncoderKind::Mlp => Head::Mlp(Mlp::new(store, &src, m, &[c, h, h, c], Act::Relu)?),
                EncoderKind::Lstm => {
                    let lstm = Lstm::new(store, &src, "prompt_encoder.lstm_head", c, h, n_layers)?;
                    Head::Lstm(
                        lstm,
                        Mlp::new(store, &src, m, &[2 * h, 2 * h, c], Act::Relu)?,
                    )
                }
            })
        }
    };
    if let Some(w) = weights {
        w.check_all_used(|_| false)?;
    }
    let tokens = Tokens {
        emb,
        head,
        switch: switch.clone(),
    };
    Ok(Prompt {
        cfg: cfg.clone(),
        tokens,
        n_heads: host.n_heads,
        n_layers: host.n_layers,
    })
}

impl Prompt {
    /// The tokens, for the model to hold.
    pub fn tokens(&self) -> Arc<dyn VirtualTokens> {
        Arc::new(self.tokens.clone())
    }

    /// Writes PEFT's files: the config, the (folded) virtual-token embeddings and the modules
    /// trained in full (`head`).
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &super::lora::Head,
    ) -> Result<()> {
        let task_type = head.task_type;
        let emb = self.tokens.embeddings()?.detach();
        let (p, c) = emb.dims2()?;
        let kind = if self.cfg.is_p_tuning() {
            "P_TUNING"
        } else {
            "PROMPT_TUNING"
        };
        let mut j = virtual_json(kind, task_type, base, p, c, self.n_heads, self.n_layers);
        match (&self.cfg.encoder, &self.cfg.init_text) {
            (Some((kind, h, layers)), _) => {
                j["encoder_reparameterization_type"] = json!(match kind {
                    EncoderKind::Mlp => "MLP",
                    EncoderKind::Lstm => "LSTM",
                });
                j["encoder_hidden_size"] = json!(if *h == 0 { c } else { *h });
                j["encoder_num_layers"] = json!(layers);
                j["encoder_dropout"] = json!(0.0);
            }
            (None, Some((text, _))) => {
                j["prompt_tuning_init"] = json!("TEXT");
                j["prompt_tuning_init_text"] = json!(text);
                j["tokenizer_name_or_path"] = json!(base);
            }
            (None, None) => j["prompt_tuning_init"] = json!("RANDOM"),
        }
        super::write_virtual(dir, &mut j, &emb, store, head)
    }

    pub fn describe(&self) -> String {
        let what = match &self.cfg.encoder {
            Some((EncoderKind::Mlp, ..)) => "P-tuning (MLP encoder)",
            Some((EncoderKind::Lstm, ..)) => "P-tuning (LSTM encoder)",
            None => "prompt tuning",
        };
        format!(", {what}: {} virtual tokens", self.cfg.num_virtual_tokens)
    }
}

/// Loads a PEFT prompt-tuning or P-tuning directory: its (folded) embeddings, trainable, so
/// training continues them as prompt tuning.
pub fn load(
    dir: &Path,
    v: &Value,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Prompt> {
    let cfg = read_config(dir, v, model.cfg.hidden_size, model.cfg.num_layers)?;
    let w = super::open_adapter_weights(dir)?;
    attach(model, store, &cfg, Some(&w), 0, switch)
}

/// A prompt-tuning or P-tuning `adapter_config.json` as lmforge loads it: P plain embeddings
/// (P-tuning's encoder is folded into them).
pub fn read_config(dir: &Path, v: &Value, hidden: usize, n_layers: usize) -> Result<PromptConfig> {
    let p = super::check_virtual_json(dir, v, n_layers, hidden, None)?;
    Ok(PromptConfig {
        num_virtual_tokens: p,
        init_text: None,
        encoder: None,
    })
}
