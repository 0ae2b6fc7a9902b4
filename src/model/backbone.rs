//! A pre-trained body under a task head: a BERT encoder (features = pooled [CLS]) or a decoder
//! (features = the hidden state of each sequence's last real token, as transformers'
//! `…ForSequenceClassification` reads it). Loaded from an HF directory or GGUF file, saved back
//! as the transformers class that has the same head (`BertForSequenceClassification`,
//! `LlamaForSequenceClassification`, `GPT2ForSequenceClassification`).

use super::encoder::{Encoder, Heads};
use super::hf;
use super::layers::Linear;
use super::{DecoderModel, Family, ForwardOpts, ParamStore};
use crate::tokenizer::Tok;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::path::Path;

pub enum Backbone {
    Encoder(Encoder),
    Decoder(DecoderModel),
}

pub struct LoadedBackbone {
    pub body: Backbone,
    pub store: ParamStore,
    pub tok: Tok,
}

/// True when `path` is an HF directory of an encoder (model_type bert); a directory whose
/// config.json cannot be read is an error naming it, not a guess.
fn is_encoder(path: &Path) -> Result<bool> {
    if !path.is_dir() {
        return Ok(false);
    }
    let p = path.join("config.json");
    let text = crate::input::read_text(&p, crate::input::MAX_CONFIG_BYTES)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", p.display()))?;
    Ok(v.get("model_type").and_then(Value::as_str) == Some("bert"))
}

impl Backbone {
    /// `pooler`: build BERT's pooler (sequence classification reads it; token heads do not).
    pub fn load(
        path: &Path,
        dev: &Device,
        pooler: bool,
        frozen: &dyn Fn(&str) -> bool,
    ) -> Result<LoadedBackbone> {
        if is_encoder(path)? {
            let m = hf::load_encoder(path, dev, Heads { mlm: false, pooler }, frozen)?;
            Ok(LoadedBackbone {
                body: Backbone::Encoder(m.model),
                store: m.store,
                tok: m.tok,
            })
        } else {
            let m = hf::load(path, dev, frozen)?;
            Ok(LoadedBackbone {
                body: Backbone::Decoder(m.model),
                store: m.store,
                tok: m.tok,
            })
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Encoder(e) => e.cfg.hidden_size,
            Backbone::Decoder(d) => d.cfg.hidden_size,
        }
    }

    pub fn max_len(&self) -> usize {
        match self {
            Backbone::Encoder(e) => e.cfg.max_position_embeddings,
            Backbone::Decoder(d) => d.cfg.max_position_embeddings,
        }
    }

    pub fn pad_id(&self, tok: &Tok) -> u32 {
        match self {
            Backbone::Encoder(e) => e.cfg.pad_token_id,
            Backbone::Decoder(_) => tok.eos_id.unwrap_or(0),
        }
    }

    /// Where the head's weights go and whether it has a bias (transformers' names).
    pub fn head_name(&self) -> (&'static str, bool) {
        match self {
            Backbone::Encoder(_) => ("classifier", true),
            Backbone::Decoder(_) => ("score", false),
        }
    }

    /// The per-token head of `…ForTokenClassification` (name, bias).
    pub fn token_head_name(&self) -> (&'static str, bool) {
        match self {
            Backbone::Decoder(d) if d.cfg.family == Family::Llama => ("score", true),
            _ => ("classifier", true),
        }
    }

    /// Right-padded rows -> every token's hidden state (B, T, C).
    pub fn token_states(&self, rows: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Tensor> {
        let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad, t - r.len()));
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            mask.extend(std::iter::repeat_n(0u32, t - r.len()));
        }
        let x = Tensor::from_vec(ids, (b, t), dev)?;
        match self {
            Backbone::Encoder(e) => {
                let m = Tensor::from_vec(mask, (b, t), dev)?;
                e.forward(&x, None, Some(&m))
            }
            // Causal attention: right padding cannot affect earlier tokens.
            Backbone::Decoder(d) => d.hidden_states(&d.embed(&x)?, ForwardOpts::default()),
        }
    }

    /// One feature vector per row (B, C): pooled [CLS] or the last real token.
    pub fn features(&self, rows: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Tensor> {
        let h = self.token_states(rows, pad, dev)?;
        match self {
            Backbone::Encoder(e) => e.pooled(&h),
            Backbone::Decoder(_) => {
                let (b, t, c) = h.dims3()?;
                let last: Vec<u32> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (i * t + r.len().max(1) - 1) as u32)
                    .collect();
                let idx = Tensor::from_vec(last, b, dev)?;
                Ok(h.reshape((b * t, c))?.index_select(&idx, 0)?)
            }
        }
    }

    /// Perplexity of `ids` under the body with its (untouched) LM head: how much a task
    /// fine-tune made a decoder forget. Encoders have no causal LM to score with.
    pub fn lm_score(&self, ids: &[u32]) -> Result<crate::eval::score::Score> {
        match self {
            Backbone::Decoder(d) => crate::eval::score::score_text_ids(d, ids),
            Backbone::Encoder(_) => anyhow::bail!(
                "--forgetting-eval measures causal-LM perplexity, which a BERT encoder does not have"
            ),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Backbone::Encoder(e) => e.linears_mut(),
            Backbone::Decoder(d) => {
                // The LM head is not part of a classifier.
                d.linears_mut()
                    .into_iter()
                    .filter(|l| l.name != "lm_head")
                    .collect()
            }
        }
    }

    /// config.json of the model with a `kind` head ("SequenceClassification", …) and labels.
    pub fn head_config(&self, kind: &str, labels: &[String], pad: u32) -> Value {
        let id2: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect();
        let l2i: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), json!(i)))
            .collect();
        let mut v = match self {
            Backbone::Encoder(e) => e.cfg.to_hf_json(&format!("BertFor{kind}")),
            Backbone::Decoder(d) => {
                let mut v = d.cfg.to_hf_json();
                let arch = match d.cfg.family {
                    Family::Gpt2 => "GPT2",
                    Family::Llama => match d.cfg.model_type.as_str() {
                        "mistral" => "Mistral",
                        "qwen2" => "Qwen2",
                        _ => "Llama",
                    },
                };
                v["architectures"] = json!([format!("{arch}For{kind}")]);
                v
            }
        };
        v["id2label"] = Value::Object(id2);
        v["label2id"] = Value::Object(l2i);
        v["num_labels"] = json!(labels.len());
        v["pad_token_id"] = json!(pad);
        v
    }
}

/// The parameter names a head model writes: the body without a decoder's LM head.
pub fn saved_with_head(name: &str) -> bool {
    name != "lm_head.weight"
}

/// f32 helper for logits → argmax per row.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    let v: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(v.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
                    if x > bv {
                        (i, x)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect())
}
