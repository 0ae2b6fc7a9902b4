//! Where lmforge writes, for every command: it never deletes or overwrites anything it did not
//! write. Each directory it writes carries a manifest (`.lmforge-manifest.json`: which command
//! wrote it, and the entries it wrote there). An output directory must be new, empty, or
//! lmforge's own — and then replacing it takes `--overwrite` (or continuing it, `--resume`);
//! even then only the entries in its manifest are replaced, anything else stays. `/`, the home
//! directory, the working directory and its parents are never outputs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = ".lmforge-manifest.json";
/// Held (an OS file lock) by the process writing a run, so a second one cannot interleave.
pub const LOCK: &str = ".lmforge.lock";

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The command that wrote the directory (`pretrain`, `convert`, `model`, …).
    pub written_by: String,
    /// Entries of the directory lmforge wrote (names, not paths).
    pub entries: BTreeSet<String>,
}

/// The manifest of `dir`, if it has one. A garbled manifest is an error, never "not ours".
pub fn manifest(dir: &Path) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST);
    if std::fs::symlink_metadata(&p).is_err() {
        return Ok(None);
    }
    let text = crate::input::read_text(&p, crate::input::MAX_CONFIG_BYTES)?;
    let m: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not an lmforge manifest; lmforge will not write into {}",
            p.display(),
            dir.display()
        )
    })?;
    if let Some(bad) = m.entries.iter().find(|n| !plain_name(n)) {
        bail!("{}: lists an unexpected entry {bad:?}", p.display());
    }
    Ok(Some(m))
}

fn plain_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\']) && n != MANIFEST && n != LOCK
}

fn save_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let mut s = serde_json::to_string_pretty(m)?;
    s.push('\n');
    crate::fsutil::write_file(&dir.join(MANIFEST), s.as_bytes())
}

/// Refuses the places that are never an output: `/`, the home directory, and the working
/// directory or any directory above it (replacing one would take the user's work with it).
pub fn refuse_special(path: &Path) -> Result<()> {
    let Ok(real) = std::fs::canonicalize(path) else {
        // Not there yet, so it cannot be any of those — unless a `..` makes it one once its
        // first part is created (`new/..` is the working directory).
        if path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            bail!(
                "{}: an output path that does not exist yet may not contain `..`; give it without",
                path.display()
            );
        }
        return Ok(());
    };
    if real.parent().is_none() {
        bail!(
            "{}: refusing to write output into the root directory",
            path.display()
        );
    }
    let home = std::env::var_os("HOME").and_then(|h| std::fs::canonicalize(h).ok());
    if home.as_deref() == Some(real.as_path()) {
        bail!(
            "{}: refusing to write output into the home directory; choose a new directory",
            path.display()
        );
    }
    if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize) {
        if cwd.starts_with(&real) {
            bail!(
                "{}: refusing to write output into the working directory or a directory above it; choose a new directory",
                path.display()
            );
        }
    }
    Ok(())
}

/// The entries of `dir` other than its manifest and lock, sorted.
fn user_visible_entries(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != MANIFEST && name != LOCK {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn examples(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(3).map(|n| format!("{n:?}")).collect();
    if names.len() > 3 {
        s.push(format!("… {} in all", names.len()));
    }
    s.join(", ")
}

/// How a command may treat an existing output.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The command, recorded in the manifest and named in errors.
    pub kind: &'a str,
    /// `--overwrite` was given.
    pub overwrite: bool,
    /// The command can continue an earlier run (suggest `--resume`).
    pub resumable: bool,
}

/// Checks that `dir` may become this command's output directory; changes nothing on disk.
pub fn check(dir: &Path, c: Claim) -> Result<()> {
    refuse_special(dir)?;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", dir.display())),
    };
    if !meta.is_dir() {
        bail!(
            "{}: exists and is not a directory; lmforge writes a directory here and never replaces a file it did not write; choose another --out",
            dir.display()
        );
    }
    let names = user_visible_entries(dir)?;
    let Some(m) = manifest(dir)? else {
        if names.is_empty() {
            return Ok(());
        }
        bail!(
            "{}: not empty ({}) and not written by lmforge; lmforge never replaces files it did not write{}; choose a new or empty directory",
            dir.display(),
            examples(&names),
            if c.overwrite { " (--overwrite replaces only what lmforge wrote, listed in its manifest)" } else { "" }
        );
    };
    if c.overwrite || names.is_empty() {
        return Ok(());
    }
    // A run of this command that failed before its first checkpoint left nothing to resume or
    // keep (options, a log, a tokenizer and token cache that are made again): start over.
    let results = ["checkpoints", "model", "adapter"];
    if c.resumable && m.written_by == c.kind && !m.entries.iter().any(|e| results.contains(&&**e)) {
        return Ok(());
    }
    let resume = if c.resumable && m.written_by == c.kind {
        format!(
            "continue it with `lmforge {} --resume {}`, or ",
            c.kind,
            dir.display()
        )
    } else {
        String::new()
    };
    bail!(
        "{}: holds an earlier lmforge output (written by `{}`: {}); {resume}pass --overwrite to replace what lmforge wrote there (other files are kept), or choose a new directory",
        dir.display(),
        m.written_by,
        examples(&names)
    )
}

