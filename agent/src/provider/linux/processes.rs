//! processes [-pid N] [-name X].

use std::path::Path;

use globset::GlobBuilder;
use liveresponse_api::command::Invocation;
use serde::Serialize;
use sysinfo::{Pid, Process, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};

use super::hostfs::{Accounts, HostFs, read_prefix};
use super::{number, summarize, to_records};
use crate::provider::{CommandResult, ExecContext, ExecError};

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ProcessRecord {
    pid: u32,
    ppid: Option<u32>,
    name: String,
    user: Option<String>,
    uid: Option<u32>,
    start_time: Option<String>,
    command_line: String,
    args: Vec<String>,
    /// The command line was longer than [`CMDLINE_CAP`]; `args` hold its start.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    command_line_cut: bool,
    image_path: Option<String>,
    /// Resident memory in bytes.
    memory: u64,
    virtual_memory: u64,
    state: String,
}

/// Most bytes of a command line read. A process can make its /proc/PID/cmdline as large as
/// its memory (PR_SET_MM_ARG_END), so reading it whole would let one process exhaust the
/// agent's.
const CMDLINE_CAP: usize = 64 << 10;

/// A process's arguments, as the kernel has them.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CommandLine {
    pub(super) args: Vec<String>,
    pub(super) cut: bool,
}

/// Bounded, and with the split sysinfo used before: NUL-separated, empty pieces dropped.
/// The other files sysinfo reads for us (stat, statm, status, the exe link) have a size
/// the kernel bounds.
fn command_line(pid: u32) -> CommandLine {
    match read_prefix(Path::new(&format!("/proc/{pid}/cmdline")), CMDLINE_CAP) {
        Ok((bytes, cut)) => parse_cmdline(&bytes, cut),
        // Exited or hidden since the listing: no arguments, as sysinfo showed them.
        Err(_) => CommandLine::default(),
    }
}

pub(super) fn parse_cmdline(bytes: &[u8], cut: bool) -> CommandLine {
    CommandLine {
        args: bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
        cut,
    }
}

pub(super) fn processes(ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
    let pid = number(inv, "pid")?;
    let name = inv.get("name");
    let matcher = name.map(NameMatcher::new).transpose()?;

    let mut system = System::new()
        .map_err(|e| ExecError::Failed(format!("cannot read the process table: {e}")))?;
    // Threads are not processes to an analyst; they would multiply every row.
    let refresh = ProcessRefreshKind::nothing()
        .with_memory()
        .with_user(UpdateKind::OnlyIfNotSet)
        .with_exe(UpdateKind::OnlyIfNotSet)
        .without_tasks();
    let wanted;
    let which = match pid {
        Some(pid) => {
            let pid = u32::try_from(pid)
                .map_err(|_| ExecError::NotFound(format!("no process with pid {pid}")))?;
            wanted = [Pid::from_u32(pid)];
            ProcessesToUpdate::Some(&wanted)
        }
        None => ProcessesToUpdate::All,
    };
    system.refresh_processes_specifics(which, true, refresh);
    ctx.check()?;

    let accounts = Accounts::load(&HostFs::of(ctx));
    let mut rows: Vec<ProcessRecord> = system
        .processes()
        .values()
        // A thread looked up by its id is still a thread, not a process.
        .filter(|p| p.thread_kind() != Some(sysinfo::ThreadKind::Userland))
        .filter(|p| pid.is_none_or(|pid| u64::from(p.pid().as_u32()) == pid))
        .map(|p| (p, command_line(p.pid().as_u32())))
        .filter(|(p, cmd)| matcher.as_ref().is_none_or(|m| m.matches(p, cmd)))
        .map(|(p, cmd)| record(p, cmd, &accounts))
        .collect();
    rows.sort_by_key(|r| r.pid);
    let cut: Vec<String> = rows
        .iter()
        .filter(|r| r.command_line_cut)
        .map(|r| r.pid.to_string())
        .collect();

    if let Some(pid) = pid
        && rows.is_empty()
    {
        return Err(ExecError::NotFound(format!("no process with pid {pid}")));
    }
    let mut result = CommandResult::with_records(to_records(&rows)?);
    if !cut.is_empty() {
        result.warnings.push(format!(
            "command lines longer than {} KiB were cut (commandLineCut), pids {}",
            CMDLINE_CAP >> 10,
            summarize(&cut, cut.len(), 20)
        ));
    }
    if let Some(name) = name
        && rows.is_empty()
    {
        result
            .warnings
            .push(format!("no running process is named {name:?}"));
    }
    Ok(result)
}

fn record(p: &Process, cmd: CommandLine, accounts: &Accounts) -> ProcessRecord {
    let CommandLine { args, cut } = cmd;
    let uid = p.user_id().map(|u| **u);
    ProcessRecord {
        pid: p.pid().as_u32(),
        ppid: p.parent().map(|pp| pp.as_u32()),
        name: p.name().to_string_lossy().into_owned(),
        user: uid.map(|u| accounts.user(u)),
        uid,
        start_time: i64::try_from(p.start_time())
            .ok()
            .and_then(|s| super::hostfs::rfc3339_from_unix(s, 0)),
        command_line: args.join(" "),
        args,
        command_line_cut: cut,
        image_path: p.exe().map(|e| e.to_string_lossy().into_owned()),
        memory: p.memory(),
        virtual_memory: p.virtual_memory(),
        state: p.status().to_string(),
    }
}

