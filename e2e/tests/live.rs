//! Live response end to end: the real operator and real agents (processes), sessions and
//! commands checked against ground truth the tests create.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::lr::{self, Cmd};
use e2e::{eventually, is_forbidden};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{Command, CommandPhase, Device, LiveResponseSession, SessionPhase};
use sha2::{Digest, Sha256};

use crate::Env;

const T: Duration = Duration::from_secs(60);

/// A per-test folder that serves as an agent's host root.
fn host_root(name: &str) -> Result<PathBuf> {
    let p = e2e::repo_root().join(format!("e2e/.state/roots/{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn write(root: &Path, rel: &str, text: &str) -> Result<PathBuf> {
    let p = root.join(rel.trim_start_matches('/'));
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&p, text)?;
    Ok(p)
}

/// A sparse file: hashing it takes real time without using disk.
fn sparse(root: &Path, rel: &str, size: u64) -> Result<()> {
    let p = root.join(rel.trim_start_matches('/'));
    std::fs::File::create(&p)?.set_len(size)?;
    Ok(())
}

/// A tenant with an agent for `device`, and a Connected session for `user`.
async fn setup(env: &Env, ns: &str, device: &str, root: &Path, settings: &str) -> Result<Client> {
    let s = &env.stack;
    s.tenant(ns, settings)?;
    s.start_agent(ns, device, root, &[])?;
    s.wait_device(ns, device, true, T)?;
    env.cluster.client("analyst-advanced").await
}

async fn session(client: &Client, ns: &str, name: &str, device: &str) -> Result<()> {
    lr::open_session(client, ns, name, device, "analyst-advanced", None).await?;
    lr::wait_session(client, ns, name, SessionPhase::Connected, T).await?;
    Ok(())
}

/// Every basic command against ground truth: a process, sockets, files with awkward names,
/// planted persistence.
pub async fn basic_commands_match_ground_truth(env: &'static Env) -> Result<()> {
    let ns = "lr-basic";
    let root = host_root("basic")?;
    let content = "evidence: the quick brown fox\n".repeat(100);
    write(&root, "/data/dossier é/sub dir/evidence ü.txt", &content)?;
    write(&root, "/etc/cron.d/evil", "*/5 * * * * root /tmp/evil.sh\n")?;
    write(
        &root,
        "/etc/systemd/system/evil.service",
        "[Service]\nExecStart=/tmp/evil --beacon\n",
    )?;
    std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants"))?;
    std::os::unix::fs::symlink(
        "../evil.service",
        root.join("etc/systemd/system/multi-user.target.wants/evil.service"),
    )?;
    write(&root, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\n")?;
    let client = setup(env, ns, "basic-host", &root, "").await?;
    session(&client, ns, "s", "basic-host").await?;

    // processes: a process the test started, by pid and by name.
    let mut child = std::process::Command::new("sleep").arg("4242.5").spawn()?;
    let pid = child.id().to_string();
    let c = Cmd::new("s", "processes", &["-pid", &pid])
        .json()
        .run(&client, ns, "ps-pid")
        .await?;
    lr::succeeded(&c)?;
    let recs = lr::records(&c)?;
    ensure!(recs.len() == 1, "processes -pid {pid}: {recs:?}");
    ensure!(
        recs[0]["pid"].as_u64() == Some(u64::from(child.id())),
        "pid: {:?}",
        recs[0]
    );
    ensure!(
        recs[0]["ppid"].as_u64() == Some(u64::from(std::process::id())),
        "ppid: {:?}",
        recs[0]
    );
    ensure!(
        recs[0]["commandLine"]
            .as_str()
            .is_some_and(|l| l.contains("sleep 4242.5")),
        "{:?}",
        recs[0]
    );
    let c = Cmd::new("s", "processes", &["-name", "sleep"])
        .run(&client, ns, "ps-name")
        .await?;
    lr::succeeded(&c)?;
    ensure!(
        lr::content(&c).contains(&pid) && lr::content(&c).contains("4242.5"),
        "table: {}",
        lr::content(&c)
    );
    let _ = child.kill();
    let _ = child.wait();

    // connections: a TCP listener and a UDP socket of this test process.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let (tport, uport) = (tcp.local_addr()?.port(), udp.local_addr()?.port());
    // Table mode: on a busy machine the JSON of every socket passes the 64 KiB inline limit.
    let c = Cmd::new("s", "connections", &[])
        .run(&client, ns, "conns")
        .await?;
    lr::succeeded(&c)?;
    let table = lr::content(&c);
    let me = std::process::id().to_string();
    let row = |proto: &str, port: u16| {
        table.lines().find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first().is_some_and(|p| p.starts_with(proto))
                && f.get(2) == Some(&port.to_string().as_str())
        })
    };
    let t = row("tcp", tport)
        .with_context(|| format!("the TCP listener is missing from connections:\n{table}"))?;
    ensure!(
        t.contains("LISTEN") && t.split_whitespace().any(|f| f == me),
        "tcp row: {t}"
    );
    let u = row("udp", uport)
        .with_context(|| format!("the UDP socket is missing from connections:\n{table}"))?;
    ensure!(u.split_whitespace().any(|f| f == me), "udp row: {u}");
    drop((tcp, udp));

    // findfile and fileinfo on a file in folders with spaces and non-ASCII names.
    let c = Cmd::new("s", "findfile", &["evidence ü.txt", "-root", "/data"])
        .json()
        .run(&client, ns, "find")
        .await?;
    lr::succeeded(&c)?;
    let recs = lr::records(&c)?;
    let path = "/data/dossier é/sub dir/evidence ü.txt";
    ensure!(recs.iter().any(|r| r["path"] == path), "findfile: {recs:?}");
    let c = Cmd::new("s", "findfile", &["evid*.TXT"])
        .json()
        .run(&client, ns, "find-glob")
        .await?;
    ensure!(
        lr::records(&c)?.iter().any(|r| r["path"] == path),
        "findfile glob: {}",
        lr::content(&c)
    );
    let c = Cmd::new("s", "fileinfo", &[path])
        .json()
        .run(&client, ns, "info")
        .await?;
    lr::succeeded(&c)?;
    let info = lr::records(&c)?;
    let want = hex::encode(Sha256::digest(content.as_bytes()));
    ensure!(
        info[0]["size"].as_u64() == Some(content.len() as u64),
        "size: {:?}",
        info[0]
    );
    ensure!(
        info[0]["sha256"] == want.as_str(),
        "sha256 {:?}, want {want}",
        info[0]["sha256"]
    );

    // -auto runs the prerequisites first and records them as steps.
    let c = Cmd::new("s", "getfile", &[path, "-auto"])
        .run(&client, ns, "getfile-auto")
        .await?;
    let st = c.status.clone().context("no status")?;
    ensure!(st.steps.len() == 1, "steps: {:?}", st.steps);
    ensure!(
        st.steps[0].command_line.starts_with("fileinfo")
            && st.steps[0].phase == CommandPhase::Succeeded,
        "step: {:?}",
        st.steps[0]
    );
    // Then getfile itself: the file, verified by the sha256 the agent and operator agree on.
    lr::succeeded(&c)?;
    let file = st.file.context("getfile recorded no file")?;
    ensure!(
        file.sha256 == want && file.artifact.as_deref() == Some(want.as_str()),
        "getfile: {file:?}, want sha256 {want}"
    );

    // cd then dir: the session follows the working directory.
    let c = Cmd::new("s", "cd", &["/data/dossier é/sub dir"])
        .run(&client, ns, "cd")
        .await?;
    lr::succeeded(&c)?;
    let s: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    let wd = s.get("s").await?.status.and_then(|st| st.working_directory);
    ensure!(
        wd.as_deref() == Some("/data/dossier é/sub dir"),
        "workingDirectory {wd:?}"
    );
    let c = Cmd::new("s", "dir", &[]).run(&client, ns, "dir").await?;
    lr::succeeded(&c)?;
    ensure!(
        lr::content(&c).contains("evidence ü.txt"),
        "dir: {}",
        lr::content(&c)
    );
    let c = Cmd::new("s", "cd", &["/no/such/folder"])
        .run(&client, ns, "cd-bad")
        .await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed),
        "cd to a missing folder must fail"
    );

    // persistence: the planted cron entry and systemd unit, with where they were found.
    let c = Cmd::new("s", "persistence", &[])
        .json()
        .run(&client, ns, "persist")
        .await?;
    lr::succeeded(&c)?;
    let recs = lr::records(&c)?;
    ensure!(
        recs.iter().any(|r| r["location"] == "/etc/cron.d/evil"
            && r["command"]
                .as_str()
                .is_some_and(|x| x.contains("/tmp/evil.sh"))),
        "cron entry missing: {recs:?}"
    );
    ensure!(
        recs.iter().any(|r| r["mechanism"]
            .as_str()
            .is_some_and(|m| m.starts_with("systemd"))
            && r["command"]
                .as_str()
                .is_some_and(|x| x.contains("/tmp/evil --beacon"))),
        "systemd unit missing: {recs:?}"
    );

    // registry makes no sense on Linux, and says so.
    let c = Cmd::new("s", "registry", &[])
        .run(&client, ns, "reg")
        .await?;
    let err = c
        .status
        .as_ref()
        .and_then(|s| s.error.clone())
        .context("no error")?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && err.message.contains("not supported on linux"),
        "{err:?}"
    );

    // A big output is truncated in status with its full size and digest.
    for i in 0..1500 {
        write(
            &root,
            &format!("/big/file-with-a-rather-long-name-{i:05}.log"),
            "x",
        )?;
    }
    let c = Cmd::new(
        "s",
        "findfile",
        &["*.log", "-root", "/big", "-max_results", "5000"],
    )
    .json()
    .run(&client, ns, "big")
    .await?;
    lr::succeeded(&c)?;
    let out = c
        .status
        .as_ref()
        .and_then(|s| s.output.clone())
        .context("no output")?;
    ensure!(
        out.truncated && out.size > 65536 && out.content.len() <= 65536,
        "truncation: size {} inline {}",
        out.size,
        out.content.len()
    );
    ensure!(
        out.sha256.as_ref().is_some_and(|h| h.len() == 64),
        "no sha256"
    );

    // Transitions are recorded as Kubernetes Events on the objects.
    let events = env.cluster.kubectl_ok(
        "admin",
        &[
            "-n",
            ns,
            "get",
            "events",
            "-o",
            "custom-columns=R:.reason,O:.involvedObject.name",
            "--no-headers",
        ],
        None,
    )?;
    ensure!(
        events
            .lines()
            .any(|l| l.starts_with("Succeeded") && l.contains("ps-pid")),
        "no Succeeded event for ps-pid: {events}"
    );
    ensure!(
        events
            .lines()
            .any(|l| l.starts_with("Connected") && l.split_whitespace().nth(1) == Some("s")),
        "no Connected event for the session: {events}"
    );

    // A user cannot forge results.
    let basic = env.cluster.client("analyst-basic").await?;
    let r = Api::<Command>::namespaced(basic, ns)
        .patch_status(
            "ps-pid",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"phase": "Failed"}})),
        )
        .await;
    ensure!(
        is_forbidden(&r),
        "patching a command's status must be forbidden: {r:?}"
    );
    env.stack.kill_agent(ns, "basic-host");
    Ok(())
}

