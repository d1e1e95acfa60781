//! The connection loop: one long-lived stream to the gateway, reconnected with jittered
//! exponential backoff. The stream's identity is the agent's certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{
    AgentMessage, Heartbeat, Hello, PROTOCOL_VERSION, RenewRequest, agent_message, operator_message,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Endpoint;

use crate::enroll::{Identityfiles, new_key_and_csr};
use crate::executor::Executor;

/// How long to wait for an answer to a renewal, or after a refusal, before asking again.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Why a connection ended.
pub enum Ended {
    /// Try again after a pause.
    Retry(anyhow::Error),
    /// Retrying cannot help (revoked certificate, incompatible protocol): stop the agent.
    Fatal(anyhow::Error),
}

pub struct Connector {
    pub gateway: String,
    /// The name in the gateway's certificate.
    pub domain: String,
    /// Read at each connection: a renewal or a new CA bundle takes effect on the next one.
    pub files: Identityfiles,
    pub hello: Hello,
    pub executor: Arc<Executor>,
}

impl Connector {
    /// Runs until a fatal error.
    pub async fn run(&self) -> anyhow::Error {
        let mut backoff = Duration::from_millis(500);
        loop {
            let (ended, welcomed) = self.once().await;
            // A connection the gateway accepted starts the backoff over.
            if welcomed {
                backoff = Duration::from_millis(500);
            }
            match ended {
                Ended::Fatal(e) => return e,
                Ended::Retry(e) => {
                    // Jitter spreads a fleet's reconnects after a gateway restart.
                    let jitter = rand::rng().random_range(0.5..1.5);
                    let pause = backoff.mul_f64(jitter);
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = pause.as_millis() as u64, "disconnected from the gateway");
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn once(&self) -> (Ended, bool) {
        let mut welcomed = false;
        let ended = self.stream(&mut welcomed).await;
        (ended, welcomed)
    }

    async fn stream(&self, welcomed: &mut bool) -> Ended {
        let tls = match self.files.tls(&self.domain) {
            Ok(t) => t,
            Err(e) => return Ended::Fatal(e),
        };
        let channel = match Endpoint::from_shared(self.gateway.clone())
            .and_then(|e| e.tls_config(tls))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(10))
                    .tcp_keepalive(Some(Duration::from_secs(20)))
            }) {
            Ok(e) => match e.connect().await {
                Ok(c) => c,
                Err(e) => return Ended::Retry(anyhow!("cannot reach {}: {e}", self.gateway)),
            },
            Err(e) => return Ended::Fatal(anyhow!("bad gateway address {}: {e}", self.gateway)),
        };
        // Bounded in bytes too: a getfile's chunks are 1 MiB each, and a deep queue of them
        // is agent memory (and delays the other events of the device behind them).
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(self.hello.clone())),
        };
        if tx.send(hello).await.is_err() {
            return Ended::Retry(anyhow!("stream closed"));
        }
        self.executor.set_channel(Some(channel.clone()));
        let resp = AgentGatewayClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await;
        let mut inbound = match resp {
            Ok(r) => r.into_inner(),
            Err(s) => return classify(s),
        };
        let mut heartbeat = Duration::from_secs(5);
        let mut beat: Option<tokio::task::JoinHandle<()>> = None;
        // When to ask for a new certificate, and the key of a request not yet answered.
        let mut renew_at: Option<Instant> = None;
        let mut pending_key: Option<rcgen::KeyPair> = None;
        let ended = loop {
            let due = renew_at;
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                    renew_at = Some(Instant::now() + RENEW_RETRY);
                    match new_key_and_csr(&self.hello.hostname) {
                        Ok((key, csr_pem)) => {
                            pending_key = Some(key);
                            tracing::info!("asking the gateway to renew this agent's certificate");
                            let held_sha256 = self.files.held_sha256().unwrap_or_default();
                            let ask = AgentMessage { msg: Some(agent_message::Msg::Renew(RenewRequest { csr_pem, held_sha256 })) };
                            if tx.send(ask).await.is_err() {
                                break Ended::Retry(anyhow!("stream closed"));
                            }
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot make a key to renew the certificate"),
                    }
                    continue;
                }
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => break Ended::Retry(anyhow!("the gateway closed the stream")),
                Err(s) => break classify(s),
            };
            match msg.msg {
                Some(operator_message::Msg::Welcome(w)) => {
                    tracing::info!(device = %w.device, namespace = %w.namespace, "connected to the gateway");
                    *welcomed = true;
                    if w.heartbeat_seconds > 0 {
                        heartbeat = Duration::from_secs(u64::from(w.heartbeat_seconds));
                    }
                    match self.files.store_ca_bundle(&w.ca_bundle_pem) {
                        Ok(true) => tracing::info!("stored the operator's new CA bundle"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot store the operator's CA bundle")
                        }
                    }
                    renew_at = Some(Instant::now() + Duration::from_secs(w.renew_after_seconds));
                    self.executor.set_sender(Some(tx.clone()));
                    let (tx2, ex) = (tx.clone(), self.executor.clone());
                    beat = Some(tokio::spawn(async move {
                        let mut t = tokio::time::interval(heartbeat);
                        loop {
                            t.tick().await;
                            let hb = AgentMessage {
                                msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                                    running: ex.running(),
                                    isolation: ex.isolation(),
                                })),
                            };
                            if tx2.send(hb).await.is_err() {
                                break;
                            }
                        }
                    }));
                }
                Some(operator_message::Msg::Execute(e)) => {
                    tracing::debug!(uid = %e.command_uid, session = %e.session, command = %e.command, "execute received");
                    self.executor.execute(e).await
                }
                Some(operator_message::Msg::Cancel(c)) => {
                    let why = c.reason();
                    tracing::info!(uid = %c.command_uid, reason = why.as_str_name(), "cancel received");
                    self.executor.cancel(&c.command_uid, why)
                }
                Some(operator_message::Msg::Renewed(r)) => {
                    let Some(key) = pending_key.take() else {
                        tracing::warn!("ignored a certificate this agent did not ask for");
                        continue;
                    };
                    if !r.refused.is_empty() {
                        tracing::warn!(reason = %r.refused, retry_in_s = RENEW_RETRY.as_secs(), "the gateway refused to renew the certificate");
                        continue;
                    }
                    let stored = self
                        .files
                        .store_renewal(&key.serialize_pem(), &r.certificate_pem)
                        .and_then(|()| self.files.store_ca_bundle(&r.ca_bundle_pem));
                    match stored {
                        Ok(_) => {
                            tracing::info!(
                                renew_after_s = r.renew_after_seconds,
                                "certificate renewed; the next connection uses it"
                            );
                            renew_at =
                                Some(Instant::now() + Duration::from_secs(r.renew_after_seconds));
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "cannot store the renewed certificate")
                        }
                    }
                }
                Some(operator_message::Msg::Reject(r)) => {
                    break Ended::Fatal(anyhow!("the gateway refused this agent: {}", r.reason));
                }
                None => {}
            }
        };
        self.executor.set_sender(None);
        self.executor.set_channel(None);
        if let Some(b) = beat {
            b.abort();
        }
        ended
    }
}

