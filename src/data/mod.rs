//! Corpus → tokens: text files, directories of them, or JSONL with a `text` field are read as a
//! stream of pieces, tokenized in parallel batches, and appended to a flat token file (u16 when
//! the vocabulary fits, else u32) that is memory-mapped for training. Documents are separated by
//! EOS. Nothing holds the whole corpus in memory, so corpora larger than RAM work.
//!
//! Deliberate deviation: a long text file is cut into ~1 MiB pieces at line breaks before
//! tokenization, so a merge across such a cut cannot happen (it never spans a newline in
//! GPT-2-style pre-tokenisation anyway, except for runs of whitespace).

pub mod conll;
pub mod labeled;
pub mod preference;
pub mod sft;
pub mod squad;

use crate::rng::{fnv1a, Rng};
use crate::tokenizer::Tok;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const PIECE_BYTES: usize = 1 << 20;
const BATCH_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Jsonl,
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    path: PathBuf,
    kind: Kind,
}

/// Expands the given paths (files or directories, recursively) into the files to read, sorted.
pub fn collect_sources(paths: &[PathBuf]) -> Result<Vec<SourceFile>> {
    if paths.is_empty() {
        bail!("no corpus given (data.paths is empty)");
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let found = crate::input::walk(p)?;
            let before = out.len();
            for f in found {
                if let Some(kind) = kind_of(&f) {
                    out.push(SourceFile { path: f, kind });
                }
            }
            if out.len() == before {
                bail!(
                    "{}: directory holds no text files (.txt, .md, .text, .jsonl)",
                    p.display()
                );
            }
        } else if p.exists() {
            drop(crate::input::open(p)?); // refuses devices, FIFOs, sockets
            let kind = kind_of(p).unwrap_or(Kind::Text);
            out.push(SourceFile {
                path: p.clone(),
                kind,
            });
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    // A file reached twice (given twice, or through a link from another given path) is read
    // once: a duplicate would train on it twice and leak it into the validation split.
    let mut seen = std::collections::HashMap::new();
    out.retain(|f| match crate::input::identity_of(&f.path) {
        Some(id) => match seen.get(&id) {
            Some(first) => {
                eprintln!(
                    "{}: the same file as {}; read once",
                    f.path.display(),
                    first
                );
                false
            }
            None => {
                seen.insert(id, f.path.display().to_string());
                true
            }
        },
        None => true,
    });
    Ok(out)
}

fn kind_of(p: &Path) -> Option<Kind> {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("txt" | "md" | "text") => Some(Kind::Text),
        Some("jsonl") => Some(Kind::Jsonl),
        _ => None,
    }
}

/// A piece of a document; `last` marks the end of its document (an EOS follows it).
pub struct Piece {
    pub text: String,
    pub last: bool,
}

/// Where to end a piece of `buf` (bytes of a longer text): after its last newline; failing
/// that, at the last character start within its final 4 bytes (a character is at most 4
/// bytes). Never 0, so a run of bytes that are no character's start is still consumed.
fn cut_point(buf: &[u8]) -> usize {
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => (buf.len().saturating_sub(4)..buf.len())
            .rev()
            .find(|&i| i > 0 && (buf[i] as i8) >= -0x40)
            .unwrap_or(buf.len()),
    }
}

/// `text` as pieces of about `PIECE_BYTES`, cut as a text file is (`cut_point`); the last
/// piece ends the document.
fn split_pieces(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > PIECE_BYTES {
        // A character start in valid UTF-8 is a char boundary.
        let cut = cut_point(&rest.as_bytes()[..PIECE_BYTES]);
        out.push(Piece {
            text: rest[..cut].to_string(),
            last: false,
        });
        rest = &rest[cut..];
    }
    out.push(Piece {
        text: rest.to_string(),
        last: true,
    });
    out
}

/// The ids of a text file, read and tokenized in pieces so memory stays bounded whatever its
/// size (the first piece gets the tokenizer's special tokens, as one `encode` of the whole
/// text would).
pub fn encode_file(path: &Path, tok: &Tok) -> Result<Vec<u32>> {
    let src = SourceFile {
        path: path.to_path_buf(),
        kind: Kind::Text,
    };
    let mut ids = Vec::new();
    for (i, p) in Pieces::new(vec![src], false).enumerate() {
        ids.extend(tok.encode(&p?.text, i == 0)?);
    }
    Ok(ids)
}

