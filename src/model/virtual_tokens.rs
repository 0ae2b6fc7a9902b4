//! Virtual tokens ahead of every sequence, as the model sees them: for a decoder, prefix
//! tuning, prompt tuning and P-tuning all come down to P positions whose keys and values every
//! query attends to, with the real tokens placed after them (positions P, P+1, …) — as
//! transformers places tokens after PEFT's `past_key_values` prefix or its prepended prompt
//! embeddings. The methods themselves live in `peft::prefix` and `peft::prompt`; a model asks
//! them for their tensors once per forward (a decoder once per generation with a cache).
//!
//! Encoders (BERT) attend both ways, so their virtual tokens cannot be a prefix computed
//! alone: prompt embeddings are prepended to the input and run with it, as PEFT does.

use super::decoder::{DecoderModel, ForwardOpts, KvCache};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// Keys and values of one layer's virtual positions: (1, n_kv, P, hd) each.
pub type LayerKv = (Tensor, Tensor);

/// What a method gives the model, on the autograd graph of the method's weights.
pub enum Virtual {
    /// Prefix tuning: PEFT's flat prefix, (P, L·2·n_kv·hd) (see `split_prefix`).
    Prefix(Tensor),
    /// Prompt tuning / P-tuning: input embeddings (P, C).
    Embeddings(Tensor),
}

pub trait VirtualTokens: Send + Sync {
    /// Off when the adapters are switched off (the reference model).
    fn active(&self) -> bool;
    /// P, the number of virtual positions.
    fn positions(&self) -> usize;
    fn tensors(&self) -> Result<Virtual>;
    /// The same tokens on detached weights (decoding).
    fn detached(&self) -> Arc<dyn VirtualTokens>;
}

/// PEFT's prefix layout: one row per virtual token of `n_layers · 2 · n_kv · hd` values, layer
/// l's keys in block 2l and its values in block 2l+1 — (P, L·2·n_kv·hd) -> per layer
/// (1, n_kv, P, hd) keys and values.
pub fn split_prefix(
    flat: &Tensor,
    n_layers: usize,
    n_kv: usize,
    hd: usize,
) -> Result<Vec<LayerKv>> {
    let (p, width) = flat.dims2()?;
    if width != n_layers * 2 * n_kv * hd {
        bail!(
            "prefix rows hold {width} values, the model needs {n_layers} layers × 2 × {n_kv} heads × {hd}"
        );
    }
    // (P, L·2, n_kv, hd) -> (L·2, n_kv, P, hd)
    let t = flat
        .reshape((p, n_layers * 2, n_kv, hd))?
        .permute((1, 2, 0, 3))?;
    (0..n_layers)
        .map(|l| {
            let part =
                |i: usize| -> Result<Tensor> { Ok(t.narrow(0, 2 * l + i, 1)?.contiguous()?) };
            Ok((part(0)?, part(1)?))
        })
        .collect()
}

impl DecoderModel {
    /// Virtual tokens as every layer's keys and values: a prefix split per layer, or prompt
    /// embeddings run alone (they come first and attend only to each other).
    pub(super) fn virtual_keys_values(&self, v: &dyn VirtualTokens) -> Result<Vec<LayerKv>> {
        let (n_kv, hd) = self.kv_shape();
        match v.tensors()? {
            Virtual::Prefix(flat) => split_prefix(&flat, self.blocks.len(), n_kv, hd),
            Virtual::Embeddings(e) => self.layer_keys_values(&e.unsqueeze(0)?),
        }
    }

    /// Every layer's keys and values of `embeds` (1, P, C) at positions 0..P, kept on the
    /// autograd graph: prompt tuning's virtual tokens as a prefix. -> per layer (1, n_kv, P, hd).
    pub fn layer_keys_values(&self, embeds: &Tensor) -> Result<Vec<LayerKv>> {
        let mut cache = KvCache::new(self.blocks.len());
        cache.keep_graph = true;
        let opts = ForwardOpts {
            cache: Some(&mut cache),
            ..Default::default()
        };
        self.run(embeds, opts, 0)?;
        cache
            .layers
            .into_iter()
            .map(|l| {
                let (k, v) = l.ok_or_else(|| anyhow::anyhow!("a layer left no keys"))?;
                // (1, P, n_kv, hd) -> (1, n_kv, P, hd)
                Ok((k.transpose(1, 2)?, v.transpose(1, 2)?))
            })
            .collect()
    }
}
