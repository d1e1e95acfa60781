//! Host roots: folders that stand in for a device's file system, with the files a test
//! created as its ground truth.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// A fresh per-test folder under `e2e/.state/roots` that serves as an agent's host root.
pub fn host_root(name: &str) -> Result<PathBuf> {
    let p = crate::repo_root().join(format!("e2e/.state/roots/{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    Ok(p)
}

/// Writes `text` at the device path `rel` below `root`, creating folders.
pub fn write(root: &Path, rel: &str, text: &str) -> Result<PathBuf> {
    let p = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// A sparse file: hashing it takes real time without using disk.
pub fn sparse(root: &Path, rel: &str, size: u64) -> Result<()> {
    let p = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(&p)?.set_len(size)?;
    Ok(())
}

/// Creates `count` empty files named by `name(i)` in the device folder `dir`.
pub fn empty_files(
    root: &Path,
    dir: &str,
    count: usize,
    name: impl Fn(usize) -> String,
) -> Result<()> {
    let d = root.join(dir.trim_start_matches('/'));
    std::fs::create_dir_all(&d)?;
    for i in 0..count {
        let p = d.join(name(i));
        std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    Ok(())
}

/// A read-only tree that is slow to create (a hundred thousand entries), built once by
/// `build` under `e2e/.state/fixtures/NAME` and reused by later runs. Change NAME when
/// `build` changes. Tests may use it as a host root but must not change it.
pub fn cached_tree(name: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let dir = crate::repo_root().join("e2e/.state/fixtures");
    let done = dir.join(name);
    if done.join(".complete").exists() {
        return Ok(done);
    }
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    build(&tmp).with_context(|| format!("building the fixture {name}"))?;
    std::fs::write(tmp.join(".complete"), "")?;
    // A half-built tree of an interrupted run has no stamp: replace it.
    if done.exists() && !done.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&done);
    }
    if std::fs::rename(&tmp, &done).is_err() {
        // Another run finished first; its tree is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    ensure!(
        done.join(".complete").exists(),
        "the fixture {} is incomplete",
        done.display()
    );
    Ok(done)
}
