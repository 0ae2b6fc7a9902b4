//! Training recipes: TOML files (unknown keys are errors naming the key) plus `--set key=value`
//! overrides that are type-checked against the same schema.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_RECIPE: &str = include_str!("../configs/shakespeare-gpt.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Gpt2,
    Llama,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads for grouped-query attention (llama); defaults to n_head.
    pub n_kv_head: Option<usize>,
    pub d_model: usize,
    /// Context length (max positions).
    pub ctx: usize,
    /// MLP hidden size; defaults to 4·d (gpt2) or 8/3·d rounded to 64 (llama).
    pub ffn: Option<usize>,
    pub rope_theta: Option<f64>,
    /// Continue pre-training an existing HF model directory instead of starting from scratch.
    pub init_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// An existing tokenizer.json; if absent, a byte-level BPE is trained on the corpus.
    pub path: Option<PathBuf>,
    pub vocab_size: usize,
    pub min_frequency: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub paths: Vec<PathBuf>,
    pub val_fraction: f64,
    /// Replace invalid UTF-8 with U+FFFD instead of failing.
    #[serde(default)]
    pub lossy_utf8: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub seed: u64,
    pub max_steps: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    #[serde(default = "adam_eps")]
    pub eps: f64,
    /// Max global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    /// Validation every N steps (0 = only at the end).
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: u64,
    #[serde(default = "keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Print a sample every N steps (0 = only at the end).
    pub sample_every: u64,
    pub sample_prompt: String,
    pub sample_tokens: usize,
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn adam_eps() -> f64 {
    1e-8
}
fn keep_checkpoints() -> usize {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
}

impl Recipe {
    /// Parses TOML text, applies `key.path=value` overrides, and resolves relative paths of
    /// the recipe against `base`.
    pub fn parse(text: &str, origin: &str, overrides: &[String], base: &Path) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let de = toml::Value::Table(table);
        let mut r: Recipe = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("{origin}: key {path}: {}", e.into_inner())
        })?;
        r.resolve_paths(base);
        r.validate(origin)?;
        Ok(r)
    }

    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
                Self::parse(&text, &p.display().to_string(), overrides, &base)
            }
            None => {
                let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
                Self::parse(DEFAULT_RECIPE, "default recipe", overrides, &base)
            }
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        self.data.paths.iter_mut().for_each(fix);
        self.tokenizer.path.iter_mut().for_each(fix);
        self.model.init_from.iter_mut().for_each(fix);
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let t = &self.train;
        let checks: [(bool, &str); 8] = [
            (t.batch_size > 0, "train.batch_size must be positive"),
            (t.seq_len > 1, "train.seq_len must be at least 2"),
            (t.grad_accum > 0, "train.grad_accum must be positive"),
            (
                t.lr > 0.0 && t.min_lr >= 0.0,
                "train.lr must be positive and train.min_lr non-negative",
            ),
            (
                (0.0..1.0).contains(&self.data.val_fraction),
                "data.val_fraction must be in [0, 1)",
            ),
            (
                self.model.n_layer > 0 && self.model.n_head > 0,
                "model.n_layer and model.n_head must be positive",
            ),
            (
                self.model.d_model.is_multiple_of(self.model.n_head),
                "model.d_model must be divisible by model.n_head",
            ),
            (
                t.seq_len <= self.model.ctx,
                "train.seq_len must not exceed model.ctx",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{origin}: {msg}");
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// `train.lr=1e-3` → sets table["train"]["lr"]; the value is read as TOML (so `3`, `1e-3`,
/// `true`, `["a"]` keep their types) and falls back to a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        bail!("--set {spec:?}: expected key.path=value");
    };
    let key = key.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().context("--set: empty key")?;
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("--set {key}: {p} is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_recipe_parses() {
        let r = Recipe::load(None, &[]).unwrap();
        assert_eq!(r.model.arch, Arch::Gpt2);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Recipe::load(None, &["train.learning_rate=0.1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
    }

    #[test]
    fn override_type_is_checked() {
        let e = Recipe::load(None, &["train.max_steps=lots".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.max_steps"), "{e}");
        let r = Recipe::load(None, &["train.lr=0.5".into(), "model.arch=llama".into()]).unwrap();
        assert_eq!(r.train.lr, 0.5);
        assert_eq!(r.model.arch, Arch::Llama);
    }
}
