//! `remediate`, `undo` and `remediate list` on Linux, through the journal: a file is
//! quarantined (moved into the journal, mode 000) with its bytes, mode, owner, times and
//! extended attributes recorded, so `undo` puts back exactly what was there; a process is
//! stopped with its whole tree (and, with `-quarantine`, its executable quarantined).
//!
//! Every step is write-ahead (intent, act, done), keyed by the Command's uid: a remediation
//! sent twice, or cut by an agent restart, acts once.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use liveresponse_api::command::Invocation;
use sha2::{Digest, Sha256};

use super::hostfs::{HostFs, file_name, io_error, normalize, parent};
use super::required;
use crate::journal::{AccountBackup, Entry, FileBackup, Journal, State, id_for};
use crate::provider::{CommandResult, ExecContext, ExecError};

fn journal(ctx: &ExecContext) -> Result<Arc<Journal>, ExecError> {
    ctx.journal.clone().ok_or_else(|| {
        ExecError::Failed("this agent has no remediation journal (no state folder)".into())
    })
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

fn record(e: &Entry, note: Option<String>) -> CommandResult {
    let mut r = CommandResult::with_records(vec![e.record()]);
    r.warnings.extend(note);
    r
}

/// The answer to a remediation sent again after it was done: its record, unchanged.
fn already_done(e: &Entry) -> CommandResult {
    record(
        e,
        Some(format!(
            "already done for this command at {}: not done again",
            e.time
        )),
    )
}

fn io(what: &str, e: std::io::Error) -> ExecError {
    ExecError::Failed(format!("{what}: {e}"))
}

pub(super) fn remediate(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let kind = required(inv, "type")?;
    let entity = required(inv, "entity")?;
    // -auto: the verdict on exactly what is about to be acted on, not on what the analyze
    // step saw a moment ago. A remediation already journaled for this command goes on: its
    // entity may be gone by now (quarantined), and the journal makes it act once anyway.
    let journaled = ctx
        .journal
        .as_ref()
        .is_some_and(|j| j.list().iter().any(|e| e.command_uid == ctx.command_uid));
    if inv.has_flag("auto") && !journaled {
        let (shown, verdict, _) = super::analyze::verdict_of(ctx, kind, entity)?;
        crate::analysis::may_act(verdict, inv.has_flag("force"), &shown)?;
    }
    match kind {
        "file" => quarantine_file(ctx, entity, "file"),
        "process" => stop_process(ctx, entity, inv.has_flag("quarantine")),
        "user" => lock_user(ctx, entity),
        "service" => disable_unit(ctx, entity, kind),
        "startupitem" | "scheduledtask" => match split_line_ref(entity) {
            Some((path, line)) => remove_line(ctx, kind, entity, path, line),
            None if kind == "scheduledtask" && entity.ends_with(".timer") => {
                disable_unit(ctx, entity, kind)
            }
            None => quarantine_as(ctx, entity, kind, kind),
        },
        "registry" => Err(ExecError::NotSupported {
            command: "remediate registry".into(),
            os: "linux".into(),
        }),
        other => Err(ExecError::Failed(format!(
            "remediate {other} is not implemented by this agent ({}) yet",
            env!("CARGO_PKG_VERSION")
        ))),
    }
}

pub(super) fn list(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    let j = journal(ctx)?;
    Ok(CommandResult::with_records(
        j.list().iter().map(Entry::record).collect(),
    ))
}

// ---------------------------------------------------------------------------------------
// files

/// Extended attributes of a path (not followed), name and hex value.
fn xattrs(path: &Path) -> Vec<(String, String)> {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return vec![];
    };
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: the buffer is as large as said; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return vec![];
    }
    names.truncate(n as usize);
    names
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|name| {
            let cname = CString::new(name).ok()?;
            let mut value = vec![0u8; 64 * 1024];
            // SAFETY: as above.
            let len = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            (len >= 0).then(|| {
                value.truncate(len as usize);
                (
                    String::from_utf8_lossy(name).into_owned(),
                    hex::encode(value),
                )
            })
        })
        .collect()
}

fn set_xattrs(path: &Path, attrs: &[(String, String)]) -> Vec<String> {
    let mut failed = Vec::new();
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return attrs.iter().map(|(n, _)| n.clone()).collect();
    };
    for (name, value) in attrs {
        let (Ok(cname), Ok(bytes)) = (CString::new(name.as_bytes()), hex::decode(value)) else {
            failed.push(name.clone());
            continue;
        };
        // SAFETY: NUL-terminated path and name, a buffer of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
            )
        };
        if rc != 0 {
            failed.push(name.clone());
        }
    }
    failed
}

fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, hex::encode(h.finalize())));
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
}

/// Moves `from` to `to`: a rename, or a copy that is synced before the original goes
/// when they are on different file systems.
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to)?;
            fs::File::open(to)?.sync_all()?;
            fs::remove_file(from)
        }
        Err(e) => Err(e),
    }
}

/// Quarantines a file; `part` tells entries of one command apart (a process's executable).
fn quarantine_file(
    ctx: &ExecContext,
    entity: &str,
    part: &str,
) -> Result<CommandResult, ExecError> {
    quarantine_as(ctx, entity, part, "file")
}