/// The lock a run holds on its directory while it writes there (released when dropped).
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] std::fs::File);

fn lock(dir: &Path) -> Result<RunLock> {
    let p = dir.join(LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(RunLock(f)),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{}: another lmforge process is writing this run; wait for it or choose another directory",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", p.display()))
        }
    }
}

/// Claims `dir` for a new run: checks it (`check`), locks it, then, when replacing an earlier
/// lmforge output, removes the entries its manifest lists — only those — and starts a fresh
/// manifest.
pub fn start_run(dir: &Path, c: Claim) -> Result<RunLock> {
    check(dir, c)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let held = lock(dir)?;
    // Again, now that the path exists (resolved) and no other lmforge can change it.
    check(dir, c)?;
    if let Some(old) = manifest(dir)? {
        for name in &old.entries {
            remove_entry(&dir.join(name))?;
        }
    }
    save_manifest(
        dir,
        &Manifest {
            written_by: c.kind.to_string(),
            entries: BTreeSet::new(),
        },
    )?;
    Ok(held)
}

/// What a run directory of any command may hold (for adopting a run of an older lmforge).
const RUN_ENTRIES: [&str; 7] = [
    "config.toml",
    "metrics.jsonl",
    "checkpoints",
    "model",
    "adapter",
    "tokenizer.json",
    "data",
];

/// Continues an existing run directory (`--resume`) of this command, locked. A run of an older
/// lmforge (no manifest) gets one listing the run files it has.
pub fn adopt(dir: &Path, kind: &str) -> Result<RunLock> {
    let held = lock(dir)?;
    match manifest(dir)? {
        Some(m) if m.written_by != kind => bail!(
            "{}: a run of `lmforge {}`, not `{kind}`; resume it with `lmforge {} --resume`",
            dir.display(),
            m.written_by,
            m.written_by
        ),
        Some(_) => {}
        None => {
            let entries = RUN_ENTRIES
                .iter()
                .filter(|n| dir.join(n).exists())
                .map(|n| n.to_string())
                .collect();
            save_manifest(
                dir,
                &Manifest {
                    written_by: kind.to_string(),
                    entries,
                },
            )?;
        }
    }
    Ok(held)
}

/// `dir/name`, recorded in `dir`'s manifest as lmforge's before anything is written there.
pub fn entry(dir: &Path, name: &str) -> Result<PathBuf> {
    if !crate::dist::world().writes() {
        // A data-parallel rank > 0 reads what rank 0 wrote; the manifest is rank 0's.
        return Ok(dir.join(name));
    }
    let mut m = manifest(dir)?.with_context(|| {
        format!(
            "{}: has no lmforge manifest; not writing {name} into it",
            dir.display()
        )
    })?;
    let p = dir.join(name);
    if !m.entries.contains(name) {
        if std::fs::symlink_metadata(&p).is_ok() {
            bail!(
                "{}: exists and was not written by lmforge; not replacing it (move it away, or choose another directory)",
                p.display()
            );
        }
        m.entries.insert(name.to_string());
        save_manifest(dir, &m)?;
    }
    Ok(p)
}

fn remove_entry(p: &Path) -> Result<()> {
    let res = match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        _ => std::fs::remove_file(p),
    };
    res.with_context(|| format!("removing {}", p.display()))
}

