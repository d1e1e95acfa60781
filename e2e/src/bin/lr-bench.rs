//! `lr-bench` (`make bench`): the live response pipeline measured against its floor and
//! against OpenSSH on the same machine, in one run (issue 12).
//!
//! It brings up its own control plane in `e2e/.state/bench/fleet`, and measures:
//! - OpenSSH on loopback first, alone on the machine: `ps` warm (ControlMaster) and cold,
//!   and 20 cold connections in parallel;
//! - the floor, before the operator exists: a Command created by the analyst, a stand-in
//!   controller in this process that sees it through a watch and patches its status twice
//!   (Running, then Succeeded with a small output), and the analyst's watch seeing
//!   `Succeeded`. Same kind, same admission policies, same API server and etcd; what the
//!   operator, gateway and agent add is the rest;
//! - then the operator, one real agent and `BENCH_AGENTS` simulated ones (`lr-sim-agents`):
//!   round trips (create → `Succeeded` seen by a watch) on the real agent and a simulated
//!   one; throughput across up to `BENCH_THROUGHPUT_DEVICES` simulated devices, each with
//!   its own session; fan-out of one BatchCommand to 100 and 1,000 devices; operator RSS
//!   and CPU over `BENCH_IDLE_SECONDS` with every simulated agent connected and idle; the
//!   real agent's idle RSS.
//!
//! It reports; targets are printed, never asserted. Results: stdout and
//! `e2e/.state/bench/bench.json` (with `getfile.json` of `lr-bench-getfile` when present).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::Cluster;
use e2e::bench::{
    Sshd, clock_ticks, cpu_secs, ensure_sshd, keep_logs, now_utc, openssh_version, run_ok,
    stack_down, survivors,
};
use e2e::lr::{self, Cmd};
use e2e::process::vm_rss;
use e2e::stack::Stack;
use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use liveresponse_api::crd::{
    BatchCommand, BatchSpec, Command, CommandPhase, Device, LiveResponseSession, SessionPhase,
};
use tokio::sync::{Semaphore, oneshot};

const NS: &str = "lr-bench";
const SIM_NS: &str = "lr-sim";
const DEVICE: &str = "bench";
const USER: &str = "analyst-advanced";
const MIB: f64 = 1048576.0;
/// What OpenSSH runs: the columns `processes` gives.
const PS: &str = "ps -e -o pid,ppid,user,rss,args";
/// Extra bootstrap tokens for the fleet's enrollment (see `lr-sim-agents --help`).
const TOKENS: usize = 8;
/// Simulated devices started first: those the round trips, throughput and fan-out use.
const FIRST_BATCH: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Config {
    agents: usize,
    runs: usize,
    throughput_devices: usize,
    idle_secs: u64,
}

fn config() -> Config {
    let agents = env_usize("BENCH_AGENTS", 10_000).max(1);
    Config {
        agents,
        runs: env_usize("BENCH_RUNS", 50).max(3),
        // One fewer than the first batch: sim-00001 keeps the round trips' session.
        throughput_devices: env_usize("BENCH_THROUGHPUT_DEVICES", 999)
            .clamp(1, agents.min(FIRST_BATCH).saturating_sub(1).max(1)),
        idle_secs: env_usize("BENCH_IDLE_SECONDS", 30).max(5) as u64,
    }
}

fn dir() -> PathBuf {
    e2e::repo_root().join("e2e/.state/bench")
}

#[derive(Default, Clone, serde::Serialize)]
struct Dist {
    samples_ms: Vec<f64>,
}

impl Dist {
    fn push(&mut self, d: Duration) {
        self.samples_ms.push(d.as_secs_f64() * 1000.0);
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.samples_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i.min(v.len() - 1)]
    }
    fn p50(&self) -> f64 {
        self.pct(0.5)
    }
    fn p99(&self) -> f64 {
        self.pct(0.99)
    }
}

