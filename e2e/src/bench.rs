//! What the benchmarks share: a private sshd on loopback to compare with, /proc readings,
//! and stopping what a run started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::Cluster;
use crate::stack::Stack;

pub const SSHD: &str = "/usr/sbin/sshd";

/// Clock ticks per second of /proc's times.
pub fn clock_ticks() -> f64 {
    Proc::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds a process used, with those of the children it has reaped (`self` for this
/// one: the `scp` and `ssh` clients it waited for).
pub fn cpu_secs(pid: &str, ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // utime, stime, cutime and cstime are fields 14 to 17; the command name before them
    // (field 2) may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut t = 0.0;
    for i in 11..15 {
        let v: f64 = fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("malformed /proc stat")?;
        t += v;
    }
    Ok(t / ticks)
}

pub fn run_ok(what: &str, cmd: &mut Proc) -> Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Installs Debian's `openssh-server` when there is no sshd (the benchmark runs as root).
pub fn ensure_sshd() -> Result<()> {
    if Path::new(SSHD).exists() {
        return Ok(());
    }
    eprintln!("bench: {SSHD} is missing; installing openssh-server with apt-get");
    let install = || {
        Proc::new("apt-get")
            .args(["install", "-y", "-qq", "openssh-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            // stdout is the report's.
            .stdout(std::io::stderr())
            .status()
            .context("running apt-get (the scp comparison needs Debian's openssh-server)")
    };
    if !install()?.success() {
        // A fresh machine may have no package lists yet.
        run_ok(
            "apt-get update",
            Proc::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        ensure!(
            install()?.success(),
            "apt-get install openssh-server failed; install it by hand and run again"
        );
    }
    ensure!(
        Path::new(SSHD).exists(),
        "openssh-server is installed but {SSHD} is not there"
    );
    Ok(())
}

/// A private sshd: own config, host key and authorized key in `dir`, key auth only, on
/// 127.0.0.1, in the foreground as our child so that stopping it is killing it.
pub struct Sshd {
    pub child: Option<Child>,
    pub port: u16,
    pub key: PathBuf,
}

impl Sshd {
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key = dir.join("id_ed25519");
        let host_key = dir.join("host_ed25519");
        for k in [&key, &host_key] {
            run_ok(
                "ssh-keygen",
                Proc::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "lr-bench", "-f"])
                    .arg(k),
            )?;
        }
        let authorized = dir.join("authorized_keys");
        std::fs::copy(key.with_extension("pub"), &authorized)?;
        // sshd refuses to start as root without its privilege separation directory, which
        // only the distribution's service creates.
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {auth}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\nMaxStartups 100\n",
                host = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                auth = authorized.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("sshd.log"))?;
        let child = Proc::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {SSHD}"))?;
        let mut sshd = Self {
            child: Some(child),
            port,
            key,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = sshd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = exited {
                bail!(
                    "sshd exited ({st}); its log:\n{}",
                    std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "sshd did not listen within 10s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The first login proves the key works before anything is timed.
        run_ok("ssh true", sshd.ssh().arg("true"))?;
        Ok(sshd)
    }

    /// Options both clients take: our key, no user config, no host key prompts.
    pub fn opts(&self) -> Vec<String> {
        let mut v = vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            self.key.to_string_lossy().into_owned(),
        ];
        for o in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "LogLevel=ERROR",
        ] {
            v.push("-o".into());
            v.push(o.into());
        }
        v
    }

    pub fn ssh(&self) -> Proc {
        let mut p = Proc::new("ssh");
        p.arg("-p")
            .arg(self.port.to_string())
            .args(self.opts())
            .arg("127.0.0.1");
        p
    }

    pub fn scp(&self, remote: &Path, local: &Path) -> Proc {
        let mut p = Proc::new("scp");
        p.arg("-q")
            .arg("-P")
            .arg(self.port.to_string())
            .args(self.opts())
            .arg(format!("127.0.0.1:{}", remote.display()))
            .arg(local);
        p
    }

    /// SIGTERM, then SIGKILL if it lingers.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = crate::process::signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Stops whatever a stack and control plane in `dir` run (by their pid files), as
/// `lr-stack down` does.
pub fn stack_down(dir: &Path) -> Result<()> {
    let cluster = Cluster {
        state: dir.to_path_buf(),
        bin: PathBuf::new(),
    };
    if dir.join("stack").exists() {
        Stack {
            cluster: cluster.clone(),
            dir: dir.join("stack"),
            children: Default::default(),
        }
        .down()?;
    }
    if dir.exists() {
        cluster.down()?;
    }
    Ok(())
}

/// Our own pid and those of our parents: their command lines may name the state folder
/// (`make`, a shell), and they are not left over.
pub fn ours() -> Vec<u32> {
    let mut pids = vec![std::process::id()];
    while let Some(&pid) = pids.last() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The command name may hold spaces and parentheses; the fields after it do not.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|p| *p > 1 && !pids.contains(p));
        match parent {
            Some(p) => pids.push(p),
            None => break,
        }
    }
    pids
}

/// Processes whose command line names `dir`, other than this one and its parents.
pub fn survivors(dir: &Path) -> Result<Vec<String>> {
    let out = Proc::new("pgrep")
        .arg("-af")
        .arg(dir)
        .output()
        .context("running pgrep")?;
    let ours = ours();
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .is_none_or(|p| !ours.contains(&p))
        })
        .map(str::to_string)
        .collect())
}

pub fn openssh_version() -> String {
    Proc::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

pub fn now_utc() -> String {
    Proc::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn keep_logs(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    let _ = std::fs::create_dir_all(to);
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}