/// Whether lmforge may replace the directory `dest` wholesale or per entry: it is absent,
/// empty, carries a manifest, or its parent's manifest lists it.
fn owned(dest: &Path) -> Result<Option<Manifest>> {
    if let Some(m) = manifest(dest)? {
        return Ok(Some(m));
    }
    let names = match std::fs::metadata(dest) {
        Err(_) => return Ok(None),
        Ok(m) if !m.is_dir() => bail!(
            "{}: exists and is not a directory; not replacing it",
            dest.display()
        ),
        Ok(_) => user_visible_entries(dest)?,
    };
    let listed = match (dest.parent(), dest.file_name()) {
        (Some(parent), Some(name)) => {
            manifest(parent)?.is_some_and(|m| m.entries.contains(&*name.to_string_lossy()))
        }
        _ => false,
    };
    if names.is_empty() || listed {
        return Ok(None);
    }
    bail!(
        "{}: not empty ({}) and not written by lmforge; not replacing it",
        dest.display(),
        examples(&names)
    )
}

/// Writes the directory `dest` via `fill` (into a fresh temporary directory), with a manifest
/// naming `kind` and what `fill` wrote. If `dest` holds only lmforge's files it is swapped
/// whole (atomic: at every instant the old or the new complete directory exists). If someone
/// added files to it, lmforge's entries are replaced one by one and the others stay.
pub fn write_output(dest: &Path, kind: &str, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let old = owned(dest)?;
    let extras: Vec<String> = match &old {
        Some(m) => user_visible_entries(dest)?
            .into_iter()
            .filter(|n| !m.entries.contains(n) && !is_sibling_of_ours(n))
            .collect(),
        None => Vec::new(),
    };
    let fill_with_manifest = |tmp: &Path| -> Result<()> {
        fill(tmp)?;
        let entries = user_visible_entries(tmp)?.into_iter().collect();
        save_manifest(
            tmp,
            &Manifest {
                written_by: kind.to_string(),
                entries,
            },
        )
    };
    if extras.is_empty() {
        return crate::fsutil::write_dir(dest, fill_with_manifest);
    }
    // Someone added files: move the new entries in one by one, then drop old entries that the
    // new output does not have. Not atomic as a whole; each entry is.
    let staging = dest.join(format!(".lmforge-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    if let Err(e) = fill_with_manifest(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let new = manifest(&staging)?.unwrap_or_default();
    if let Some(clash) = new.entries.iter().find(|n| extras.contains(n)) {
        let _ = std::fs::remove_dir_all(&staging);
        bail!(
            "{}: holds {clash:?}, which lmforge did not write but would write now; move it away first",
            dest.display()
        );
    }
    // Recorded before the moves: a kill half-way leaves every new entry listed as lmforge's.
    let mut both = old.clone().unwrap_or_default();
    both.entries.extend(new.entries.iter().cloned());
    save_manifest(dest, &both)?;
    for name in &new.entries {
        let to = dest.join(name);
        if to.is_dir() {
            remove_entry(&to)?;
        }
        std::fs::rename(staging.join(name), &to)
            .with_context(|| format!("moving {} into place", to.display()))?;
    }
    for name in old.iter().flat_map(|m| m.entries.difference(&new.entries)) {
        remove_entry(&dest.join(name))?;
    }
    save_manifest(dest, &new)?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))
}

fn is_sibling_of_ours(name: &str) -> bool {
    name.starts_with(".lmforge-staging-")
}

