//! Crash-safe file output: everything is written beside its destination and renamed into place,
//! so an interrupted write never replaces a good file or directory with a broken one.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// The destination, tag and pid of a name `sibling` made (`.NAME.TAG-PID`).
fn parse_sibling(file_name: &str) -> Option<(&str, &str, u32)> {
    let (dest, tag) = file_name.strip_prefix('.')?.rsplit_once('.')?;
    let (tag, pid) = tag.split_once('-')?;
    Some((dest, tag, pid.parse().ok()?))
}

/// Repairs what a killed writer left in `dir` beside the destinations `owned` accepts: a
/// `.NAME.tmp-PID` is never complete and is removed; a `.NAME.old-PID` is the previous complete
/// version, put back as NAME when the kill came between `write_dir`'s two renames, removed
/// otherwise. This process's own siblings are left alone.
pub fn recover_siblings(dir: &Path, owned: impl Fn(&str) -> bool) -> Result<()> {
    let own = std::process::id();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((dest, tag, pid)) = parse_sibling(&name) else {
            continue;
        };
        if pid == own || !owned(dest) || !matches!(tag, "tmp" | "old") {
            continue;
        }
        let (p, home) = (e.path(), dir.join(dest));
        let res = match (tag, home.exists(), p.is_dir()) {
            ("old", false, _) => std::fs::rename(&p, &home),
            (_, _, true) => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        res.with_context(|| format!("cleaning up {}", p.display()))?;
    }
    Ok(())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file atomically.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(dest, "tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

/// Fills a fresh directory via `fill`, then swaps it in for `dest`. If `fill` fails the
/// temporary directory is removed and `dest` is untouched.
pub fn write_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = sibling(dest, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        // Two renames are not atomic together, but at every instant either the old or the new
        // complete directory exists under a known name.
        let old = sibling(dest, "old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    }
    Ok(())
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// This machine's name (for rank logs and TensorBoard file names); empty where unknown.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// A test-only crash point: with `LMFORGE_TEST_ABORT=NAME:K` in the environment, the K-th time
/// the process passes the point NAME it aborts (as `kill -9` would, mid-write). Nothing happens
/// without the variable.
pub fn abort_point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("LMFORGE_TEST_ABORT") else {
        return;
    };
    let Some((n, k)) = spec.split_once(':') else {
        return;
    };
    if n == name && k.parse::<u64>().ok() == Some(PASSES.fetch_add(1, Ordering::SeqCst) + 1) {
        eprintln!("LMFORGE_TEST_ABORT: aborting at {name} pass {k}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_writers_leftovers_are_repaired() {
        let d = std::env::temp_dir().join(format!("lmforge-siblings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(".step-2.tmp-1")).unwrap(); // half-written: removed
        std::fs::create_dir_all(d.join(".step-3.old-1")).unwrap(); // between renames: put back
        std::fs::create_dir_all(d.join("step-4")).unwrap();
        std::fs::create_dir_all(d.join(".step-4.old-1")).unwrap(); // replaced already: removed
        std::fs::write(d.join(".latest.tmp-1"), "x").unwrap(); // not owned: kept
        std::fs::write(d.join(".step-5.tmp-9.x"), "x").unwrap(); // not a sibling name: kept
        recover_siblings(&d, |n| n.starts_with("step-")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".latest.tmp-1", ".step-5.tmp-9.x", "step-3", "step-4"]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
