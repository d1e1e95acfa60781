//! `lr-bench-getfile` (`make bench-getfile`): how fast getfile moves a 750 MiB file from an
//! agent into the operator's artifact store, next to `scp` and `ssh cat` of the same file
//! on loopback, and how much resident memory the operator needs for it.
//!
//! It brings up its own control plane, operator and agent in `e2e/.state/bench` (so it
//! meets neither the tests nor the demo), and its own `sshd` on a free port of 127.0.0.1,
//! installing Debian's `openssh-server` when there is none. getfile is timed from the
//! Command's creation to `Succeeded`, which includes dispatch, both sides' hashing and the
//! store; the OpenSSH runs from the client's start to its exit, handshake included.
//! Every copy is checked against the file's sha256. It stops everything it started.
//!
//! It reports; it does not judge: a missed target is printed, and only an error (a failed
//! transfer, a wrong digest, a process left running) makes it exit non-zero. Use optimised
//! binaries (`LR_PROFILE=release`, as `make bench-getfile` does) for numbers worth keeping.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::Cluster;
use e2e::bench::{
    Sshd, clock_ticks, cpu_secs, ensure_sshd, keep_logs, now_utc, openssh_version, run_ok,
    stack_down, survivors,
};
use e2e::lr::{self, Cmd};
use e2e::process::{RssSampler, reset_hwm, vm_hwm, vm_rss};
use e2e::stack::Stack;
use kube::Client;
use kube::api::{Api, DeleteParams};
use kube::runtime::wait::await_condition;
use liveresponse_api::crd::{Command, SessionPhase};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// The size the issue names: large enough that start-up costs fade, small enough to run
/// in a minute or two.
const SIZE: u64 = 750 * MIB;
/// Runs per method unless `LR_BENCH_RUNS` says otherwise (more on a noisy machine).
const RUNS: usize = 3;
const NS: &str = "lr-bench";
const DEVICE: &str = "bench";
/// The file's name in the agent's host root (its path as the device sees it).
const FILE: &str = "bench.bin";
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const RSS_TARGET: u64 = 64 * MIB;
const SCP_SHARE_TARGET: f64 = 0.5;
/// One transfer must not take longer; far beyond any plausible speed.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn runs() -> usize {
    std::env::var("LR_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(RUNS)
}

fn state() -> PathBuf {
    e2e::repo_root().join("e2e/.state/bench")
}

/// Times of one way of copying the file.
struct Method {
    name: &'static str,
    secs: Vec<f64>,
    /// CPU seconds of both ends (sender and receiver) in each run.
    cpu: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Method {
    fn median(&self) -> f64 {
        median(&self.secs)
    }

    fn mib_per_s(&self) -> f64 {
        mib(SIZE) / self.median()
    }

    fn median_cpu(&self) -> f64 {
        median(&self.cpu)
    }
}

/// The operator's resident memory around the getfile runs.
struct Rss {
    baseline: u64,
    /// Highest VmRSS sampled during each run.
    run_peaks: Vec<u64>,
    /// VmHWM at the end, counted from just before the baseline.
    hwm: u64,
    after: u64,
    samples: usize,
}

impl Rss {
    fn peak(&self) -> u64 {
        self.run_peaks.iter().copied().fold(self.hwm, u64::max)
    }