/// Settings and limits decide which sessions start; idle sessions expire; analysts end theirs.
pub async fn session_limits_and_lifecycle(env: &'static Env) -> Result<()> {
    let ns = "lr-limits";
    let root = host_root("limits")?;
    let client = setup(env, ns, "host-a", &root, "  maxSessions: 2\n").await?;
    env.stack.start_agent(ns, "host-b", &root, &[])?;
    env.stack.wait_device(ns, "host-b", true, T)?;

    session(&client, ns, "a1", "host-a").await?;
    lr::open_session(&client, ns, "a2", "host-a", "analyst-advanced", None).await?;
    let s = lr::wait_session(&client, ns, "a2", SessionPhase::Rejected, T).await?;
    let msg = s.status.and_then(|st| st.message).unwrap_or_default();
    ensure!(
        msg.contains("host-a") && msg.contains("sessionsPerDevice"),
        "second session to a device: {msg}"
    );
    session(&client, ns, "b1", "host-b").await?;
    lr::open_session(&client, ns, "c1", "host-c", "analyst-advanced", None).await?;
    let s = lr::wait_session(&client, ns, "c1", SessionPhase::Rejected, T).await?;
    let msg = s.status.and_then(|st| st.message).unwrap_or_default();
    ensure!(msg.contains("maxSessions 2"), "third session: {msg}");
    let dev: Api<Device> = Api::namespaced(client.clone(), ns);
    let active = dev
        .get("host-a")
        .await?
        .status
        .and_then(|s| s.active_session);
    ensure!(
        active.as_deref() == Some("a1"),
        "Device.status.activeSession {active:?}"
    );

    // Disconnecting ends the session and frees the device.
    lr::disconnect(&client, ns, "a1").await?;
    lr::wait_session(&client, ns, "a1", SessionPhase::Disconnected, T).await?;
    eventually("host-a to be free", T, || async {
        Ok(dev
            .get("host-a")
            .await?
            .status
            .and_then(|s| s.active_session)
            .is_none()
            .then_some(()))
    })
    .await?;

    // Deleting a session ends it and takes its commands with it (ownerReferences + GC).
    lr::succeeded(
        &Cmd::new("b1", "status", &[])
            .run(&client, ns, "b1-cmd")
            .await?,
    )?;
    let sessions: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    // Deleting erases the command log, so analysts may not; a settings admin may.
    ensure!(
        is_forbidden(&sessions.delete("b1", &Default::default()).await),
        "analysts must not delete sessions"
    );
    let admin: Api<LiveResponseSession> =
        Api::namespaced(env.cluster.client("settings-admin").await?, ns);
    admin.delete("b1", &Default::default()).await?;
    let commands: Api<Command> = Api::namespaced(client.clone(), ns);
    eventually("b1's command to be garbage-collected", T, || async {
        Ok(commands.get_opt("b1-cmd").await?.is_none().then_some(()))
    })
    .await?;
    eventually("b1 to be gone", T, || async {
        Ok(sessions.get_opt("b1").await?.is_none().then_some(()))
    })
    .await?;
    eventually("host-b to be free", T, || async {
        Ok(dev
            .get("host-b")
            .await?
            .status
            .and_then(|s| s.active_session)
            .is_none()
            .then_some(()))
    })
    .await?;

    // An idle session expires.
    lr::open_session(
        &client,
        ns,
        "idle",
        "host-a",
        "analyst-advanced",
        Some("3s"),
    )
    .await?;
    lr::wait_session(&client, ns, "idle", SessionPhase::Connected, T).await?;
    let s = lr::wait_session(
        &client,
        ns,
        "idle",
        SessionPhase::Expired,
        Duration::from_secs(30),
    )
    .await?;
    ensure!(
        s.status
            .and_then(|st| st.message)
            .is_some_and(|m| m.contains("idleTimeout")),
        "expiry message"
    );

    // Live response off: sessions are rejected with how to turn it on.
    for (tenant, settings) in [("lr-off", None), ("lr-disabled", Some("enabled: false"))] {
        let y = env.cluster.kubectl_ok(
            "admin",
            &[
                "create",
                "namespace",
                tenant,
                "--dry-run=client",
                "-o",
                "yaml",
            ],
            None,
        )?;
        env.cluster
            .kubectl_ok("admin", &["apply", "-f", "-"], Some(&y))?;
        if let Some(spec) = settings {
            let yaml = format!(
                "apiVersion: liveresponse.io/v1alpha1\nkind: LiveResponseSettings\nmetadata: {{name: default, namespace: {tenant}}}\nspec: {{{spec}}}\n"
            );
            env.cluster
                .kubectl_ok("admin", &["apply", "-f", "-"], Some(&yaml))?;
        }
        let admin = env.cluster.client("admin").await?;
        lr::open_session(&admin, tenant, "s", "any", "admin", None).await?;
        let s = lr::wait_session(&admin, tenant, "s", SessionPhase::Rejected, T).await?;
        let msg = s.status.and_then(|st| st.message).unwrap_or_default();
        ensure!(
            msg.contains("not enabled") && msg.contains("enabled: true"),
            "{tenant}: {msg}"
        );
    }
    env.stack.kill_agent(ns, "host-a");
    env.stack.kill_agent(ns, "host-b");
    Ok(())
}

