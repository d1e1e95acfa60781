//! `liveresponse-agent`: the endpoint agent. It enrolls once with a bootstrap token, then
//! keeps a stream to the operator's gateway and runs the commands it receives.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use liveresponse_agent::connection::{Connector, hello};
use liveresponse_agent::content::Files;
use liveresponse_agent::enroll::{Identityfiles, enroll};
use liveresponse_agent::executor::Executor;
use liveresponse_agent::logging::{SessionLevels, json_layer};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(version, about = "Live response agent")]
struct Args {
    /// Gateway URL, e.g. https://127.0.0.1:8443.
    #[arg(long, env = "LR_GATEWAY")]
    gateway: String,
    /// Name in the gateway's certificate (defaults to the URL's host).
    #[arg(long)]
    gateway_name: Option<String>,
    /// Folder for the agent's key, certificate and the operator's CA.
    #[arg(
        long,
        env = "LR_STATE_DIR",
        default_value = "/var/lib/liveresponse-agent"
    )]
    state_dir: PathBuf,
    /// The operator's CA certificate (PEM), to trust the gateway while enrolling.
    #[arg(long, env = "LR_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Tenant namespace to enroll into.
    #[arg(long, env = "LR_NAMESPACE")]
    namespace: Option<String>,
    /// File holding a bootstrap token of that namespace (needed only to enroll).
    #[arg(long, env = "LR_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// Device name to enroll as (defaults to the host name, lowercased).
    #[arg(long, env = "LR_DEVICE")]
    device: Option<String>,
    /// The host's filesystem as the agent sees it: / on the host, /host in a DaemonSet.
    #[arg(long, env = "LR_HOST_ROOT", default_value = "/")]
    host_root: PathBuf,
    /// Most bytes per second getfile sends (`50Mi`, `1Gi`, or bytes), so a transfer does
    /// not fill a slow or shared link. Unlimited when unset.
    #[arg(long, env = "LR_TRANSFER_RATE_LIMIT", value_parser = parse_rate)]
    transfer_rate_limit: Option<u64>,
    /// Folder putfile puts library files in (default: `drop` in the state folder). Files
    /// put without `-keep` are removed when the agent starts again.
    #[arg(long, env = "LR_DROP_DIR")]
    drop_dir: Option<PathBuf>,
    /// An SSH allowed-signers file: when given, putfile and run accept only library files
    /// signed by one of its keys, whatever the namespace's settings say.
    #[arg(long, env = "LR_TRUSTED_SIGNERS")]
    trusted_signers: Option<PathBuf>,
    /// Protocol version to announce (only to test how an incompatible agent is refused).
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
}

/// `50Mi`, `1Gi`, `500Ki` or a number of bytes, per second.
fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let mul: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: write bytes per second as 500Ki, 50Mi, 1Gi or a number"
            ));
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: write a positive rate such as 50Mi"))
}

#[tokio::main]
async fn main() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let levels = SessionLevels::new(filter.to_string());
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(json_layer(filter, levels.clone(), std::io::stdout))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = run(Args::parse(), levels).await {
        tracing::error!(error = %format!("{e:#}"), "agent stopped");
        eprintln!("liveresponse-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args, levels: SessionLevels) -> Result<()> {
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
    let files = Identityfiles::new(&args.state_dir);
    if !files.enrolled() {
        let (Some(ns), Some(token_file), Some(ca_file)) =
            (&args.namespace, &args.bootstrap_token_file, &args.ca_file)
        else {
            bail!(
                "this agent is not enrolled yet ({} holds no certificate): pass --namespace, --bootstrap-token-file and --ca-file to enroll",
                args.state_dir.display()
            );
        };
        let token = std::fs::read_to_string(token_file).with_context(|| {
            format!("reading the bootstrap token from {}", token_file.display())
        })?;
        let ca = std::fs::read_to_string(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?;
        let device = match &args.device {
            Some(d) => d.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_lowercase())
                .unwrap_or_default(),
        };
        enroll(
            &files,
            &args.gateway,
            &domain,
            &ca,
            ns,
            &device,
            token.trim(),
        )
        .await?;
        // The token is a bearer secret: once it has served, it must not lie around on the
        // host. A read-only mount (a Secret volume) is the admin's to remove.
        match std::fs::remove_file(token_file) {
            Ok(()) => {
                tracing::info!(file = %token_file.display(), "enrolled; removed the bootstrap token file")
            }
            Err(e) => {
                tracing::warn!(file = %token_file.display(), error = %e, "enrolled, but could not remove the bootstrap token file: remove it by hand")
            }
        }
    }
    let executor = Executor::new(
        liveresponse_agent::provider::for_this_os(),
        args.host_root.clone(),
        levels,
    );
    executor.set_transfer_rate(args.transfer_rate_limit);
    executor.set_gateway(&args.gateway);
    let mut library = Files::new(args.state_dir.clone(), args.drop_dir.clone());
    if let Some(path) = &args.trusted_signers {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --trusted-signers {}", path.display()))?;
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        liveresponse_api::signing::parse_signers(&lines)
            .map_err(|e| anyhow::anyhow!("--trusted-signers {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), signers = lines.len(), "only library files signed by these keys are used");
        library.own_signers = Some(lines);
    }
    library.clean_drop();
    // An isolation recorded before a reboot holds again before anything else talks.
    #[cfg(target_os = "linux")]
    match liveresponse_agent::provider::linux::isolate::reapply(&args.state_dir, &args.gateway) {
        Ok(Some(r)) => {
            tracing::warn!(since = %r.since, by = %r.by, "the device is isolated: the isolation was applied again")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "the device is recorded as isolated, but the isolation could not be applied again")
        }
    }
    executor.set_files(library);
    let mut hello = hello(&executor, &args.host_root);
    if let Some(v) = args.protocol_version {
        hello.protocol_version = v;
    }
    // A renewal stored just before a crash is finished before anything reads the pair.
    files.finish_renewal()?;
    // Fails now, with the reason, rather than retrying a connection that cannot succeed.
    files.tls(&domain)?;
    let connector = Connector {
        gateway: args.gateway.clone(),
        domain,
        files,
        hello,
        executor,
    };
    Err(connector.run().await)
}
