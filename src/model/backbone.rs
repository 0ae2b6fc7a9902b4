//! A pre-trained body under a task head: a BERT encoder (features = pooled [CLS]) or a decoder
//! (features = the hidden state of each sequence's last real token, as transformers'
//! `…ForSequenceClassification` reads it). Loaded from an HF directory or GGUF file, saved back
//! as the transformers class that has the same head (`BertForSequenceClassification`,
//! `LlamaForSequenceClassification`, `GPT2ForSequenceClassification`).

use super::encoder::{Encoder, Heads};
use super::hf;
use super::layers::{Builder, Layout, Linear};
use super::loader::WeightSource;
use super::params::Source;
use super::{DecoderModel, Family, ForwardOpts, ParamStore};
use crate::tokenizer::Tok;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub enum Backbone {
    Encoder(Encoder),
    Decoder(DecoderModel),
}

pub struct LoadedBackbone {
    pub body: Backbone,
    pub store: ParamStore,
    pub tok: Tok,
    /// A decoder's chat template and end-of-turn ids (encoders have neither).
    pub chat_template: Option<String>,
    pub eos_ids: Vec<u32>,
}

impl LoadedBackbone {
    /// `source` as a chat template with this model's special tokens (as `LoadedModel::chat`).
    pub fn chat(&self, source: String) -> crate::chat::ChatTemplate {
        let name = |id: Option<u32>| id.and_then(|i| self.tok.inner.id_to_token(i));
        let bos = match &self.body {
            Backbone::Decoder(d) => d.cfg.bos_token_id.or(self.tok.bos_id),
            Backbone::Encoder(_) => self.tok.bos_id,
        };
        let eos = self.eos_ids.first().copied().or(self.tok.eos_id);
        crate::chat::ChatTemplate::new(source, name(bos), name(eos))
    }
}