    fn growth(&self) -> u64 {
        self.peak().saturating_sub(self.baseline)
    }
}

struct Outcome {
    methods: Vec<Method>,
    rss: Rss,
    agent_hwm: Option<u64>,
    openssh: String,
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes `SIZE` random bytes to `path` and returns their sha256. Random, so nothing on
/// the way (a compressing link, a deduplicating store) can make it cheaper than it is.
fn make_file(path: &Path) -> Result<String> {
    let mut random = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut out =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..SIZE / MIB {
        random.read_exact(&mut buf)?;
        h.update(&buf);
        out.write_all(&buf)?;
    }
    out.sync_all()?;
    Ok(hex::encode(h.finalize()))
}

/// Flushes dirty pages, so one run's writes are not paid for by the next.
fn sync() {
    let _ = Proc::new("sync").status();
}

/// `scp` and `ssh cat` of `src`, [`runs`] times each, every copy checked.
fn openssh_runs(dir: &Path, src: &Path, want: &str) -> Result<Vec<Method>> {
    let mut sshd = Sshd::start(&dir.join("ssh"))?;
    let dest = dir.join("ssh-copy.bin");
    let quoted = format!("'{}'", src.to_string_lossy().replace('\'', r"'\''"));
    let mut scp = Method {
        name: "scp",
        secs: Vec::new(),
        cpu: Vec::new(),
    };
    let mut cat = Method {
        name: "ssh cat",
        secs: Vec::new(),
        cpu: Vec::new(),
    };
    let ticks = clock_ticks();
    let sshd_pid = sshd
        .child
        .as_ref()
        .map(|c| c.id().to_string())
        .context("sshd is not running")?;
    // The server side of a connection is counted once sshd has reaped it.
    let sshd_cpu = || -> Result<f64> {
        let children = format!("/proc/{sshd_pid}/task/{sshd_pid}/children");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&children).is_ok_and(|c| !c.trim().is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        cpu_secs(&sshd_pid, ticks)
    };
    for i in 0..runs() {
        for m in [&mut scp, &mut cat] {
            let _ = std::fs::remove_file(&dest);
            sync();
            let cpu_before = cpu_secs("self", ticks)? + sshd_cpu()?;
            let started = Instant::now();
            if m.name == "scp" {
                run_ok("scp", &mut sshd.scp(src, &dest))?;
            } else {
                let out = std::fs::File::create(&dest)?;
                run_ok(
                    "ssh cat",
                    sshd.ssh().arg("cat").arg(&quoted).stdout(Stdio::from(out)),
                )?;
            }
            let secs = started.elapsed().as_secs_f64();
            let cpu = cpu_secs("self", ticks)? + sshd_cpu()? - cpu_before;
            ensure!(
                sha256_of(&dest)? == want,
                "{} run {}: the copy differs from the file",
                m.name,
                i + 1
            );
            eprintln!(
                "bench: {} run {}: {secs:.2}s, {:.0} MiB/s, {cpu:.2} CPU seconds",
                m.name,
                i + 1,
                mib(SIZE) / secs
            );
            m.secs.push(secs);
            m.cpu.push(cpu);
        }
    }
    let _ = std::fs::remove_file(&dest);
    sshd.stop()?;
    Ok(vec![scp, cat])
}

/// A getfile of `path` as `client`; its artifact is checked and deleted, so the next run
/// stores the content again instead of finding it (the store is content-addressed), and
/// its Command is deleted by `admin` (analysts may not delete the command log).
async fn getfile(
    stack: &Stack,
    client: &Client,
    admin: &Client,
    name: &str,
    path: &str,
    want: &str,
) -> Result<f64> {
    let started = Instant::now();
    Cmd::new("s", "getfile", &[path])
        .create(client, NS, name)
        .await?;
    let api: Api<Command> = Api::namespaced(client.clone(), NS);
    // A watch, not polling: it sees the final phase as soon as the API server has it.
    let done = await_condition(api, name, |c: Option<&Command>| {
        c.and_then(lr::phase).is_some_and(|p| p.is_final())
    });
    let c = tokio::time::timeout(RUN_TIMEOUT, done)
        .await
        .with_context(|| format!("getfile {name} did not finish within {RUN_TIMEOUT:?}"))??
        .with_context(|| format!("the Command {name} disappeared"))?;
    let secs = started.elapsed().as_secs_f64();
    lr::succeeded(&c)?;
    let file = c
        .status
        .and_then(|s| s.file)
        .context("a Succeeded getfile without status.file")?;
    ensure!(
        file.sha256 == want,
        "getfile {name}: sha256 {} is not the file's {want}",
        file.sha256
    );
    let artifact = file.artifact.context("no artifact in status.file")?;
    let stored = stack.artifact_dir().join("objects/sha256").join(&artifact);
    ensure!(
        sha256_of(&stored)? == want,
        "getfile {name}: the stored artifact differs from the file"
    );
    std::fs::remove_file(&stored)?;
    Api::<Command>::namespaced(admin.clone(), NS)
        .delete(name, &DeleteParams::default())
        .await?;
    Ok(secs)
}

async fn getfile_runs(
    stack: &Stack,
    root: &Path,
    want: &str,
) -> Result<(Method, Rss, Option<u64>)> {
    stack.tenant(NS, "")?;
    stack.start_agent(NS, DEVICE, root, &[])?;
    stack.wait_device(NS, DEVICE, true, Duration::from_secs(60))?;
    let client = stack.cluster.client("analyst-advanced").await?;
    let admin = stack.cluster.client("admin").await?;
    lr::open_session(&client, NS, "s", DEVICE, "analyst-advanced", None).await?;
    lr::wait_session(
        &client,
        NS,
        "s",
        SessionPhase::Connected,
        Duration::from_secs(60),
    )
    .await?;
    // One small getfile first, untimed: the first command of a session pays for things
    // (caches, connections) that a transfer of any size pays only once.
    std::fs::write(root.join("warmup.txt"), "warm-up\n")?;
    let small = hex::encode(Sha256::digest(b"warm-up\n"));
    getfile(stack, &client, &admin, "warmup", "/warmup.txt", &small).await?;

    let pid = stack
        .operator_pid()
        .context("the operator is not running")?;
    reset_hwm(pid)?;
    let baseline = RssSampler::start(pid, SAMPLE_EVERY, Duration::from_secs(2))?
        .stop()
        .baseline;
    let mut method = Method {
        name: "getfile",
        secs: Vec::new(),
        cpu: Vec::new(),
    };
    let ticks = clock_ticks();
    let agent = stack
        .agent_pid(NS, DEVICE)
        .context("the agent is not running")?
        .to_string();
    let both =
        || -> Result<f64> { Ok(cpu_secs(&pid.to_string(), ticks)? + cpu_secs(&agent, ticks)?) };
    let (mut run_peaks, mut samples) = (Vec::new(), 0);
    for i in 0..runs() {
        sync();
        let sampler = RssSampler::start(pid, SAMPLE_EVERY, Duration::ZERO)?;
        let cpu_before = both()?;
        let secs = getfile(
            stack,
            &client,
            &admin,
            &format!("getfile-{}", i + 1),
            &format!("/{FILE}"),
            want,
        )
        .await;
        let seen = sampler.stop();
        let secs = secs?;
        let cpu = both()? - cpu_before;
        eprintln!(
            "bench: getfile run {}: {secs:.2}s, {:.0} MiB/s, {cpu:.2} CPU seconds, operator RSS peak {:.1} MiB",
            i + 1,
            mib(SIZE) / secs,
            mib(seen.peak)
        );
        method.secs.push(secs);
        method.cpu.push(cpu);
        run_peaks.push(seen.peak);
        samples += seen.samples;
    }
    let rss = Rss {
        baseline,
        run_peaks,
        hwm: vm_hwm(pid)?,
        after: vm_rss(pid)?,
        samples,
    };
    let agent_hwm = stack.agent_pid(NS, DEVICE).and_then(|p| vm_hwm(p).ok());
    Ok((method, rss, agent_hwm))
}

async fn bench(dir: &Path) -> Result<Outcome> {
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    ensure_sshd()?;
    let src = root.join(FILE);
    eprintln!(
        "bench: writing {} MiB of random bytes to {}",
        SIZE / MIB,
        src.display()
    );
    let want = make_file(&src)?;
    // OpenSSH first, alone on the machine: no control plane runs yet to take its cores.
    let mut methods = openssh_runs(dir, &src, &want)?;
    let cluster_dir = dir.join("cluster");
    let measured = async {
        let cluster = Cluster::up(&cluster_dir)?;
        let stack = Stack::up(cluster)?;
        getfile_runs(&stack, &root, &want).await
    }
    .await;
    // The stack's folder goes with the control plane; its logs say where time went.
    keep_logs(&cluster_dir.join("stack"), &dir.join("logs"));
    let stopped = stack_down(&cluster_dir);
    let (getfile, rss, agent_hwm) = measured?;
    stopped?;
    methods.insert(0, getfile);
    Ok(Outcome {
        methods,
        rss,
        agent_hwm,
        openssh: openssh_version(),
    })
}

fn report(dir: &Path, o: &Outcome) -> Result<()> {
    let find = |n: &str| o.methods.iter().find(|m| m.name == n);
    let (Some(getfile), Some(scp)) = (find("getfile"), find("scp")) else {
        bail!("a method has no runs");
    };
    let ratio = getfile.mib_per_s() / scp.mib_per_s();
    let fast_enough = ratio >= SCP_SHARE_TARGET;
    let lean_enough = o.rss.growth() < RSS_TARGET;
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "getfile benchmark: one {} MiB random file, {} runs per method, {} binaries, {cores} cores",
        SIZE / MIB,
        runs(),
        e2e::stack::profile_dir()
    );
    println!("MiB/s = 1048576 bytes per second; the median run of each method");
    println!();
    println!(
        "{:<10} {:>8} {:>8} {:>6} {:>5}  all runs (s)",
        "method", "MiB/s", "seconds", "CPU s", "runs"
    );
    for m in &o.methods {
        let all: Vec<String> = m.secs.iter().map(|s| format!("{s:.2}")).collect();
        println!(
            "{:<10} {:>8.0} {:>8.2} {:>6.2} {:>5}  {}",
            m.name,
            m.mib_per_s(),
            m.median(),
            m.median_cpu(),
            m.secs.len(),
            all.join(" ")
        );
    }
    println!(
        "CPU s: both ends of the copy (getfile: operator and agent, not the API server; scp and ssh: client and sshd)"
    );
    println!();
    println!(
        "getfile / scp: {ratio:.2} (target >= {SCP_SHARE_TARGET}: {})",
        met(fast_enough)
    );
    println!(
        "operator RSS: baseline {:.1} MiB, peak {:.1} MiB (VmHWM {:.1} MiB), growth {:.1} MiB (target < {} MiB: {}); {:.1} MiB after",
        mib(o.rss.baseline),
        mib(o.rss.peak()),
        mib(o.rss.hwm),
        mib(o.rss.growth()),
        RSS_TARGET / MIB,
        met(lean_enough),
        mib(o.rss.after)
    );
    if let Some(a) = o.agent_hwm {
        println!("agent peak RSS (VmHWM): {:.1} MiB", mib(a));
    }
    println!("OpenSSH: {} (its default cipher; scp over SFTP)", o.openssh);
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let json = serde_json::json!({
        "date": now_utc(),
        "cores": cores,
        "profile": e2e::stack::profile_dir(),
        "file_bytes": SIZE,
        "runs": runs(),
        "unit": "MiB/s (1 MiB = 1048576 bytes), median run",
        "methods": o.methods.iter().map(|m| serde_json::json!({
            "method": m.name,
            "mib_per_s": round(m.mib_per_s()),
            "median_seconds": round(m.median()),
            "runs_seconds": m.secs.iter().map(|s| round(*s)).collect::<Vec<_>>(),
            "median_cpu_seconds": round(m.median_cpu()),
            "runs_cpu_seconds": m.cpu.iter().map(|s| round(*s)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "getfile_to_scp": round(ratio),
        "operator_rss_mib": {
            "baseline": round(mib(o.rss.baseline)),
            "peak": round(mib(o.rss.peak())),
            "vm_hwm": round(mib(o.rss.hwm)),
            "growth": round(mib(o.rss.growth())),
            "after": round(mib(o.rss.after)),
            "run_peaks": o.rss.run_peaks.iter().map(|p| round(mib(*p))).collect::<Vec<_>>(),
            "samples": o.rss.samples,
            "sample_interval_ms": SAMPLE_EVERY.as_millis() as u64,
        },
        "agent_vm_hwm_mib": o.agent_hwm.map(|a| round(mib(a))),
        "targets": {
            "getfile_at_least_half_of_scp": fast_enough,
            "operator_rss_growth_under_64_mib": lean_enough,
        },
        "openssh": o.openssh,
    });
    let out = dir.join("getfile.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!(
        "written to {}; the stack's logs are in {}",
        out.display(),
        dir.join("logs").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = state();
    if e2e::stack::profile_dir() != "release" {
        eprintln!(
            "bench: warning: debug binaries (LR_PROFILE is not release); `make bench-getfile` builds and uses the release ones"
        );
    }
    // What an interrupted earlier run left running or lying around.
    if let Err(e) = stack_down(&dir.join("cluster")) {
        eprintln!("bench: stopping what an earlier run left: {e:#}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let result = std::fs::create_dir_all(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting a tokio runtime")
        })
        .and_then(|rt| rt.block_on(bench(&dir)));
    // The file and the copies are large; the numbers are in getfile.json.
    let _ = std::fs::remove_dir_all(dir.join("root"));
    let result = result.and_then(|o| report(&dir, &o));
    let result = match survivors(&dir) {
        Ok(left) if left.is_empty() => result,
        Ok(left) => {
            eprintln!(
                "lr-bench-getfile: processes of the benchmark are still running:\n{}",
                left.join("\n")
            );
            result.and_then(|()| bail!("the benchmark left processes running"))
        }
        Err(e) => result.and_then(|()| Err(e)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lr-bench-getfile: {e:#}");
            ExitCode::FAILURE
        }
    }
}
