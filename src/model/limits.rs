//! The allowed range of every size and constant lmforge reads from a model config, GGUF
//! metadata or a recipe, in one place. The maxima are far above any released model; they exist
//! so that a few hostile bytes cannot ask for a terabyte (or a NaN).

use anyhow::{bail, Result};

pub const MAX_VOCAB: usize = 1 << 24;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;
pub const MAX_FFN: usize = 1 << 18;
/// Positions: tables built from it grow with the lengths actually used, so this only bounds
/// arithmetic (10M covers the longest released contexts).
pub const MAX_CONTEXT: usize = 1 << 24;
/// Parameters of a model initialised fresh (a recipe, not a weights file): 4G, 16 GiB in f32.
pub const MAX_FRESH_PARAMS: u64 = 1 << 32;

/// `key = v` must lie in `lo..=hi`.
pub fn in_range(key: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if v < lo || v > hi {
        bail!("{key} = {v} is outside the allowed range {lo}..={hi}");
    }
    Ok(())
}

/// `key = v` must be a finite number in (0, max].
pub fn positive_at_most(key: &str, v: f64, max: f64) -> Result<()> {
    if !(v.is_finite() && v > 0.0 && v <= max) {
        bail!("{key} = {v} must be a finite number in (0, {max}]");
    }
    Ok(())
}
