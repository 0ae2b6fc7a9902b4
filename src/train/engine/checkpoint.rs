//! Checkpoints: everything a run needs to continue exactly, written under a temporary name and
//! renamed, with a `latest` pointer moved only after the checkpoint is complete.
//!
//!   run/checkpoints/step-00000500/  trainable.safetensors  every trainable parameter
//!                                   optimizer.safetensors  AdamW moments
//!                                   config.toml            the run's resolved options
//!                                   trainer_state.json     step, counters, SHA-256 of each file
//!                                   (+ what the method exports: an HF model directory, …)
//!   run/checkpoints/latest          "step-00000500"
//!
//! Resuming checks every file against its SHA-256: a truncated or corrupted checkpoint is refused
//! by name, and the newest checkpoint that does verify is offered instead.

use crate::fsutil::{recover_siblings, write_dir, write_file, write_json};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const STATE: &str = "trainer_state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed; the next step drawn is the one with this index.
    pub step: u64,
    /// Tokens (or units) trained on so far.
    pub tokens_seen: u64,
    /// Steps skipped under `nan_policy = "skip"` (or with no units).
    #[serde(default)]
    pub skipped_steps: u64,
    /// Non-finite steps in a row up to here (ten stop a run under `skip`).
    #[serde(default)]
    pub bad_in_a_row: u32,
    /// What the data order depends on besides the seed: examples per epoch (0: endless draws)
    /// and examples per step. A resume with other values warns that it will not reproduce.
    #[serde(default)]
    pub epoch_len: u64,
    #[serde(default)]
    pub per_step: u64,
    /// The method's own state (e.g. an adaptive coefficient), restored on resume.
    #[serde(default)]
    pub method_state: serde_json::Value,
    /// Seconds of training before this checkpoint (wall-time reports across resumes).
    pub elapsed_s: f64,
    pub lmforge_version: String,
    /// The subcommand that wrote it (`pretrain`, `sft`, `finetune`).
    #[serde(default)]
    pub command: String,
    /// SHA-256 (hex) of every other file of the checkpoint.
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

/// Writes `run_dir/checkpoints/step-N` via `fill`, records the files' checksums, moves `latest`
/// to it and keeps the newest `keep` checkpoints up to this step.
pub fn save(
    run_dir: &Path,
    state: &TrainerState,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = crate::outdir::entry(run_dir, "checkpoints")?;
    let name = step_name(state.step);
    let dir = root.join(&name);
    recover_siblings(&root, |n| step_of(n).is_some())?;
    write_dir(&dir, |tmp| {
        fill(tmp)?;
        let mut st = state.clone();
        st.sha256 = checksums(tmp)?;
        write_json(&tmp.join(STATE), &serde_json::to_value(&st)?)
    })?;
    write_file(&root.join("latest"), name.as_bytes())?;
    prune(&root, state.step, keep.max(1))?;
    Ok(dir)
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint directory name (`step-00000500` → 500).
fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            let s = step_of(&e.file_name().to_string_lossy())?;
            p.is_dir().then_some((s, p))
        })
        .collect();
    v.sort();
    v
}

/// Removes checkpoints older than the newest `keep` at or below `step`. Newer ones (left by a
/// run that was resumed from an earlier checkpoint) are not counted and not removed: the run
/// overwrites them when it gets there.
fn prune(root: &Path, step: u64, keep: usize) -> Result<()> {
    let older: Vec<PathBuf> = checkpoints(root)
        .into_iter()
        .filter(|(s, _)| *s <= step)
        .map(|(_, p)| p)
        .collect();
    let n = older.len();
    for old in older.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::fsutil::hex(&h.finalize()))
}

/// SHA-256 of every file in `dir` but the trainer state.
fn checksums(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != STATE && e.file_type()?.is_file() {
            out.insert(name, sha256_file(&e.path())?);
        }
    }
    Ok(out)
}

