//! `lr-sim-agents`: N simulated devices in one process, for benchmarks and fleet tests.
//!
//! Each device is a real agent as far as the operator can tell: it enrolls with a bootstrap
//! token (its own key, CSR and client certificate, kept in its own state folder), then keeps
//! the agent's own connection loop (mTLS stream, hello, heartbeats, renewals) and executor.
//! Only the provider differs: it answers from a small fixed fixture at once, so the cost
//! measured is the control plane's, not the host's. All devices share one tokio runtime.
//!
//! The agent cannot label its Device (the enrollment protocol carries no labels); whoever
//! runs the fleet labels the Devices (`kubectl label lrdev ...`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use liveresponse_agent::connection::{Connector, hello};
use liveresponse_agent::content::Files;
use liveresponse_agent::enroll::{Identityfiles, enroll_endpoint, enroll_over};
use liveresponse_agent::executor::Executor;
use liveresponse_agent::logging::SessionLevels;
use liveresponse_agent::sim::SimProvider;
use rand::Rng;
use tokio::sync::Semaphore;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(about = "Runs N simulated live response agents in one process")]
struct Args {
    /// Gateway URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "LR_GATEWAY")]
    gateway: String,
    /// Name in the gateway's certificate (defaults to the URL's host).
    #[arg(long)]
    gateway_name: Option<String>,
    /// Parent folder: each device keeps its key, certificate and CA in `DIR/DEVICE`.
    #[arg(long)]
    state_dir: PathBuf,
    /// The operator's CA certificate (PEM), to trust the gateway while enrolling.
    #[arg(long)]
    ca_file: PathBuf,
    /// Tenant namespace the devices enroll into.
    #[arg(long)]
    namespace: String,
    /// Files holding bootstrap tokens of that namespace; device i uses token i mod n.
    /// Several tokens spread the enrollments: each one counts its uses with a
    /// compare-and-set on its Secret, which concurrent enrollments contend for.
    #[arg(long = "bootstrap-token-file", required = true)]
    bootstrap_token_files: Vec<PathBuf>,
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Number of the first device (devices are `PREFIX` + five digits).
    #[arg(long, default_value_t = 1)]
    first: usize,
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Enrollments (and first connections) in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Enroll device i from its own loopback address (127.64.0.0/10, all of it this host's),
    /// as separate hosts would: the gateway limits enrollments per source address and
    /// minute. Only for a gateway on loopback.
    #[arg(long)]
    loopback_sources: bool,
}

/// Device i's own address in 127.64.0.0/10 (skipping .0 and .255 of each /24).
fn loopback_source(i: usize) -> IpAddr {
    let n = (i % (64 * 256 * 254)) as u32;
    let host = n % 254 + 1;
    let rest = n / 254;
    IpAddr::V4(Ipv4Addr::new(
        127,
        64 + (rest / 256) as u8,
        (rest % 256) as u8,
        host as u8,
    ))
}

struct Fleet {
    args: Args,
    domain: String,
    ca: String,
    tokens: Vec<String>,
    levels: SessionLevels,
    enrolled: AtomicUsize,
    failed: AtomicUsize,
}

impl Fleet {
    /// Enrolls device `i` unless its state folder already holds an identity; returns its
    /// connector.
    async fn prepare(&self, i: usize) -> Result<Connector> {
        let device = format!("{}{:05}", self.args.prefix, i);
        let dir = self.args.state_dir.join(&device);
        let files = Identityfiles::new(&dir);
        if !files.enrolled() {
            let token = &self.tokens[i % self.tokens.len()];
            let mut pause = Duration::from_millis(200);
            let mut attempt = 0;
            loop {
                let mut endpoint = enroll_endpoint(&self.args.gateway, &self.domain, &self.ca)?
                    .connect_timeout(Duration::from_secs(10));
                if self.args.loopback_sources {
                    endpoint = endpoint.local_address(Some(loopback_source(i)));
                }
                match enroll_over(&files, endpoint, &self.args.namespace, &device, token).await {
                    Ok(()) => break,
                    // Contention on the token's use counter and the gateway's rate limit
                    // both pass; a refusal that lasts is reported.
                    Err(e) if attempt < 8 => {
                        attempt += 1;
                        tracing::debug!(%device, error = %format!("{e:#}"), "enrollment failed; retrying");
                        let jitter = rand::rng().random_range(0.5..1.5);
                        tokio::time::sleep(pause.mul_f64(jitter)).await;
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(e.context(format!("enrolling {device}"))),
                }
            }
            self.enrolled.fetch_add(1, Ordering::Relaxed);
        }
        files.finish_renewal()?;
        files.tls(&self.domain)?;
        let executor = Executor::new(Box::new(SimProvider), dir.clone(), self.levels.clone());
        executor.set_gateway(&self.args.gateway);
        executor.set_files(Files::new(dir.clone(), None));
        let mut hello = hello(&executor, &dir);
        hello.hostname = device;
        hello.os_version = "simulated (lr-sim-agents)".to_owned();
        Ok(Connector {
            gateway: self.args.gateway.clone(),
            domain: self.domain.clone(),
            files,
            hello,
            executor,
        })
    }
}

fn main() {
    // Quiet by default: ten thousand agents saying "connected" is noise; progress lines
    // go to stdout instead.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lr-sim-agents: cannot start a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(Args::parse())) {
        eprintln!("lr-sim-agents: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let domain = match &args.gateway_name {
        Some(n) => n.clone(),
        None => args
            .gateway
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':']).next())
            .map(str::to_string)
            .context("cannot read the host of --gateway; pass --gateway-name")?,
    };
    let ca = std::fs::read_to_string(&args.ca_file)
        .with_context(|| format!("reading {}", args.ca_file.display()))?;
    let mut tokens = Vec::new();
    for f in &args.bootstrap_token_files {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading the bootstrap token from {}", f.display()))?;
        tokens.push(t.trim().to_string());
    }
    if tokens.iter().any(String::is_empty) {
        bail!("a bootstrap token file is empty");
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let (count, first, concurrency) = (args.count, args.first, args.concurrency.max(1));
    let fleet = Arc::new(Fleet {
        args,
        domain,
        ca,
        tokens,
        levels: SessionLevels::new("warn".to_string()),
        enrolled: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let gate = Arc::new(Semaphore::new(concurrency));
    let started = std::time::Instant::now();
    let mut prepared = tokio::task::JoinSet::new();
    for i in first..first + count {
        let (mine, permit) = (fleet.clone(), gate.clone().acquire_owned().await?);
        prepared.spawn(async move {
            let connector = mine.prepare(i).await;
            drop(permit);
            match connector {
                Ok(c) => {
                    // A device runs until a fatal refusal (revoked, incompatible).
                    let e = c.run().await;
                    tracing::error!(device = %c.hello.hostname, error = %format!("{e:#}"), "simulated agent stopped");
                }
                Err(e) => {
                    mine.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("lr-sim-agents: {e:#}");
                }
            }
        });
        let done = i + 1 - first;
        if done % 500 == 0 {
            println!(
                "lr-sim-agents: started {done}/{count} ({} enrolled now, {} failed) after {:.1}s",
                fleet.enrolled.load(Ordering::Relaxed),
                fleet.failed.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }
    // The last permits come back once every device enrolled (or gave up).
    let _all = gate.acquire_many(concurrency as u32).await?;
    println!(
        "lr-sim-agents: all {count} started ({} enrolled now, {} failed) after {:.1}s",
        fleet.enrolled.load(Ordering::Relaxed),
        fleet.failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    while prepared.join_next().await.is_some() {}
    bail!("every simulated agent stopped")
}