/// Quarantines a file, journaled under `kind` (a startup item that is a whole file).
fn quarantine_as(
    ctx: &ExecContext,
    entity: &str,
    part: &str,
    kind: &str,
) -> Result<CommandResult, ExecError> {
    let j = journal(ctx)?;
    let _held = j.lock();
    let id = id_for(&ctx.command_uid, part);
    let hfs = HostFs::of(ctx);
    if let Some(e) = j.get(&id) {
        match e.state {
            State::Intent => return finish_quarantine(ctx, &j, e),
            _ => return Ok(already_done(&e)),
        }
    }
    // The last component is not followed: a link is not what the analyst named.
    let device = hfs
        .resolve(&ctx.working_directory, entity, false)
        .map_err(|e| io_error(&e, &normalize(&ctx.working_directory, entity)))?;
    let host = hfs.host_path(&device);
    let meta = fs::symlink_metadata(&host).map_err(|e| io_error(&e, &device))?;
    if meta.file_type().is_symlink() {
        return Err(ExecError::InvalidArgument(format!(
            "{device} is a symbolic link; remediate the file it points to ({})",
            fs::read_link(&host)
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        )));
    }
    if !meta.is_file() {
        return Err(ExecError::InvalidArgument(format!(
            "{device} is not a regular file; remediate file quarantines files"
        )));
    }
    let (size, sha256) = sha256_file(&host).map_err(|e| io_error(&e, &device))?;
    let e = Entry {
        file: Some(FileBackup {
            path: device.clone(),
            size,
            sha256,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            atime: (meta.atime(), meta.atime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            xattrs: xattrs(&host),
        }),
        ..Entry::intent(&id, &ctx.command_uid, kind, &device, "quarantined")
    };
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    finish_quarantine(ctx, &j, e)
}

/// The action after the intent, also what a replay after a crash runs: it looks at where
/// the file is before moving anything.
fn finish_quarantine(
    ctx: &ExecContext,
    j: &Journal,
    mut e: Entry,
) -> Result<CommandResult, ExecError> {
    let backup = e
        .file
        .clone()
        .ok_or_else(|| ExecError::Failed("a file entry without its backup".into()))?;
    let host = HostFs::of(ctx).host_path(&backup.path);
    let blob = j.blob(&e.id);
    let original = fs::symlink_metadata(&host).is_ok();
    let kept = fs::symlink_metadata(&blob).is_ok();
    if original {
        if kept {
            // A copy across file systems was cut short: start it again.
            let _ = fs::remove_file(&blob);
        }
        move_file(&host, &blob).map_err(|err| io_error(&err, &backup.path))?;
    } else if !kept {
        return Err(ExecError::Failed(format!(
            "{} is gone and the journal holds no copy of it: it was moved or deleted by someone else while it was being quarantined",
            backup.path
        )));
    }
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o000))
        .map_err(|err| io("cannot lock the quarantined copy", err))?;
    e.state = State::Done;
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(id = %e.id, path = %backup.path, sha256 = %backup.sha256, "file quarantined");
    Ok(record(&e, None))
}

// ---------------------------------------------------------------------------------------
// processes

