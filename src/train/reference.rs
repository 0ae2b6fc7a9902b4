//! The reference model's log-probs, computed once before training and cached on disk.
//!
//! A cache file is named by the SHA-256 of what its numbers depend on: the model (its weight,
//! config and tokenizer files' bytes), the tokenizer (its serialized form), the data file's
//! bytes, and the token sequences scored (which also carry the chat template, the length limit
//! and the method's choice of sequences) and lmforge's version. Change any of them and the name
//! changes, so a stale cache is never read; a damaged one (wrong key, count or values) is reported
//! and recomputed. A file of that name that is not a reference cache (no magic) is never
//! replaced. Layout: b"LMFREF01", the 32-byte key, the count (u64 LE), f32 LE values.

use crate::data::sft::Tokenized;
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LMFREF01";

pub struct RefCache {
    pub path: PathBuf,
    key: [u8; 32],
}

/// SHA-256 of a file's bytes, streamed.
fn hash_file(h: &mut Sha256, p: &Path) -> Result<()> {
    let mut f = crate::input::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// The identity of a model: a `.gguf` file's bytes, or an HF directory's config, weights and
/// tokenizer files (names and bytes, sorted).
pub fn model_hash(path: &Path) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    if path.is_file() {
        hash_file(&mut h, path)?;
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                p.is_file()
                    && (n.ends_with(".safetensors")
                        || n.ends_with(".safetensors.index.json")
                        || n.ends_with(".bin")
                        || matches!(
                            n,
                            "config.json"
                                | "tokenizer.json"
                                | "tokenizer_config.json"
                                | "vocab.json"
                                | "merges.txt"
                                | "vocab.txt"
                                | "chat_template.jinja"
                        ))
            })
            .collect();
        files.sort();
        for f in files {
            h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
            hash_file(&mut h, &f)?;
        }
    }
    Ok(h.finalize().into())
}

impl RefCache {
    /// The cache file in `dir` for these inputs.
    pub fn new(
        dir: &Path,
        model: &Path,
        tok: &Tok,
        data: &Path,
        seqs: &[&Tokenized],
        what: &str,
    ) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update(what.as_bytes());
        h.update(model_hash(model)?);
        let tj = tok
            .inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        h.update(Sha256::digest(tj.as_bytes()));
        hash_file(&mut h, data)?;
        for s in seqs {
            h.update((s.ids.len() as u64).to_le_bytes());
            for (&id, &t) in s.ids.iter().zip(&s.train) {
                h.update(id.to_le_bytes());
                h.update([t as u8]);
            }
        }
        let key: [u8; 32] = h.finalize().into();
        let hex = crate::fsutil::hex(&key[..12]);
        Ok(Self {
            path: dir.join(format!("ref-logps-{hex}.bin")),
            key,
        })
    }

    /// The cached values, if a valid cache of `n` values exists.
    pub fn load(&self, n: usize) -> Result<Option<Vec<f32>>> {
        if !self.path.exists() {
            return Ok(None);
        }
        self.ours()?;
        match self.read(n) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                eprintln!("reference cache unusable, recomputing it: {e:#}");
                Ok(None)
            }
        }
    }

    fn read(&self, n: usize) -> Result<Vec<f32>> {
        let p = &self.path;
        let bytes = crate::input::read_bytes(p, 48 + 4 * n as u64)?;
        // The magic was checked by `ours`.
        if bytes.len() < 48 || bytes[8..40] != self.key {
            bail!("{}: not a reference cache for these inputs", p.display());
        }
        let count = u64::from_le_bytes(bytes[40..48].try_into()?) as usize;
        if count != n || bytes.len() != 48 + 4 * n {
            bail!("{}: holds {count} values, expected {n}", p.display());
        }
        let v: Vec<f32> = bytes[48..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if v.iter().any(|x| !x.is_finite()) {
            bail!("{}: holds non-finite values", p.display());
        }
        Ok(v)
    }

    /// Refuses a file at the cache's name that lmforge did not write.
    fn ours(&self) -> Result<()> {
        let mut head = [0u8; 8];
        let f = crate::input::open(&self.path)?;
        let n = f.take(8).read(&mut head).unwrap_or(0);
        if n < 8 || &head != MAGIC {
            bail!(
                "{}: exists and is not an lmforge reference cache; refusing to replace it",
                self.path.display()
            );
        }
        Ok(())
    }

    pub fn store(&self, v: &[f32]) -> Result<()> {
        if let Some(d) = self.path.parent() {
            crate::outdir::refuse_special(d)?;
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        if self.path.exists() {
            self.ours()?;
        }
        let mut b = Vec::with_capacity(48 + 4 * v.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        crate::fsutil::write_file(&self.path, &b)
    }
}
