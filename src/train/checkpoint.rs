//! Checkpoints: an HF model directory plus the trainer's state, written under a temporary name
//! and renamed, with a `latest` pointer updated only after the checkpoint is complete.
//!
//!   run/checkpoints/step-00000500/  config.json model.safetensors tokenizer.json …
//!                                   optimizer.safetensors trainer_state.json recipe.toml
//!   run/checkpoints/latest          "step-00000500"

use crate::fsutil::{write_dir, write_file, write_json};
use crate::model::params::save_tensors;
use crate::model::{hf, DecoderModel, ParamStore};
use crate::tokenizer::Tok;
use crate::train::optim::AdamW;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed; the next batch drawn is the one of this step index.
    pub step: u64,
    pub tokens_seen: u64,
    /// Seconds of training before this checkpoint (for wall-time reports across resumes).
    pub elapsed_s: f64,
    pub lmforge_version: String,
}

pub struct Checkpoint<'a> {
    pub model: &'a DecoderModel,
    pub store: &'a ParamStore,
    pub tok: &'a Tok,
    pub opt: &'a AdamW,
    pub state: &'a TrainerState,
    pub recipe_toml: &'a str,
}

/// Writes `run_dir/checkpoints/step-N`, moves `latest` to it, keeps the newest `keep`.
pub fn save(run_dir: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    let name = format!("step-{:08}", ck.state.step);
    let dir = root.join(&name);
    write_dir(&dir, |tmp| {
        hf::write_files(tmp, ck.model, ck.store, ck.tok)?;
        save_tensors(
            &ck.opt.state_tensors(ck.store),
            &tmp.join("optimizer.safetensors"),
        )?;
        write_json(
            &tmp.join("trainer_state.json"),
            &serde_json::to_value(ck.state)?,
        )?;
        std::fs::write(tmp.join("recipe.toml"), ck.recipe_toml)?;
        Ok(())
    })?;
    write_file(&root.join("latest"), name.as_bytes())?;
    prune(&root, keep.max(1))?;
    Ok(dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    steps.sort();
    let n = steps.len();
    for old in steps.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(())
}

/// Accepts a checkpoint directory or a run directory (then its `latest` checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("latest");
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest)
            .with_context(|| format!("reading {}", latest.display()))?;
        let dir = path.join("checkpoints").join(name.trim());
        if dir.join("trainer_state.json").is_file() {
            return Ok(dir);
        }
        bail!(
            "{}: points to {}, which is not a complete checkpoint",
            latest.display(),
            dir.display()
        );
    }
    bail!(
        "{}: not a checkpoint (no trainer_state.json) and not a run directory (no checkpoints/latest)",
        path.display()
    )
}

pub fn read_state(ckpt: &Path) -> Result<(TrainerState, String)> {
    let p = ckpt.join("trainer_state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid trainer state", p.display()))?;
    let r = ckpt.join("recipe.toml");
    let recipe = std::fs::read_to_string(&r).with_context(|| format!("reading {}", r.display()))?;
    Ok((state, recipe))
}

/// The run directory a checkpoint belongs to (`run/checkpoints/step-N` → `run`).
pub fn run_dir_of(ckpt: &Path) -> Result<PathBuf> {
    ckpt.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "{}: checkpoint is not inside a run directory",
                ckpt.display()
            )
        })
}
