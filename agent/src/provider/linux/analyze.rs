//! `analyze file|process` and `scan` on Linux: the namespace's rule files (through
//! [`crate::analysis::RuleSet`]) plus built-in checks that need no rules:
//! - a running process whose executable was deleted or replaced on disk;
//! - an executable file in a world-writable directory;
//! - a process listening on a port whose executable lies outside the package paths.
//!
//! Nothing here changes the device: `remediate` acts on what these find.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

use liveresponse_api::command::Invocation;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::hostfs::{HostFs, io_error, normalize, open_regular, parent};
use super::required;
use crate::analysis::{Checker, Finding, RuleSet, Verdict};
use crate::provider::{CommandResult, ExecContext, ExecError};

/// What YARA reads of one file: larger files are hashed whole but matched on their first
/// part (and the answer says so).
const YARA_WINDOW: u64 = 64 << 20;
/// scan's defaults: enough for a home directory, bounded for a whole disk.
const SCAN_MAX_FILES: u64 = 100_000;
const SCAN_MAX_FILE_SIZE: u64 = 64 << 20;
/// Where packaged executables live; a listener elsewhere is worth a look.
const PACKAGE_PATHS: &[&str] = &[
    "/usr/",
    "/bin/",
    "/sbin/",
    "/lib/",
    "/lib64/",
    "/opt/",
    "/snap/",
    "/nix/store/",
];

fn empty_rules() -> &'static RuleSet {
    static EMPTY: std::sync::OnceLock<RuleSet> = std::sync::OnceLock::new();
    EMPTY.get_or_init(RuleSet::default)
}

fn rules(ctx: &ExecContext) -> &RuleSet {
    match ctx.rules.as_deref() {
        Some(set) => set,
        None => empty_rules(),
    }
}

/// The overall verdict of some findings, given whether any rule could have matched.
fn overall(findings: &[Finding], has_rules: bool) -> Verdict {
    findings
        .iter()
        .map(|f| f.verdict)
        .max()
        .filter(|v| *v > Verdict::Clean)
        .unwrap_or(if has_rules {
            Verdict::Clean
        } else {
            Verdict::Unknown
        })
}

pub(super) fn analyze(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let kind = required(inv, "type")?;
    let entity = required(inv, "entity")?;
    let (shown, verdict, findings) = verdict_of(ctx, kind, entity)?;
    let set = rules(ctx);
    let mut records = vec![json!({
        "entity": shown,
        "verdict": verdict.as_str(),
        "engine": "summary",
        "details": set.describe(),
    })];
    records.extend(findings.iter().map(|f| {
        json!({
            "entity": shown,
            "verdict": f.verdict.as_str(),
            "engine": f.engine,
            "threat": f.threat,
            "details": f.details,
        })
    }));
    let mut r = CommandResult::with_records(records);
    r.warnings.extend(set.problems.iter().cloned());
    Ok(r)
}

/// The verdict on an entity, with the evidence, as `analyze` and `remediate -auto` see
/// it. Returns the entity as shown (a canonical path, or `pid (name)`).
pub(super) fn verdict_of(
    ctx: &ExecContext,
    kind: &str,
    entity: &str,
) -> Result<(String, Verdict, Vec<Finding>), ExecError> {
    let set = rules(ctx);
    let mut checker = set.checker();
    let (shown, findings) = match kind {
        "file" => {
            let hfs = HostFs::of(ctx);
            let path = hfs
                .resolve(&ctx.working_directory, entity, true)
                .map_err(|e| io_error(&e, &normalize(&ctx.working_directory, entity)))?;
            let findings = check_file(ctx, &mut checker, &path)?;
            (path, findings)
        }
        "process" => process_findings(ctx, &mut checker, entity)?,
        "registry" => {
            return Err(ExecError::NotSupported {
                command: "analyze registry".into(),
                os: "linux".into(),
            });
        }
        other => {
            return Err(ExecError::InvalidArgument(format!(
                "analyze looks at files and processes, not a {other}; analyze the file behind it instead (analyze file PATH)"
            )));
        }
    };
    Ok((shown, overall(&findings, set.has_rules()), findings))
}