/// Checks a single-file output (`tokenizer train --out FILE`): a new file, or, with
/// `--overwrite`, an existing file (never a directory).
pub fn check_file(path: &Path, overwrite: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => bail!(
            "{}: is a directory; --out names a file here",
            path.display()
        ),
        Ok(m) if !m.is_file() => bail!(
            "{}: exists and is not a regular file; not replacing it",
            path.display()
        ),
        Ok(_) if overwrite => Ok(()),
        Ok(_) => bail!(
            "{}: exists; pass --overwrite to replace it, or choose another --out",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lmforge-outdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn claim(overwrite: bool) -> Claim<'static> {
        Claim {
            kind: "convert",
            overwrite,
            resumable: false,
        }
    }

    #[test]
    fn user_files_are_never_replaced() {
        let d = tmpdir("user");
        let out = d.join("v");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("precious.txt"), "x").unwrap();
        for ow in [false, true] {
            let e = check(&out, claim(ow)).unwrap_err().to_string();
            assert!(
                e.contains("precious.txt") && e.contains("not written by lmforge"),
                "{e}"
            );
        }
        assert!(write_output(&out, "convert", |t| Ok(std::fs::write(t.join("a"), "1")?)).is_err());
        assert_eq!(
            std::fs::read_to_string(out.join("precious.txt")).unwrap(),
            "x"
        );
        assert!(out.join("sub").is_dir());
        let f = d.join("file");
        std::fs::write(&f, "mine").unwrap();
        assert!(check(&f, claim(true)).is_err());
        assert!(check_file(&f, false).is_err());
        assert!(check_file(&f, true).is_ok());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "mine");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overwrite_replaces_only_lmforge_entries() {
        let d = tmpdir("own");
        let out = d.join("m");
        write_output(&out, "convert", |t| {
            std::fs::write(t.join("a"), "1")?;
            Ok(std::fs::write(t.join("old-only"), "1")?)
        })
        .unwrap();
        let e = check(&out, claim(false)).unwrap_err().to_string();
        assert!(e.contains("--overwrite"), "{e}");
        check(&out, claim(true)).unwrap();
        std::fs::write(out.join("notes.md"), "mine").unwrap();
        write_output(&out, "convert", |t| Ok(std::fs::write(t.join("a"), "2")?)).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "2");
        assert_eq!(
            std::fs::read_to_string(out.join("notes.md")).unwrap(),
            "mine"
        );
        assert!(!out.join("old-only").exists());
        let m = manifest(&out).unwrap().unwrap();
        assert_eq!(
            m.entries.into_iter().collect::<Vec<_>>(),
            vec!["a".to_string()]
        );
        // A run: --overwrite removes the old run's entries and nothing else.
        let run = d.join("run");
        let c = Claim {
            kind: "pretrain",
            overwrite: false,
            resumable: true,
        };
        start_run(&run, c).unwrap();
        std::fs::write(entry(&run, "metrics.jsonl").unwrap(), "{}").unwrap();
        // Only a log: a failed start, replaced without asking.
        check(&run, c).unwrap();
        std::fs::create_dir(entry(&run, "checkpoints").unwrap()).unwrap();
        std::fs::write(run.join("mine.txt"), "keep").unwrap();
        let e = check(&run, c).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
        start_run(
            &run,
            Claim {
                overwrite: true,
                ..c
            },
        )
        .unwrap();
        assert!(!run.join("metrics.jsonl").exists() && !run.join("checkpoints").exists());
        assert_eq!(
            std::fs::read_to_string(run.join("mine.txt")).unwrap(),
            "keep"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn review_cases() {
        let d = tmpdir("review");
        // `new/..` would become the parent once `new` exists.
        let e = check(&d.join("new/../x"), claim(false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`..`"), "{e}");
        // A run never takes over a name it did not write, and two writers cannot share a run.
        let run = d.join("run");
        let c = Claim {
            kind: "sft",
            overwrite: false,
            resumable: true,
        };
        let held = start_run(&run, c).unwrap();
        std::fs::create_dir(run.join("model")).unwrap();
        std::fs::write(run.join("model/mine.txt"), "keep").unwrap();
        assert!(entry(&run, "model")
            .unwrap_err()
            .to_string()
            .contains("not written by lmforge"));
        let e = adopt(&run, "sft").unwrap_err().to_string();
        assert!(e.contains("another lmforge process"), "{e}");
        drop(held);
        assert!(adopt(&run, "pretrain")
            .unwrap_err()
            .to_string()
            .contains("not `pretrain`"));
        // --overwrite never replaces a user's file of the same name as a new entry.
        let out = d.join("m");
        write_output(&out, "convert", |t| Ok(std::fs::write(t.join("a"), "1")?)).unwrap();
        std::fs::write(out.join("b"), "mine").unwrap();
        let e = write_output(&out, "convert", |t| {
            std::fs::write(t.join("a"), "2")?;
            Ok(std::fs::write(t.join("b"), "theirs")?)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"b\""), "{e}");
        assert_eq!(std::fs::read_to_string(out.join("b")).unwrap(), "mine");
        assert_eq!(std::fs::read_to_string(out.join("a")).unwrap(), "1");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn special_places_are_refused() {
        assert!(refuse_special(Path::new("/")).is_err());
        let cwd = std::env::current_dir().unwrap();
        assert!(refuse_special(&cwd).is_err());
        assert!(refuse_special(cwd.parent().unwrap()).is_err());
        assert!(refuse_special(Path::new("..")).is_err());
        assert!(refuse_special(&cwd.join("target/no-such-dir-xyz")).is_ok());
        if let Some(h) = std::env::var_os("HOME") {
            assert!(refuse_special(Path::new(&h)).is_err());
        }
    }
}
