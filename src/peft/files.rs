//! Adapter directories: reading task models' configs, refusing unsupported keys, and the files
//! of PEFT's prompt-learning methods (shared by prefix, prompt and P-tuning).

use super::lora;
use super::{bottleneck, ia3, prefix, prompt, PeftConfig};
use crate::model::loader::WeightSource;
use crate::model::params::{save_tensors, ParamKind};
use crate::model::ParamStore;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::path::Path;

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
    let heads = modules_to_save(&v);
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

/// `modules_to_save` as a list of names (absent or null: none).
pub(crate) fn modules_to_save(v: &Value) -> Vec<String> {
    match v.get("modules_to_save") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
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
    head: &Head,
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
    save_tensors(&tensors, &dir.join("adapter_model.safetensors"))
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
    let p = positive(v, "num_virtual_tokens", dir)?;
    // A causal LM's prompt learning trains no heads (a task model's adapter loads elsewhere).
    refuse_set(v, &["modules_to_save"], dir, "causal-LM prompt learning")?;
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

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Every linear layer except the output head (PEFT's `"all-linear"`).
    AllLinear,
    /// Module names or name suffixes at a `.` boundary, e.g. `q_proj` or `self_attn.q_proj`.
    Names(Vec<String>),
}

impl Targets {
    pub fn parse(s: &str) -> Result<Self> {
        if s.trim() == "all-linear" {
            return Ok(Targets::AllLinear);
        }
        let names: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            bail!("--target-modules: expected module names (q_proj,v_proj) or all-linear");
        }
        Ok(Targets::Names(names))
    }

    pub(crate) fn matches(&self, module: &str) -> bool {
        match self {
            Targets::AllLinear => module != "lm_head",
            Targets::Names(ns) => ns
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        match self {
            Targets::AllLinear => json!("all-linear"),
            Targets::Names(ns) => json!(ns),
        }
    }
}

/// What an adapter file holds besides the adapters: PEFT's `task_type` and the modules trained
/// in full (`modules_to_save`: module names such as `classifier` or `pooler`, matched as PEFT
/// does, by path suffix).
pub struct Head<'a> {
    pub task_type: &'a str,
    pub modules: Vec<&'a str>,
}

impl Head<'_> {
    pub fn causal_lm() -> Self {
        Head {
            task_type: "CAUSAL_LM",
            modules: Vec::new(),
        }
    }

    /// Whether parameter `name` belongs to a module trained in full. PEFT's matching: a
    /// module whose path is, or ends with, a listed name.
    pub fn saves(&self, name: &str) -> bool {
        self.modules
            .iter()
            .any(|m| name.starts_with(&format!("{m}.")) || name.contains(&format!(".{m}.")))
    }
}

/// Every linear layer's name, for error messages that list what a target could have been.
pub(crate) fn available(names: &[String]) -> String {
    let mut short: Vec<String> = names
        .iter()
        .map(|l| l.rsplit('.').next().unwrap_or(l).to_string())
        .collect();
    short.sort();
    short.dedup();
    short.join(", ")
}

/// Writes `dir/adapter_model.safetensors`: every adapter parameter under its PEFT name (the
/// store's), and the parameters of `head.modules` under `base_model.model.<name>`.
pub(crate) fn save_adapter_tensors(store: &ParamStore, head: &Head, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = store
        .params()
        .iter()
        .filter_map(|p| {
            let name = if p.kind == ParamKind::Adapter {
                p.name.clone()
            } else if head.saves(&p.name) {
                format!("base_model.model.{}", p.name)
            } else {
                return None;
            };
            Some((name, p.var.as_detached_tensor()))
        })
        .collect();
    save_tensors(&tensors, &dir.join("adapter_model.safetensors"))
}
