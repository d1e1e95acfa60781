//! cd, dir, fileinfo and findfile.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::{GlobBuilder, GlobMatcher};
use liveresponse_api::command::Invocation;
use serde::Serialize;

use super::hostfs::{
    Accounts, HostFs, hash_file, io_error, listing_size, mode_string, normalize, open_in_root,
    open_regular, owner_of, rfc3339, rfc3339_from_unix, rfc3339_precise, type_name,
};
use super::{number, required, summarize, to_records};
use crate::provider::{CommandResult, ExecContext, ExecError, OpenedFile};

const DEFAULT_MAX_RESULTS: u64 = 1000;
const DEFAULT_FINDFILE_TIMEOUT: Duration = Duration::from_secs(300);
/// Pseudo file systems: walking them is slow, endless (/proc/*/root loops back to /) or
/// has side effects (reading some /sys files), and a file an attacker dropped is not
/// there. Searched only when -root is inside them.
const PSEUDO_FS: &[&str] = &["/proc", "/sys", "/dev"];
/// How many skipped folders a warning names before it only counts.
const SHOWN_SKIPPED: usize = 5;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PathRecord {
    path: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DirRecord {
    /// The entry's name, or its full device path with -full_path.
    name: String,
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: Option<u64>,
    modified: Option<String>,
    mode: String,
    owner: String,
    group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileInfoRecord {
    /// Canonical device path: links resolved.
    path: String,
    /// The path as asked for, when a link made it differ from `path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    requested_path: Option<String>,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    created: Option<String>,
    modified: Option<String>,
    accessed: Option<String>,
    /// Inode change time: moves, chmod and chown show here even when mtime was forged.
    changed: Option<String>,
    owner: String,
    group: String,
    uid: u32,
    gid: u32,
    mode: String,
    inode: u64,
    links: u64,
    sha256: Option<String>,
    sha1: Option<String>,
    md5: Option<String>,
}

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct FoundRecord {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: Option<u64>,
    modified: Option<String>,
}

/// Resolves a user path against the session, naming it as typed (absolute) in errors.
fn resolve(ctx: &ExecContext, path: &str, follow_last: bool) -> Result<String, ExecError> {
    let hfs = HostFs::of(ctx);
    hfs.resolve(&ctx.working_directory, path, follow_last)
        .map_err(|e| io_error(&e, &normalize(&ctx.working_directory, path)))
}

/// Metadata of a resolved device path, opened by the kernel within the root so a link
/// swapped in since the resolution cannot point it elsewhere (the last component is not
/// followed, as lstat would not).
fn metadata_of(ctx: &ExecContext, device: &str) -> Result<fs::Metadata, ExecError> {
    open_in_root(&ctx.host_root, device)
        .and_then(|f| f.metadata())
        .map_err(|e| io_error(&e, device))
}

/// Opens a file for getfile: links resolved within the root, and only a regular file on a
/// real file system (a FIFO would block the transfer, a device or a /proc file never end).
pub(super) fn open_for_transfer(ctx: &ExecContext, path: &str) -> Result<OpenedFile, ExecError> {
    let canonical = resolve(ctx, path, true)?;
    let (file, meta) =
        open_regular(&ctx.host_root, &canonical, true).map_err(|e| e.into_exec(&canonical))?;
    Ok(OpenedFile {
        path: canonical,
        file,
        size: meta.len(),
        modified: meta.modified().ok(),
    })
}

pub(super) fn cd(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let path = required(inv, "path")?;
    let canonical = resolve(ctx, path, true)?;
    if !metadata_of(ctx, &canonical)?.is_dir() {
        return Err(ExecError::InvalidArgument(format!(
            "not a directory: {canonical}"
        )));
    }
    let mut result = CommandResult::with_records(to_records(&[PathRecord {
        path: canonical.clone(),
    }])?);
    result.working_directory = Some(canonical);
    Ok(result)
}

pub(super) fn dir(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let path = inv.get("path").unwrap_or(".");
    let full_path = inv.has_flag("full_path");
    let canonical = resolve(ctx, path, true)?;
    let meta = metadata_of(ctx, &canonical)?;
    let accounts = Accounts::load(&hfs);
    let mut warnings = Vec::new();

    let entry = |device: String, meta: &fs::Metadata| {
        let (owner, group) = owner_of(&accounts, meta);
        let target = meta
            .file_type()
            .is_symlink()
            .then(|| fs::read_link(hfs.host_path(&device)).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned());
        DirRecord {
            name: if full_path {
                device.clone()
            } else {
                super::hostfs::file_name(&device).to_owned()
            },
            path: device,
            kind: type_name(meta.file_type()),
            size: listing_size(meta),
            modified: meta.modified().ok().and_then(rfc3339),
            mode: mode_string(meta),
            owner,
            group,
            target,
        }
    };

    // `dir FILE` describes the one file, as ls does, rather than failing.
    if !meta.is_dir() {
        return Ok(CommandResult::with_records(to_records(&[entry(
            canonical, &meta,
        )])?));
    }

    // Listed through a handle opened within the root, for the same reason as metadata_of.
    let handle = open_in_root(&ctx.host_root, &canonical).map_err(|e| io_error(&e, &canonical))?;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let host = if by_fd.exists() {
        by_fd
    } else {
        hfs.host_path(&canonical)
    };
    let read = fs::read_dir(&host).map_err(|e| io_error(&e, &canonical))?;
    let mut rows = Vec::new();
    let mut unreadable = Vec::new();
    for item in read {
        ctx.check()?;
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                return Err(io_error(&e, &canonical));
            }
        };
        let device = super::hostfs::join(&canonical, &item.file_name().to_string_lossy());
        match item.metadata() {
            Ok(meta) => rows.push(entry(device, &meta)),
            // Gone between readdir and stat, or not ours to see: say so, keep listing.
            Err(_) => unreadable.push(device),
        }
    }
    if !unreadable.is_empty() {
        warnings.push(format!(
            "could not read {} entries: {}",
            unreadable.len(),
            summarize(&unreadable, unreadable.len(), SHOWN_SKIPPED)
        ));
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let mut result = CommandResult::with_records(to_records(&rows)?);
    result.warnings = warnings;
    Ok(result)
}

pub(super) fn fileinfo(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let path = required(inv, "path")?;
    let requested = normalize(&ctx.working_directory, path);
    let canonical = resolve(ctx, path, true)?;
    let meta = metadata_of(ctx, &canonical)?;
    let accounts = Accounts::load(&hfs);
    let (owner, group) = owner_of(&accounts, &meta);

    // Directories are described without content. Anything else but a regular file on a
    // real file system is refused on the opened descriptor (a FIFO would block, a device
    // never end, /proc/kmsg drain the kernel log): better a clear error than a hang.
    let hashes = if meta.is_dir() {
        None
    } else {
        Some(hash_file(ctx, &canonical).map_err(|e| e.into_exec(&canonical))?)
    };
    let record = FileInfoRecord {
        requested_path: (requested != canonical).then_some(requested),
        name: super::hostfs::file_name(&canonical).to_owned(),
        path: canonical,
        kind: type_name(meta.file_type()),
        size: meta.len(),
        // Some file systems answer statx with a zero birth time instead of none.
        created: meta
            .created()
            .ok()
            .filter(|t| *t != std::time::UNIX_EPOCH)
            .and_then(rfc3339_precise),
        modified: meta.modified().ok().and_then(rfc3339_precise),
        accessed: meta.accessed().ok().and_then(rfc3339_precise),
        changed: rfc3339_from_unix(meta.ctime(), meta.ctime_nsec()),
        owner,
        group,
        uid: meta.uid(),
        gid: meta.gid(),
        mode: mode_string(&meta),
        inode: meta.ino(),
        links: meta.nlink(),
        sha256: hashes.as_ref().map(|h| h.sha256.clone()),
        sha1: hashes.as_ref().map(|h| h.sha1.clone()),
        md5: hashes.map(|h| h.md5),
    };
    Ok(CommandResult::with_records(to_records(&[record])?))
}

/// Lists one host directory: names and types, sorted by name so that searches stop at
/// the same place every time. Injected in tests to simulate unreadable folders and slow
/// disks, which root (who runs the tests) never meets.
type ListDir<'a> = dyn Fn(&Path) -> io::Result<Vec<(OsString, fs::FileType)>> + 'a;

fn list_dir(path: &Path) -> io::Result<Vec<(OsString, fs::FileType)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        // d_type is free with the listing; a stat per entry would double the cost.
        if let Ok(ft) = entry.file_type() {
            entries.push((entry.file_name(), ft));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// How a name is matched: an exact name or a glob, case-insensitively either way, since
/// the analyst hunts for a name an attacker may have varied in case.
fn matcher(name: &str) -> Result<GlobMatcher, ExecError> {
    if name.is_empty() {
        return Err(ExecError::InvalidArgument(
            "findfile needs a file name or glob".to_owned(),
        ));
    }
    if name.contains('/') {
        return Err(ExecError::InvalidArgument(format!(
            "findfile matches file names, not paths: give the folder with -root (got {name:?})"
        )));
    }
    let is_glob = name.contains(['*', '?', '[', '{']);
    let pattern = if is_glob {
        name.to_owned()
    } else {
        globset::escape(name)
    };
    GlobBuilder::new(&pattern)
        .case_insensitive(true)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| ExecError::InvalidArgument(format!("invalid glob {name:?}: {e}")))
}

struct Search {
    max_results: usize,
    /// Our own -timeout_seconds: reaching it gives partial results, not an error.
    stop_at: Instant,
    timeout: Duration,
}

struct SearchOutcome {
    found: Vec<FoundRecord>,
    unreadable: Vec<String>,
    unreadable_count: usize,
    hit_limit: bool,
    hit_timeout: bool,
    pruned: Vec<String>,
}

pub(super) fn findfile(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    findfile_with(ctx, inv, &list_dir)
}

fn findfile_with(
    ctx: &ExecContext,
    inv: &Invocation,
    list: &ListDir,
) -> Result<CommandResult, ExecError> {
    let name = required(inv, "name")?;
    let matcher = matcher(name)?;
    let max_results = match number(inv, "max_results")? {
        Some(0) => {
            return Err(ExecError::InvalidArgument(
                "-max_results must be at least 1".to_owned(),
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => DEFAULT_MAX_RESULTS as usize,
    };
    let timeout = match number(inv, "timeout_seconds")? {
        Some(0) => {
            return Err(ExecError::InvalidArgument(
                "-timeout_seconds must be at least 1".to_owned(),
            ));
        }
        Some(n) => Duration::from_secs(n),
        None => DEFAULT_FINDFILE_TIMEOUT,
    };
    let root = resolve(ctx, inv.get("root").unwrap_or("/"), true)?;
    if !metadata_of(ctx, &root)?.is_dir() {
        return Err(ExecError::InvalidArgument(format!(
            "-root is not a directory: {root}"
        )));
    }
    let now = Instant::now();
    let search = Search {
        max_results,
        stop_at: now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(86_400 * 365)),
        timeout,
    };
    let outcome = walk(ctx, &root, &matcher, &search, list)?;

    let mut warnings = Vec::new();
    if outcome.unreadable_count > 0 {
        warnings.push(format!(
            "skipped {} unreadable folder{}: {}",
            outcome.unreadable_count,
            if outcome.unreadable_count == 1 {
                ""
            } else {
                "s"
            },
            summarize(&outcome.unreadable, outcome.unreadable_count, SHOWN_SKIPPED)
        ));
    }
    if outcome.hit_limit {
        warnings.push(format!(
            "stopped after {} results (-max_results); there may be more",
            search.max_results
        ));
    }
    if outcome.hit_timeout {
        warnings.push(format!(
            "stopped after {} s (-timeout_seconds); the search is incomplete",
            search.timeout.as_secs()
        ));
    }
    if !outcome.pruned.is_empty() {
        warnings.push(format!(
            "did not search {} (pseudo file systems); give -root inside one to search it",
            outcome.pruned.join(", ")
        ));
    }
    let mut found = outcome.found;
    found.sort_by(|a, b| a.path.cmp(&b.path));
    let mut result = CommandResult::with_records(to_records(&found)?);
    result.warnings = warnings;
    Ok(result)
}

/// Depth-first, in name order, never following symbolic links (so link loops cannot
/// trap it), checking cancellation and both deadlines at every entry.
fn walk(
    ctx: &ExecContext,
    root: &str,
    matcher: &GlobMatcher,
    search: &Search,
    list: &ListDir,
) -> Result<SearchOutcome, ExecError> {
    let hfs = HostFs::of(ctx);
    let pruned_dirs: Vec<(PathBuf, &str)> = PSEUDO_FS
        .iter()
        .filter(|p| !is_within(root, p))
        .map(|p| (hfs.host_path(p), *p))
        .collect();
    let mut outcome = SearchOutcome {
        found: Vec::new(),
        unreadable: Vec::new(),
        unreadable_count: 0,
        hit_limit: false,
        hit_timeout: false,
        pruned: Vec::new(),
    };
    let mut stack = vec![hfs.host_path(root)];
    while let Some(dir) = stack.pop() {
        ctx.check()?;
        if Instant::now() >= search.stop_at {
            outcome.hit_timeout = true;
            break;
        }
        let entries = match list(&dir) {
            Ok(entries) => entries,
            Err(_) => {
                outcome.unreadable_count += 1;
                if outcome.unreadable.len() < SHOWN_SKIPPED {
                    outcome.unreadable.push(hfs.device_path(&dir));
                }
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for (name, ft) in entries {
            ctx.check()?;
            if Instant::now() >= search.stop_at {
                outcome.hit_timeout = true;
                return Ok(outcome);
            }
            let child = dir.join(&name);
            if matcher.is_match(Path::new(&name)) {
                let meta = fs::symlink_metadata(&child).ok();
                outcome.found.push(FoundRecord {
                    path: hfs.device_path(&child),
                    name: name.to_string_lossy().into_owned(),
                    kind: type_name(ft),
                    size: meta.as_ref().and_then(listing_size),
                    modified: meta.and_then(|m| m.modified().ok()).and_then(rfc3339),
                });
                if outcome.found.len() >= search.max_results {
                    outcome.hit_limit = true;
                    return Ok(outcome);
                }
            }
            if ft.is_dir() {
                if let Some((_, device)) = pruned_dirs.iter().find(|(p, _)| *p == child) {
                    outcome.pruned.push((*device).to_owned());
                } else {
                    subdirs.push(child);
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(outcome)
}

/// Whether device path `path` is `dir` or below it.
fn is_within(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sha2::Digest;

    use super::super::testutil::*;
    use super::*;

    const CONTENT: &str = "live response: known content\n";

    /// A host root with `/dossier é/sub dir/report ü.txt`.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/dossier é/sub dir/report ü.txt", CONTENT);
        write(dir.path(), "/dossier é/other.log", "x");
        write(
            dir.path(),
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\n",
        );
        write(dir.path(), "/etc/group", "root:x:0:\n");
        dir
    }

    fn paths(result: &CommandResult) -> Vec<String> {
        result
            .records
            .iter()
            .map(|r| r["path"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn findfile_by_exact_name_and_glob() {
        let dir = tree();
        let ctx = ctx(dir.path());
        let exact = run(&ctx, "findfile", &["report ü.txt"]).unwrap();
        assert_columns("findfile", &exact);
        assert_eq!(paths(&exact), vec!["/dossier é/sub dir/report ü.txt"]);
        assert_eq!(exact.records[0]["size"], CONTENT.len() as u64);
        assert_eq!(exact.records[0]["type"], "file");

        let glob = run(&ctx, "findfile", &["REPORT*.TXT", "-root", "/dossier é"]).unwrap();
        assert_eq!(paths(&glob), vec!["/dossier é/sub dir/report ü.txt"]);

        let dirs = run(&ctx, "findfile", &["sub*"]).unwrap();
        assert_eq!(paths(&dirs), vec!["/dossier é/sub dir"]);
        assert_eq!(dirs.records[0]["type"], "directory");

        let none = run(&ctx, "findfile", &["report", "-root", "/etc"]).unwrap();
        assert!(none.records.is_empty());

        let err = run(&ctx, "findfile", &["x", "-root", "/missing"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
        let err = run(&ctx, "findfile", &["a/b"]).unwrap_err();
        assert_eq!(err.reason(), "InvalidArgument");
    }

    #[test]
    fn findfile_relative_root_and_pseudo_fs() {
        let dir = tree();
        write(dir.path(), "/proc/1/report ü.txt", "not a real file");
        let mut ctx = ctx(dir.path());
        let all = run(&ctx, "findfile", &["report ü.txt"]).unwrap();
        assert_eq!(paths(&all), vec!["/dossier é/sub dir/report ü.txt"]);
        assert!(
            all.warnings.iter().any(|w| w.contains("/proc")),
            "{:?}",
            all.warnings
        );

        let inside = run(&ctx, "findfile", &["report ü.txt", "-root", "/proc"]).unwrap();
        assert_eq!(paths(&inside), vec!["/proc/1/report ü.txt"]);

        ctx.working_directory = "/dossier é".to_owned();
        let relative = run(&ctx, "findfile", &["*.txt", "-root", "sub dir"]).unwrap();
        assert_eq!(paths(&relative), vec!["/dossier é/sub dir/report ü.txt"]);
    }

    #[test]
    fn fileinfo_sizes_and_hashes() {
        let dir = tree();
        let ctx = ctx(dir.path());
        let result = run(&ctx, "fileinfo", &["/dossier é/sub dir/report ü.txt"]).unwrap();
        assert_columns("fileinfo", &result);
        let r = &result.records[0];
        assert_eq!(r["path"], "/dossier é/sub dir/report ü.txt");
        assert_eq!(r["size"], CONTENT.len() as u64);
        assert_eq!(r["type"], "file");
        assert_eq!(r["owner"], "root");
        assert_eq!(r["mode"].as_str().unwrap().len(), 10);
        assert_eq!(
            r["sha256"],
            hex::encode(sha2::Sha256::digest(CONTENT.as_bytes()))
        );
        assert_eq!(
            r["sha1"],
            hex::encode(sha1::Sha1::digest(CONTENT.as_bytes()))
        );
        assert_eq!(r["md5"], hex::encode(md5::Md5::digest(CONTENT.as_bytes())));
        assert!(r["modified"].as_str().unwrap().ends_with('Z'));
        assert!(r.get("requestedPath").is_none());

        // Known digests, so that a wrong hasher cannot hide behind the same mistake twice.
        write(dir.path(), "/abc", "abc");
        let abc = run(&ctx, "fileinfo", &["/abc"]).unwrap();
        assert_eq!(
            abc.records[0]["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(abc.records[0]["md5"], "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            abc.records[0]["sha1"],
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );

        let folder = run(&ctx, "fileinfo", &["/dossier é"]).unwrap();
        assert_eq!(folder.records[0]["type"], "directory");
        assert!(folder.records[0]["sha256"].is_null());

        let err = run(&ctx, "fileinfo", &["/nope"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
        assert_eq!(err.to_string(), "no such file or directory: /nope");
    }

    #[test]
    fn fileinfo_through_a_link_names_both_paths() {
        let dir = tree();
        symlink("/dossier é/sub dir", dir.path().join("shortcut")).unwrap();
        let result = run(&ctx(dir.path()), "fileinfo", &["/shortcut/report ü.txt"]).unwrap();
        let r = &result.records[0];
        assert_eq!(r["path"], "/dossier é/sub dir/report ü.txt");
        assert_eq!(r["requestedPath"], "/shortcut/report ü.txt");
    }

    #[test]
    fn cd_then_dir() {
        let dir = tree();
        let mut ctx = ctx(dir.path());
        let cd = run(&ctx, "cd", &["dossier é/./sub dir/../sub dir"]).unwrap();
        assert_columns("cd", &cd);
        assert_eq!(cd.working_directory.as_deref(), Some("/dossier é/sub dir"));
        assert_eq!(cd.records[0]["path"], "/dossier é/sub dir");
        ctx.working_directory = cd.working_directory.unwrap();

        let listing = run(&ctx, "dir", &[]).unwrap();
        assert_columns("dir", &listing);
        assert_eq!(listing.records.len(), 1);
        assert_eq!(listing.records[0]["name"], "report ü.txt");
        assert_eq!(listing.records[0]["type"], "file");
        assert_eq!(listing.records[0]["size"], CONTENT.len() as u64);
        assert_eq!(listing.records[0]["owner"], "root");

        let full = run(&ctx, "dir", &["..", "-full_path"]).unwrap();
        let names: Vec<&str> = full
            .records
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["/dossier é/other.log", "/dossier é/sub dir"]);
        assert_eq!(full.records[1]["type"], "directory");
        assert!(full.records[1]["size"].is_null());

        let up = run(&ctx, "cd", &["../../../../.."]).unwrap();
        assert_eq!(up.working_directory.as_deref(), Some("/"));

        let err = run(&ctx, "cd", &["missing"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
        assert_eq!(
            err.to_string(),
            "no such file or directory: /dossier é/sub dir/missing"
        );
        let err = run(&ctx, "cd", &["report ü.txt"]).unwrap_err();
        assert_eq!(err.reason(), "InvalidArgument");
    }

    #[test]
    fn cd_through_absolute_link_stays_in_root() {
        let dir = tree();
        symlink("/", dir.path().join("dossier é/to-root")).unwrap();
        symlink("/etc", dir.path().join("etc-link")).unwrap();
        let ctx = ctx(dir.path());
        let cd = run(&ctx, "cd", &["/dossier é/to-root/etc-link"]).unwrap();
        assert_eq!(cd.working_directory.as_deref(), Some("/etc"));
        let listing = run(&ctx, "dir", &["/etc-link"]).unwrap();
        assert_eq!(listing.records.len(), 2, "{:?}", listing.records);
        let links = run(&ctx, "dir", &["/"]).unwrap();
        let link = links
            .records
            .iter()
            .find(|r| r["name"] == "etc-link")
            .unwrap();
        assert_eq!(link["type"], "symlink");
        assert_eq!(link["target"], "/etc");
    }

    #[test]
    fn findfile_survives_symlink_loops() {
        let dir = tree();
        let loops = dir.path().join("loops");
        fs::create_dir(&loops).unwrap();
        symlink(".", loops.join("a")).unwrap();
        symlink("a", loops.join("b")).unwrap();
        write(dir.path(), "/loops/target.bin", "t");
        let ctx = ctx(dir.path());
        let started = Instant::now();
        let result = run(&ctx, "findfile", &["*", "-root", "/loops"]).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            paths(&result),
            vec!["/loops/a", "/loops/b", "/loops/target.bin"]
        );
        assert_eq!(result.records[0]["type"], "symlink");
    }

    #[test]
    fn findfile_reports_unreadable_folders() {
        let dir = tree();
        for name in ["locked1", "locked2"] {
            write(dir.path(), &format!("/{name}/secret.txt"), "s");
        }
        let ctx = ctx(dir.path());
        let inv = inv("findfile", &["*.txt"]);
        let locked = |path: &Path| {
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("locked"))
            {
                Err(io::Error::from(io::ErrorKind::PermissionDenied))
            } else {
                list_dir(path)
            }
        };
        let result = findfile_with(&ctx, &inv, &locked).unwrap();
        assert_eq!(paths(&result), vec!["/dossier é/sub dir/report ü.txt"]);
        assert!(
            result
                .warnings
                .iter()
                .any(|w| w == "skipped 2 unreadable folders: /locked1, /locked2"),
            "{:?}",
            result.warnings
        );

        // Without the injection, a real chmod 000 folder only stops a non-root user.
        let locked_dir = dir.path().join("locked1");
        fs::set_permissions(&locked_dir, fs::Permissions::from_mode(0o000)).unwrap();
        let real = run(&ctx, "findfile", &["*.txt"]).unwrap();
        let running_as_root = fs::read_dir(&locked_dir).is_ok();
        if !running_as_root {
            assert!(real.warnings.iter().any(|w| w.contains("/locked1")));
        }
        fs::set_permissions(&locked_dir, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn findfile_respects_max_results() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            write(dir.path(), &format!("/d/f{i}.log"), "x");
        }
        let result = run(
            &ctx(dir.path()),
            "findfile",
            &["*.log", "-max_results", "3"],
        )
        .unwrap();
        assert_eq!(paths(&result), vec!["/d/f0.log", "/d/f1.log", "/d/f2.log"]);
        assert!(
            result
                .warnings
                .iter()
                .any(|w| w.contains("stopped after 3 results (-max_results)")),
            "{:?}",
            result.warnings
        );
        let all = run(&ctx(dir.path()), "findfile", &["*.log"]).unwrap();
        assert_eq!(all.records.len(), 10);
        assert!(all.warnings.is_empty(), "{:?}", all.warnings);
        let err = run(&ctx(dir.path()), "findfile", &["x", "-max_results", "0"]).unwrap_err();
        assert_eq!(err.reason(), "InvalidArgument");
    }

    /// 200 folders of 100 files; the cancel arrives while the 20th folder is being listed.
    /// Counting the folders listed after it, rather than timing the stop, keeps the test
    /// exact on a loaded machine.
    #[test]
    fn findfile_stops_quickly_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..200 {
            let folder = dir.path().join(format!("d{d:03}"));
            fs::create_dir(&folder).unwrap();
            for f in 0..100 {
                fs::write(folder.join(format!("f{f}")), b"").unwrap();
            }
        }
        let ctx = ctx(dir.path());
        let listed = AtomicUsize::new(0);
        let listed_after_cancel = AtomicUsize::new(0);
        let cancelled = ctx.cancelled.clone();
        let cancelling = |path: &Path| {
            if cancelled.load(Ordering::SeqCst) {
                listed_after_cancel.fetch_add(1, Ordering::SeqCst);
            }
            if listed.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
                // From another thread, as the executor does it.
                let flag = cancelled.clone();
                std::thread::spawn(move || flag.store(true, Ordering::SeqCst))
                    .join()
                    .unwrap();
            }
            list_dir(path)
        };
        // Matches nothing, so neither -max_results nor the end of the tree stops it first.
        let inv = inv("findfile", &["no-such-file"]);
        let result = findfile_with(&ctx, &inv, &cancelling).map(|r| r.warnings);
        assert!(matches!(result, Err(ExecError::Cancelled)), "{result:?}");
        assert_eq!(listed.load(Ordering::SeqCst), 20);
        assert_eq!(listed_after_cancel.load(Ordering::SeqCst), 0);

        // The real walker over the same 20k files honours a cancel set before it starts.
        let err = run(&ctx, "findfile", &["*"]).unwrap_err();
        assert!(matches!(err, ExecError::Cancelled));
    }

    #[test]
    fn findfile_timeout_gives_partial_results_and_deadline_an_error() {
        let dir = tree();
        let mut ctx = ctx(dir.path());
        let slow = |path: &Path| {
            std::thread::sleep(Duration::from_millis(1200));
            list_dir(path)
        };
        let inv_timeout = inv("findfile", &["*", "-timeout_seconds", "1"]);
        let partial = findfile_with(&ctx, &inv_timeout, &slow).unwrap();
        assert!(
            partial
                .warnings
                .iter()
                .any(|w| w.contains("stopped after 1 s (-timeout_seconds)")),
            "{:?}",
            partial.warnings
        );
        ctx.deadline = Some(Instant::now());
        let err = run(&ctx, "findfile", &["*"]).unwrap_err();
        assert!(matches!(err, ExecError::TimedOut));
    }
}