/// Streams the pieces of every document of every source, in order.
pub struct Pieces {
    files: std::vec::IntoIter<SourceFile>,
    cur: Option<(SourceFile, BufReader<File>, u64, usize)>, // file, reader, byte offset, line
    lossy: bool,
    carry: Vec<u8>,
    /// The rest of a long JSONL document, last piece first.
    split: Vec<Piece>,
}

impl Pieces {
    pub fn new(files: Vec<SourceFile>, lossy: bool) -> Self {
        Self {
            files: files.into_iter(),
            cur: None,
            lossy,
            carry: Vec::new(),
            split: Vec::new(),
        }
    }

    fn utf8(&self, bytes: Vec<u8>, path: &Path, offset: u64) -> Result<String> {
        match String::from_utf8(bytes) {
            Ok(s) => Ok(s),
            Err(e) if self.lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            Err(e) => bail!(
                "{}: invalid UTF-8 at byte offset {} (set data.lossy_utf8 = true to replace bad bytes)",
                path.display(),
                offset + e.utf8_error().valid_up_to() as u64
            ),
        }
    }

    fn next_piece(&mut self) -> Result<Option<Piece>> {
        loop {
            if self.cur.is_none() {
                let Some(f) = self.files.next() else {
                    return Ok(None);
                };
                let file = crate::input::open(&f.path)?;
                self.cur = Some((f, BufReader::with_capacity(1 << 16, file), 0, 0));
                self.carry.clear();
            }
            let (f, reader, offset, line) = self.cur.as_mut().expect("set above");
            match f.kind {
                Kind::Jsonl => {
                    if let Some(p) = self.split.pop() {
                        return Ok(Some(p));
                    }
                    let mut buf = Vec::new();
                    let cap = (crate::input::max_line_bytes() as u64).saturating_add(1);
                    let n = reader
                        .take(cap)
                        .read_until(b'\n', &mut buf)
                        .with_context(|| format!("reading {}", f.path.display()))?;
                    if n == 0 {
                        self.cur = None;
                        continue;
                    }
                    *line += 1;
                    if n as u64 == cap && buf.last() != Some(&b'\n') {
                        bail!(
                            "{}:{line}: line longer than {} bytes (raise --max-line-bytes if it is genuine)",
                            f.path.display(),
                            cap - 1
                        );
                    }
                    *offset += n as u64;
                    let (path, lineno, start) = (f.path.clone(), *line, *offset - n as u64);
                    if buf.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let s = self.utf8(buf, &path, start)?;
                    let v: serde_json::Value = serde_json::from_str(&s).map_err(|e| {
                        anyhow::anyhow!("{}:{lineno}: not valid JSON: {e}", path.display())
                    })?;
                    let Some(text) = v.get("text").and_then(|t| t.as_str()) else {
                        bail!("{}:{lineno}: missing string field \"text\"", path.display());
                    };
                    // A long document is tokenized in pieces, as a text file is.
                    self.split = split_pieces(text);
                    self.split.reverse();
                    if let Some(p) = self.split.pop() {
                        return Ok(Some(p));
                    }
                }
                Kind::Text => {
                    let mut buf = std::mem::take(&mut self.carry);
                    let start = buf.len();
                    buf.resize(PIECE_BYTES.max(start + 4096), 0);
                    let mut filled = start;
                    while filled < buf.len() {
                        let n = reader
                            .read(&mut buf[filled..])
                            .with_context(|| format!("reading {}", f.path.display()))?;
                        if n == 0 {
                            break;
                        }
                        filled += n;
                    }
                    buf.truncate(filled);
                    let eof = filled < PIECE_BYTES.max(start + 4096);
                    let cut = if eof { buf.len() } else { cut_point(&buf) };
                    self.carry = buf.split_off(cut);
                    let piece_offset = *offset;
                    *offset += buf.len() as u64;
                    let path = f.path.clone();
                    if eof {
                        self.cur = None;
                    }
                    let text = self.utf8(buf, &path, piece_offset)?;
                    if text.is_empty() && !eof {
                        continue;
                    }
                    return Ok(Some(Piece { text, last: eof }));
                }
            }
        }
    }
}

