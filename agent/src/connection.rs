//! The connection loop: one long-lived stream to the gateway, reconnected with jittered
//! exponential backoff. The stream's identity is the agent's certificate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{
    AgentMessage, Heartbeat, Hello, PROTOCOL_VERSION, agent_message, operator_message,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::executor::Executor;

/// Why a connection ended.
pub enum Ended {
    /// Try again after a pause.
    Retry(anyhow::Error),
    /// Retrying cannot help (revoked certificate, incompatible protocol): stop the agent.
    Fatal(anyhow::Error),
}

pub struct Connector {
    pub gateway: String,
    pub tls: ClientTlsConfig,
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
        let channel = match Endpoint::from_shared(self.gateway.clone())
            .and_then(|e| e.tls_config(self.tls.clone()))
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
        let (tx, rx) = mpsc::channel::<AgentMessage>(256);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(self.hello.clone())),
        };
        if tx.send(hello).await.is_err() {
            return Ended::Retry(anyhow!("stream closed"));
        }
        let resp = AgentGatewayClient::new(channel)
            .attach(ReceiverStream::new(rx))
            .await;
        let mut inbound = match resp {
            Ok(r) => r.into_inner(),
            Err(s) => return classify(s),
        };
        let mut heartbeat = Duration::from_secs(5);
        let mut beat: Option<tokio::task::JoinHandle<()>> = None;
        let ended = loop {
            let msg = match inbound.message().await {
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
                    self.executor.set_sender(Some(tx.clone()));
                    let (tx2, ex) = (tx.clone(), self.executor.clone());
                    beat = Some(tokio::spawn(async move {
                        let mut t = tokio::time::interval(heartbeat);
                        loop {
                            t.tick().await;
                            let hb = AgentMessage {
                                msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                                    running: ex.running(),
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
                Some(operator_message::Msg::Reject(r)) => {
                    break Ended::Fatal(anyhow!("the gateway refused this agent: {}", r.reason));
                }
                None => {}
            }
        };
        self.executor.set_sender(None);
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
        os_version: sysinfo::System::long_os_version().unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: executor.capabilities(),
    }
}