/// Accepts a checkpoint directory or a run directory (then its `latest` checkpoint, which must
/// name a checkpoint of that run). A missing or garbled `latest` is an error that offers the
/// newest checkpoint of the run that verifies.
pub fn resolve(path: &Path, command: &str) -> Result<PathBuf> {
    if path.join(STATE).is_file() {
        return Ok(path.to_path_buf());
    }
    let root = path.join("checkpoints");
    // A kill between the two renames that replace a checkpoint leaves it as `.step-N.old-PID`.
    recover_siblings(&root, |n| step_of(n).is_some())?;
    let latest = root.join("latest");
    let name = std::fs::read_to_string(&latest).unwrap_or_default();
    let name = name.trim();
    if step_of(name).is_some() {
        return Ok(root.join(name));
    }
    if root.is_dir() {
        let why = if latest.is_file() {
            format!(
                "{}: {name:?} is not a checkpoint name (step-NNNNNNNN) of this run",
                latest.display()
            )
        } else {
            format!("{}: missing", latest.display())
        };
        return Err(with_offer(anyhow::anyhow!(why), &root, None, command));
    }
    bail!(
        "{}: not a checkpoint (no {STATE}) and not a run directory (no checkpoints/latest)",
        path.display()
    )
}

/// `e`, plus the newest checkpoint in `root` below step `below` that verifies, with the command
/// that resumes from it.
fn with_offer(e: anyhow::Error, root: &Path, below: Option<u64>, command: &str) -> anyhow::Error {
    let offer = checkpoints(root)
        .into_iter()
        .rev()
        .filter(|(s, _)| below.is_none_or(|b| *s < b))
        .find(|(_, p)| check(p).is_ok());
    match offer {
        Some((_, p)) => anyhow::anyhow!(
            "{e:#}\nthe previous good checkpoint is {}: resume from it with\n  lmforge {command} --resume {}",
            p.display(),
            p.display()
        ),
        None => anyhow::anyhow!("{e:#}\nno earlier checkpoint of this run verifies"),
    }
}

/// Reads a checkpoint's state after checking every file against its recorded SHA-256. On
/// failure the error names the file and offers the newest earlier checkpoint that verifies,
/// with the command that resumes from it.
pub fn verify(ckpt: &Path, command: &str) -> Result<TrainerState> {
    check(ckpt).map_err(|e| match run_dir_of(ckpt) {
        Ok(run) => {
            let own = ckpt.file_name().and_then(|n| step_of(&n.to_string_lossy()));
            with_offer(e, &run.join("checkpoints"), own, command)
        }
        Err(_) => e,
    })
}

fn check(ckpt: &Path) -> Result<TrainerState> {
    let p = ckpt.join(STATE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: not a complete checkpoint (cannot read {STATE})",
            ckpt.display()
        )
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid trainer state", p.display()))?;
    if state.sha256.is_empty() {
        bail!(
            "{}: records no checksums (written by an older lmforge); it cannot be verified",
            p.display()
        );
    }
    for (name, want) in &state.sha256 {
        let f = ckpt.join(name);
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            bail!("{}: lists an unexpected file name {name:?}", p.display());
        }
        let got = sha256_file(&f)
            .with_context(|| format!("checkpoint {}: {name} is missing", ckpt.display()))?;
        if &got != want {
            bail!(
                "checkpoint {}: {name} does not match its SHA-256 in {STATE} (truncated or corrupted)",
                ckpt.display()
            );
        }
    }
    Ok(state)
}

/// The run directory a checkpoint belongs to (`run/checkpoints/step-N` → `run`).
pub fn run_dir_of(ckpt: &Path) -> Result<PathBuf> {
    let parent = ckpt
        .parent()
        .filter(|p| p.file_name() == Some("checkpoints".as_ref()));
    parent
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| {
            format!(
                "{}: a checkpoint lives in RUN/checkpoints/step-N; this one is not inside a run directory",
                ckpt.display()
            )
        })
}

/// The run's saved options (`config.toml` of the checkpoint).
pub fn read_config(ckpt: &Path) -> Result<String> {
    let p = ckpt.join("config.toml");
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names() {
        assert_eq!(step_of("step-00000500"), Some(500));
        assert_eq!(step_of("step-"), None);
        assert_eq!(step_of("../../x"), None);
        assert_eq!(step_of("step-12/../x"), None);
    }
}
