//! The agent gateway: a tonic gRPC server (TLS always) where agents enroll and keep one
//! stream each. It knows which devices are connected and which commands are in flight, and
//! hands everything that must reach the API server to the operator as [`GatewayEvent`]s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use liveresponse_api::crd::{Device, DeviceSpec, Enrollment};
use liveresponse_api::proto::agent_gateway_server::AgentGateway;
use liveresponse_api::proto::{
    AgentMessage, Cancel, Completed, EnrollRequest, EnrollResponse, Execute, Hello,
    OperatorMessage, PROTOCOL_VERSION, Reject, Welcome, agent_message, command_event,
    operator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pki::{self, Ca};

/// A device: (namespace, name).
pub type DeviceKey = (String, String);

/// Label that marks a Secret as a bootstrap token for enrolling devices into its namespace.
pub const BOOTSTRAP_LABEL: &str = "liveresponse.io/bootstrap-token";

/// Largest output the gateway assembles for one command before it gives up on it.
pub const MAX_OUTPUT: usize = 64 * 1024 * 1024;

/// Which Command an in-flight execution belongs to.
#[derive(Clone, Debug)]
pub struct CommandTarget {
    pub namespace: String,
    pub name: String,
    pub session: String,
    pub verb: String,
    pub device: DeviceKey,
    /// Which `-auto` prerequisite this execution is, or `None` for the command itself.
    pub step: Option<usize>,
}

/// The uid an `-auto` prerequisite of a command runs under on the agent.
pub fn step_uid(uid: &str, step: usize) -> String {
    format!("{uid}.step-{step}")
}

fn belongs(key: &str, uid: &str) -> bool {
    key == uid
        || key
            .strip_prefix(uid)
            .is_some_and(|rest| rest.starts_with(".step-"))
}

/// What the gateway saw that the operator must record.
#[derive(Debug)]
pub enum GatewayEvent {
    Connected {
        device: DeviceKey,
        hello: Hello,
    },
    Seen {
        device: DeviceKey,
    },
    Disconnected {
        device: DeviceKey,
        running: Vec<(String, CommandTarget)>,
    },
    Completed {
        uid: String,
        target: CommandTarget,
        completed: Completed,
        output: Vec<u8>,
    },
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Result<OperatorMessage, Status>>,
}

struct InFlight {
    target: CommandTarget,
    output: Vec<u8>,
}

#[derive(Default)]
struct State {
    agents: HashMap<DeviceKey, Conn>,
    inflight: HashMap<String, InFlight>,
    next_conn: u64,
}

/// Shared gateway state; the gRPC service and the controllers both hold it.
pub struct Gateway {
    client: kube::Client,
    ca: Arc<Ca>,
    instance: String,
    heartbeat: Duration,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<GatewayEvent>,
    metrics: crate::metrics::Metrics,
}

impl Gateway {
    pub fn new(
        client: kube::Client,
        ca: Arc<Ca>,
        instance: String,
        heartbeat: Duration,
        metrics: crate::metrics::Metrics,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<GatewayEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let gw = Arc::new(Self {
            client,
            ca,
            instance,
            heartbeat,
            state: Mutex::new(State::default()),
            events,
            metrics,
        });
        (gw, rx)
    }

    /// This replica's name, recorded in `Device.status.gateway`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the device has an open stream to this replica.
    pub fn is_connected(&self, device: &DeviceKey) -> bool {
        self.state().agents.contains_key(device)
    }

    /// Whether the gateway is waiting for a result of this command (or of one of its steps).
    pub fn is_inflight(&self, uid: &str) -> bool {
        self.state().inflight.keys().any(|k| belongs(k, uid))
    }

    /// Sends a command to its device and waits for the result in the background.
    pub async fn execute(&self, target: CommandTarget, exec: Execute) -> Result<(), String> {
        let tx = {
            let mut st = self.state();
            let Some(conn) = st.agents.get(&target.device) else {
                return Err(format!("device {} is not connected", target.device.1));
            };
            let tx = conn.tx.clone();
            st.inflight.insert(
                exec.command_uid.clone(),
                InFlight {
                    target,
                    output: Vec::new(),
                },
            );
            tx
        };
        let uid = exec.command_uid.clone();
        let msg = OperatorMessage {
            msg: Some(operator_message::Msg::Execute(exec)),
        };
        if tx.send(Ok(msg)).await.is_err() {
            self.state().inflight.remove(&uid);
            return Err("the agent's stream closed".into());
        }
        Ok(())
    }

    /// Asks the agent to stop a command (and its running step). Returns false when nothing
    /// of it is in flight here.
    pub async fn cancel(&self, uid: &str, reason: &str) -> bool {
        let targets: Vec<(String, mpsc::Sender<Result<OperatorMessage, Status>>)> = {
            let st = self.state();
            st.inflight
                .iter()
                .filter(|(k, _)| belongs(k, uid))
                .filter_map(|(k, f)| {
                    st.agents
                        .get(&f.target.device)
                        .map(|c| (k.clone(), c.tx.clone()))
                })
                .collect()
        };
        let mut sent = false;
        for (key, tx) in targets {
            let msg = OperatorMessage {
                msg: Some(operator_message::Msg::Cancel(Cancel {
                    command_uid: key,
                    reason: reason.to_string(),
                })),
            };
            sent |= tx.send(Ok(msg)).await.is_ok();
        }
        sent
    }

    /// Stops waiting for a command (it was finished by the operator, e.g. timed out).
    pub fn forget(&self, uid: &str) {
        self.state().inflight.retain(|k, _| !belongs(k, uid));
    }

    /// Closes a device's stream (its Device was deleted: the certificate is revoked).
    pub fn disconnect_device(&self, device: &DeviceKey) {
        let conn = self.state().agents.remove(device);
        if let Some(conn) = conn {
            let _ = conn.tx.try_send(Err(Status::permission_denied(
                "this device was deleted: its certificate is revoked; enroll again",
            )));
            self.metrics.agents_connected.dec();
            self.drop_inflight(device);
        }
    }

    fn drop_inflight(&self, device: &DeviceKey) {
        let running: Vec<(String, CommandTarget)> = {
            let mut st = self.state();
            let uids: Vec<String> = st
                .inflight
                .iter()
                .filter(|(_, f)| &f.target.device == device)
                .map(|(u, _)| u.clone())
                .collect();
            uids.into_iter()
                .filter_map(|u| st.inflight.remove(&u).map(|f| (u, f.target)))
                .collect()
        };
        let _ = self.events.send(GatewayEvent::Disconnected {
            device: device.clone(),
            running,
        });
    }

    fn register(
        &self,
        device: DeviceKey,
        tx: mpsc::Sender<Result<OperatorMessage, Status>>,
    ) -> u64 {
        let mut st = self.state();
        st.next_conn += 1;
        let id = st.next_conn;
        let old = st.agents.insert(device, Conn { id, tx });
        match old {
            // A reconnect replaces the old stream; tell the old one why it ends.
            Some(old) => {
                let _ = old.tx.try_send(Err(Status::aborted(
                    "replaced by a newer connection of this device",
                )));
            }
            None => self.metrics.agents_connected.inc(),
        }
        id
    }

    fn unregister(&self, device: &DeviceKey, id: u64) {
        let removed = {
            let mut st = self.state();
            if st.agents.get(device).is_some_and(|c| c.id == id) {
                st.agents.remove(device);
                true
            } else {
                false
            }
        };
        if removed {
            self.metrics.agents_connected.dec();
            self.drop_inflight(device);
        }
    }

    fn on_event(
        &self,
        device: &DeviceKey,
        ev: liveresponse_api::proto::CommandEvent,
    ) -> Result<(), Status> {
        let uid = ev.command_uid;
        match ev.event {
            Some(command_event::Event::Output(chunk)) => {
                let mut st = self.state();
                let Some(f) = st.inflight.get_mut(&uid) else {
                    return Ok(());
                };
                // A malicious agent must not reach another device's commands.
                if &f.target.device != device {
                    return Err(Status::permission_denied(
                        "that command belongs to another device",
                    ));
                }
                if f.output.len() + chunk.data.len() > MAX_OUTPUT {
                    f.output.clear();
                    f.output.extend_from_slice(b"\0too-large");
                } else if !f.output.ends_with(b"\0too-large") {
                    f.output.extend_from_slice(&chunk.data);
                }
            }
            Some(command_event::Event::Completed(completed)) => {
                let f = {
                    let mut st = self.state();
                    match st.inflight.get(&uid) {
                        Some(f) if &f.target.device != device => {
                            return Err(Status::permission_denied(
                                "that command belongs to another device",
                            ));
                        }
                        Some(_) => st.inflight.remove(&uid),
                        None => None,
                    }
                };
                if let Some(f) = f {
                    let _ = self.events.send(GatewayEvent::Completed {
                        uid,
                        target: f.target,
                        completed,
                        output: f.output,
                    });
                }
            }
            Some(command_event::Event::Started(_))
            | Some(command_event::Event::Progress(_))
            | None => {}
        }
        Ok(())
    }

    async fn enroll(&self, req: EnrollRequest) -> Result<EnrollResponse, Status> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(incompatible(
                req.protocol_version,
            )));
        }
        let ns = req.namespace.trim();
        let name = req.device_name.trim();
        if !is_dns_label(ns) {
            return Err(Status::invalid_argument(format!(
                "namespace {ns:?} is not a valid namespace name"
            )));
        }
        if !is_dns_label(name) {
            return Err(Status::invalid_argument(format!(
                "device name {name:?} is not valid: use lowercase letters, digits and '-', at most 63 characters"
            )));
        }
        if req.bootstrap_token.is_empty() || !self.token_is_valid(ns, &req.bootstrap_token).await? {
            // Same answer whatever was wrong, so a caller learns nothing about the namespace.
            return Err(Status::unauthenticated(
                "the bootstrap token is not valid for this namespace: ask your live response administrator for a current token",
            ));
        }
        let devices: Api<Device> = Api::namespaced(self.client.clone(), ns);
        let existing = devices.get_opt(name).await.map_err(internal)?;
        if existing
            .as_ref()
            .is_some_and(|d| d.spec.certificate_sha256.is_some())
        {
            return Err(Status::already_exists(format!(
                "device {name} is already enrolled in {ns}; to enroll this host again, delete the Device first (kubectl -n {ns} delete lrdev {name})"
            )));
        }
        let (cert_pem, fp) = self
            .ca
            .sign_device(&req.csr_pem, ns, name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec = DeviceSpec {
            enrollment: Enrollment::ExternalHost,
            node_name: None,
            certificate_sha256: Some(fp),
        };
        match existing {
            None => {
                let dev = Device {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        namespace: Some(ns.to_string()),
                        ..Default::default()
                    },
                    spec,
                    status: None,
                };
                devices
                    .create(&PostParams::default(), &dev)
                    .await
                    .map_err(internal)?;
            }
            Some(_) => {
                devices
                    .patch(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({ "spec": spec })),
                    )
                    .await
                    .map_err(internal)?;
            }
        }
        tracing::info!(namespace = ns, device = name, "device enrolled");
        Ok(EnrollResponse {
            certificate_pem: cert_pem,
            ca_pem: self.ca.cert_pem.clone(),
            device: name.to_string(),
            namespace: ns.to_string(),
        })
    }

    async fn token_is_valid(&self, ns: &str, token: &str) -> Result<bool, Status> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let list = secrets
            .list(&ListParams::default().labels(&format!("{BOOTSTRAP_LABEL}=true")))
            .await
            .map_err(internal)?;
        Ok(list.items.iter().any(|s| {
            s.data
                .as_ref()
                .and_then(|d| d.get("token"))
                .is_some_and(|t| constant_time_eq(&t.0, token.as_bytes()))
        }))
    }

    /// Who is on the other end of a stream: the device its certificate was issued for, as
    /// long as that Device still exists and recorded this very certificate.
    async fn authenticate(
        &self,
        certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    ) -> Result<DeviceKey, Status> {
        let certs = certs.ok_or_else(|| {
            Status::unauthenticated(
                "a client certificate is required: enroll this agent first (--bootstrap-token)",
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (ns, name) = pki::device_identity(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let fp = pki::fingerprint(leaf.as_ref());
        let devices: Api<Device> = Api::namespaced(self.client.clone(), &ns);
        let dev = devices.get_opt(&name).await.map_err(internal)?;
        match dev {
            Some(d)
                if d.metadata.deletion_timestamp.is_none()
                    && d.spec.certificate_sha256.as_deref() == Some(fp.as_str()) =>
            {
                Ok((ns, name))
            }
            _ => Err(Status::permission_denied(format!(
                "the certificate for device {name} in {ns} is revoked (the Device was deleted or re-enrolled); enroll again"
            ))),
        }
    }
}

fn incompatible(v: u32) -> String {
    format!(
        "agent protocol version {v} is not supported by this operator (it speaks version {PROTOCOL_VERSION}); install an agent of the operator's release"
    )
}

fn internal(e: kube::Error) -> Status {
    tracing::warn!(error = %e, "API server error in the gateway");
    Status::unavailable("the operator cannot reach the Kubernetes API right now; retry")
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gRPC service over a shared [`Gateway`].
#[derive(Clone)]
pub struct GatewayService(pub Arc<Gateway>);

#[tonic::async_trait]
impl AgentGateway for GatewayService {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.0.enroll(req.into_inner()).await.map(Response::new)
    }

    type AttachStream = ReceiverStream<Result<OperatorMessage, Status>>;

    async fn attach(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let gw = self.0.clone();
        let device = gw.authenticate(req.peer_certs()).await?;
        let mut inbound = req.into_inner();
        // The first message must be the agent's hello, promptly.
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello from the agent within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        let (tx, rx) = mpsc::channel(64);
        if hello.protocol_version != PROTOCOL_VERSION {
            let reason = incompatible(hello.protocol_version);
            tracing::warn!(device = %device.1, %reason, "refusing agent");
            let _ = tx
                .send(Ok(OperatorMessage {
                    msg: Some(operator_message::Msg::Reject(Reject {
                        reason: reason.clone(),
                    })),
                }))
                .await;
            let _ = tx.send(Err(Status::failed_precondition(reason))).await;
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let welcome = OperatorMessage {
            msg: Some(operator_message::Msg::Welcome(Welcome {
                device: device.1.clone(),
                namespace: device.0.clone(),
                heartbeat_seconds: u32::try_from(gw.heartbeat.as_secs()).unwrap_or(5),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::aborted("stream closed"))?;
        let conn_id = gw.register(device.clone(), tx);
        tracing::info!(namespace = %device.0, device = %device.1, hostname = %hello.hostname, "agent connected");
        let _ = gw.events.send(GatewayEvent::Connected {
            device: device.clone(),
            hello,
        });
        tokio::spawn(async move {
            let idle = gw.heartbeat * 3;
            // An agent that sends heartbeats in a tight loop must not flood the event queue.
            let mut last_seen: Option<std::time::Instant> = None;
            let reason = loop {
                match tokio::time::timeout(idle, inbound.message()).await {
                    Err(_) => break format!("no heartbeat for {}s", idle.as_secs()),
                    Ok(Err(e)) => break format!("stream error: {}", e.message()),
                    Ok(Ok(None)) => break "stream closed".to_string(),
                    Ok(Ok(Some(m))) => match m.msg {
                        Some(agent_message::Msg::Heartbeat(_)) => {
                            if last_seen.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                                last_seen = Some(std::time::Instant::now());
                                let _ = gw.events.send(GatewayEvent::Seen {
                                    device: device.clone(),
                                });
                            }
                        }
                        Some(agent_message::Msg::Event(ev)) => {
                            if let Err(s) = gw.on_event(&device, ev) {
                                break format!("protocol violation: {}", s.message());
                            }
                        }
                        Some(agent_message::Msg::Hello(_)) | None => {}
                    },
                }
            };
            tracing::info!(namespace = %device.0, device = %device.1, %reason, "agent disconnected");
            gw.unregister(&device, conn_id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("host-1"));
        assert!(!is_dns_label("Host"));
        assert!(!is_dns_label("a/b"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(!is_dns_label("../x"));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