/// `-name X`: exact and case-insensitive, against the kernel's name (comm, cut to 15
/// characters), the executable's file name and argv[0]'s file name, so that long names
/// and interpreters' scripts are found too; `*`, `?` and `[...]` make it a glob. Not a
/// substring match: `-name sh` must not bring every bash, ssh and sshd.
struct NameMatcher {
    glob: globset::GlobMatcher,
}

impl NameMatcher {
    fn new(name: &str) -> Result<Self, ExecError> {
        let pattern = if name.contains(['*', '?', '[']) {
            name.to_owned()
        } else {
            globset::escape(name)
        };
        let glob = GlobBuilder::new(&pattern)
            .case_insensitive(true)
            .literal_separator(true)
            .build()
            .map_err(|e| ExecError::InvalidArgument(format!("invalid -name {name:?}: {e}")))?
            .compile_matcher();
        Ok(NameMatcher { glob })
    }

    fn matches(&self, p: &Process, cmd: &CommandLine) -> bool {
        let base = |path: &Path| path.file_name().map(|n| n.to_os_string());
        let candidates = [
            Some(p.name().to_os_string()),
            p.exe().and_then(base),
            cmd.args.first().and_then(|a| base(Path::new(a))),
        ];
        candidates
            .iter()
            .flatten()
            .any(|n| self.glob.is_match(Path::new(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;

    /// Kills the child even when an assertion fails.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Polls until the process's arguments include `arg`; panics after a generous deadline
    /// so a process that never gets there fails the test instead of hanging it.
    fn wait_for_cmdline(pid: u32, arg: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} did not show argument {arg} within 10 s: {:?}",
                String::from_utf8_lossy(&cmdline)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn finds_a_spawned_process_by_pid_and_name() {
        let marker = "31.4159";
        let child = Child(
            std::process::Command::new("sleep")
                .arg(marker)
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        // `spawn` returns once exec has passed its point of no return, when the kernel has
        // set the new name and executable but may not yet have set up the arguments: until
        // then /proc/PID/cmdline is empty. Wait for the state asserted below.
        wait_for_cmdline(pid, marker);
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\n",
        );
        let ctx = ctx(dir.path());

        let by_pid = run(&ctx, "processes", &["-pid", &pid.to_string()]).unwrap();
        assert_columns("processes", &by_pid);
        assert_eq!(by_pid.records.len(), 1);
        let r = &by_pid.records[0];
        assert_eq!(r["pid"], pid);
        assert_eq!(r["ppid"], std::process::id());
        assert_eq!(r["name"], "sleep");
        assert!(r["commandLine"].as_str().unwrap().contains(marker), "{r}");
        assert_eq!(r["args"][1], marker);
        assert!(r.get("commandLineCut").is_none(), "{r}");
        assert!(r["imagePath"].as_str().unwrap().ends_with("sleep"), "{r}");
        assert!(r["startTime"].as_str().unwrap().ends_with('Z'));
        let our_uid = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        if our_uid.is_ok_and(|u| u == 0) {
            assert_eq!(r["user"], "root");
        }

        for name in ["sleep", "SLEEP", "sl*p"] {
            let by_name = run(&ctx, "processes", &["-name", name]).unwrap();
            assert!(
                by_name.records.iter().any(|r| r["pid"] == pid),
                "-name {name} misses {pid}"
            );
            assert!(by_name.records.iter().all(|r| r["name"] == "sleep"));
        }
        let substring = run(&ctx, "processes", &["-name", "slee"]).unwrap();
        assert!(substring.records.iter().all(|r| r["pid"] != pid));

        let all = run(&ctx, "processes", &[]).unwrap();
        assert!(all.records.iter().any(|r| r["pid"] == pid));
        assert!(all.records.iter().any(|r| r["pid"] == std::process::id()));
        let pids: Vec<u64> = all
            .records
            .iter()
            .map(|r| r["pid"].as_u64().unwrap())
            .collect();
        assert!(pids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn long_command_lines_are_cut_and_say_so() {
        let script = "sleep 30; true";
        let long = "x".repeat(100_000);
        let child = Child(
            std::process::Command::new("sh")
                .args(["-c", script, "sh", &long])
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        wait_for_cmdline(pid, script);
        let dir = tempfile::tempdir().unwrap();
        let result = run(&ctx(dir.path()), "processes", &["-pid", &pid.to_string()]).unwrap();
        let r = &result.records[0];
        assert_eq!(r["commandLineCut"], true, "{r}");
        let args: Vec<&str> = r["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(&args[..3], &["sh", "-c", script]);
        let kept: usize = args.iter().map(|a| a.len() + 1).sum();
        assert!(kept <= super::CMDLINE_CAP + 1, "{kept} bytes kept");
        assert!(args[4].len() > 60_000);
        assert!(
            result
                .warnings
                .iter()
                .any(|w| w.contains("cut") && w.contains(&pid.to_string())),
            "{:?}",
            result.warnings
        );
    }

    #[test]
    fn missing_pid_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&ctx(dir.path()), "processes", &["-pid", "4294967295"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
        assert_eq!(err.to_string(), "no process with pid 4294967295");
        let err = run(&ctx(dir.path()), "processes", &["-pid", "99999999999"]).unwrap_err();
        assert_eq!(err.reason(), "NotFound");
    }
}