/// Reads a file for the rules: the SHA-256 of all of it, and its first [`YARA_WINDOW`]
/// bytes. Returns the digest and the bytes, and whether the file was longer.
fn read_for_rules(
    ctx: &ExecContext,
    file: &mut fs::File,
    shown: &str,
) -> Result<(String, Vec<u8>, bool), ExecError> {
    let mut hasher = Sha256::new();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut cut = false;
    loop {
        ctx.check()?;
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(&e, shown)),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        let room = usize::try_from(YARA_WINDOW)
            .unwrap_or(usize::MAX)
            .saturating_sub(head.len());
        if room < n {
            cut = true;
        }
        head.extend_from_slice(&buf[..n.min(room)]);
    }
    Ok((hex::encode(hasher.finalize()), head, cut))
}

/// Rules and built-in checks on a regular file (a device path below the host root).
fn check_file(
    ctx: &ExecContext,
    checker: &mut Checker<'_>,
    path: &str,
) -> Result<Vec<Finding>, ExecError> {
    let (mut file, meta) =
        open_regular(&ctx.host_root, path, true).map_err(|e| e.into_exec(path))?;
    let mut findings = builtin_file_checks(ctx, path, &meta);
    if checker.rules().has_rules() {
        let (sha, bytes, cut) = read_for_rules(ctx, &mut file, path)?;
        if cut {
            ctx.note(format!(
                "{path} is larger than {} MiB: YARA matched its first {} MiB only (its SHA-256 covers all of it)",
                YARA_WINDOW >> 20,
                YARA_WINDOW >> 20
            ));
        }
        findings.extend(checker.check(&bytes, &sha));
    }
    Ok(findings)
}

/// An executable (any x bit) in a directory everyone may write: a classic drop spot.
fn builtin_file_checks(ctx: &ExecContext, path: &str, meta: &fs::Metadata) -> Vec<Finding> {
    let mut findings = Vec::new();
    if meta.permissions().mode() & 0o111 != 0 {
        let dir = parent(path);
        let dir_mode = fs::symlink_metadata(HostFs::of(ctx).host_path(dir))
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if dir_mode & 0o002 != 0 {
            findings.push(Finding {
                verdict: Verdict::Suspicious,
                engine: "builtin",
                threat: "executable-in-world-writable-directory".into(),
                details: format!("an executable in {dir}, a directory every user may write"),
            });
        }
    }
    findings
}