/// CPU seconds (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Clock ticks of CPU a process uses over the next second: hashing keeps a core busy
/// (about 100), an idle agent uses almost none.
async fn cpu_in_one_second(pid: u32) -> Result<u64> {
    let before = cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(cpu_ticks(pid)?.saturating_sub(before))
}

/// Cancel stops the work on the device; a timeout ends the command TimedOut.
pub async fn cancel_and_timeout(env: &'static Env) -> Result<()> {
    let ns = "lr-cancel";
    let root = host_root("cancel")?;
    sparse(&root, "/huge.img", 400 << 30)?;
    let client = setup(env, ns, "busy", &root, "").await?;
    session(&client, ns, "s", "busy").await?;
    let agent = env
        .stack
        .agent_pid(ns, "busy")
        .context("agent not running")?;

    Cmd::new("s", "fileinfo", &["/huge.img"])
        .create(&client, ns, "hash")
        .await?;
    lr::wait_phase(&client, ns, "hash", T, |p| p == CommandPhase::Running).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = cpu_in_one_second(agent).await?;
    ensure!(
        busy >= 20,
        "the agent should be hashing (used {busy} ticks in 1s)"
    );
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    api.patch(
        "hash",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let c = lr::wait_final(&client, ns, "hash", Duration::from_secs(20)).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Cancelled),
        "phase {:?}",
        lr::phase(&c)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = cpu_in_one_second(agent).await?;
    ensure!(
        idle < 15,
        "the agent kept working after the cancel ({idle} ticks in 1s)"
    );
    // The agent itself no longer lists it.
    let c = Cmd::new("s", "status", &[])
        .json()
        .run(&client, ns, "status")
        .await?;
    lr::succeeded(&c)?;
    let uid = api.get("hash").await?.metadata.uid.unwrap_or_default();
    ensure!(
        !lr::content(&c).contains(&uid),
        "the agent still runs the cancelled command: {}",
        lr::content(&c)
    );

    let c = Cmd::new("s", "fileinfo", &["/huge.img"])
        .timeout(2)
        .run(&client, ns, "slow")
        .await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::TimedOut),
        "phase {:?}",
        lr::phase(&c)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        cpu_in_one_second(agent).await? < 15,
        "the agent kept working after the timeout"
    );
    env.stack.kill_agent(ns, "busy");
    Ok(())
}