fn classify(s: tonic::Status) -> Ended {
    match s.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition => {
            Ended::Fatal(anyhow!("the gateway refused this agent: {}", s.message()))
        }
        _ => Ended::Retry(anyhow!("{}", s.message())),
    }
}

/// The host's OS name from its os-release under `host_root` (in a DaemonSet the agent's
/// own /etc is the container image's, not the host's), read bounded.
fn host_os_version(host_root: &std::path::Path) -> Option<String> {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|f| crate::provider::linux::read_small_host_file(host_root, f, 64 << 10).ok())
        .and_then(|text| pretty_name(&text))
}

/// `PRETTY_NAME` of an os-release file, unquoted.
fn pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        let value = l.trim().strip_prefix("PRETTY_NAME=")?.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        (!value.is_empty()).then(|| value.replace("\\\"", "\""))
    })
}

/// Facts about this host for the hello.
pub fn hello(executor: &Executor, host_root: &std::path::Path) -> Hello {
    // The host's file may be anything; the kernel's name is at most 64 bytes.
    let hostname = crate::provider::linux::read_small_host_file(host_root, "/etc/hostname", 4096)
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Hello {
        protocol_version: PROTOCOL_VERSION,
        hostname,
        os: executor.os().to_string(),
        os_version: host_os_version(host_root)
            .or_else(|| sysinfo::System::long_os_version().ok())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: executor.capabilities(),
        isolation: executor.isolation(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_version_is_the_hosts_pretty_name() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(
            pretty_name(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("PRETTY_NAME=Alpine").as_deref(), Some("Alpine"));
        assert_eq!(
            pretty_name("PRETTY_NAME='Arch Linux'").as_deref(),
            Some("Arch Linux")
        );
        assert_eq!(pretty_name("PRETTY_NAME=\"\"\nID=x"), None);
        assert_eq!(pretty_name("ID=x"), None);
        let root = tempfile::tempdir().expect("root");
        std::fs::create_dir_all(root.path().join("usr/lib")).expect("dir");
        std::fs::write(
            root.path().join("usr/lib/os-release"),
            "PRETTY_NAME=\"Host OS 1\"\n",
        )
        .expect("write");
        assert_eq!(host_os_version(root.path()).as_deref(), Some("Host OS 1"));
    }
}
