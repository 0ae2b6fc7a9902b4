//! The models a server offers, by id: `serve --model M [--adapter A]` offers one; the dashboard
//! also offers what its runs directory holds — each run's `model/` (an HF directory), `adapter/`
//! (a PEFT directory over the base it names) and pre-training checkpoints with model files.
//! A request names a model by id only: ids are looked up in this list, never opened as paths.

use crate::model::hf::{self, LoadedModel};
use anyhow::Result;
use candle_core::Device;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
}

pub struct Catalog {
    fixed: Option<(String, Spec)>,
    runs: Option<PathBuf>,
    device: Device,
}

/// A run directory (one with `metrics.jsonl`) under the runs root.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Its path below the root, with `/` separators.
    pub name: String,
    pub dir: PathBuf,
}

/// How deep below the runs root run directories are looked for, and how many are listed.
const MAX_DEPTH: usize = 3;
const MAX_RUNS: usize = 2000;

impl Catalog {
    pub fn new(fixed: Option<(String, Spec)>, runs: Option<PathBuf>, device: Device) -> Self {
        Self {
            fixed,
            runs,
            device,
        }
    }

    /// Every model id with what it loads, the fixed model first.
    pub fn list(&self) -> Vec<(String, Spec)> {
        let mut out: Vec<(String, Spec)> = self.fixed.iter().cloned().collect();
        for run in self.runs() {
            out.extend(models_of(&run));
        }
        out
    }

    pub fn find(&self, id: &str) -> Option<Spec> {
        if let Some((name, s)) = &self.fixed {
            if name == id {
                return Some(s.clone());
            }
        }
        self.list()
            .into_iter()
            .find(|(n, _)| n == id)
            .map(|(_, s)| s)
    }

    /// Loads a model found by `find` (with its adapter, whose chat template wins).
    pub fn load(&self, spec: &Spec) -> Result<LoadedModel> {
        let mut m = hf::load_with_blocks(&spec.model, &self.device, &|_| true, true)?;
        if let Some(dir) = &spec.adapter {
            m.apply_adapter(dir)?;
        }
        Ok(m)
    }

    /// The run directories under the runs root (none without one), sorted by name.
    pub fn runs(&self) -> Vec<RunDir> {
        self.dirs_with("metrics.jsonl")
    }

    /// Directories under the runs root holding an `lmforge eval` result (`results.json`).
    pub fn evals(&self) -> Vec<RunDir> {
        self.dirs_with("results.json")
    }

    fn dirs_with(&self, file: &str) -> Vec<RunDir> {
        let Some(root) = &self.runs else {
            return Vec::new();
        };
        let mut out = Vec::new();
        walk(root, root, 0, file, &mut out);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn rel(root: &Path, dir: &Path) -> String {
    dir.strip_prefix(root)
        .unwrap_or(dir)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Directories holding `file`, depth-first, not following symbolic links, bounded.
fn walk(root: &Path, dir: &Path, depth: usize, file: &str, out: &mut Vec<RunDir>) {
    if out.len() >= MAX_RUNS {
        return;
    }
    if dir.join(file).is_file() && dir != root {
        out.push(RunDir {
            name: rel(root, dir),
            dir: dir.to_path_buf(),
        });
    }
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    for d in subdirs {
        // A run's own checkpoints are not runs.
        if d.file_name().is_some_and(|n| n == "checkpoints") {
            continue;
        }
        walk(root, &d, depth + 1, file, out);
    }
}

/// What a run offers to talk to: `model/`, `adapter/` (over its base) and checkpoints that hold
/// model files.
fn models_of(run: &RunDir) -> Vec<(String, Spec)> {
    let mut out = Vec::new();
    let model = run.dir.join("model");
    if model.join("config.json").is_file() {
        out.push((
            format!("{}/model", run.name),
            Spec {
                model,
                adapter: None,
            },
        ));
    }
    let adapter = run.dir.join("adapter");
    if let Some(base) = adapter_base(&adapter) {
        out.push((
            format!("{}/adapter", run.name),
            Spec {
                model: base,
                adapter: Some(adapter),
            },
        ));
    }
    if let Ok(entries) = std::fs::read_dir(run.dir.join("checkpoints")) {
        let mut cks: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                    && p.join("config.json").is_file()
                    && p.join("model.safetensors").is_file()
            })
            .collect();
        cks.sort();
        for ck in cks {
            let name = ck
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            out.push((
                format!("{}/checkpoints/{name}", run.name),
                Spec {
                    model: ck,
                    adapter: None,
                },
            ));
        }
    }
    out
}

/// The base model an adapter directory names, if it is one and the base exists.
fn adapter_base(dir: &Path) -> Option<PathBuf> {
    let cfg = dir.join("adapter_config.json");
    if !cfg.is_file() {
        return None;
    }
    let v = crate::input::read_json(&cfg).ok()?;
    let base = PathBuf::from(v.get("base_model_name_or_path")?.as_str()?);
    base.exists().then_some(base)
}