/// Killing an agent disconnects its Device and fails its running command; a restarted agent
/// reconnects and works.
pub async fn agent_crash_and_return(env: &'static Env) -> Result<()> {
    let ns = "lr-crash";
    let root = host_root("crash")?;
    sparse(&root, "/huge.img", 400 << 30)?;
    let client = setup(env, ns, "flaky", &root, "").await?;
    session(&client, ns, "s", "flaky").await?;
    Cmd::new("s", "fileinfo", &["/huge.img"])
        .create(&client, ns, "long")
        .await?;
    lr::wait_phase(&client, ns, "long", T, |p| p == CommandPhase::Running).await?;
    let killed = Instant::now();
    env.stack.kill_agent(ns, "flaky");
    env.stack
        .wait_device(ns, "flaky", false, Duration::from_secs(15))?;
    // A brief disconnect is waited out (the agent may come back with the result): the
    // command fails once the operator's 30 s grace has passed.
    let c = lr::wait_final(&client, ns, "long", Duration::from_secs(50)).await?;
    let err = c
        .status
        .as_ref()
        .and_then(|s| s.error.clone())
        .context("no error")?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && err.reason == "DeviceDisconnected"
            && err.message.contains("disconnected"),
        "{:?} {err:?}",
        lr::phase(&c)
    );
    eprintln!(
        "agent killed -> Device disconnected and command failed in {:?}",
        killed.elapsed()
    );
    env.stack.start_agent(ns, "flaky", &root, &[])?;
    env.stack.wait_device(ns, "flaky", true, T)?;
    let c = Cmd::new("s", "processes", &["-pid", "1"])
        .run(&client, ns, "after")
        .await?;
    lr::succeeded(&c)?;
    env.stack.kill_agent(ns, "flaky");
    Ok(())
}

