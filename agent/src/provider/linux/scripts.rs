//! `run`: starts a verified library script without a shell, captures its output, and stops
//! its whole process tree on cancel, on timeout, and when the script itself ends.
//!
//! Parameters are argv entries: the kernel hands them to the interpreter as they are, so
//! `; & | ! $ ( )` arrive literally. The script runs in a process group of its own; the
//! processes it starts are also followed by parent pid while it runs, so one that leaves the
//! group (setsid) is still stopped.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::provider::{CommandResult, ExecContext, ExecError};

/// How often a running script's tree is looked at (new children, cancel, deadline).
const POLL: Duration = Duration::from_millis(50);

/// How the script is started: an interpreter for its extension, or directly when it names
/// its own (`#!`) or is a program.
fn launcher(script: &Path, head: &[u8]) -> Result<Option<&'static str>, ExecError> {
    if head.starts_with(b"#!") || head.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let ext = script
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "sh" => Ok(Some("/bin/sh")),
        "bash" => Ok(Some("bash")),
        "py" => Ok(Some("python3")),
        "pl" => Ok(Some("perl")),
        "rb" => Ok(Some("ruby")),
        "ps1" => Ok(Some("pwsh")),
        _ => Err(ExecError::InvalidArgument(format!(
            "cannot tell how to run {}: give it a #! line, or a .sh, .bash, .py, .pl, .rb or .ps1 name",
            script
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("the script")
        ))),
    }
}

/// Parent pid and start time (clock ticks after boot) of a process, from /proc.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything, spaces and ')' included.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, start))
}

/// The processes of a script's tree, each with its start time so a reused pid is never
/// taken for one of them.
#[derive(Default)]
struct Tree {
    members: HashMap<i32, u64>,
}

impl Tree {
    /// Adds every live process whose parent is a member (transitively).
    fn grow(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let procs: Vec<(i32, i32, u64)> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| stat(pid).map(|(ppid, start)| (pid, ppid, start)))
            .collect();
        loop {
            let before = self.members.len();
            for &(pid, ppid, start) in &procs {
                if self.members.contains_key(&ppid) {
                    self.members.entry(pid).or_insert(start);
                }
            }
            if self.members.len() == before {
                break;
            }
        }
        // Forget the dead and the reused.
        self.members
            .retain(|pid, start| stat(*pid).is_some_and(|(_, s)| s == *start));
    }

    fn signal(&self, sig: i32) {
        for (&pid, &start) in &self.members {
            if stat(pid).is_some_and(|(_, s)| s == start) {
                // SAFETY: kill(2) with a pid checked to be the process we recorded.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    }

    /// Stops everything: freeze first, so nothing forks while it is being killed.
    fn kill(&mut self, pgid: Option<i32>) -> Vec<i32> {
        for _ in 0..3 {
            self.grow();
            self.signal(libc::SIGSTOP);
        }
        self.grow();
        let pids: Vec<i32> = self.members.keys().copied().collect();
        self.signal(libc::SIGKILL);
        if let Some(pgid) = pgid {
            // SAFETY: the script's own process group, created for it.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
        pids
    }
}

/// Stops a running process and every process it started (`remediate process`): the pids
/// stopped, root first when it was running.
pub(super) fn kill_tree(pid: i32) -> Vec<i32> {
    let mut tree = Tree::default();
    if let Some((_, start)) = stat(pid) {
        tree.members.insert(pid, start);
    }
    let mut pids = tree.kill(None);
    pids.sort_unstable_by_key(|p| (*p != pid, *p));
    // Reap what this agent started itself (none in practice); others' parents reap theirs.
    pids
}

/// Reads a pipe to its end, keeping at most `limit` bytes.
fn capture(
    mut pipe: impl Read + Send + 'static,
    limit: usize,
) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut cut = false;
        let mut buf = [0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = limit.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    cut |= n > room;
                }
            }
        }
        (kept, cut)
    })
}