impl Iterator for Pieces {
    type Item = Result<Piece>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}

/// A memory-mapped token file: a header (`HEADER` bytes: magic, token width, count, and the
/// first 8 bytes of the SHA-256 of the tokens), then the tokens little-endian. A file whose
/// header does not match its contents (truncated, edited, an older format) is never used.
pub struct Tokens {
    mmap: Mmap,
    width: usize,
    len: usize,
}

const MAGIC: &[u8; 8] = b"LMFTOK02";
const HEADER: usize = 32;

fn header(width: usize, count: u64, digest: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&(width as u32).to_le_bytes());
    h[16..24].copy_from_slice(&count.to_le_bytes());
    h[24..32].copy_from_slice(&digest[..8]);
    h
}

impl Tokens {
    /// Opens a token file after checking its header against its size and checksum.
    pub fn open(path: &Path, width: usize) -> Result<Self> {
        use sha2::Digest;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let bytes = file.metadata()?.len() as usize;
        let bad = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
        if bytes < HEADER {
            return Err(bad("shorter than its header (truncated)"));
        }
        // SAFETY: token files are only ever written under a temporary name and renamed; the
        // header and checksum below catch one changed behind our back before it is used.
        let mmap = unsafe { Mmap::map(&file) }?;
        let count = u64::from_le_bytes(mmap[16..24].try_into()?);
        if &mmap[..8] != MAGIC || u32::from_le_bytes(mmap[8..12].try_into()?) as usize != width {
            return Err(bad(
                "not a token cache of this lmforge (magic or width differs)",
            ));
        }
        if (bytes - HEADER) as u64 != count.saturating_mul(width as u64) {
            return Err(bad(&format!(
                "holds {} bytes of tokens, its header says {count} tokens (truncated)",
                bytes - HEADER
            )));
        }
        if sha2::Sha256::digest(&mmap[HEADER..])[..8] != mmap[24..32] {
            return Err(bad(
                "tokens do not match the checksum in its header (corrupted)",
            ));
        }
        Ok(Self {
            mmap,
            width,
            len: count as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let m = &self.mmap;
        let o = HEADER + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([m[o], m[o + 1]]) as u32
        } else {
            u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]])
        }
    }

    pub fn slice(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start + n).map(|i| self.get(i)).collect()
    }
}