/// Only enrolled, current certificates may connect; identities cannot be taken over;
/// an incompatible agent is refused with a clear message.
pub async fn agent_identity_is_enforced(env: &'static Env) -> Result<()> {
    use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
    use liveresponse_api::proto::{
        AgentMessage, EnrollRequest, Hello, PROTOCOL_VERSION, agent_message,
    };
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let ns = "lr-identity";
    let root = host_root("identity")?;
    let stack = &env.stack;
    setup(env, ns, "alpha", &root, "").await?;
    let ca = std::fs::read_to_string(stack.ca_file())?;
    let gateway = stack.gateway()?;
    let tls = ClientTlsConfig::new()
        .domain_name("127.0.0.1")
        .ca_certificate(Certificate::from_pem(&ca));
    let hello = || AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            hostname: "alpha".into(),
            ..Default::default()
        })),
    };
    let attach = |tls: ClientTlsConfig| {
        let gateway = gateway.clone();
        async move {
            let ch = Endpoint::from_shared(gateway)?
                .tls_config(tls)?
                .connect()
                .await?;
            let r = AgentGatewayClient::new(ch)
                .attach(tokio_stream::iter(vec![hello()]))
                .await;
            Ok::<_, anyhow::Error>(r.map(|_| ()))
        }
    };

    // No certificate at all.
    match attach(tls.clone()).await {
        Ok(Err(s)) => ensure!(
            s.message().contains("client certificate is required"),
            "no cert: {s:?}"
        ),
        other => bail!("an agent without a certificate must be refused, got {other:?}"),
    }
    // A certificate naming alpha, but from another CA: the TLS handshake fails.
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names.push(rcgen::SanType::URI(
        format!("liveresponse://device/{ns}/alpha").try_into()?,
    ));
    let forged = p.self_signed(&key)?;
    let forged_tls = tls
        .clone()
        .identity(Identity::from_pem(forged.pem(), key.serialize_pem()));
    ensure!(
        !matches!(attach(forged_tls).await, Ok(Ok(()))),
        "a certificate from another CA must be refused"
    );

    // Enrolling as an already enrolled device is refused, even with a valid token.
    let token = std::fs::read_to_string(stack.bootstrap_token(ns)?)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let ch = Endpoint::from_shared(gateway.clone())?
        .tls_config(tls.clone())?
        .connect()
        .await?;
    let r = AgentGatewayClient::new(ch.clone())
        .enroll(EnrollRequest {
            namespace: ns.into(),
            bootstrap_token: token.clone(),
            device_name: "alpha".into(),
            csr_pem: csr.clone(),
            protocol_version: PROTOCOL_VERSION,
        })
        .await;
    ensure!(
        matches!(&r, Err(s) if s.message().contains("already enrolled")),
        "takeover of alpha: {r:?}"
    );
    let r = AgentGatewayClient::new(ch)
        .enroll(EnrollRequest {
            namespace: ns.into(),
            bootstrap_token: "wrong".into(),
            device_name: "gamma".into(),
            csr_pem: csr,
            protocol_version: PROTOCOL_VERSION,
        })
        .await;
    ensure!(
        matches!(&r, Err(s) if s.code() == tonic::Code::Unauthenticated),
        "bad token: {r:?}"
    );

    // alpha's own certificate works for alpha, and is refused once its Device is deleted.
    let dir = stack.agent_dir(ns, "alpha");
    let own = tls.clone().identity(Identity::from_pem(
        std::fs::read_to_string(dir.join("device.crt"))?,
        std::fs::read_to_string(dir.join("device.key"))?,
    ));
    stack.kill_agent(ns, "alpha");
    ensure!(
        matches!(attach(own.clone()).await, Ok(Ok(()))),
        "alpha's own certificate must be accepted"
    );
    env.cluster
        .kubectl_ok("admin", &["-n", ns, "delete", "lrdev", "alpha"], None)?;
    match attach(own).await {
        Ok(Err(s)) => ensure!(s.message().contains("revoked"), "deleted device: {s:?}"),
        other => bail!("a deleted device's certificate must be refused, got {other:?}"),
    }

    // An agent speaking another protocol version is refused and says why.
    stack.start_agent(ns, "beta", &root, &["--protocol-version", "99"])?;
    let log = stack.log(&format!("agent-{ns}-beta"));
    eventually("the incompatible agent to exit", T, || async {
        Ok(stack.agent_pid(ns, "beta").is_none().then_some(()))
    })
    .await?;
    let text = std::fs::read_to_string(log)?;
    ensure!(
        text.contains("protocol version 99 is not supported"),
        "agent log: {text}"
    );
    Ok(())
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(env: &Env) -> Result<String> {
    let url = env.stack.metrics_url()?;
    let out = std::process::Command::new("curl")
        .args(["-sf", &url])
        .output()?;
    ensure!(out.status.success(), "cannot scrape {url}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// /metrics counts what the test did.
pub async fn metrics_match_activity(env: &'static Env) -> Result<()> {
    let ns = "lr-metrics";
    let root = host_root("metrics")?;
    write(&root, "/etc/crontab", "0 * * * * root /usr/bin/true\n")?;
    let client = setup(env, ns, "counted", &root, "").await?;
    session(&client, ns, "s", "counted").await?;
    let before = scrape(env).await?;
    for i in 0..3 {
        lr::succeeded(
            &Cmd::new("s", "scheduledtasks", &[])
                .run(&client, ns, &format!("st-{i}"))
                .await?,
        )?;
    }
    let c = Cmd::new("s", "startupfolders", &["-bogus"])
        .create(&client, ns, "bad")
        .await;
    // A parse error is refused by the operator (admission lets the verb through).
    if c.is_ok() {
        lr::wait_final(&client, ns, "bad", T).await?;
    }
    let after = scrape(env).await?;
    let delta =
        |name: &str, labels: &str| metric(&after, name, labels) - metric(&before, name, labels);
    let ok = delta(
        "liveresponse_commands_total",
        r#"result="Succeeded",verb="scheduledtasks""#,
    ) + delta(
        "liveresponse_commands_total",
        r#"verb="scheduledtasks",result="Succeeded""#,
    );
    ensure!(
        ok == 3.0,
        "scheduledtasks Succeeded went up by {ok}, want 3:\n{after}"
    );
    let failed = delta(
        "liveresponse_commands_total",
        r#"result="Failed",verb="startupfolders""#,
    ) + delta(
        "liveresponse_commands_total",
        r#"verb="startupfolders",result="Failed""#,
    );
    ensure!(
        failed == 1.0,
        "startupfolders Failed went up by {failed}, want 1"
    );
    let count = delta(
        "liveresponse_command_duration_seconds_count",
        r#"verb="scheduledtasks""#,
    );
    ensure!(count == 3.0, "latency histogram count went up by {count}");
    ensure!(
        metric(&after, "liveresponse_agents_connected", "") >= 1.0,
        "agents_connected"
    );
    ensure!(
        metric(&after, "liveresponse_sessions", r#"phase="Connected""#) >= 1.0,
        "sessions gauge"
    );
    ensure!(
        after.contains("liveresponse_reconcile_errors_total")
            || after.contains("# HELP liveresponse_reconcile_errors_total"),
        "reconcile errors metric"
    );
    env.stack.kill_agent(ns, "counted");
    Ok(())
}

/// Median latency from Command creation to Succeeded for `processes` (reported, not asserted).
pub async fn processes_latency(env: &'static Env) -> Result<()> {
    let ns = "lr-latency";
    let root = host_root("latency")?;
    let client = setup(env, ns, "timed", &root, "").await?;
    session(&client, ns, "s", "timed").await?;
    let mut samples = Vec::new();
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    for i in 0..15 {
        let name = format!("p-{i}");
        let t = Instant::now();
        Cmd::new("s", "processes", &[])
            .create(&client, ns, &name)
            .await?;
        // Poll tightly: the shared helper's 200 ms poll would hide the real latency.
        loop {
            let c = api.get(&name).await?;
            if lr::phase(&c).is_some_and(CommandPhase::is_final) {
                lr::succeeded(&c)?;
                break;
            }
            ensure!(t.elapsed() < T, "processes did not finish");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let line = format!(
        "processes: median creation->Succeeded latency {median:?} over {} runs (min {:?}, max {:?})\n",
        samples.len(),
        samples[0],
        samples[samples.len() - 1]
    );
    eprint!("{line}");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(e2e::repo_root().join("e2e/.state/latency.txt"))?;
    f.write_all(line.as_bytes())?;
    env.stack.kill_agent(ns, "timed");
    Ok(())
}

/// Killing the operator mid-session loses no command: each reaches a final phase exactly
/// once, and the agent runs each exactly once. (Runs alone: it restarts the shared operator.)
pub async fn operator_restart_loses_nothing(env: &'static Env) -> Result<()> {
    let ns = "lr-restart";
    let root = host_root("restart")?;
    sparse(&root, "/medium.img", 3 << 30)?;
    let client = setup(env, ns, "steady", &root, "").await?;
    session(&client, ns, "s", "steady").await?;
    Cmd::new("s", "fileinfo", &["/medium.img"])
        .create(&client, ns, "r-0")
        .await?;
    let names: Vec<String> = (1..=4).map(|i| format!("r-{i}")).collect();
    for n in &names {
        Cmd::new("s", "processes", &["-pid", "1"])
            .create(&client, ns, n)
            .await?;
    }
    lr::wait_phase(&client, ns, "r-0", T, |p| p == CommandPhase::Running).await?;
    env.stack.kill_operator();
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.stack.start_operator()?;
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let mut all = vec!["r-0".to_string()];
    all.extend(names);
    for n in &all {
        let c = lr::wait_final(&client, ns, n, Duration::from_secs(120)).await?;
        lr::succeeded(&c)?;
    }
    // Each ran once on the agent.
    let log = std::fs::read_to_string(env.stack.log(&format!("agent-{ns}-steady")))?;
    for n in &all {
        let uid = api.get(n).await?.metadata.uid.unwrap_or_default();
        let runs = log
            .lines()
            .filter(|l| l.contains(&uid) && l.contains("\"running\""))
            .count();
        ensure!(runs == 1, "command {n} ran {runs} times on the agent");
    }
    env.stack.kill_agent(ns, "steady");
    Ok(())
}

/// Two replicas never both reconcile: a second operator waits for the Lease.
pub async fn second_replica_waits_for_the_lease(env: &'static Env) -> Result<()> {
    let log = env.stack.start_standby_operator()?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let text = std::fs::read_to_string(&log)?;
    env.stack.stop_standby_operator();
    ensure!(
        text.contains("waiting for the leader lease"),
        "standby log: {text}"
    );
    ensure!(
        !text.contains("\"leading\"") && !text.contains("agent gateway listening"),
        "a second replica started working while the first leads: {text}"
    );
    ensure!(
        env.stack.operator_pid().is_some(),
        "the leader must keep running"
    );
    Ok(())
}

/// Only a session's requester types in it: admission stamps each Command with its creator,
/// and the operator refuses commands from anyone else; nobody else may cancel them either.
pub async fn commands_belong_to_the_session_requester(env: &'static Env) -> Result<()> {
    use kube::ResourceExt;
    let ns = "lr-owner";
    let root = host_root("owner")?;
    let owner = setup(env, ns, "owned", &root, "").await?;
    session(&owner, ns, "s", "owned").await?;
    let intruder = env.cluster.client("analyst-basic").await?;

    // A forged annotation is overwritten with the real creator.
    let yaml = format!(
        "apiVersion: liveresponse.io/v1alpha1\nkind: Command\nmetadata:\n  name: sneaky\n  namespace: {ns}\n  annotations: {{liveresponse.io/requested-by: analyst-advanced}}\nspec: {{session: s, command: processes}}\n"
    );
    env.cluster
        .kubectl_ok("analyst-basic", &["create", "-f", "-"], Some(&yaml))?;
    let c = lr::wait_final(&intruder, ns, "sneaky", T).await?;
    let stamped = c.annotations().get("liveresponse.io/requested-by").cloned();
    ensure!(
        stamped.as_deref() == Some("analyst-basic"),
        "annotation {stamped:?}"
    );
    let err = c
        .status
        .as_ref()
        .and_then(|s| s.error.clone())
        .context("no error")?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && err.reason == "NotSessionOwner"
            && err.message.contains("belongs to analyst-advanced"),
        "{:?} {err:?}",
        lr::phase(&c)
    );

    // The owner's command cannot be cancelled, or re-attributed, by someone else.
    let c = Cmd::new("s", "processes", &[])
        .run(&owner, ns, "mine")
        .await?;
    lr::succeeded(&c)?;
    let api: Api<Command> = Api::namespaced(intruder.clone(), ns);
    let r = api
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await;
    ensure!(
        matches!(&r, Err(kube::Error::Api(s)) if s.message.contains("belongs to analyst-advanced")),
        "someone else's cancel must be refused: {r:?}"
    );
    let r = Api::<Command>::namespaced(owner.clone(), ns)
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"liveresponse.io/requested-by": "someone"}}})),
        )
        .await;
    ensure!(
        matches!(&r, Err(kube::Error::Api(s)) if s.message.contains("cannot change")),
        "the annotation must be immutable: {r:?}"
    );
    env.stack.kill_agent(ns, "owned");
    Ok(())
}