fn stop_process(
    ctx: &ExecContext,
    entity: &str,
    quarantine: bool,
) -> Result<CommandResult, ExecError> {
    let pid: i32 = entity.trim().parse().map_err(|_| {
        ExecError::InvalidArgument(format!(
            "remediate process takes a process id, not {entity:?}"
        ))
    })?;
    if pid <= 1 || pid == std::process::id() as i32 {
        return Err(ExecError::PermissionDenied(format!(
            "refusing to stop process {pid}: it is init or this agent"
        )));
    }
    let j = journal(ctx)?;
    let id = id_for(&ctx.command_uid, "process");
    match j.get(&id) {
        Some(mut e) if e.state == State::Intent => {
            // Cut short by an agent restart: whatever of the tree is left goes now.
            let _held = j.lock();
            e.pids.extend(super::scripts::kill_tree(pid));
            e.state = State::Done;
            j.write(&e)
                .map_err(|err| io("cannot write the journal", err))?;
            return Ok(record(
                &e,
                Some("finished a remediation an agent restart cut short".into()),
            ));
        }
        Some(e) => {
            return Ok(already_done(&e));
        }
        None => {}
    }
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    if exe.is_none() && fs::metadata(format!("/proc/{pid}")).is_err() {
        return Err(ExecError::NotFound(format!("no process {pid} is running")));
    }
    // The executable first: once the process is gone, its path cannot be read.
    let mut notes = Vec::new();
    if quarantine {
        match &exe {
            Some(path) if !path.starts_with(&ctx.host_root) => notes.push(format!(
                "its executable {} is outside the host's root as this agent sees it: not quarantined",
                path.display()
            )),
            Some(path) => {
                let shown = HostFs::of(ctx).device_path(path);
                if shown.ends_with(" (deleted)") {
                    notes.push(format!(
                        "its executable {shown} was already deleted: nothing to quarantine"
                    ));
                } else {
                    let q = quarantine_file(ctx, &shown, "exe")?;
                    notes.push(format!(
                        "its executable {shown} was quarantined as {}",
                        q.records
                            .first()
                            .and_then(|r| r["quarantineId"].as_str())
                            .unwrap_or("?")
                    ));
                }
            }
            None => notes.push(
                "its executable cannot be read (a kernel thread?): nothing quarantined".into(),
            ),
        }
    }
    let _held = j.lock();
    let mut e = Entry::intent(&id, &ctx.command_uid, "process", &pid.to_string(), "killed");
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    let pids = super::scripts::kill_tree(pid);
    e.pids = pids.clone();
    e.state = State::Done;
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(pid, ?pids, "process tree stopped");
    notes.push(format!("stopped {} processes: {pids:?}", pids.len()));
    let mut r = record(&e, None);
    r.warnings.extend(notes);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// lines of files (cron entries, authorized keys, profile lines) and timers

/// `PATH:LINE` (1-based), as `persistence` and `scheduledtasks` show an entry's file and
/// line.
fn split_line_ref(entity: &str) -> Option<(&str, usize)> {
    let (path, line) = entity.rsplit_once(':')?;
    let n: usize = line.parse().ok()?;
    (n > 0 && path.starts_with('/')).then_some((path, n))
}

/// Largest file a line is removed from: these are configuration files.
const EDIT_CAP: u64 = 4 << 20;

fn write_like(host: &Path, content: &[u8], meta: &fs::Metadata) -> std::io::Result<()> {
    let tmp = host.with_file_name(format!(
        ".{}.liveresponse",
        host.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::io::Write::write_all(&mut f, content)?;
        f.sync_all()?;
        fs::rename(&tmp, host)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn remove_line(
    ctx: &ExecContext,
    kind: &str,
    entity: &str,
    path: &str,
    line: usize,
) -> Result<CommandResult, ExecError> {
    let j = journal(ctx)?;
    let _held = j.lock();
    let id = id_for(&ctx.command_uid, kind);
    let hfs = HostFs::of(ctx);
    let existing = j.get(&id);
    if let Some(e) = existing.as_ref().filter(|e| e.state != State::Intent) {
        return Ok(already_done(e));
    }
    let device = hfs
        .resolve("/", path, true)
        .map_err(|e| io_error(&e, path))?;
    let host = hfs.host_path(&device);
    let meta = fs::metadata(&host).map_err(|e| io_error(&e, &device))?;
    if !meta.is_file() || meta.len() > EDIT_CAP {
        return Err(ExecError::InvalidArgument(format!(
            "{device} is not a regular file of at most {EDIT_CAP} bytes"
        )));
    }
    let current = fs::read(&host).map_err(|e| io_error(&e, &device))?;
    let e = match existing {
        Some(e) => e,
        None => {
            let text = String::from_utf8_lossy(&current);
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            let Some(removed) = lines.get(line - 1) else {
                return Err(ExecError::NotFound(format!(
                    "{device} has {} lines, not {line}",
                    lines.len()
                )));
            };
            let t = removed.trim();
            if t.is_empty() || t.starts_with('#') {
                return Err(ExecError::InvalidArgument(format!(
                    "line {line} of {device} is blank or a comment: nothing to remove; `persistence` or `scheduledtasks` shows each entry's line"
                )));
            }
            let after: String = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != line - 1)
                .map(|(_, l)| *l)
                .collect();
            // The whole file as it was, for undo: written before the intent.
            let blob = j.blob(&id);
            fs::write(&blob, &current).map_err(|err| io("cannot keep a copy of the file", err))?;
            fs::set_permissions(&blob, fs::Permissions::from_mode(0o000))
                .map_err(|err| io("cannot lock the copy", err))?;
            let e = Entry {
                edit: Some(crate::journal::FileEdit {
                    path: device.clone(),
                    line,
                    removed: removed.trim_end_matches('\n').to_string(),
                    before_sha256: sha_hex(&current),
                    after_sha256: sha_hex(after.as_bytes()),
                    mode: meta.mode(),
                    uid: meta.uid(),
                    gid: meta.gid(),
                    atime: (meta.atime(), meta.atime_nsec()),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                }),
                ..Entry::intent(&id, &ctx.command_uid, kind, entity, "removed")
            };
            j.write(&e)
                .map_err(|err| io("cannot write the journal", err))?;
            e
        }
    };
    let edit = e
        .edit
        .clone()
        .ok_or_else(|| ExecError::Failed("an edit entry without its record".into()))?;
    let now_sha = sha_hex(&current);
    if now_sha == edit.before_sha256 {
        let text = String::from_utf8_lossy(&current);
        let after: String = text
            .split_inclusive('\n')
            .enumerate()
            .filter(|(i, _)| *i != edit.line - 1)
            .map(|(_, l)| l)
            .collect();
        write_like(&host, after.as_bytes(), &meta).map_err(|err| io_error(&err, &device))?;
    } else if now_sha != edit.after_sha256 {
        return Err(ExecError::Failed(format!(
            "{device} changed while the line was being removed; run the command again"
        )));
    }
    let mut e = e;
    e.state = State::Done;
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(id = %e.id, path = %device, line = edit.line, "line removed");
    let mut r = record(&e, None);
    r.warnings.push(format!(
        "removed line {}: {}",
        edit.line,
        shown(&edit.removed)
    ));
    Ok(r)
}

/// A removed line as notes show it: keys and commands, cut short.
fn shown(line: &str) -> String {
    let mut s: String = line.chars().take(120).collect();
    if line.chars().count() > 120 {
        s.push_str("...");
    }
    s
}

fn restore_edit(
    ctx: &ExecContext,
    j: &Journal,
    mut e: Entry,
    force: bool,
) -> Result<CommandResult, ExecError> {
    let edit = e
        .edit
        .clone()
        .ok_or_else(|| ExecError::Failed("an edit entry without its record".into()))?;
    let hfs = HostFs::of(ctx);
    let host = hfs.host_path(&edit.path);
    let blob = j.blob(&e.id);
    let _ = fs::set_permissions(&blob, fs::Permissions::from_mode(0o400));
    let before = fs::read(&blob).map_err(|err| io("cannot read the journal's copy", err));
    let _ = fs::set_permissions(&blob, fs::Permissions::from_mode(0o000));
    let before = before?;
    if sha_hex(&before) != edit.before_sha256 {
        return Err(ExecError::Failed(format!(
            "the journal's copy of {} was altered: not restored",
            edit.path
        )));
    }
    let current = fs::read(&host).unwrap_or_default();
    let now_sha = sha_hex(&current);
    if now_sha != edit.before_sha256 {
        if now_sha != edit.after_sha256 && !force {
            return Err(ExecError::InvalidArgument(format!(
                "{} changed since the line was removed; undo -force puts back the whole file as it was",
                edit.path
            )));
        }
        let meta = fs::metadata(&host).map_err(|err| io_error(&err, &edit.path))?;
        write_like(&host, &before, &meta).map_err(|err| io_error(&err, &edit.path))?;
    }
    restore_attributes(
        &host,
        (edit.uid, edit.gid, edit.mode),
        &[],
        (edit.atime, edit.mtime),
    )
    .map_err(|err| io_error(&err, &edit.path))?;
    e.state = State::Undone;
    e.undone_by = Some(ctx.command_uid.clone());
    e.undone_at = Some(now());
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    let mut r = record(&e, None);
    if let Some(first) = r.records.first_mut() {
        first["action"] = serde_json::json!("restored");
    }
    Ok(r)
}

/// A systemd unit (a timer for `scheduledtask`, a service for `service`): stopped where
/// systemd runs the host, its enablement links removed and its unit file quarantined, all
/// in one journal entry that undo puts back.
fn disable_unit(ctx: &ExecContext, unit: &str, kind: &str) -> Result<CommandResult, ExecError> {
    if unit.is_empty() || unit.contains('/') || unit.starts_with('.') {
        return Err(ExecError::InvalidArgument(format!(
            "{unit:?} is not a unit name"
        )));
    }
    let unit = if kind == "service" && !unit.contains('.') {
        format!("{unit}.service")
    } else {
        unit.to_string()
    };
    let unit = unit.as_str();
    if kind == "service" && unit.starts_with("liveresponse-agent") {
        return Err(ExecError::PermissionDenied(format!(
            "refusing to disable {unit}: it runs this agent, and the device would drop out of live response"
        )));
    }
    let hfs = HostFs::of(ctx);
    let dirs = [
        "/etc/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ];
    let Some(file) = dirs
        .iter()
        .map(|d| super::hostfs::join(d, unit))
        .find(|p| fs::symlink_metadata(hfs.host_path(p)).is_ok_and(|m| m.is_file()))
    else {
        return Err(ExecError::NotFound(format!(
            "no {} unit {unit} in {}",
            if kind == "service" {
                "service"
            } else {
                "timer"
            },
            dirs.join(", ")
        )));
    };
    // Enablement links: every *.wants folder under /etc/systemd/system naming the unit.
    let mut links = Vec::new();
    for wants in hfs.list("/etc/systemd/system") {
        if !wants.ends_with(".wants") {
            continue;
        }
        let link = super::hostfs::join(&super::hostfs::join("/etc/systemd/system", &wants), unit);
        let host = hfs.host_path(&link);
        if let Ok(target) = fs::read_link(&host) {
            links.push((link, target.to_string_lossy().into_owned()));
        }
    }
    if ctx.host_root == Path::new("/") {
        let _ = std::process::Command::new("systemctl")
            .args(["stop", unit])
            .stdin(std::process::Stdio::null())
            .output();
    }
    let mut r = quarantine_as(ctx, &file, kind, kind)?;
    let j = journal(ctx)?;
    let _held = j.lock();
    let id = id_for(&ctx.command_uid, kind);
    if let Some(mut e) = j.get(&id).filter(|e| e.links.is_empty()) {
        for (link, _) in &links {
            let _ = fs::remove_file(hfs.host_path(link));
        }
        e.entity = unit.to_string();
        e.action = "disabled".into();
        e.links = links.clone();
        j.write(&e)
            .map_err(|err| io("cannot write the journal", err))?;
        r = record(&e, None);
    }
    r.warnings.push(format!(
        "{unit}: unit file quarantined, {} enablement links removed",
        links.len()
    ));
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// accounts

/// A user name as useradd allows it: nothing that could reach into another shadow field.
fn is_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-$".contains(&b))
}

/// The shadow line that disables an account and forces a new password: the hash locked
/// with `!`, the last change at 0 (must change), and the account expired (day 1).
fn locked(line: &str) -> Option<String> {
    let mut f: Vec<String> = line.split(':').map(str::to_string).collect();
    if f.len() < 9 {
        return None;
    }
    if !f[1].starts_with('!') {
        f[1] = format!("!{}", f[1]);
    }
    f[2] = "0".into();
    f[7] = "1".into();
    Some(f.join(":"))
}

/// Replaces `name`'s line in the host's /etc/shadow, keeping its mode and owner; `expect`
/// is the line that must be there now.
fn rewrite_shadow(
    ctx: &ExecContext,
    name: &str,
    expect: Option<&str>,
    new: &str,
) -> Result<(), ExecError> {
    let path = HostFs::of(ctx).host_path("/etc/shadow");
    let text = fs::read_to_string(&path).map_err(|e| io_error(&e, "/etc/shadow"))?;
    let meta = fs::metadata(&path).map_err(|e| io_error(&e, "/etc/shadow"))?;
    let prefix = format!("{name}:");
    let mut found = false;
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        if line.starts_with(&prefix) {
            if expect.is_some_and(|e| e != line) {
                return Err(ExecError::InvalidArgument(format!(
                    "the account {name} changed since it was remediated; undo -force restores it anyway"
                )));
            }
            found = true;
            out.push_str(new);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        return Err(ExecError::NotFound(format!(
            "no account {name} in /etc/shadow"
        )));
    }
    let tmp = path.with_file_name(".shadow.liveresponse");
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        std::io::Write::write_all(&mut f, out.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_error(&e, "/etc/shadow")
    })
}

fn shadow_line(ctx: &ExecContext, name: &str) -> Result<String, ExecError> {
    let text = HostFs::of(ctx)
        .read_to_string("/etc/shadow")
        .map_err(|e| io_error(&e, "/etc/shadow"))?;
    let prefix = format!("{name}:");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .ok_or_else(|| ExecError::NotFound(format!("no account {name} in /etc/shadow")))
}

fn lock_user(ctx: &ExecContext, name: &str) -> Result<CommandResult, ExecError> {
    if !is_user_name(name) {
        return Err(ExecError::InvalidArgument(format!(
            "{name:?} is not a user name"
        )));
    }
    let passwd = HostFs::of(ctx)
        .read_to_string("/etc/passwd")
        .map_err(|e| io_error(&e, "/etc/passwd"))?;
    let uid: u32 = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| ExecError::NotFound(format!("no account {name} in /etc/passwd")))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid == 0 {
        return Err(ExecError::PermissionDenied(format!(
            "{name} is the root account (uid 0): it is never locked"
        )));
    }
    if uid == me {
        return Err(ExecError::PermissionDenied(format!(
            "{name} is the account this agent runs as: locking it would cut off live response"
        )));
    }
    let j = journal(ctx)?;
    let _held = j.lock();
    let id = id_for(&ctx.command_uid, "user");
    if let Some(e) = j.get(&id).filter(|e| e.state != State::Intent) {
        return Ok(already_done(&e));
    }
    let e = match j.get(&id) {
        Some(e) => e,
        None => {
            let line = shadow_line(ctx, name)?;
            let locked_line = locked(&line).ok_or_else(|| {
                ExecError::Failed(format!("the /etc/shadow line of {name} has too few fields"))
            })?;
            let e = Entry {
                account: Some(AccountBackup {
                    name: name.into(),
                    shadow_line: line,
                    locked_line,
                }),
                ..Entry::intent(&id, &ctx.command_uid, "user", name, "locked")
            };
            j.write(&e)
                .map_err(|err| io("cannot write the journal", err))?;
            e
        }
    };
    let acct = e
        .account
        .clone()
        .ok_or_else(|| ExecError::Failed("an account entry without its backup".into()))?;
    // A replay finds the line already written: nothing to change.
    if shadow_line(ctx, name)? != acct.locked_line {
        rewrite_shadow(ctx, name, Some(&acct.shadow_line), &acct.locked_line)?;
    }
    let mut e = e;
    e.state = State::Done;
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(id = %e.id, user = %name, "account locked and its password expired");
    let mut r = record(&e, None);
    r.warnings.push(format!(
        "{name} is locked, its account expired and its password must be changed; sessions already open are not ended"
    ));
    Ok(r)
}

fn unlock_user(
    ctx: &ExecContext,
    j: &Journal,
    mut e: Entry,
    force: bool,
) -> Result<CommandResult, ExecError> {
    let acct = e
        .account
        .clone()
        .ok_or_else(|| ExecError::Failed("an account entry without its backup".into()))?;
    let now_line = shadow_line(ctx, &acct.name)?;
    if now_line != acct.shadow_line {
        let expect = (!force).then_some(acct.locked_line.as_str());
        rewrite_shadow(ctx, &acct.name, expect, &acct.shadow_line)?;
    }
    e.state = State::Undone;
    e.undone_by = Some(ctx.command_uid.clone());
    e.undone_at = Some(now());
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(id = %e.id, user = %acct.name, "account restored");
    let mut r = record(&e, None);
    if let Some(first) = r.records.first_mut() {
        first["action"] = serde_json::json!("restored");
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// undo

pub(super) fn undo(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let kind = required(inv, "type")?;
    let entity = required(inv, "entity")?;
    let force = inv.has_flag("force");
    let j = journal(ctx)?;
    let _held = j.lock();
    let all = j.list();
    // By quarantine id, else the newest entry of that type for that entity.
    let wanted = normalize(&ctx.working_directory, entity);
    let found = all
        .iter()
        .find(|e| e.id == entity && e.entity_type == kind)
        .or_else(|| {
            all.iter()
                .rev()
                .find(|e| {
                    e.entity_type == kind
                        && (e.entity == entity
                            || e.entity == wanted
                            || (kind == "service" && e.entity == format!("{entity}.service")))
                })
        })
        .cloned()
        .ok_or_else(|| {
            ExecError::NotFound(format!(
                "the journal has no {kind} remediation of {entity}; `remediate list` shows what can be undone"
            ))
        })?;
    match (kind, found.state) {
        (_, State::Undone) => {
            let note = format!(
                "already undone at {} (by command {}): nothing to do",
                found.undone_at.as_deref().unwrap_or("?"),
                found.undone_by.as_deref().unwrap_or("?")
            );
            Ok(record(&found, Some(note)))
        }
        (_, State::Intent) => Err(ExecError::Failed(format!(
            "remediation {} never finished (the agent stopped in the middle); run the remediate command again first",
            found.id
        ))),
        ("process", _) => Err(ExecError::InvalidArgument(format!(
            "a killed process cannot be brought back (remediation {}); start it again by hand if it was wrongly stopped",
            found.id
        ))),
        (_, _) if found.edit.is_some() => restore_edit(ctx, &j, found, force),
        (_, _) if found.file.is_some() => restore_file(ctx, &j, found, force),
        ("user", _) => unlock_user(ctx, &j, found, force),
        (other, _) => Err(ExecError::Failed(format!(
            "undo {other} is not implemented yet"
        ))),
    }
}

fn restore_file(
    ctx: &ExecContext,
    j: &Journal,
    mut e: Entry,
    force: bool,
) -> Result<CommandResult, ExecError> {
    let backup = e
        .file
        .clone()
        .ok_or_else(|| ExecError::Failed("a file entry without its backup".into()))?;
    let hfs = HostFs::of(ctx);
    // The folder is resolved now (links within the root); the name is the recorded one.
    let dir = hfs
        .resolve("/", parent(&backup.path), true)
        .map_err(|err| io_error(&err, parent(&backup.path)))?;
    let device = super::hostfs::join(&dir, file_name(&backup.path));
    let host = hfs.host_path(&device);
    let blob = j.blob(&e.id);
    if e.state == State::Done {
        if fs::symlink_metadata(&host).is_ok() && !force {
            return Err(ExecError::InvalidArgument(format!(
                "{device} exists again since it was quarantined; undo -force replaces it with the quarantined copy"
            )));
        }
        // The copy must still be what was taken: a journal altered on disk is refused.
        let _ = fs::set_permissions(&blob, fs::Permissions::from_mode(0o400));
        let (size, sha) =
            sha256_file(&blob).map_err(|err| io("cannot read the quarantined copy", err))?;
        if size != backup.size || sha != backup.sha256 {
            let _ = fs::set_permissions(&blob, fs::Permissions::from_mode(0o000));
            return Err(ExecError::Failed(format!(
                "the quarantined copy of {device} changed in the journal (sha256 {sha}, not {}): not restored",
                backup.sha256
            )));
        }
        e.state = State::Undoing;
        e.undone_by = Some(ctx.command_uid.clone());
        j.write(&e)
            .map_err(|err| io("cannot write the journal", err))?;
        move_file(&blob, &host).map_err(|err| io_error(&err, &device))?;
    }
    // Undoing: the move happened, or happens above; put the metadata back either way.
    let failed = restore_attributes(
        &host,
        (backup.uid, backup.gid, backup.mode),
        &backup.xattrs,
        (backup.atime, backup.mtime),
    )
    .map_err(|err| io_error(&err, &device))?;
    // A timer's enablement links, removed with it.
    for (link, target) in &e.links {
        let host_link = hfs.host_path(link);
        if fs::symlink_metadata(&host_link).is_err() {
            std::os::unix::fs::symlink(target, &host_link).map_err(|err| io_error(&err, link))?;
        }
    }
    e.state = State::Undone;
    e.undone_at = Some(now());
    j.write(&e)
        .map_err(|err| io("cannot write the journal", err))?;
    tracing::info!(id = %e.id, path = %device, "file restored");
    let note = (!failed.is_empty())
        .then(|| format!("extended attributes not restored: {}", failed.join(", ")));
    let mut r = record(&e, note);
    if let Some(first) = r.records.first_mut() {
        first["action"] = serde_json::json!("restored");
    }
    Ok(r)
}

/// Puts a restored file's owner, mode, extended attributes and times back, in the order
/// that keeps each: owner before mode (a chown clears set-id bits) and before the
/// attributes (it clears security.capability), times last. The attributes that could not
/// be set are returned.
fn restore_attributes(
    host: &Path,
    (uid, gid, mode): (u32, u32, u32),
    xattrs: &[(String, String)],
    (atime, mtime): ((i64, i64), (i64, i64)),
) -> std::io::Result<Vec<String>> {
    std::os::unix::fs::lchown(host, Some(uid), Some(gid))?;
    fs::set_permissions(host, fs::Permissions::from_mode(mode & 0o7777))?;
    let failed = set_xattrs(host, xattrs);
    let times = fs::FileTimes::new()
        .set_accessed(system_time(atime))
        .set_modified(system_time(mtime));
    fs::File::options()
        .write(true)
        .open(host)
        .and_then(|f| f.set_times(times))?;
    Ok(failed)
}

fn system_time((secs, nanos): (i64, i64)) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    let nanos = u32::try_from(nanos).unwrap_or(0);
    if secs >= 0 {
        base + std::time::Duration::new(secs as u64, nanos)
    } else {
        base - std::time::Duration::new(secs.unsigned_abs(), 0) + std::time::Duration::new(0, nanos)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::testutil::*;
    use super::*;

    /// A host root, a journal in a state folder beside it, and a context for command `uid`.
    fn setup(uid: &str) -> (tempfile::TempDir, ExecContext) {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("root/srv")).expect("root");
        let j = Journal::open(&dir.path().join("state")).expect("journal");
        let mut c = ctx(&dir.path().join("root"));
        c.command_uid = uid.into();
        c.journal = Some(Arc::new(j));
        (dir, c)
    }

    fn with_uid(c: &ExecContext, uid: &str) -> ExecContext {
        let mut c = c.clone();
        c.command_uid = uid.into();
        c
    }

    #[test]
    fn quarantine_then_undo_restores_bytes_mode_and_times() {
        let (dir, c) = setup("uid-q");
        let f = dir.path().join("root/srv/evil.sh");
        std::fs::write(&f, b"#!/bin/sh\necho evil\n").expect("write");
        std::fs::set_permissions(&f, fs::Permissions::from_mode(0o751)).expect("chmod");
        let old = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
        fs::File::options()
            .write(true)
            .open(&f)
            .and_then(|h| h.set_times(fs::FileTimes::new().set_modified(old).set_accessed(old)))
            .expect("times");
        let before = fs::metadata(&f).expect("meta");

        let r = run(&c, "remediate", &["file", "/srv/evil.sh"]).expect("remediated");
        assert!(!f.exists(), "the file is quarantined");
        let id = r.records[0]["quarantineId"]
            .as_str()
            .expect("id")
            .to_string();
        let blob = c.journal.as_ref().expect("j").blob(&id);
        assert_eq!(
            fs::metadata(&blob).expect("blob").mode() & 0o777,
            0,
            "mode 000"
        );
        // Sent again (same command uid): nothing more happens.
        let again = run(&c, "remediate", &["file", "/srv/evil.sh"]).expect("replay");
        assert_eq!(again.records[0]["quarantineId"], id.as_str());
        assert!(again.warnings[0].contains("not done again"));
        assert_eq!(c.journal.as_ref().expect("j").list().len(), 1);

        let u = run(&with_uid(&c, "uid-u"), "undo", &["file", &id]).expect("undone");
        assert_eq!(u.records[0]["action"], "restored");
        assert_eq!(fs::read(&f).expect("back"), b"#!/bin/sh\necho evil\n");
        let after = fs::metadata(&f).expect("meta");
        assert_eq!(after.mode(), before.mode());
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (1_600_000_000, 123_456_789)
        );
        // An undo of an undo is a no-op that says so.
        let twice = run(&with_uid(&c, "uid-u2"), "undo", &["file", "/srv/evil.sh"]).expect("no-op");
        assert!(
            twice.warnings[0].contains("already undone"),
            "{:?}",
            twice.warnings
        );
    }

    #[test]
    fn undo_refuses_a_file_that_is_back_unless_forced() {
        let (dir, c) = setup("uid-r");
        let f = dir.path().join("root/srv/x.bin");
        std::fs::write(&f, b"one").expect("write");
        run(&c, "remediate", &["file", "/srv/x.bin"]).expect("remediated");
        std::fs::write(&f, b"new").expect("a new file at the path");
        let e = run(&with_uid(&c, "u1"), "undo", &["file", "/srv/x.bin"]).expect_err("refused");
        assert!(e.to_string().contains("-force"), "{e}");
        assert_eq!(fs::read(&f).expect("kept"), b"new");
        run(
            &with_uid(&c, "u2"),
            "undo",
            &["file", "/srv/x.bin", "-force"],
        )
        .expect("forced");
        assert_eq!(fs::read(&f).expect("restored"), b"one");
    }

    #[test]
    fn an_interrupted_quarantine_is_finished_by_its_replay() {
        let (dir, c) = setup("uid-i");
        let f = dir.path().join("root/srv/half.txt");
        std::fs::write(&f, b"half").expect("write");
        // The intent was written, then the agent died before moving the file.
        let j = c.journal.clone().expect("j");
        let id = id_for("uid-i", "file");
        let meta = fs::metadata(&f).expect("meta");
        j.write(&Entry {
            file: Some(FileBackup {
                path: "/srv/half.txt".into(),
                size: 4,
                sha256: hex::encode(Sha256::digest(b"half")),
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                atime: (meta.atime(), meta.atime_nsec()),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                xattrs: vec![],
            }),
            ..Entry::intent(&id, "uid-i", "file", "/srv/half.txt", "quarantined")
        })
        .expect("intent");
        run(&c, "remediate", &["file", "/srv/half.txt"]).expect("finished");
        assert!(!f.exists());
        assert_eq!(j.get(&id).map(|e| e.state), Some(State::Done));
        assert_eq!(j.list().len(), 1);
    }

    #[test]
    fn an_account_is_locked_then_restored_and_root_never() {
        let (dir, c) = setup("uid-a");
        let etc = dir.path().join("root/etc");
        std::fs::create_dir_all(&etc).expect("etc");
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\ntoor:x:0:0::/root:/bin/sh\nmallory:x:1001:1001::/home/mallory:/bin/bash\n",
        )
        .expect("passwd");
        let line = "mallory:$6$salt$hash:19000:0:99999:7:::";
        std::fs::write(
            etc.join("shadow"),
            format!("root:*:19000:0:99999:7:::\n{line}\n"),
        )
        .expect("shadow");
        std::fs::set_permissions(etc.join("shadow"), fs::Permissions::from_mode(0o640))
            .expect("mode");
        let r = run(&c, "remediate", &["user", "mallory"]).expect("locked");
        assert_eq!(r.records[0]["action"], "locked");
        let shadow = std::fs::read_to_string(etc.join("shadow")).expect("shadow");
        assert!(
            shadow.contains("mallory:!$6$salt$hash:0:0:99999:7::1:"),
            "{shadow}"
        );
        assert_eq!(
            fs::metadata(etc.join("shadow")).expect("m").mode() & 0o777,
            0o640
        );
        assert!(
            !r.records[0].to_string().contains("$6$"),
            "no hash in records"
        );
        run(&with_uid(&c, "u-a"), "undo", &["user", "mallory"]).expect("restored");
        let shadow = std::fs::read_to_string(etc.join("shadow")).expect("shadow");
        assert!(shadow.contains(line), "{shadow}");
        for who in ["root", "toor"] {
            let e = run(&with_uid(&c, who), "remediate", &["user", who]).expect_err("root");
            assert!(e.to_string().contains("root account"), "{e}");
        }
        let e = run(&with_uid(&c, "x"), "remediate", &["user", "a:b"]).expect_err("name");
        assert_eq!(e.reason(), "InvalidArgument");
    }

    #[test]
    fn a_line_is_removed_and_undo_puts_the_file_back_exactly() {
        let (dir, c) = setup("uid-k");
        let ssh = dir.path().join("root/root/.ssh");
        std::fs::create_dir_all(&ssh).expect("ssh");
        let keys = ssh.join("authorized_keys");
        let text = "ssh-ed25519 AAAAgood admin@corp\nssh-ed25519 AAAAevil backdoor@evil\n# end\n";
        std::fs::write(&keys, text).expect("keys");
        std::fs::set_permissions(&keys, fs::Permissions::from_mode(0o600)).expect("mode");
        let before = fs::metadata(&keys).expect("meta");
        let r = run(
            &c,
            "remediate",
            &["startupitem", "/root/.ssh/authorized_keys:2"],
        )
        .expect("removed");
        assert_eq!(r.records[0]["action"], "removed");
        assert_eq!(
            std::fs::read_to_string(&keys).expect("keys"),
            "ssh-ed25519 AAAAgood admin@corp\n# end\n"
        );
        assert_eq!(fs::metadata(&keys).expect("m").mode(), before.mode());
        // A comment or a line past the end is refused.
        let e = run(
            &with_uid(&c, "x1"),
            "remediate",
            &["startupitem", "/root/.ssh/authorized_keys:2"],
        )
        .expect_err("comment");
        assert!(e.to_string().contains("comment"), "{e}");
        run(
            &with_uid(&c, "u-k"),
            "undo",
            &["startupitem", "/root/.ssh/authorized_keys:2"],
        )
        .expect("undone");
        assert_eq!(std::fs::read_to_string(&keys).expect("keys"), text);
        let after = fs::metadata(&keys).expect("m");
        assert_eq!(
            (after.mode(), after.mtime(), after.mtime_nsec()),
            (before.mode(), before.mtime(), before.mtime_nsec())
        );
    }

    #[test]
    fn a_timer_is_disabled_and_enabled_again() {
        let (dir, c) = setup("uid-t");
        let sys = dir.path().join("root/etc/systemd/system");
        std::fs::create_dir_all(sys.join("timers.target.wants")).expect("dirs");
        std::fs::write(sys.join("evil.timer"), "[Timer]\nOnCalendar=hourly\n").expect("unit");
        std::os::unix::fs::symlink(
            "/etc/systemd/system/evil.timer",
            sys.join("timers.target.wants/evil.timer"),
        )
        .expect("link");
        let r = run(&c, "remediate", &["scheduledtask", "evil.timer"]).expect("disabled");
        assert_eq!(r.records[0]["action"], "disabled");
        assert!(!sys.join("evil.timer").exists());
        assert!(fs::symlink_metadata(sys.join("timers.target.wants/evil.timer")).is_err());
        run(
            &with_uid(&c, "u-t"),
            "undo",
            &["scheduledtask", "evil.timer"],
        )
        .expect("undone");
        assert_eq!(
            std::fs::read_to_string(sys.join("evil.timer")).expect("unit"),
            "[Timer]\nOnCalendar=hourly\n"
        );
        assert_eq!(
            fs::read_link(sys.join("timers.target.wants/evil.timer")).expect("link"),
            Path::new("/etc/systemd/system/evil.timer")
        );
    }

    #[test]
    fn registry_and_links_are_refused() {
        let (dir, c) = setup("uid-l");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("root/srv/link")).expect("link");
        let e = run(&c, "remediate", &["file", "/srv/link"]).expect_err("link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = run(&c, "remediate", &["registry", "HKLM\\x"]).expect_err("registry");
        assert_eq!(
            e.to_string(),
            "remediate registry is not supported on linux"
        );
    }

    #[test]
    fn a_process_tree_is_stopped_once() {
        let (_dir, c) = setup("uid-p");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30041 & sleep 30042"])
            .spawn()
            .expect("spawn");
        let pid = child.id().to_string();
        // Let sh start its children.
        let t = std::time::Instant::now();
        while super::super::scripts::tests_count_sleeps(&["30041", "30042"]) < 2
            && t.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let r = run(&c, "remediate", &["process", &pid]).expect("stopped");
        assert_eq!(r.records[0]["action"], "killed");
        let _ = child.wait();
        let t = std::time::Instant::now();
        while super::super::scripts::tests_count_sleeps(&["30041", "30042"]) > 0
            && t.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            super::super::scripts::tests_count_sleeps(&["30041", "30042"]),
            0
        );
        let again = run(&c, "remediate", &["process", &pid]).expect("replay");
        assert!(again.warnings[0].contains("not done again"));
        let e = run(&with_uid(&c, "u"), "undo", &["process", &pid]).expect_err("no undo");
        assert!(e.to_string().contains("cannot be brought back"), "{e}");
        let e = run(&with_uid(&c, "u1"), "remediate", &["process", "1"]).expect_err("init");
        assert_eq!(e.reason(), "PermissionDenied");
    }
}