/// Runs `script` with `params` as its arguments, in `cwd` (a host folder), keeping at most
/// `max_output` bytes of stdout and of stderr each.
pub fn run_script(
    ctx: &ExecContext,
    script: &Path,
    params: &[String],
    cwd: &Path,
    max_output: usize,
) -> Result<CommandResult, ExecError> {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(script)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| ExecError::Failed(format!("cannot read {}: {e}", script.display())))?;
    let mut cmd = match launcher(script, &head[..n])? {
        Some(interpreter) => {
            let mut c = Command::new(interpreter);
            c.arg(script);
            c
        }
        None => Command::new(script),
    };
    // A fresh environment: the agent's own (its flags, a proxy's credentials) is not the
    // script's business.
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("LIVERESPONSE", "1");
    cmd.args(params)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child: Child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ExecError::NotFound(format!(
            "cannot start {}: its interpreter is not installed on the device ({e})",
            script.display()
        )),
        _ => ExecError::Failed(format!("cannot start {}: {e}", script.display())),
    })?;
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let mut tree = Tree::default();
    if let Some((_, start)) = stat(pid) {
        tree.members.insert(pid, start);
    }
    let out = child.stdout.take().map(|p| capture(p, max_output));
    let err = child.stderr.take().map(|p| capture(p, max_output));
    tracing::info!(pid, script = %script.display(), "script started");
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                return Err(ExecError::Failed(format!(
                    "cannot wait for the script: {e}"
                )));
            }
        }
        if let Err(stop) = ctx.check() {
            let pids = tree.kill(Some(pid));
            let _ = child.wait();
            tracing::info!(?pids, "script stopped with its process tree");
            return Err(stop);
        }
        tree.grow();
        std::thread::sleep(POLL);
    };
    // What the script left behind would hold its output open and outlive the command.
    tree.members.remove(&pid);
    tree.grow();
    let leftovers: HashSet<i32> = if tree.members.is_empty() {
        HashSet::new()
    } else {
        tree.kill(Some(pid)).into_iter().collect()
    };
    let (stdout, out_cut) = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let (stderr, err_cut) = err.and_then(|h| h.join().ok()).unwrap_or_default();
    let exit_code = status
        .code()
        .or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            status.signal().map(|s| 128 + s)
        })
        .unwrap_or(-1);
    let mut r = CommandResult::with_records(vec![json!({
        "exitCode": exit_code,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
    })]);
    r.exit_code = Some(exit_code);
    if out_cut || err_cut {
        r.warnings.push(format!(
            "the script wrote more than {max_output} bytes to stdout or stderr; the rest was dropped"
        ));
    }
    if !leftovers.is_empty() {
        let mut pids: Vec<i32> = leftovers.into_iter().collect();
        pids.sort_unstable();
        r.warnings.push(format!(
            "the script ended leaving {} processes running (pids {pids:?}); they were stopped",
            pids.len()
        ));
    }
    Ok(r)
}

/// How many `sleep D` processes run for the given durations (tests find their own sleeps).
#[cfg(test)]
pub(super) fn tests_count_sleeps(durations: &[&str]) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| durations.iter().any(|d| *c == format!("sleep\0{d}\0")))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        p
    }

    #[test]
    fn parameters_arrive_as_one_literal_argument() {
        let dir = tempfile::tempdir().expect("dir");
        let s = script(dir.path(), "args.sh", "printf '%s\\n' \"$#\" \"$1\"\n");
        let param = "a;b & c | d $(e) `f` ! 'g' \"h\"".to_string();
        let r = run_script(
            &ExecContext::new("/"),
            &s,
            std::slice::from_ref(&param),
            dir.path(),
            1 << 20,
        )
        .expect("ran");
        assert_eq!(r.records[0]["exitCode"], 0);
        assert_eq!(r.records[0]["stdout"], format!("1\n{param}\n"));
    }

    #[test]
    fn the_script_does_not_inherit_the_agents_environment() {
        let dir = tempfile::tempdir().expect("dir");
        let s = script(dir.path(), "env.sh", "env\n");
        let r = run_script(&ExecContext::new("/"), &s, &[], dir.path(), 1 << 20).expect("ran");
        let out = r.records[0]["stdout"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(out.contains("LIVERESPONSE=1"), "{out}");
        // Whatever this test process has (cargo sets CARGO_PKG_NAME for it) stays out.
        let ours: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| !["PATH", "HOME", "LANG", "PWD", "SHLVL", "_"].contains(&k.as_str()))
            .collect();
        assert!(!ours.is_empty(), "the test process has some environment");
        for k in ours {
            assert!(
                !out.contains(&format!("\n{k}=")) && !out.starts_with(&format!("{k}=")),
                "{k} leaked: {out}"
            );
        }
    }

    #[test]
    fn exit_code_and_stderr_are_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let s = script(dir.path(), "fail", "#!/bin/sh\necho oops >&2\nexit 3\n");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let r = run_script(&ExecContext::new("/"), &s, &[], dir.path(), 1 << 20).expect("ran");
        assert_eq!(r.records[0]["exitCode"], 3);
        assert_eq!(r.records[0]["stderr"], "oops\n");
    }

    #[test]
    fn an_unknown_kind_of_script_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let s = script(dir.path(), "notes.txt", "hello");
        let e = run_script(&ExecContext::new("/"), &s, &[], dir.path(), 1024).expect_err("kind");
        assert!(e.to_string().contains("#! line"), "{e}");
    }

    #[test]
    fn cancel_stops_the_whole_tree() {
        let dir = tempfile::tempdir().expect("dir");
        // One child in the group, one that leaves it with setsid, one in the foreground;
        // durations no other test uses, to find them.
        let s = script(
            dir.path(),
            "tree.sh",
            "sleep 30011 & setsid sleep 30012 & sleep 30013\n",
        );
        let ctx = ExecContext::new("/");
        let flag = ctx.cancelled.clone();
        let worker = {
            let (ctx, s, d) = (ctx.clone(), s.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || run_script(&ctx, &s, &[], &d, 1024))
        };
        // Wait until the tree is up: three sleeps under this test's script.
        let count = || {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
                .filter(|c| {
                    ["30011", "30012", "30013"]
                        .iter()
                        .any(|d| *c == format!("sleep\0{d}\0"))
                })
                .count()
        };
        let up = std::time::Instant::now();
        while count() < 3 && up.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(count(), 3, "the script's three sleeps started");
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = worker.join().expect("joined");
        assert!(matches!(r, Err(ExecError::Cancelled)), "{r:?}");
        let gone = std::time::Instant::now();
        while count() > 0 && gone.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(count(), 0, "no process of the tree is left");
    }
}