/// Tokenizes `sources` into `cache_dir/tokens-<key>.bin` unless an identical cache exists;
/// the key covers the tokenizer, every file's path, size and mtime, and the UTF-8 mode.
pub fn tokenize_cached(
    sources: &[SourceFile],
    tok: &Tok,
    cache_dir: &Path,
    lossy: bool,
) -> Result<Tokens> {
    let eos = tok
        .eos_id
        .context("the tokenizer has no end-of-text token to separate documents")?;
    // By the largest id, not the count: added tokens may have ids past the vocabulary size.
    let top = tok.inner.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    let width = if top.max(tok.vocab_size()) < 1 << 16 {
        2
    } else {
        4
    };
    let mut key = tok
        .inner
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    for s in sources {
        let m =
            std::fs::metadata(&s.path).with_context(|| format!("reading {}", s.path.display()))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        key.push_str(&format!("|{}|{}|{:?}", s.path.display(), m.len(), mtime));
    }
    key.push_str(&format!("|lossy={lossy}"));
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let path = cache_dir.join(format!("tokens-{:016x}.bin", fnv1a(key.as_bytes())));
    if !crate::dist::world().writes() {
        // A data-parallel rank > 0 reads rank 0's cache; rebuilding it would pull the file from
        // under rank 0's memory map.
        return Tokens::open(&path, width)
            .with_context(|| format!("reading rank 0's token cache {}", path.display()));
    }
    if path.exists() {
        match Tokens::open(&path, width) {
            Ok(t) => return Ok(t),
            Err(e) => {
                eprintln!("token cache unusable, rebuilding it: {e:#}");
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = write_tokens(sources, tok, eos, width, lossy, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path)?;
    let t = Tokens::open(&path, width)?;
    if t.is_empty() {
        bail!("the corpus is empty: no text in {} file(s)", sources.len());
    }
    Ok(t)
}

fn write_tokens(
    sources: &[SourceFile],
    tok: &Tok,
    eos: u32,
    width: usize,
    lossy: bool,
    out: &Path,
) -> Result<()> {
    use sha2::Digest;
    use std::io::{Seek, SeekFrom};
    let mut w =
        BufWriter::new(File::create(out).with_context(|| format!("creating {}", out.display()))?);
    w.write_all(&[0u8; HEADER])?;
    let (mut sha, mut count) = (sha2::Sha256::new(), 0u64);
    let mut pieces = Pieces::new(sources.to_vec(), lossy);
    let mut any_text = false;
    loop {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while bytes < BATCH_BYTES {
            match pieces.next() {
                Some(p) => {
                    let p = p?;
                    bytes += p.text.len() + 1;
                    batch.push(p);
                }
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Result<Vec<u32>>> = batch
            .par_iter()
            .map(|p| tok.encode(&p.text, false))
            .collect();
        for (p, ids) in batch.iter().zip(encoded) {
            let mut ids = ids?;
            any_text |= !ids.is_empty();
            if p.last {
                ids.push(eos);
            }
            count += ids.len() as u64;
            for id in ids {
                let le = id.to_le_bytes();
                let b = &le[..width];
                sha.update(b);
                w.write_all(b)?;
            }
        }
    }
    if !any_text {
        bail!("the corpus is empty: the given files hold no text");
    }
    let mut f = w.into_inner().map_err(|e| e.into_error())?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&header(width, count, &sha.finalize()))?;
    f.sync_all()?;
    Ok(())
}

/// Train/validation windows over a token file: the last `val_fraction` of the tokens is the
/// validation split (deterministic, nanoGPT-style).
pub struct Dataset {
    pub tokens: Tokens,
    pub train_len: usize,
    pub seq_len: usize,
}

pub struct Batch {
    pub x: Vec<u32>, // (B, T)
    pub y: Vec<u32>, // (B, T)
    pub batch: usize,
}

impl Dataset {
    pub fn new(tokens: Tokens, seq_len: usize, val_fraction: f64) -> Result<Self> {
        let n = tokens.len();
        let need = seq_len + 1;
        let val = if val_fraction > 0.0 {
            ((n as f64 * val_fraction) as usize).max(need)
        } else {
            0
        };
        if n < val + need {
            bail!("the corpus has only {n} tokens; a sequence length of {seq_len} with validation fraction {val_fraction} needs at least {}", val + need);
        }
        Ok(Self {
            tokens,
            train_len: n - val,
            seq_len,
        })
    }

    pub fn val_len(&self) -> usize {
        self.tokens.len() - self.train_len
    }

    /// Random windows of the training split, one per draw: window k starts where a stream
    /// keyed by (seed, draw k) puts it, so a window depends on its draw alone — not on the step,
    /// micro-batch or rank that asks for it — and resuming needs no saved RNG.
    pub fn windows(&self, seed: u64, draws: &[usize]) -> Batch {
        let t = self.seq_len;
        let span = (self.train_len - t - 1) as u64 + 1;
        let mut x = Vec::with_capacity(draws.len() * t);
        let mut y = Vec::with_capacity(draws.len() * t);
        for &d in draws {
            let s = Rng::keyed(&[seed, 0xDA7A, d as u64]).below(span) as usize;
            let w = self.tokens.slice(s, t + 1);
            x.extend_from_slice(&w[..t]);
            y.extend_from_slice(&w[1..]);
        }
        Batch {
            x,
            y,
            batch: draws.len(),
        }
    }

    /// Consecutive non-overlapping validation windows, at most `max_batches` batches.
    pub fn val_batches(&self, batch: usize, max_batches: usize) -> Vec<Batch> {
        let t = self.seq_len;
        let n_windows = self.val_len().saturating_sub(1) / t;
        let mut out = Vec::new();
        let mut w = 0;
        while w < n_windows && out.len() < max_batches {
            let k = batch.min(n_windows - w);
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for i in 0..k {
                let s = self.train_len + (w + i) * t;
                let win = self.tokens.slice(s, t + 1);
                x.extend_from_slice(&win[..t]);
                y.extend_from_slice(&win[1..]);
            }
            out.push(Batch { x, y, batch: k });
            w += k;
        }
        out
    }
}