/// A process: its executable as the kernel holds it (readable even when deleted) through
/// the rules, and the built-in checks on how it runs.
fn process_findings(
    ctx: &ExecContext,
    checker: &mut Checker<'_>,
    entity: &str,
) -> Result<(String, Vec<Finding>), ExecError> {
    let pid: u32 = entity.trim().parse().map_err(|_| {
        ExecError::InvalidArgument(format!(
            "analyze process takes a process id, not {entity:?}"
        ))
    })?;
    let proc_dir = format!("/proc/{pid}");
    if fs::metadata(&proc_dir).is_err() {
        return Err(ExecError::NotFound(format!("no process {pid} is running")));
    }
    let comm = fs::read_to_string(format!("{proc_dir}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let shown = format!("{pid} ({comm})");
    let link = fs::read_link(format!("{proc_dir}/exe")).map_err(|e| {
        ExecError::PermissionDenied(format!(
            "cannot see the executable of process {pid}: {e} (a kernel thread has none)"
        ))
    })?;
    let link = link.to_string_lossy().into_owned();
    let mut findings = Vec::new();
    let (exe, deleted) = match link.strip_suffix(" (deleted)") {
        Some(p) => (p.to_string(), true),
        None => (link.clone(), false),
    };
    let running = fs::metadata(format!("{proc_dir}/exe")).ok();
    if deleted {
        findings.push(Finding {
            verdict: Verdict::Suspicious,
            engine: "builtin",
            threat: "deleted-executable".into(),
            details: format!("it runs from {exe}, which was deleted from disk"),
        });
    } else if let (Some(running), Ok(on_disk)) = (&running, fs::metadata(&exe))
        && (running.dev(), running.ino()) != (on_disk.dev(), on_disk.ino())
    {
        findings.push(Finding {
            verdict: Verdict::Suspicious,
            engine: "builtin",
            threat: "replaced-executable".into(),
            details: format!(
                "{exe} on disk is not the file it runs: it was replaced since it started"
            ),
        });
    }
    if !deleted
        && let Some(dir) = Path::new(&exe).parent()
        && fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
    {
        findings.push(Finding {
            verdict: Verdict::Suspicious,
            engine: "builtin",
            threat: "executable-in-world-writable-directory".into(),
            details: format!("it runs from {exe}, in a directory every user may write"),
        });
    }
    let ports = listening_ports(ctx, pid);
    if !ports.is_empty() && !PACKAGE_PATHS.iter().any(|p| exe.starts_with(p)) {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        findings.push(Finding {
            verdict: Verdict::Suspicious,
            engine: "builtin",
            threat: "listener-outside-package-paths".into(),
            details: format!(
                "it listens on port {} and runs from {exe}, outside the package paths",
                list.join(", ")
            ),
        });
    }
    if checker.rules().has_rules() {
        let mut file = fs::File::open(format!("{proc_dir}/exe"))
            .map_err(|e| io_error(&e, &format!("{proc_dir}/exe")))?;
        let (sha, bytes, _) = read_for_rules(ctx, &mut file, &exe)?;
        findings.extend(checker.check(&bytes, &sha));
    }
    Ok((shown, findings))
}

/// TCP ports `pid` listens on (IPv4 and IPv6), from its own socket descriptors and its
/// network namespace's tables, read as `connections` reads them (bounded, procfs's parser).
fn listening_ports(ctx: &ExecContext, pid: u32) -> Vec<u16> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: HashSet<u64> = fds
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut ports: Vec<u16> = ["tcp", "tcp6"]
        .into_iter()
        .filter_map(|t| super::network::read_table_of(ctx, pid, t).ok())
        .filter_map(|t| super::network::parse_tcp(&t).ok())
        .flatten()
        .filter(|s| s.state == "LISTEN" && inodes.contains(&s.inode))
        .map(|s| s.local.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

// ---------------------------------------------------------------------------------------
// scan

pub(super) fn scan(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let max_files = uint(inv, "max_files")?.unwrap_or(SCAN_MAX_FILES);
    let max_size = uint(inv, "max_file_size")?.unwrap_or(SCAN_MAX_FILE_SIZE);
    let set = rules(ctx);
    let mut checker = set.checker();
    let hfs = HostFs::of(ctx);
    let mut stats = ScanStats::default();
    let mut records = Vec::new();
    let started = Instant::now();
    let limits = (max_files, max_size);
    match inv.get("path") {
        Some(p) => {
            let root = hfs
                .resolve(&ctx.working_directory, p, true)
                .map_err(|e| io_error(&e, &normalize(&ctx.working_directory, p)))?;
            // Counted first (names only, cheap next to reading), so progress has a total.
            stats.total = count(ctx, &root, max_files)?;
            walk(ctx, &mut checker, &root, limits, &mut stats, &mut records)?;
        }
        None => {
            // The quick scan: what runs, and where droppers land.
            let dirs: Vec<&str> = ["/tmp", "/var/tmp", "/dev/shm"]
                .into_iter()
                .filter(|d| hfs.is_dir(d))
                .collect();
            stats.total = fs::read_dir("/proc").map_or(0, |d| d.count() as u64);
            for dir in &dirs {
                stats.total += count(ctx, dir, max_files)?;
            }
            quick_processes(ctx, &mut checker, &mut stats, &mut records)?;
            for dir in dirs {
                walk(ctx, &mut checker, dir, limits, &mut stats, &mut records)?;
            }
        }
    }
    ctx.progress.report(stats.total, stats.total, "files");
    let mut r = CommandResult::with_records(records);
    r.warnings.push(format!(
        "scanned {} files ({} MiB) in {:.1}s with {}{}",
        stats.files,
        stats.bytes >> 20,
        started.elapsed().as_secs_f64(),
        set.describe(),
        if stats.skipped > 0 {
            format!(
                "; skipped {} (larger than {max_size} bytes or unreadable)",
                stats.skipped
            )
        } else {
            String::new()
        }
    ));
    if stats.capped {
        r.warnings.push(format!(
            "stopped after {max_files} files (max_files): the rest was not scanned"
        ));
    }
    r.warnings.extend(set.problems.iter().cloned());
    Ok(r)
}

fn uint(inv: &Invocation, name: &str) -> Result<Option<u64>, ExecError> {
    inv.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ExecError::InvalidArgument(format!("-{name} takes a number, not {v:?}"))
            })
        })
        .transpose()
}