/// True when `path` is an HF directory of an encoder (model_type bert); a directory whose
/// config.json cannot be read is an error naming it, not a guess.
fn is_encoder(path: &Path) -> Result<bool> {
    if !path.is_dir() {
        return Ok(false);
    }
    let v = crate::input::read_json(&path.join("config.json"))?;
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
                chat_template: None,
                eos_ids: Vec::new(),
            })
        } else {
            let m = hf::load(path, dev, frozen)?;
            Ok(LoadedBackbone {
                body: Backbone::Decoder(m.model),
                store: m.store,
                tok: m.tok,
                chat_template: m.chat_template,
                eos_ids: m.eos_ids,
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
            Backbone::Encoder(e) => e.context(),
            Backbone::Decoder(d) => d.context(),
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

    /// Right-padded rows -> every token's hidden state (B, T, C) (prompt-tuning tokens of an
    /// encoder left out).
    pub fn token_states(&self, rows: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Tensor> {
        let h = self.states(rows, pad, dev)?;
        match self {
            Backbone::Encoder(e) if e.virtual_positions() > 0 => {
                let p = e.virtual_positions();
                Ok(h.narrow(1, p, h.dim(1)? - p)?)
            }
            _ => Ok(h),
        }
    }

    /// `token_states` with an encoder's prompt-tuning tokens first.
    fn states(&self, rows: &[Vec<u32>], pad: u32, dev: &Device) -> Result<Tensor> {
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
        match self {
            Backbone::Encoder(e) => e.pooled(&self.states(rows, pad, dev)?),
            Backbone::Decoder(_) => {
                let h = self.token_states(rows, pad, dev)?;
                let (b, t, c) = h.dims3()?;
                // transformers' rule: the rightmost token that is not the pad id (a trailing
                // EOS that doubles as padding is skipped, as the Python model skips it).
                let last: Vec<u32> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let j = r
                            .iter()
                            .rposition(|&x| x != pad)
                            .unwrap_or(r.len().max(1) - 1);
                        (i * t + j) as u32
                    })
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

    /// PEFT's `model_type` of the body (its per-architecture defaults).
    pub fn model_type(&self) -> &str {
        match self {
            Backbone::Encoder(_) => "bert",
            Backbone::Decoder(d) => &d.cfg.model_type,
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

/// A body with a trained sequence head, read back from what `finetune` / `reward` write: an
/// `…ForSequenceClassification` HF directory, or a PEFT adapter directory whose
/// `modules_to_save` hold the head (`score`; BERT's `classifier` and `pooler`).
pub struct HeadModel {
    pub m: LoadedBackbone,
    pub head: Linear,
    /// transformers' `pad_token_id`: a decoder's features are read at the last other token.
    pub pad: u32,
}

fn head_linear(
    store: &mut ParamStore,
    w: &WeightSource,
    (name, bias): (&str, bool),
    hidden: usize,
    trainable: bool,
) -> Result<Linear> {
    let key = format!("{name}.weight");
    let n = match w.shape(&key).as_deref() {
        Some([n, h]) if *h == hidden => *n,
        Some(s) => anyhow::bail!("head {key} has shape {s:?}; expected (labels, {hidden})"),
        None => anyhow::bail!("the weights have no sequence head ({key})"),
    };
    let mut b = Builder {
        store,
        source: &Source::Weights(w),
        frozen: &|_| !trainable,
        blocks: None,
    };
    Linear::new(&mut b, name, hidden, n, bias, Layout::OutIn, 0.02)
}

/// Loads a head model (see `HeadModel`); `base` overrides an adapter's `base_model_name_or_path`.
/// `trainable`: the head (and an adapter's LoRA weights) get gradients; the body stays frozen.
pub fn load_head_model(
    path: &Path,
    base: Option<&Path>,
    dev: &Device,
    trainable: bool,
) -> Result<HeadModel> {
    if path.join("adapter_config.json").is_file() {
        return load_head_adapter(path, base, dev, trainable);
    }
    let cfg_path = path.join("config.json");
    let v = crate::input::read_json(&cfg_path)?;
    let arch = v["architectures"][0].as_str().unwrap_or("");
    if !arch.ends_with("ForSequenceClassification") {
        anyhow::bail!(
            "{}: architectures {arch:?} is not a …ForSequenceClassification model",
            cfg_path.display()
        );
    }
    if is_encoder(path)? {
        let heads = Heads {
            mlm: false,
            pooler: true,
        };
        let mut e = hf::load_encoder(path, dev, heads, &|_| true)?;
        let w = WeightSource::open_dir(path)?;
        let hidden = e.model.cfg.hidden_size;
        let head = head_linear(&mut e.store, &w, ("classifier", true), hidden, trainable)?;
        let pad = e.model.cfg.pad_token_id;
        let m = LoadedBackbone {
            body: Backbone::Encoder(e.model),
            store: e.store,
            tok: e.tok,
            chat_template: crate::chat::template_from_dir(path)?,
            eos_ids: Vec::new(),
        };
        return Ok(HeadModel { m, head, pad });
    }
    let (mut cfg, w) = hf::open_dir(path)?;
    // `…ForSequenceClassification` has no LM head; an untied one is not built.
    if !cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
        cfg.tie_word_embeddings = true;
    }
    let mut store = ParamStore::new(dev.clone());
    let model = DecoderModel::new(&cfg, &mut store, &Source::Weights(&w), &|_| true)?;
    let head = head_linear(&mut store, &w, ("score", false), cfg.hidden_size, trainable)?;
    w.check_all_used(|n| DecoderModel::unused_ok(&cfg, n))?;
    let (tok, eos_ids, chat_template) = hf::dir_extras(path, &cfg)?;
    let pad = v["pad_token_id"]
        .as_u64()
        .map(|p| p as u32)
        .or(tok.eos_id)
        .unwrap_or(0);
    let m = LoadedBackbone {
        body: Backbone::Decoder(model),
        store,
        tok,
        chat_template,
        eos_ids,
    };
    Ok(HeadModel { m, head, pad })
}

fn load_head_adapter(
    dir: &Path,
    base: Option<&Path>,
    dev: &Device,
    trainable: bool,
) -> Result<HeadModel> {
    let (cfg, base_in_file, heads) = crate::peft::read_head_config(dir)?;
    let base = match (base, &base_in_file) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(b)) => std::path::PathBuf::from(b),
        (None, None) => {
            anyhow::bail!("{}: no base_model_name_or_path; pass --base", dir.display())
        }
    };
    if !base.exists() {
        anyhow::bail!(
            "{}: its base model {} does not exist here; pass --base DIR",
            dir.display(),
            base.display()
        );
    }
    let mut m = Backbone::load(&base, dev, true, &|_| true)?;
    let file = dir.join("adapter_model.safetensors");
    let w = WeightSource::open_files(std::slice::from_ref(&file))?;
    let label = file.display().to_string();
    let (mut lora, mut rest) = (HashMap::new(), HashMap::new());
    for k in w.names() {
        let shape = w.shape(&k).with_context(|| format!("{label}: {k}"))?;
        let t = w.load(&k, &shape, dev)?;
        if crate::peft::is_adapter_tensor(&k) {
            lora.insert(k, t);
        } else {
            // LoRA-style adapters nest modules under base_model.model., prompt learning under
            // base_model.
            let name = k
                .strip_prefix("base_model.model.")
                .or_else(|| k.strip_prefix("base_model."))
                .unwrap_or(&k);
            rest.insert(name.to_string(), t);
        }
    }
    let switch = crate::peft::AdapterSwitch::default();
    let ws = WeightSource::from_tensors(label.clone(), lora);
    crate::peft::Adapters::attach_backbone(&mut m.body, &mut m.store, &cfg, Some(&ws), 0, &switch)?;
    // Modules trained in full overwrite the base's copies (BERT's pooler); the head is new.
    let (name, bias) = m.body.head_name();
    let (head_part, rest): (HashMap<_, _>, HashMap<_, _>) = rest
        .into_iter()
        .partition(|(k, _)| k.starts_with(&format!("{name}.")));
    for (k, t) in &rest {
        let Some(p) = m.store.get(k) else {
            anyhow::bail!(
                "{label}: tensor {k} belongs to no module of the base model (modules_to_save {heads:?})"
            );
        };
        if p.var.dims() != t.dims() {
            anyhow::bail!(
                "{label}: {k} has shape {:?}, the base model's {:?}",
                t.dims(),
                p.var.dims()
            );
        }
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    let hw = WeightSource::from_tensors(label, head_part);
    let hidden = m.body.hidden_size();
    let head = head_linear(&mut m.store, &hw, (name, bias), hidden, trainable)?;
    hw.check_all_used(|_| false)?;
    let pad = m.body.pad_id(&m.tok);
    if let Some(t) = crate::chat::template_from_dir(dir)? {
        m.chat_template = Some(t);
    }
    Ok(HeadModel { m, head, pad })
}
