//! Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
//! Generation"): P trained key/value vectors per layer that every token attends to.
//!
//!   attention over [P_k ; K], [P_v ; V],   P (P, L·2·n_kv·hd) trained, the model frozen
//!
//! With `prefix_projection` the prefix is produced by PEFT's reparameterisation MLP,
//! P = W₂·tanh(W₁·E + b₁) + b₂ from P embeddings E (the paper's stabilising trick), and saved
//! folded: `adapter_model.safetensors` holds `prompt_embeddings`, the prefix itself, as PEFT
//! saves it. The real tokens' positions start after the prefix, as transformers places tokens
//! after PEFT's `past_key_values` (`model::virtual_tokens`). For grouped-query models the prefix
//! has n_kv heads (PEFT's `token_dim = head_dim · num_key_value_heads`). Fresh prefixes are
//! N(0, 1), as PEFT's `nn.Embedding`.

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

#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// Train through PEFT's MLP of this hidden size (`prefix_projection`; None: the prefix
    /// itself trains). 0 means the token dimension, PEFT's default.
    pub projection: Option<usize>,
}

/// Where the prefix comes from.
#[derive(Clone)]
enum Encoder {
    /// The prefix itself, (P, L·2·td).
    Flat(Tensor),
    /// PEFT's `PrefixEncoder` with `prefix_projection`: E (P, td) -> tanh MLP -> (P, L·2·td).
    Projected { emb: Tensor, mlp: Mlp },
}

#[derive(Clone)]
struct Tokens {
    enc: Encoder,
    p: usize,
    n_layers: usize,
    n_kv: usize,
    hd: usize,
    switch: AdapterSwitch,
}

impl Tokens {
    /// The prefix as PEFT saves it, (P, L·2·td).
    fn flat(&self) -> Result<Tensor> {
        match &self.enc {
            Encoder::Flat(t) => Ok(t.clone()),
            Encoder::Projected { emb, mlp } => mlp.forward(emb),
        }
    }
}

impl VirtualTokens for Tokens {
    fn active(&self) -> bool {
        self.switch.enabled()
    }
    fn positions(&self) -> usize {
        self.p
    }
    fn tensors(&self) -> Result<Virtual> {
        Ok(Virtual::Prefix(self.flat()?))
    }
    fn detached(&self) -> Arc<dyn VirtualTokens> {
        let enc = match &self.enc {
            Encoder::Flat(t) => Encoder::Flat(t.detach()),
            Encoder::Projected { emb, mlp } => Encoder::Projected {
                emb: emb.detach(),
                mlp: mlp.detached(),
            },
        };
        Arc::new(Tokens {
            enc,
            ..self.clone()
        })
    }
}

/// A prefix attached to a model.
pub struct Prefix {
    pub cfg: PrefixConfig,
    tokens: Tokens,
}

/// PEFT's parameter names (adapter `default` dropped).
pub const FLAT: &str = "prompt_embeddings";
const EMB: &str = "prompt_encoder.embedding.weight";

/// Attaches a prefix to `model`. `weights`: a PEFT directory's `prompt_embeddings` (the prefix
/// itself), or with a projection the unfolded encoder under PEFT's names
/// (`prompt_encoder.embedding.weight`, `prompt_encoder.transform.{0,2}.{weight,bias}`).
pub fn attach(
    model: &mut DecoderModel,
    store: &mut ParamStore,
    cfg: &PrefixConfig,
    weights: Option<&WeightSource>,
    seed: u64,
    switch: &AdapterSwitch,
) -> Result<Prefix> {
    if cfg.num_virtual_tokens == 0 || cfg.num_virtual_tokens >= model.cfg.max_position_embeddings {
        bail!(
            "prefix tuning needs 1 to {} virtual tokens (num_virtual_tokens), not {}",
            model.cfg.max_position_embeddings - 1,
            cfg.num_virtual_tokens
        );
    }
    let (n_kv, hd) = model.kv_shape();
    let (p, l, td) = (cfg.num_virtual_tokens, model.cfg.num_layers, n_kv * hd);
    let src = weights.map_or(Source::Random { seed }, Source::Weights);
    let mut add = |name: &str, shape: &[usize]| {
        store.add(
            &src,
            name,
            shape,
            ParamKind::Adapter,
            Init::Normal(1.0),
            true,
        )
    };
    let enc = match cfg.projection {
        None => Encoder::Flat(add(FLAT, &[p, l * 2 * td])?),
        Some(h) => {
            let h = if h == 0 { td } else { h };
            let emb = add(EMB, &[p, td])?;
            let widths = [td, h, l * 2 * td];
            let mlp = Mlp::new(store, &src, "prompt_encoder.transform", &widths, Act::Tanh)?;
            Encoder::Projected { emb, mlp }
        }
    };
    if let Some(w) = weights {
        w.check_all_used(|_| false)?;
    }
    let tokens = Tokens {
        enc,
        p,
        n_layers: l,
        n_kv,
        hd,
        switch: switch.clone(),
    };
    model.virtual_tokens = Some(Arc::new(tokens.clone()));
    Ok(Prefix {
        cfg: cfg.clone(),
        tokens,
    })
}

impl Prefix {
    /// Writes PEFT's files: the config and the folded prefix as `prompt_embeddings`.
    pub fn write_files(
        &self,
        dir: &Path,
        store: &ParamStore,
        base: &str,
        head: &super::lora::Head,
    ) -> Result<()> {
        let task_type = head.task_type;
        let t = &self.tokens;
        let td = t.n_kv * t.hd;
        let mut c = virtual_json(
            "PREFIX_TUNING",
            task_type,
            base,
            t.p,
            td,
            t.n_kv,
            t.n_layers,
        );
        c["prefix_projection"] = json!(self.cfg.projection.is_some());
        c["encoder_hidden_size"] = json!(match self.cfg.projection {
            Some(h) if h > 0 => h,
            _ => td,
        });
        c["init_weights"] = Value::Null;
        super::write_virtual(dir, &mut c, &t.flat()?.detach(), store, head)
    }

    /// P and where its weights go, for the log.
    pub fn describe(&self) -> String {
        format!(
            ", prefix of {} virtual tokens{}",
            self.cfg.num_virtual_tokens,
            if self.cfg.projection.is_some() {
                " (through the projection MLP)"
            } else {
                ""
            }
        )
    }
}

/// Loads a PEFT prefix-tuning directory (its folded prefix; trainable, so training continues
/// it without the projection).
pub fn load(
    dir: &Path,
    v: &Value,
    model: &mut DecoderModel,
    store: &mut ParamStore,
    switch: &AdapterSwitch,
) -> Result<Prefix> {
    let (n_kv, hd) = model.kv_shape();
    let p = super::check_virtual_json(dir, v, model.cfg.num_layers, n_kv * hd, Some(n_kv))?;
    let w = super::open_adapter_weights(dir)?;
    let cfg = PrefixConfig {
        num_virtual_tokens: p,
        projection: None,
    };
    attach(model, store, &cfg, Some(&w), 0, switch)
}