enum Slot {
    Waiting(oneshot::Sender<(Option<CommandPhase>, Instant)>),
    Done,
}

/// One watch on a namespace's Commands for the whole run: a waiter registers a name before
/// creating it and learns when the watch delivered its final phase.
#[derive(Clone)]
struct Finals {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl Finals {
    async fn start(client: &Client, ns: &str) -> Result<Self> {
        let slots: Arc<Mutex<HashMap<String, Slot>>> = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel();
        let api: Api<Command> = Api::namespaced(client.clone(), ns);
        let s = slots.clone();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events =
                std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(ev) = events.next().await {
                let c = match ev {
                    Ok(watcher::Event::Apply(c)) | Ok(watcher::Event::InitApply(c)) => c,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let phase = lr::phase(&c);
                if !phase.is_some_and(CommandPhase::is_final) {
                    continue;
                }
                let at = Instant::now();
                let mut m = s.lock().unwrap_or_else(|p| p.into_inner());
                match m.remove(&c.name_any()) {
                    Some(Slot::Waiting(tx)) => {
                        let _ = tx.send((phase, at));
                        m.insert(c.name_any(), Slot::Done);
                    }
                    Some(done) => {
                        m.insert(c.name_any(), done);
                    }
                    None => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .context("the Command watch did not start")??;
        Ok(Self { slots })
    }

    fn expect(&self, name: &str) -> oneshot::Receiver<(Option<CommandPhase>, Instant)> {
        let (tx, rx) = oneshot::channel();
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Slot::Waiting(tx));
        rx
    }
}

/// Create → final phase seen by the watch; fails unless `Succeeded`.
async fn round_trip(
    client: &Client,
    finals: &Finals,
    ns: &str,
    session: &str,
    name: &str,
    verb: &str,
    args: &[&str],
) -> Result<Duration> {
    let done = finals.expect(name);
    let t = Instant::now();
    Cmd::new(session, verb, args)
        .create(client, ns, name)
        .await?;
    let (phase, at) = tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .with_context(|| format!("{name} did not finish within 60s"))??;
    if phase != Some(CommandPhase::Succeeded) {
        let c = Api::<Command>::namespaced(client.clone(), ns)
            .get(name)
            .await?;
        lr::succeeded(&c)?;
    }
    Ok(at.duration_since(t))
}

/// The stand-in controller of the floor: every new Command of `ns` gets two status
/// patches, as the least an operator does (it takes the command, then reports it).
fn floor_controller(admin: Client, ns: &str) -> tokio::task::JoinHandle<()> {
    let api: Api<Command> = Api::namespaced(admin, ns);
    // The times' values cost nothing to write; asking the clock per patch would.
    let now = now_utc();
    tokio::spawn(async move {
        let mut events =
            std::pin::pin!(watcher(api.clone(), watcher::Config::default()).default_backoff());
        while let Some(ev) = events.next().await {
            let Ok(watcher::Event::Apply(c)) = ev else {
                continue;
            };
            if lr::phase(&c).is_some() {
                continue;
            }
            let (api, name, now) = (api.clone(), c.name_any(), now.clone());
            tokio::spawn(async move {
                let pp = PatchParams::default();
                let running = serde_json::json!({"status": {"phase": "Running", "id": 1,
                    "commandLine": "processes", "startTime": now}});
                let done = serde_json::json!({"status": {"phase": "Succeeded", "exitCode": 0,
                    "completionTime": now, "duration": "0s",
                    "output": {"format": "json", "content": FLOOR_OUTPUT}}});
                if let Err(e) = api.patch_status(&name, &pp, &Patch::Merge(running)).await {
                    eprintln!("bench: floor: patching {name}: {e}");
                    return;
                }
                if let Err(e) = api.patch_status(&name, &pp, &Patch::Merge(done)).await {
                    eprintln!("bench: floor: patching {name}: {e}");
                }
            });
        }
    })
}

/// About what a simulated device's `processes` answer weighs.
const FLOOR_OUTPUT: &str = r#"[{"pid":1,"ppid":0,"name":"systemd","user":"root","memory":12582912,"commandLine":"/sbin/init"},{"pid":421,"ppid":1,"name":"sshd","user":"root","memory":7340032,"commandLine":"sshd: /usr/sbin/sshd -D [listener]"},{"pid":4242,"ppid":421,"name":"bash","user":"analyst","memory":5242880,"commandLine":"-bash --login"}]"#;

async fn open_session(client: &Client, ns: &str, name: &str, device: &str) -> Result<()> {
    lr::open_session(client, ns, name, device, USER, Some("1h")).await
}

/// Waits until `want` sessions of `ns` whose names start with `prefix` are Connected.
async fn wait_sessions(client: &Client, ns: &str, prefix: &str, want: usize) -> Result<()> {
    let api: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let list = api.list(&ListParams::default()).await?;
        let ours: Vec<_> = list
            .items
            .iter()
            .filter(|s| s.name_any().starts_with(prefix))
            .collect();
        if let Some(ended) = ours.iter().find(|s| {
            s.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(|p| p.is_final())
        }) {
            bail!("session {} ended: {:?}", ended.name_any(), ended.status);
        }
        let connected = ours
            .iter()
            .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Connected))
            .count();
        if connected >= want {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(600),
            "only {connected} of {want} sessions {prefix}* connected within 600s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Connected Devices of `ns`, counted page by page.
async fn connected_devices(client: &Client, ns: &str) -> Result<usize> {
    let api: Api<Device> = Api::namespaced(client.clone(), ns);
    let mut lp = ListParams::default().limit(1000);
    let mut n = 0;
    loop {
        let page = api.list(&lp).await?;
        n += page
            .items
            .iter()
            .filter(|d| d.status.as_ref().is_some_and(|s| s.connected))
            .count();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(n),
        }
    }
}

async fn wait_connected(stack: &Stack, admin: &Client, want: usize, sims: &str) -> Result<f64> {
    let start = Instant::now();
    let limit = Duration::from_secs(300 + want as u64 / 10);
    loop {
        let n = connected_devices(admin, SIM_NS).await?;
        if n >= want {
            return Ok(start.elapsed().as_secs_f64());
        }
        ensure!(
            stack.sim_agents_pid(sims).is_some(),
            "lr-sim-agents ({sims}) exited:\n{}",
            stack.tail(sims)
        );
        ensure!(
            start.elapsed() < limit,
            "only {n} of {want} simulated devices connected within {limit:?}:\n{}",
            stack.tail(sims)
        );
        eprintln!(
            "bench: {n}/{want} simulated devices connected after {:.0}s",
            start.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn sim(i: usize) -> String {
    format!("sim-{i:05}")
}

#[derive(Default, serde::Serialize)]
struct Results {
    ssh_warm: Dist,
    ssh_cold: Dist,
    ssh_parallel20_wall_ms: f64,
    ssh_parallel20: Dist,
    floor: Dist,
    real: Dist,
    sim: Dist,
    throughput_devices: usize,
    throughput_commands: usize,
    throughput_per_s: f64,
    /// Commands that did not finish within 60 s, with the phase they were left in.
    throughput_stuck: Vec<String>,
    fanout: Vec<serde_json::Value>,
    agents: usize,
    enroll_connect_secs: f64,
    operator_rss_mib_before_fleet: f64,
    operator_rss_mib_idle: f64,
    operator_cpu_pct_idle: f64,
    sim_process_rss_mib: f64,
    agent_idle_rss_mib: f64,
}

/// OpenSSH: warm (one master connection), cold, and 20 cold at once.
fn openssh(dir: &Path, runs: usize, r: &mut Results) -> Result<()> {
    let mut sshd = Sshd::start(&dir.join("ssh"))?;
    let sock = dir.join("ssh/master.sock");
    run_ok(
        "ssh master",
        sshd.ssh()
            .args(["-M", "-S"])
            .arg(&sock)
            .args(["-o", "ControlPersist=yes", "-f", "-N"]),
    )?;
    for _ in 0..runs {
        let t = Instant::now();
        run_ok("ssh ps (warm)", sshd.ssh().arg("-S").arg(&sock).arg(PS))?;
        r.ssh_warm.push(t.elapsed());
    }
    let _ = sshd
        .ssh()
        .arg("-S")
        .arg(&sock)
        .args(["-O", "exit"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    for _ in 0..runs.min(20) {
        let t = Instant::now();
        run_ok("ssh ps (cold)", sshd.ssh().arg(PS))?;
        r.ssh_cold.push(t.elapsed());
    }
    let t = Instant::now();
    let children: Vec<_> = (0..20)
        .map(|_| {
            sshd.ssh()
                .arg(PS)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for c in children {
        let out = c.wait_with_output()?;
        ensure!(
            out.status.success(),
            "parallel ssh ps failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        r.ssh_parallel20.push(t.elapsed());
    }
    r.ssh_parallel20_wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    sshd.stop()
}

/// Creates `n` more bootstrap token Secrets in `ns`; returns their files.
fn extra_tokens(stack: &Stack, ns: &str, n: usize) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for i in 0..n {
        let token = format!("{:016x}{:016x}", rand_u64(), rand_u64());
        let secret = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: liveresponse-bootstrap-bench-{i}\n  namespace: {ns}\n  labels: {{liveresponse.io/bootstrap-token: \"true\"}}\nstringData: {{token: \"{token}\"}}\n"
        );
        stack
            .cluster
            .kubectl_ok("admin", &["apply", "-f", "-"], Some(&secret))?;
        let f = stack.dir.join(format!("{ns}-bench-{i}.token"));
        std::fs::write(&f, &token)?;
        files.push(f);
    }
    Ok(files)
}

fn rand_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

/// Every session runs its commands one after the other (a session's commands are
/// ordered); sessions run side by side. Returns (commands, seconds).
async fn throughput(
    client: &Client,
    finals: &Finals,
    devices: usize,
    per_session: usize,
) -> Result<(usize, f64, Vec<String>)> {
    let gate = Arc::new(Semaphore::new(256));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=devices {
        let (client, finals, gate) = (client.clone(), finals.clone(), gate.clone());
        tasks.spawn(async move {
            let (mut done, mut stuck) = (0usize, Vec::new());
            for k in 0..per_session {
                let _p = gate.acquire().await?;
                let name = format!("t-{i}-{k}");
                match round_trip(
                    &client,
                    &finals,
                    SIM_NS,
                    &format!("t-{i}"),
                    &name,
                    "processes",
                    &[],
                )
                .await
                {
                    Ok(_) => done += 1,
                    // A command that never ends is a finding to report, not a reason to
                    // lose the other measurements.
                    Err(e) if format!("{e:#}").contains("did not finish within") => {
                        let phase = Api::<Command>::namespaced(client.clone(), SIM_NS)
                            .get(&name)
                            .await
                            .ok()
                            .and_then(|c| lr::phase(&c))
                            .map_or("no phase".to_string(), |p| format!("{p:?}"));
                        stuck.push(format!("{name} ({phase})"));
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            anyhow::Ok((done, stuck))
        });
    }
    let (mut n, mut stuck) = (0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (done, s) = r??;
        n += done;
        stuck.extend(s);
    }
    Ok((n, t.elapsed().as_secs_f64(), stuck))
}

/// One BatchCommand of `processes` to the first `n` simulated devices; seconds from its
/// creation until the watch sees it final with every device final.
async fn fanout(client: &Client, n: usize) -> Result<serde_json::Value> {
    let api: Api<BatchCommand> = Api::namespaced(client.clone(), SIM_NS);
    let name = format!("fanout-{n}");
    let spec = BatchSpec {
        selector: None,
        devices: (1..=n).map(sim).collect(),
        command: "processes".into(),
        args: Vec::new(),
        max_concurrency: i32::try_from(n).unwrap_or(10_000),
        timeout_seconds: None,
        reason: Some("make bench".into()),
        cancel: false,
    };
    let b = BatchCommand::new(&name, spec);
    let t = Instant::now();
    api.create(&PostParams::default(), &b).await?;
    let cond = kube::runtime::wait::await_condition(api, &name, |b: Option<&BatchCommand>| {
        b.and_then(|b| b.status.as_ref())
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_final())
    });
    let b = tokio::time::timeout(Duration::from_secs(600), cond)
        .await
        .with_context(|| format!("{name} did not finish within 600s"))??
        .with_context(|| format!("{name} disappeared"))?;
    let secs = t.elapsed().as_secs_f64();
    let st = b.status.unwrap_or_default();
    Ok(serde_json::json!({
        "devices": n, "seconds": secs, "phase": format!("{:?}", st.phase),
        "succeeded": st.counts.succeeded, "failed": st.counts.failed,
        "timed_out": st.counts.timed_out, "total": st.total,
    }))
}

async fn bench(cfg: &Config, dir: &Path) -> Result<Results> {
    let mut r = Results {
        agents: cfg.agents,
        ..Results::default()
    };
    ensure_sshd()?;
    eprintln!("bench: OpenSSH on loopback");
    openssh(dir, cfg.runs, &mut r)?;
    let cluster_dir = dir.join("fleet");
    let measured = async {
        let cluster = Cluster::up(&cluster_dir)?;
        let stack = Stack {
            dir: cluster.state.join("stack"),
            cluster,
            children: Default::default(),
        };
        std::fs::create_dir_all(&stack.dir)?;
        stack.install_api()?;
        let sessions = "  maxSessions: 10000\n  sessionsPerUser: 10000\n  idleTimeout: 1h\n";
        stack.tenant(NS, sessions)?;
        stack.tenant(SIM_NS, sessions)?;
        let client = stack.cluster.client(USER).await?;
        let admin = stack.cluster.client("admin").await?;

        eprintln!("bench: the floor (no operator running)");
        open_session(&client, NS, "floor", DEVICE).await?;
        let finals = Finals::start(&client, NS).await?;
        let fake = floor_controller(admin.clone(), NS);
        for i in 0..cfg.runs + 3 {
            let d =
                round_trip(&client, &finals, NS, "floor", &format!("floor-{i}"), "processes", &[])
                    .await?;
            // The first few pay for connections and caches.
            if i >= 3 {
                r.floor.push(d);
            }
        }
        fake.abort();
        // The operator must not meet them.
        stack.cluster.kubectl_ok("admin", &["-n", NS, "delete", "commands.liveresponse.io,liveresponsesessions.liveresponse.io", "--all"], None)?;

        eprintln!("bench: starting the operator, a real agent and the simulated fleet");
        // Created by hand above, since Stack::up would start the operator before the floor.
        stack
            .cluster
            .kubectl_ok("admin", &["create", "namespace", e2e::stack::OPERATOR_NAMESPACE], None)?;
        // The production heartbeat, not the tests' 2 s.
        stack.start_operator_with(&["--heartbeat-seconds".into(), "5".into()])?;
        stack.start_agent(NS, DEVICE, Path::new("/"), &[])?;
        stack.wait_device(NS, DEVICE, true, Duration::from_secs(60))?;
        let tokens = extra_tokens(&stack, SIM_NS, TOKENS)?;
        let first = cfg.agents.min(FIRST_BATCH);
        stack.start_sim_agents("sims-a", SIM_NS, 1, first, &tokens, &["--loopback-sources", "--concurrency", "16"])?;
        wait_connected(&stack, &admin, first, "sims-a").await?;

        eprintln!("bench: round trips");
        open_session(&client, NS, "s-real", DEVICE).await?;
        open_session(&client, SIM_NS, "s-sim", &sim(1)).await?;
        lr::wait_session(&client, NS, "s-real", SessionPhase::Connected, Duration::from_secs(60)).await?;
        lr::wait_session(&client, SIM_NS, "s-sim", SessionPhase::Connected, Duration::from_secs(60)).await?;
        let finals = Finals::start(&client, NS).await?;
        let sim_finals = Finals::start(&client, SIM_NS).await?;
        for i in 0..cfg.runs + 3 {
            let d = round_trip(&client, &finals, NS, "s-real", &format!("real-{i}"), "processes", &[]).await?;
            let s = round_trip(&client, &sim_finals, SIM_NS, "s-sim", &format!("sim-{i}"), "processes", &[]).await?;
            if i >= 3 {
                r.real.push(d);
                r.sim.push(s);
            }
        }
        r.operator_rss_mib_before_fleet = stack.operator_pid().map_or(Ok(0), vm_rss)? as f64 / MIB;

        eprintln!("bench: throughput over {} simulated devices", cfg.throughput_devices);
        // sim-00001 keeps its round-trip session (one session per device): these start
        // at sim-00002.
        for i in 1..=cfg.throughput_devices {
            open_session(&client, SIM_NS, &format!("t-{i}"), &sim(i + 1)).await?;
        }
        wait_sessions(&client, SIM_NS, "t-", cfg.throughput_devices).await?;
        let (n, secs, stuck) = throughput(&client, &sim_finals, cfg.throughput_devices, 3).await?;
        r.throughput_stuck = stuck;
        r.throughput_devices = cfg.throughput_devices;
        r.throughput_commands = n;
        r.throughput_per_s = n as f64 / secs;
        // Their sessions end, so the fan-out's child sessions are the only ones left.
        stack.cluster.kubectl_ok("admin", &["-n", SIM_NS, "delete", "liveresponsesessions.liveresponse.io", "--all", "--wait=false"], None)?;

        for n in [100, 1000] {
            if n > first {
                r.fanout.push(serde_json::json!({"devices": n, "skipped": format!("only {first} simulated devices")}));
                continue;
            }
            eprintln!("bench: fan-out to {n} devices");
            match fanout(&client, n).await {
                Ok(v) => r.fanout.push(v),
                Err(e) => r.fanout.push(serde_json::json!({"devices": n, "error": format!("{e:#}")})),
            }
        }

        if cfg.agents > first {
            eprintln!("bench: {} more simulated devices", cfg.agents - first);
            stack.start_sim_agents("sims-b", SIM_NS, first + 1, cfg.agents - first, &tokens, &["--loopback-sources", "--concurrency", "16"])?;
        }
        let t = Instant::now();
        wait_connected(&stack, &admin, cfg.agents, if cfg.agents > first { "sims-b" } else { "sims-a" }).await?;
        r.enroll_connect_secs = t.elapsed().as_secs_f64();
        // Let the connection storm's work (status patches) drain before idling counts.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let op = stack.operator_pid().context("the operator is not running")?;
        let ticks = clock_ticks();
        let c0 = cpu_secs(&op.to_string(), ticks)?;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(cfg.idle_secs)).await;
        let c1 = cpu_secs(&op.to_string(), ticks)?;
        r.operator_cpu_pct_idle = (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0;
        r.operator_rss_mib_idle = vm_rss(op)? as f64 / MIB;
        let still = connected_devices(&admin, SIM_NS).await?;
        ensure!(still >= cfg.agents, "only {still} of {} simulated devices stayed connected while idle", cfg.agents);
        r.sim_process_rss_mib = ["sims-a", "sims-b"]
            .iter()
            .filter_map(|n| stack.sim_agents_pid(n))
            .filter_map(|p| vm_rss(p).ok())
            .sum::<u64>() as f64
            / MIB;
        r.agent_idle_rss_mib = stack.agent_pid(NS, DEVICE).map_or(Ok(0), vm_rss)? as f64 / MIB;
        anyhow::Ok(())
    }
    .await;
    keep_logs(&cluster_dir.join("stack"), &dir.join("logs"));
    let stopped = stack_down(&cluster_dir);
    measured?;
    stopped?;
    Ok(r)
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn report(cfg: &Config, dir: &Path, r: &Results) -> Result<String> {
    use std::fmt::Write;
    let mut o = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        o,
        "live response benchmark: {} binaries, {cores} cores, {} simulated devices, {} runs per round trip",
        e2e::stack::profile_dir(),
        cfg.agents,
        cfg.runs
    )?;
    writeln!(o)?;
    writeln!(
        o,
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "round trip of `processes` / `ps` (ms)", "p50", "p99", "/floor", "/warm ssh"
    )?;
    let floor = r.floor.p50();
    let warm = r.ssh_warm.p50();
    for (name, d, ours) in [
        ("floor: create, 2 status patches, watch", &r.floor, false),
        ("live response, real agent", &r.real, true),
        ("live response, simulated agent", &r.sim, true),
        ("ssh ps, warm (ControlMaster)", &r.ssh_warm, false),
        ("ssh ps, cold (new connection)", &r.ssh_cold, false),
        (
            "ssh ps, 20 cold in parallel (each)",
            &r.ssh_parallel20,
            false,
        ),
    ] {
        let (rf, rs) = if ours {
            (ratio(d.p50(), floor), ratio(d.p50(), warm))
        } else {
            ("".into(), "".into())
        };
        writeln!(
            o,
            "{name:<44} {:>9.1} {:>9.1} {rf:>9} {rs:>9}",
            d.p50(),
            d.p99()
        )?;
    }
    writeln!(
        o,
        "20 cold ssh ps in parallel, all done after {:.0} ms",
        r.ssh_parallel20_wall_ms
    )?;
    writeln!(o)?;
    writeln!(
        o,
        "throughput: {:.0} commands/s ({} commands over {} simulated devices, one session each)",
        r.throughput_per_s, r.throughput_commands, r.throughput_devices
    )?;
    if !r.throughput_stuck.is_empty() {
        writeln!(
            o,
            "throughput: {} command(s) did not finish within 60 s: {}",
            r.throughput_stuck.len(),
            r.throughput_stuck.join(", ")
        )?;
    }
    for f in &r.fanout {
        writeln!(o, "fan-out: {f}")?;
    }
    if r.fanout.is_empty() {
        writeln!(o, "fan-out: BatchCommand not available yet")?;
    }
    writeln!(
        o,
        "fleet: {} simulated devices enrolled and connected in {:.0}s after the first {}",
        r.agents,
        r.enroll_connect_secs,
        r.agents.min(FIRST_BATCH)
    )?;
    writeln!(
        o,
        "operator with {} idle connected agents: RSS {:.1} MiB (before the fleet: {:.1} MiB), CPU {:.1}% of a core",
        r.agents, r.operator_rss_mib_idle, r.operator_rss_mib_before_fleet, r.operator_cpu_pct_idle
    )?;
    writeln!(
        o,
        "lr-sim-agents RSS: {:.1} MiB ({:.1} KiB per simulated agent)",
        r.sim_process_rss_mib,
        r.sim_process_rss_mib * 1024.0 / r.agents as f64
    )?;
    writeln!(o, "real agent idle RSS: {:.1} MiB", r.agent_idle_rss_mib)?;
    writeln!(o)?;
    writeln!(o, "targets (issue 12, reported, not asserted):")?;
    writeln!(
        o,
        "  round trip p50 <= 1.5x floor: real {} sim {}",
        met(r.real.p50() <= 1.5 * floor),
        met(r.sim.p50() <= 1.5 * floor)
    )?;
    writeln!(
        o,
        "  round trip p50 <= warm ssh: real {} sim {}",
        met(r.real.p50() <= warm),
        met(r.sim.p50() <= warm)
    )?;
    let fan1000 = r
        .fanout
        .iter()
        .find(|f| f["devices"] == 1000)
        .and_then(|f| f["seconds"].as_f64());
    writeln!(
        o,
        "  fan-out to 1000 <= 5 s: {}",
        fan1000.map_or("not measured", |s| met(s <= 5.0))
    )?;
    let full = r.agents >= 10_000;
    writeln!(
        o,
        "  10,000 idle agents: operator RSS <= 250 MB {}, CPU <= 5% {}{}",
        met(r.operator_rss_mib_idle * MIB <= 250e6),
        met(r.operator_cpu_pct_idle <= 5.0),
        if full {
            ""
        } else {
            " (fewer agents than the target's 10,000)"
        }
    )?;
    writeln!(
        o,
        "  agent idle RSS <= 15 MB: {}",
        met(r.agent_idle_rss_mib * MIB <= 15e6)
    )?;
    writeln!(o, "OpenSSH: {}", openssh_version())?;
    let getfile: Option<serde_json::Value> = std::fs::read_to_string(dir.join("getfile.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(g) = &getfile {
        writeln!(
            o,
            "getfile (lr-bench-getfile, getfile.json): {} x scp, operator RSS growth {} MiB",
            g["getfile_to_scp"], g["operator_rss_mib"]["growth"]
        )?;
    }
    let json = serde_json::json!({
        "date": now_utc(),
        "cores": cores,
        "profile": e2e::stack::profile_dir(),
        "config": {"agents": cfg.agents, "runs": cfg.runs, "throughput_devices": cfg.throughput_devices, "idle_seconds": cfg.idle_secs},
        "round_trip_ms": {
            "floor": {"p50": r.floor.p50(), "p99": r.floor.p99()},
            "real_agent": {"p50": r.real.p50(), "p99": r.real.p99()},
            "simulated_agent": {"p50": r.sim.p50(), "p99": r.sim.p99()},
            "ssh_warm": {"p50": r.ssh_warm.p50(), "p99": r.ssh_warm.p99()},
            "ssh_cold": {"p50": r.ssh_cold.p50(), "p99": r.ssh_cold.p99()},
            "ssh_cold_20_parallel_each": {"p50": r.ssh_parallel20.p50(), "p99": r.ssh_parallel20.p99()},
        },
        "ratios": {
            "real_over_floor": r.real.p50() / floor, "sim_over_floor": r.sim.p50() / floor,
            "real_over_warm_ssh": r.real.p50() / warm, "sim_over_warm_ssh": r.sim.p50() / warm,
        },
        "results": r,
        "getfile": getfile,
    });
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    writeln!(o, "written to {}", dir.join("bench.json").display())?;
    Ok(o)
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = config();
    let dir = dir();
    if e2e::stack::profile_dir() != "release" {
        eprintln!(
            "bench: warning: debug binaries (LR_PROFILE is not release); `make bench` uses the release ones"
        );
    }
    if let Err(e) = stack_down(&dir.join("fleet")) {
        eprintln!("bench: stopping what an earlier run left: {e:#}");
    }
    // getfile.json of `lr-bench-getfile`, run just before by `make bench`, stays.
    let _ = std::fs::remove_dir_all(dir.join("fleet"));
    let _ = std::fs::remove_dir_all(dir.join("ssh"));
    let result = std::fs::create_dir_all(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting a tokio runtime")
        })
        .and_then(|rt| rt.block_on(bench(&cfg, &dir)))
        .and_then(|r| report(&cfg, &dir, &r));
    let result = match (result, survivors(&dir)) {
        (Ok(text), Ok(left)) if left.is_empty() => Ok(text),
        (Ok(_), Ok(left)) => Err(anyhow::anyhow!(
            "the benchmark left processes running:\n{}",
            left.join("\n")
        )),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lr-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
