//! The analyst's console, driven in a real terminal (tmux), and `kubectl liveresponse exec`.

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::lr;
use e2e::stack::target_bin;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use liveresponse_api::crd::{Command, CommandPhase, LiveResponseSession, SessionPhase};
use sha2::Digest;

use crate::Env;

const T: Duration = Duration::from_secs(60);

/// A tmux server of our own, so the test never touches the user's.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Self {
        Self {
            socket: format!("lr-e2e-{tag}-{}", std::process::id()),
        }
    }
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Proc::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "tmux {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-200", "-t", "lr"])
            .unwrap_or_default()
    }
    fn keys(&self, keys: &[&str]) -> Result<()> {
        let mut args = vec!["send-keys", "-t", "lr"];
        args.extend_from_slice(keys);
        self.run(&args).map(|_| ())
    }
    fn line(&self, text: &str) -> Result<()> {
        self.keys(&["-l", text])?;
        self.keys(&["Enter"])
    }
    /// Waits until the screen shows `needle` (after `from` lines already seen).
    async fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("the console never showed {needle:?}; screen:\n{s}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "lr"]).is_ok()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Proc::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// `kubectl liveresponse connect DEVICE` as `user` in a fresh tmux pane of `width` columns,
/// working in its own folder under e2e/.state; returns once the prompt shows.
async fn console(
    env: &Env,
    tag: &str,
    user: &str,
    ns: &str,
    device: &str,
    width: u32,
) -> Result<(Tmux, PathBuf)> {
    let work: PathBuf = e2e::repo_root().join(format!("e2e/.state/{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let tmux = Tmux::new(tag);
    let cmdline = format!(
        "env KUBECONFIG={} PATH={} NO_COLOR=1 kubectl liveresponse -n {ns} connect {device} --reason {tag}-test",
        env.cluster.kubeconfig(user).display(),
        path_with_plugins(env)
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "lr",
        "-x",
        &width.to_string(),
        "-y",
        "60",
        "-c",
        &work.to_string_lossy(),
        &cmdline,
    ])?;
    // Keep the pane after exit so a failure shows what the console printed.
    let _ = tmux.run(&["set-option", "-t", "lr", "remain-on-exit", "on"]);
    tmux.wait_for(&format!("[{device} "), T).await?;
    Ok((tmux, work))
}

fn path_with_plugins(env: &Env) -> String {
    let cli_dir = target_bin("kubectl-liveresponse")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    format!(
        "{}:{}:{}",
        cli_dir.display(),
        env.cluster.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The names of the Commands in a namespace.
async fn command_names(client: &kube::Client, ns: &str) -> Result<Vec<String>> {
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect())
}

/// Everything an analyst does at the console, in a real terminal.
pub async fn interactive_console(env: &'static Env) -> Result<()> {
    let ns = "lr-console";
    let device = "console-host";
    env.stack.tenant(ns, "")?;
    env.stack.start_agent(ns, device, Path::new("/"), &[])?;
    env.stack.wait_device(ns, device, true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    let (tmux, work) = console(env, "console", "analyst-advanced", ns, device, 220).await?;
    let sessions: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    let session = sessions
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|s| {
            s.spec.device == device
                && s.status.as_ref().and_then(|x| x.phase) == Some(SessionPhase::Connected)
        })
        .context("no Connected session for the console")?;
    let session_name = session.name_any();
    ensure!(
        session.spec.requested_by == "analyst-advanced",
        "requestedBy {}",
        session.spec.requested_by
    );

    // A process the test started shows up.
    let mut child = Proc::new("sleep").arg("777.25").spawn()?;
    tmux.line("processes -name sleep")?;
    let screen = tmux.wait_for("777.25", T).await?;
    ensure!(
        screen.contains(&child.id().to_string()),
        "pid {} not shown:\n{screen}",
        child.id()
    );
    let _ = child.kill();
    let _ = child.wait();

    // A parse error shows the usage and creates nothing.
    let before = Api::<Command>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .len();
    tmux.line("processes -bogus 1")?;
    tmux.wait_for("usage: processes", T).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = Api::<Command>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .len();
    ensure!(
        before == after,
        "a parse error created a Command ({before} -> {after})"
    );

    // Ctrl+C cancels the running command for real and the prompt returns.
    let seen = command_names(&client, ns).await?;
    tmux.line("findfile zz-no-such-file-anywhere -root /")?;
    // Press Ctrl+C as soon as the Command exists: walking every file of this machine takes
    // seconds, the cancel arrives within a few hundred milliseconds.
    let running = wait_new_command(&client, ns, "findfile", &seen).await?;
    tmux.keys(&["C-c"])?;
    let c = lr::wait_final(&client, ns, &running, T).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Cancelled),
        "findfile after Ctrl+C ended {:?}",
        lr::phase(&c)
    );
    ensure!(tmux.alive(), "the console died on Ctrl+C");
    let prompt_back = async {
        loop {
            let s = tmux.screen();
            let last = s
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_string();
            if last.starts_with(&format!("[{device} ")) && last.trim_end().ends_with('>') {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(T, prompt_back)
        .await
        .with_context(|| format!("no prompt after Ctrl+C:\n{}", tmux.screen()))?;

    // A background command, jobs, fg.
    tmux.line("findfile hostname -root /etc &")?;
    let screen = tmux.wait_for("started in the background", T).await?;
    let id = screen
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<i64>().ok())
        .with_context(|| format!("no job id shown:\n{screen}"))?;
    // Type the next line only once the console reads again: keys typed while it is busy
    // may be lost, as at any terminal.
    let prompt = format!("[{device} ");
    let prompts = |s: &str| s.lines().filter(|l| l.starts_with(&prompt)).count();
    let prompts_before = prompts(&tmux.screen());
    tmux.line("jobs")?;
    let jobs_done = async {
        loop {
            let s = tmux.screen();
            let last = s
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .to_string();
            if prompts(&s) > prompts_before
                && s.contains("PHASE")
                && last.starts_with(&format!("[{device} "))
                && last.trim_end().ends_with('>')
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let screen = tokio::time::timeout(T, jobs_done)
        .await
        .with_context(|| format!("jobs did not answer:\n{}", tmux.screen()))?;
    ensure!(
        screen.contains("findfile hostname -root /etc"),
        "jobs does not list the background command:\n{screen}"
    );
    tmux.line(&format!("fg {id}"))?;
    tmux.wait_for("/etc/hostname", T).await?;

    // Output to a local file.
    tmux.line("processes > out.txt")?;
    tmux.wait_for("to out.txt", T).await?;
    let text = std::fs::read_to_string(work.join("out.txt")).context("out.txt was not written")?;
    ensure!(
        text.contains("PID") && text.lines().count() > 2,
        "out.txt: {text}"
    );

    // help comes from the registry.
    tmux.line("help findfile")?;
    tmux.wait_for("usage: findfile", T).await?;

    // A large getfile shows a progress bar with its total while it moves.
    let big = work.join("big.img");
    std::fs::File::create(&big)?.set_len(400 << 20)?;
    tmux.line(&format!("getfile {}", big.display()))?;
    tmux.wait_for("/400.00 MiB", T)
        .await
        .context("no progress bar with the file's total")?;
    tmux.wait_for("6ed5e85372e48880", Duration::from_secs(120))
        .await
        .context("the large getfile did not finish")?;

    // getfile, then download brings the file to this computer through the file API.
    let src = work.join("evidence.txt");
    let body: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(&src, &body)?;
    tmux.line(&format!("getfile {}", src.display()))?;
    let sha = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    tmux.wait_for(&sha, T).await?;
    let getfile_id = Api::<Command>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        // Names are random, so the list order says nothing: pick this file's getfile.
        .find(|c| {
            c.spec.session == session_name
                && c.spec.command == "getfile"
                && c.spec.args.iter().any(|a| a.ends_with("evidence.txt"))
        })
        .and_then(|c| c.status.as_ref().and_then(|s| s.id))
        .context("the getfile has no id")?;
    tmux.line(&format!("download {getfile_id} > copy.txt"))?;
    tmux.wait_for("sha256 verified", T).await?;
    ensure!(
        std::fs::read_to_string(work.join("copy.txt"))? == body,
        "download wrote something else than the device's file"
    );

    // disconnect ends the session.
    tmux.line("disconnect")?;
    lr::wait_session(&client, ns, &session_name, SessionPhase::Disconnected, T).await?;

    // The command log lists every command with id, line, duration and status.
    let out = Proc::new(target_bin("kubectl-liveresponse"))
        .args(["-n", ns, "--no-color", "log", &session_name])
        .env("KUBECONFIG", env.cluster.kubeconfig("analyst-advanced"))
        .output()?;
    let log = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "log failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let commands = Api::<Command>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let mine: Vec<&Command> = commands
        .iter()
        .filter(|c| c.spec.session == session_name)
        .collect();
    // processes, the cancelled findfile, the background findfile, processes > out.txt and
    // two getfiles; help, download and the parse error never became Commands.
    ensure!(
        mine.len() == 6,
        "expected the console's 6 commands, found {}",
        mine.len()
    );
    for c in mine {
        let st = c.status.as_ref().context("no status")?;
        let line = st.command_line.as_deref().unwrap_or_default();
        let row = log
            .lines()
            .find(|l| {
                l.contains(line)
                    && l.split_whitespace().next() == st.id.map(|i| i.to_string()).as_deref()
            })
            .with_context(|| {
                format!(
                    "command {} ({line}) missing from the log:\n{log}",
                    st.id.unwrap_or_default()
                )
            })?;
        let phase = format!("{:?}", st.phase.context("no phase")?);
        ensure!(
            row.contains(&phase),
            "log row lacks the phase {phase}: {row}"
        );
        if let Some(d) = &st.duration {
            ensure!(
                row.contains(d.trim_end_matches('s')) || row.contains(d),
                "log row lacks the duration {d}: {row}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    env.stack.kill_agent(ns, device);
    Ok(())
}

/// Waits for a Command of `verb` that is not among `seen` (creation times have one-second
/// granularity, so "the newest" cannot be told by them).
async fn wait_new_command(
    client: &kube::Client,
    ns: &str,
    verb: &str,
    seen: &[String],
) -> Result<String> {
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let found = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|c| c.spec.command == verb && !seen.contains(&c.name_any()));
        if let Some(c) = found {
            return Ok(c.name_any());
        }
        if start.elapsed() > T {
            bail!("no new {verb} command appeared");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn exec(env: &Env, user: &str, ns: &str, words: &[&str]) -> Result<std::process::Output> {
    Ok(Proc::new(target_bin("kubectl-liveresponse"))
        .args(["-n", ns, "--no-color", "exec"])
        .args(words)
        .env("KUBECONFIG", env.cluster.kubeconfig(user))
        .env("PATH", path_with_plugins(env))
        .output()?)
}

/// `exec` for scripts: exit 0 and the output, or non-zero and the reason.
pub async fn exec_for_scripts(env: &'static Env) -> Result<()> {
    let ns = "lr-exec";
    let device = "exec-host";
    env.stack.tenant(ns, "")?;
    env.stack.start_agent(ns, device, Path::new("/"), &[])?;
    env.stack.wait_device(ns, device, true, T)?;

    let out = exec(
        env,
        "analyst-basic",
        ns,
        &[device, "--", "processes", "-pid", "1"],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "exec processes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("PID")
            && stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some("1")),
        "output: {stdout}"
    );

    let out = exec(env, "analyst-basic", ns, &[device, "--", "registry"])?;
    ensure!(!out.status.success(), "a failed command must exit non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("not supported on linux"), "stderr: {err}");

    let out = exec(
        env,
        "analyst-basic",
        ns,
        &[device, "--", "getfile", "/etc/hostname"],
    )?;
    ensure!(
        !out.status.success(),
        "getfile as analyst-basic must be refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("getfile") && err.contains("liveresponse-advanced"),
        "stderr: {err}"
    );

    // Each exec disconnected the session it opened.
    let client = env.cluster.client("admin").await?;
    let open: Vec<LiveResponseSession> = Api::<LiveResponseSession>::namespaced(client, ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| {
            !s.status
                .as_ref()
                .and_then(|x| x.phase)
                .is_some_and(|p| p.is_final())
        })
        .collect();
    ensure!(
        open.is_empty(),
        "exec left sessions open: {:?}",
        open.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    );
    env.stack.kill_agent(ns, device);
    Ok(())
}

/// A file name that would retitle the terminal, ring its bell and clear the screen.
const EVIL_NAME: &str = "evil\x1b]0;pwned\x07\x1b[2Jname.txt";
/// How the CLI shows it.
const EVIL_SHOWN: &str = "evil\\x1b]0;pwned\\x07\\x1b[2Jname.txt";
/// An argument of a process's command line that would clear the screen.
const EVIL_ARG: &str = "x\x1b[2J\u{202e}argv";
const EVIL_ARG_SHOWN: &str = "x\\x1b[2J\\u202eargv";

/// The console shows what a host wrote, never obeys it: a file name and a command line with
/// escape sequences come out escaped from `exec` and at the console, exact in `-output json`,
/// and the terminal's title is untouched.
pub async fn hostile_text_is_shown_escaped(env: &'static Env) -> Result<()> {
    let ns = "lr-hostile";
    let device = "hostile-host";
    env.stack.tenant(ns, "")?;
    env.stack.start_agent(ns, device, Path::new("/"), &[])?;
    env.stack.wait_device(ns, device, true, T)?;
    let dir = e2e::repo_root().join(format!("e2e/.state/roots/hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(EVIL_NAME), "x")?;
    let dir_text = dir.to_string_lossy().into_owned();

    // `sh` stays the parent of its `sleep` (the `:` after it), so its own command line, with
    // the hostile argument as `$0`, is what the agent lists.
    let mut child = Proc::new("sh")
        .args(["-c", "sleep 300; :", EVIL_ARG])
        .spawn()?;
    let pid = child.id().to_string();
    let start = Instant::now();
    while !std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .windows(EVIL_ARG.len())
        .any(|w| w == EVIL_ARG.as_bytes())
    {
        ensure!(start.elapsed() < T, "sh {pid} never showed its arguments");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = hostile_checks(env, ns, device, &dir_text, &pid).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    env.stack.kill_agent(ns, device);
    result
}

fn no_raw_escape(what: &str, bytes: &[u8]) -> Result<()> {
    ensure!(
        !bytes.contains(&0x1b) && !bytes.contains(&0x07),
        "{what} sent a raw ESC or BEL to the terminal: {}",
        String::from_utf8_lossy(bytes).escape_debug()
    );
    Ok(())
}

async fn hostile_checks(env: &Env, ns: &str, device: &str, dir: &str, pid: &str) -> Result<()> {
    // exec: stdout and stderr carry the escapes as text.
    let out = exec(env, "analyst-basic", ns, &[device, "--", "dir", dir])?;
    ensure!(
        out.status.success(),
        "exec dir failed: {}",
        String::from_utf8_lossy(&out.stderr).escape_debug()
    );
    no_raw_escape("exec dir (stdout)", &out.stdout)?;
    no_raw_escape("exec dir (stderr)", &out.stderr)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(stdout.contains(EVIL_SHOWN), "exec dir: {stdout}");

    let out = exec(
        env,
        "analyst-basic",
        ns,
        &[device, "--", "processes", "-pid", pid],
    )?;
    ensure!(
        out.status.success(),
        "exec processes failed: {}",
        String::from_utf8_lossy(&out.stderr).escape_debug()
    );
    no_raw_escape("exec processes", &out.stdout)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(stdout.contains(EVIL_ARG_SHOWN), "exec processes: {stdout}");
    ensure!(
        !stdout.contains('\u{202e}'),
        "a raw bidi override: {stdout}"
    );

    // -output json: still no raw ESC on the terminal, and the values are the exact names.
    let out = exec(
        env,
        "analyst-basic",
        ns,
        &[device, "--", "dir", dir, "-output", "json"],
    )?;
    ensure!(out.status.success(), "exec dir -output json failed");
    no_raw_escape("exec dir -output json", &out.stdout)?;
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("exec dir -output json is not JSON")?;
    ensure!(
        records.iter().any(|r| r["name"] == EVIL_NAME),
        "the JSON lost the exact name: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = exec(
        env,
        "analyst-basic",
        ns,
        &[device, "--", "processes", "-pid", pid, "-output", "json"],
    )?;
    ensure!(out.status.success(), "exec processes -output json failed");
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains('\u{202e}'),
        "a raw bidi override in JSON on the terminal"
    );
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("exec processes -output json is not JSON")?;
    ensure!(
        records.iter().any(|r| r["commandLine"]
            .as_str()
            .is_some_and(|l| l.contains(EVIL_ARG))),
        "the JSON lost the exact command line: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The console, in a real terminal.
    let (tmux, work) = console(env, "hostile", "analyst-basic", ns, device, 250).await?;
    let title_before = tmux.run(&["display-message", "-p", "-t", "lr", "#{pane_title}"])?;
    tmux.line(&format!("dir {dir}"))?;
    tmux.wait_for(EVIL_SHOWN, T).await?;
    tmux.line(&format!("processes -pid {pid}"))?;
    let screen = tmux.wait_for(EVIL_ARG_SHOWN, T).await?;
    // Had the name reached the terminal raw, it would have cleared the screen (the banner
    // gone) and retitled the pane.
    ensure!(
        screen.contains("Live response session"),
        "the screen was cleared:\n{screen}"
    );
    let title = tmux.run(&["display-message", "-p", "-t", "lr", "#{pane_title}"])?;
    ensure!(
        !title.contains("pwned") && title == title_before,
        "the pane title changed to {title:?}"
    );
    // `> file` keeps the raw bytes: it is evidence, not display.
    tmux.line(&format!("dir {dir} -output json > hostile.json"))?;
    tmux.wait_for("to hostile.json", T).await?;
    let saved = std::fs::read(work.join("hostile.json")).context("hostile.json")?;
    let records: Vec<serde_json::Value> = serde_json::from_slice(&saved)?;
    ensure!(
        records.iter().any(|r| r["name"] == EVIL_NAME),
        "hostile.json lost the exact name"
    );
    tmux.line("disconnect")?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