/// Regular files below `root` (a device path), up to `max`.
fn count(ctx: &ExecContext, root: &str, max: u64) -> Result<u64, ExecError> {
    let mut n = 0;
    for entry in walkdir::WalkDir::new(HostFs::of(ctx).host_path(root))
        .follow_links(false)
        .same_file_system(true)
        .into_iter()
        .flatten()
    {
        ctx.check()?;
        if entry.file_type().is_file() {
            n += 1;
            if n >= max {
                break;
            }
        }
    }
    Ok(n)
}

#[derive(Default)]
struct ScanStats {
    /// What progress counts towards.
    total: u64,
    files: u64,
    bytes: u64,
    skipped: u64,
    capped: bool,
}

fn finding_record(path: &str, f: &Finding) -> serde_json::Value {
    json!({
        "path": path,
        "verdict": f.verdict.as_str(),
        "threat": f.threat,
        "engine": f.engine,
        "details": f.details,
    })
}

/// Walks `root` (a device path) without following links or leaving its file system.
fn walk(
    ctx: &ExecContext,
    checker: &mut Checker<'_>,
    root: &str,
    (max_files, max_size): (u64, u64),
    stats: &mut ScanStats,
    records: &mut Vec<serde_json::Value>,
) -> Result<(), ExecError> {
    let hfs = HostFs::of(ctx);
    let host_root = hfs.host_path(root);
    for entry in walkdir::WalkDir::new(&host_root)
        .follow_links(false)
        .same_file_system(true)
    {
        ctx.check()?;
        if stats.files >= max_files {
            stats.capped = true;
            return Ok(());
        }
        let Ok(entry) = entry else {
            stats.skipped += 1;
            continue;
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let device = hfs.device_path(entry.path());
        let Ok(meta) = entry.metadata() else {
            stats.skipped += 1;
            continue;
        };
        if meta.len() > max_size {
            stats.skipped += 1;
            continue;
        }
        stats.files += 1;
        stats.bytes += meta.len();
        ctx.progress
            .report(stats.files, stats.total.max(stats.files), "files");
        let found = if checker.rules().has_rules() {
            match check_file(ctx, checker, &device) {
                Ok(f) => f,
                Err(e @ (ExecError::Cancelled | ExecError::TimedOut)) => return Err(e),
                Err(_) => {
                    stats.skipped += 1;
                    continue;
                }
            }
        } else {
            builtin_file_checks(ctx, &device, &meta)
        };
        records.extend(
            found
                .iter()
                .filter(|f| f.verdict > Verdict::Clean)
                .map(|f| finding_record(&device, f)),
        );
    }
    Ok(())
}

/// The quick scan's first part: every running process's executable.
fn quick_processes(
    ctx: &ExecContext,
    checker: &mut Checker<'_>,
    stats: &mut ScanStats,
    records: &mut Vec<serde_json::Value>,
) -> Result<(), ExecError> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Ok(());
    };
    for entry in dir.flatten() {
        ctx.check()?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        // Kernel threads have no executable: nothing to look at.
        let Ok((shown, found)) = process_findings(ctx, checker, &pid.to_string()) else {
            continue;
        };
        stats.files += 1;
        records.extend(
            found
                .iter()
                .filter(|f| f.verdict > Verdict::Clean)
                .map(|f| finding_record(&format!("process {shown}"), f)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::command::parse_command;

    fn inv(line: &[&str]) -> Invocation {
        let args: Vec<String> = line[1..].iter().map(|s| s.to_string()).collect();
        parse_command(line[0], &args).expect("parses")
    }

    #[test]
    fn an_executable_in_a_world_writable_directory_is_suspicious_without_rules() {
        let root = tempfile::tempdir().expect("tempdir");
        let drop = root.path().join("drop");
        fs::create_dir(&drop).expect("mkdir");
        fs::set_permissions(&drop, fs::Permissions::from_mode(0o777)).expect("chmod");
        fs::write(drop.join("tool"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(drop.join("tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::write(drop.join("notes.txt"), b"hello").expect("write");
        let ctx = ExecContext::new(root.path());

        let r = analyze(&ctx, &inv(&["analyze", "file", "/drop/tool"])).expect("analyze");
        assert_eq!(r.records[0]["verdict"], "suspicious", "{:?}", r.records);
        assert_eq!(
            r.records[1]["threat"],
            "executable-in-world-writable-directory"
        );
        // Without rules, nothing found is not "clean".
        let r = analyze(&ctx, &inv(&["analyze", "file", "/drop/notes.txt"])).expect("analyze");
        assert_eq!(r.records[0]["verdict"], "unknown");
        assert_eq!(r.records.len(), 1);

        let r = scan(&ctx, &inv(&["scan", "/drop"])).expect("scan");
        assert_eq!(r.records.len(), 1, "{:?}", r.records);
        assert_eq!(r.records[0]["path"], "/drop/tool");
        assert!(
            r.warnings[0].starts_with("scanned 2 files"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn scan_stops_at_max_files_and_says_so() {
        let root = tempfile::tempdir().expect("tempdir");
        for i in 0..10 {
            fs::write(root.path().join(format!("f{i}")), b"x").expect("write");
        }
        let ctx = ExecContext::new(root.path());
        let r = scan(&ctx, &inv(&["scan", "/", "-max_files", "3"])).expect("scan");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("stopped after 3 files")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn a_process_running_a_deleted_executable_is_suspicious() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("sleeper");
        fs::copy("/bin/sleep", &exe).expect("copy sleep");
        let mut child = std::process::Command::new(&exe)
            .arg("30")
            .spawn()
            .expect("spawn");
        fs::remove_file(&exe).expect("delete");
        let ctx = ExecContext::new("/");
        let r = analyze(&ctx, &inv(&["analyze", "process", &child.id().to_string()]));
        let _ = child.kill();
        let _ = child.wait();
        let r = r.expect("analyze");
        assert_eq!(r.records[0]["verdict"], "suspicious", "{:?}", r.records);
        assert!(
            r.records
                .iter()
                .any(|x| x["threat"] == "deleted-executable"),
            "{:?}",
            r.records
        );
    }

    #[test]
    fn a_listening_socket_is_found_by_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ports = listening_ports(&ExecContext::new("/"), std::process::id());
        assert!(ports.contains(&port), "{port} not in {ports:?}");
    }

    #[test]
    fn other_entity_types_say_what_to_do() {
        let ctx = ExecContext::new("/");
        let e = analyze(&ctx, &inv(&["analyze", "user", "bob"])).expect_err("refused");
        assert!(e.to_string().contains("analyze file PATH"), "{e}");
        let e = analyze(&ctx, &inv(&["analyze", "registry", "HKLM\\x"])).expect_err("refused");
        assert!(e.to_string().contains("not supported on linux"), "{e}");
    }
}
