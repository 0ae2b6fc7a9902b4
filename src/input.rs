//! Reading files a stranger may have written, with bounded resources: only regular files are
//! read (a device such as `/dev/zero`, a FIFO or a socket is refused by name), whole-file reads
//! have a size cap, line-oriented inputs are streamed with a per-line cap
//! (`--max-line-bytes`), and directory walks visit each file once and survive symlink loops.

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default per-line cap: far above any real record, far below what exhausts memory
/// (tokenizing costs ~300 bytes of memory per input byte).
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 << 20;
/// Whole-file reads of datasets (SQuAD JSON, CSV): a size no real one reaches.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Whole-file reads of configs, templates, vocabularies, tokenizer.json (the largest released
/// tokenizer files are ~30 MB).
pub const MAX_CONFIG_BYTES: u64 = 256 << 20;

static MAX_LINE: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_LINE_BYTES);

/// Sets the per-line cap for this process (`--max-line-bytes`).
pub fn set_max_line_bytes(n: usize) {
    MAX_LINE.store(n.clamp(1, 1 << 40), Ordering::Relaxed);
}

pub fn max_line_bytes() -> usize {
    MAX_LINE.load(Ordering::Relaxed)
}

/// Opens `path` for reading if it is a regular file (symlinks followed).
pub fn open(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_dir() {
        bail!("{}: is a directory, expected a file", path.display());
    }
    if !meta.is_file() {
        bail!(
            "{}: not a regular file (a device, FIFO or socket); lmforge reads only regular files",
            path.display()
        );
    }
    File::open(path).with_context(|| format!("opening {}", path.display()))
}

/// Reads a whole regular file of at most `max` bytes; errors name the file.
pub fn read_bytes(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        bail!(
            "{}: {len} bytes, more than the {max} this input may have",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{}: grew past {max} bytes while being read", path.display());
    }
    Ok(bytes)
}

/// Reads a whole regular file of at most `max` bytes as UTF-8; errors name the file (and the
/// byte offset of invalid UTF-8).
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_bytes(path, max)?).map_err(|e| {
        anyhow::anyhow!(
            "{}: invalid UTF-8 at byte offset {}",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Streams the lines of a regular file as (1-based line number, text without the line break),
/// each line at most `max_line_bytes()`; a longer one is an error naming file:line.
pub struct Lines {
    reader: BufReader<File>,
    path: PathBuf,
    line: usize,
    max: usize,
    done: bool,
}

/// A JSON file (a model or adapter config) read within `MAX_CONFIG_BYTES`; errors name it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path, MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

pub fn lines(path: &Path) -> Result<Lines> {
    lines_capped(path, max_line_bytes())
}

/// `lines` with an explicit cap.
pub fn lines_capped(path: &Path, max: usize) -> Result<Lines> {
    Ok(Lines {
        reader: BufReader::with_capacity(1 << 16, open(path)?),
        path: path.to_path_buf(),
        line: 0,
        max,
        done: false,
    })
}

impl Lines {
    fn next_line(&mut self) -> Result<Option<(usize, String)>> {
        let mut buf = Vec::new();
        let limit = (self.max as u64).saturating_add(1);
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {}", self.path.display()))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        let at = || format!("{}:{}", self.path.display(), self.line);
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if n as u64 == limit {
            bail!(
                "{}: line longer than {} bytes (raise --max-line-bytes if it is genuine)",
                at(),
                self.max
            );
        }
        let s = String::from_utf8(buf).map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid UTF-8 at byte {} of the line",
                at(),
                e.utf8_error().valid_up_to()
            )
        })?;
        if self.line == 1 {
            // Spreadsheet exports often start with a byte-order mark.
            if let Some(rest) = s.strip_prefix('\u{feff}') {
                return Ok(Some((1, rest.to_string())));
            }
        }
        Ok(Some((self.line, s)))
    }
}

impl Iterator for Lines {
    type Item = Result<(usize, String)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_line().transpose();
        if matches!(r, Some(Err(_)) | None) {
            self.done = true;
        }
        r
    }
}

/// Every regular file under `dir`, each once (by device and inode) however many links lead to
/// it, sorted; symlinked directories are followed but a directory already on the walk (a
/// loop) is not entered again. Special files are skipped.
pub fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut out = Vec::new();
    walk_into(dir, &mut seen_dirs, &mut seen_files, &mut out, 0)?;
    out.sort();
    Ok(out)
}

/// The (device, inode) of the file at `path` (symlinks followed), on Unix.
pub fn identity_of(path: &Path) -> Option<(u64, u64)> {
    if cfg!(unix) {
        std::fs::metadata(path).ok().map(|m| identity(&m))
    } else {
        None
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        (0, 0)
    }
}

fn walk_into(
    dir: &Path,
    seen_dirs: &mut HashSet<(u64, u64)>,
    seen_files: &mut HashSet<(u64, u64)>,
    out: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    const MAX_DEPTH: usize = 64;
    if depth > MAX_DEPTH {
        bail!(
            "{}: directories nested more than {MAX_DEPTH} deep",
            dir.display()
        );
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    // (Without inode identities — not Unix — a loop ends at the depth limit instead.)
    if cfg!(unix) && !seen_dirs.insert(identity(&meta)) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort();
    for p in entries {
        let Ok(m) = std::fs::metadata(&p) else {
            continue; // a dangling symlink
        };
        if m.is_dir() {
            walk_into(&p, seen_dirs, seen_files, out, depth + 1)?;
        } else if m.is_file() && (cfg!(not(unix)) || seen_files.insert(identity(&m))) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_long_lines_and_loops() {
        let e = read_text(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let d = std::env::temp_dir().join(format!("lmforge-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a")).unwrap();
        let f = d.join("a/x.txt");
        std::fs::write(&f, format!("ok\n{}\nend", "y".repeat(100))).unwrap();
        let got: Vec<_> = lines_capped(&f, 50).unwrap().collect();
        assert_eq!(got[0].as_ref().unwrap(), &(1, "ok".to_string()));
        let e = got[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("x.txt:2") && e.contains("--max-line-bytes"),
            "{e}"
        );
        assert_eq!(got.len(), 2);
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&d, d.join("a/loop")).unwrap();
            std::os::unix::fs::symlink(&f, d.join("again.txt")).unwrap();
            let files = walk(&d).unwrap();
            assert_eq!(files.len(), 1, "{files:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
