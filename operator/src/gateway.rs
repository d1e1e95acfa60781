//! The agent gateway: a tonic gRPC server (TLS always) where agents enroll and keep one
//! stream each. It knows which devices are connected, which commands are in flight and what
//! the agents reported; it writes nothing to the API server about commands or devices: it
//! wakes their reconcilers, which read its state (one writer per status).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use liveresponse_api::crd::{Command, Device, DeviceSpec, Enrollment, LiveResponseSettings};
use liveresponse_api::proto::agent_gateway_server::AgentGateway;
use liveresponse_api::proto::{
    AgentMessage, Cancel, CancelReason, ContentChunk, EnrollRequest, EnrollResponse, Execute,
    FetchRequest, Hello, OperatorMessage, Outcome, PROTOCOL_VERSION, Reject, RenewRequest, Renewed,
    Welcome, agent_message, command_event, operator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::ArtifactStore;
use crate::pki::{self, Ca};
use crate::sink::{FileProblem, FileSink, OutputProblem, OutputSink, OutputSummary, StagedFile};
use crate::status::bounded;
use crate::wake::WakeQueue;

/// A device: (namespace, name).
pub type DeviceKey = (String, String);

/// Label that marks a Secret as a bootstrap token for enrolling devices into its namespace.
pub const BOOTSTRAP_LABEL: &str = "liveresponse.io/bootstrap-token";

/// Most bytes of finished results (inline outputs) waiting for their reconciler. Past it the
/// oldest is dropped: its command is sent again, and the agent replays the result.
const MAX_RESULT_BYTES: usize = 128 * 1024 * 1024;

/// Bounds of what an agent's report may put into a Command's status.
const MAX_MESSAGE: usize = 4096;
const MAX_WARNING: usize = 1024;
const MAX_WARNINGS: usize = 100;
const MAX_PATH: usize = 4096;

/// Largest message an agent may send (output travels in 256 KiB chunks); above it the
/// stream ends with an error.
pub const MAX_AGENT_MESSAGE: usize = 16 * 1024 * 1024;

/// The hello's facts, bounded: they become the Device's status.
fn bounded_hello(mut h: Hello) -> Hello {
    h.hostname = bounded(&h.hostname, 253);
    h.os = bounded(&h.os, 32);
    h.os_version = bounded(&h.os_version, 256);
    h.arch = bounded(&h.arch, 32);
    h.agent_version = bounded(&h.agent_version, 64);
    h.capabilities.truncate(256);
    h.capabilities.retain(|c| c.len() <= 64);
    if let Some(i) = h.isolation.as_mut() {
        i.since = bounded(&i.since, 64);
        i.by = bounded(&i.by, 256);
    }
    h
}

/// Messages queued to one agent. An agent that lets this fill stopped reading: it is
/// disconnected rather than waited on.
const AGENT_QUEUE: usize = 256;

/// Which Command an in-flight execution belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandTarget {
    pub namespace: String,
    pub name: String,
    pub device: DeviceKey,
    /// Which `-auto` prerequisite this execution is, or `None` for the command itself.
    pub step: Option<usize>,
}

impl CommandTarget {
    pub fn object_ref(&self) -> ObjectRef<Command> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
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

/// What the agent reported of one execution, ready for the command's reconciler.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub step: Option<usize>,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub error_reason: String,
    pub error_message: String,
    pub working_directory: String,
    pub warnings: Vec<String>,
    /// The output, or why it cannot be trusted.
    pub output: Result<OutputSummary, OutputProblem>,
    /// getfile: the verified copy, or why there is none.
    pub file: Option<Result<StagedFile, FileProblem>>,
}

/// How far a transfer has come, as the gateway holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub bytes: u64,
    pub total: Option<u64>,
    pub resumed_at: Option<u64>,
    /// What `bytes` and `total` count when not bytes ("files" for scan).
    pub unit: Option<&'static str>,
}

impl Report {
    fn bytes(&self) -> usize {
        let out = self.output.as_ref().map_or(0, |o| o.inline.len());
        out + self.error_message.len() + self.warnings.iter().map(String::len).sum::<usize>() + 256
    }
}

/// Why a message could not be sent to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("device {0} is not connected")]
    NotConnected(String),
    #[error("device {0} stopped reading its stream; it was disconnected")]
    Stalled(String),
    #[error("the operator cannot stage the file: {0}")]
    Staging(String),
}

/// What the gateway knows of a device's link.
#[derive(Clone, Debug, Default)]
pub struct Link {
    pub connected: bool,
    pub hello: Option<Hello>,
    /// When the agent last showed signs of life.
    pub last_seen: Option<jiff::Timestamp>,
    /// When the stream closed (unset while connected).
    pub disconnected_at: Option<jiff::Timestamp>,
    /// Streams refused because this device already had a live one.
    pub duplicates_refused: u64,
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Result<OperatorMessage, Status>>,
}

struct InFlight {
    target: CommandTarget,
    sink: OutputSink,
    cancel_sent: Option<Instant>,
    /// getfile: the copy being written. Behind its own lock: chunks are written without
    /// holding the gateway's.
    file: Option<Arc<Mutex<FileSink>>>,
    /// When the command was last woken for progress.
    progress_woken: Option<Instant>,
    /// putfile and run: the library file the agent may fetch while this is in flight.
    content: Option<content::ContentSource>,
    /// analyze, scan and remediate -auto: the rule files it may fetch, by name.
    rules: Vec<content::ContentSource>,
    /// scan: how far the agent says it got (files done, total).
    work: Option<(u64, u64)>,
    /// How many of its bytes were served.
    content_sent: u64,
}

/// How often a transfer wakes its command to record progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs blocking file work from async code without stalling the runtime's other tasks
/// (other agents' streams); directly where the runtime cannot lend its thread (tests).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[derive(Default)]
struct State {
    agents: HashMap<DeviceKey, Conn>,
    links: HashMap<DeviceKey, Link>,
    inflight: HashMap<String, InFlight>,
    results: HashMap<String, Report>,
    result_order: VecDeque<String>,
    result_bytes: usize,
    next_conn: u64,
}

/// Shared gateway state; the gRPC service and the controllers both hold it. Nothing here
/// awaits an agent: sends are `try_send`, and a full queue disconnects the agent.
pub struct Gateway {
    client: kube::Client,
    ca: Arc<Ca>,
    instance: String,
    heartbeat: Duration,
    state: Mutex<State>,
    /// Commands with something new: a result, or their device's link changed.
    pub command_wakes: WakeQueue<ObjectRef<Command>>,
    /// Devices whose link changed (connected, seen, disconnected).
    pub device_wakes: WakeQueue<DeviceKey>,
    metrics: crate::metrics::Metrics,
    tokens: std::sync::OnceLock<kube::runtime::reflector::Store<Secret>>,
    /// Enrollments per source address in the current minute.
    enrollments: Mutex<HashMap<std::net::IpAddr, (Instant, u32)>>,
    enroll_per_minute: u32,
    /// Life of the device certificates this gateway signs, unless a namespace's settings
    /// say otherwise.
    device_cert_lifetime: Duration,
    settings: std::sync::OnceLock<kube::runtime::reflector::Store<LiveResponseSettings>>,
    artifacts: std::sync::OnceLock<Arc<ArtifactStore>>,
}

impl Gateway {
    pub fn new(
        client: kube::Client,
        ca: Arc<Ca>,
        instance: String,
        heartbeat: Duration,
        metrics: crate::metrics::Metrics,
        device_cert_lifetime: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            ca,
            instance,
            heartbeat,
            state: Mutex::new(State::default()),
            command_wakes: WakeQueue::new(),
            device_wakes: WakeQueue::new(),
            metrics,
            tokens: std::sync::OnceLock::new(),
            enrollments: Mutex::new(HashMap::new()),
            enroll_per_minute: 60,
            device_cert_lifetime,
            settings: std::sync::OnceLock::new(),
            artifacts: std::sync::OnceLock::new(),
        })
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

    /// The device's link as this replica knows it.
    pub fn link(&self, device: &DeviceKey) -> Option<Link> {
        self.state().links.get(device).cloned()
    }

    /// When a cancel was sent for this execution, if it is in flight: `Some(None)` when in
    /// flight and not cancelled, `None` when not in flight.
    pub fn inflight(&self, exec_uid: &str) -> Option<Option<Duration>> {
        self.state()
            .inflight
            .get(exec_uid)
            .map(|f| f.cancel_sent.map(|t| t.elapsed()))
    }

    /// The result the agent reported for this execution, if it arrived.
    pub fn report(&self, exec_uid: &str) -> Option<Report> {
        self.state().results.get(exec_uid).cloned()
    }

    /// Where getfile copies wait before the artifact store takes them.
    pub fn set_artifacts(&self, store: Arc<ArtifactStore>) {
        let _ = self.artifacts.set(store);
    }

    /// A getfile's copy in staging.
    fn staging_path(&self, exec_uid: &str) -> Option<std::path::PathBuf> {
        self.staging_file(exec_uid, "part")
    }

    /// A large output, kept whole, in staging.
    fn output_path(&self, exec_uid: &str) -> Option<std::path::PathBuf> {
        self.staging_file(exec_uid, "out")
    }

    fn staging_file(&self, exec_uid: &str, ext: &str) -> Option<std::path::PathBuf> {
        // A uid is the API server's; still, only a plain name becomes a file name.
        let safe = exec_uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        let store = self.artifacts.get()?;
        (safe && !exec_uid.starts_with('.'))
            .then(|| store.staging_dir().join(format!("{exec_uid}.{ext}")))
    }

    /// Deletes what an execution left in staging (stored, or the command ended otherwise).
    pub fn discard_staging(&self, exec_uid: &str) {
        for p in [self.staging_path(exec_uid), self.output_path(exec_uid)]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
    }

    /// How far a transfer has come.
    pub fn progress(&self, exec_uid: &str) -> Option<Progress> {
        let file = {
            let st = self.state();
            let f = st.inflight.get(exec_uid)?;
            if let Some((done, total)) = f.work {
                return Some(Progress {
                    bytes: done,
                    total: Some(total),
                    resumed_at: None,
                    unit: Some("files"),
                });
            }
            match (&f.file, &f.content) {
                (Some(file), _) => file.clone(),
                // putfile and run: how much of the library file the device fetched.
                (None, Some(c)) => {
                    let sent = f.content_sent;
                    return (sent > 0).then_some(Progress {
                        bytes: sent,
                        total: Some(c.size),
                        resumed_at: None,
                        unit: None,
                    });
                }
                (None, None) => return None,
            }
        };
        let f = file.lock().unwrap_or_else(|p| p.into_inner());
        Some(Progress {
            bytes: f.written(),
            total: f.total(),
            resumed_at: f.resumed_at(),
            unit: None,
        })
    }

    /// Sends a command to its device. Never waits: an agent whose queue is full is
    /// disconnected (it stopped reading), and the command is sent again when it is back.
    /// A getfile goes on from what an interrupted transfer left in staging.
    pub fn execute(&self, target: CommandTarget, mut exec: Execute) -> Result<(), SendError> {
        let uid = exec.command_uid.clone();
        let limit = exec.max_output_bytes;
        let device = target.device.clone();
        let file = if liveresponse_api::command::moves_a_file(&exec.command) {
            let path = self
                .staging_path(&uid)
                .ok_or_else(|| SendError::Staging("no artifact store is configured".to_string()))?;
            let sink = blocking(|| FileSink::open(&path, exec.max_file_bytes))
                .map_err(|e| SendError::Staging(format!("{}: {e}", path.display())))?;
            if let Some(at) = sink.resumed_at() {
                tracing::info!(%uid, offset = at, "getfile resumes: the operator holds the first {at} bytes");
            }
            exec.resume_offset = sink.written();
            Some(Arc::new(Mutex::new(sink)))
        } else {
            None
        };
        let source = |c: &liveresponse_api::proto::Content| content::ContentSource {
            namespace: target.namespace.clone(),
            library: c.name.clone(),
            size: c.size,
        };
        let content = exec.content.as_ref().map(source);
        let rules = exec.rules.iter().map(source).collect();
        let msg = OperatorMessage {
            msg: Some(operator_message::Msg::Execute(exec)),
        };
        // Only the command's own output is kept whole; an -auto step's is summarised.
        let output_path = target
            .step
            .is_none()
            .then(|| self.output_path(&uid))
            .flatten();
        let mut st = self.state();
        let Some(conn) = st.agents.get(&device) else {
            return Err(SendError::NotConnected(device.1.clone()));
        };
        match conn.tx.try_send(Ok(msg)) {
            Ok(()) => {
                // A new dispatch starts a new output: a replay sends everything again.
                st.results.remove(&uid);
                st.inflight.insert(
                    uid,
                    InFlight {
                        target,
                        sink: match output_path {
                            Some(p) => OutputSink::new(limit).spill_to(p),
                            None => OutputSink::new(limit),
                        },
                        cancel_sent: None,
                        file,
                        progress_woken: None,
                        content,
                        rules,
                        work: None,
                        content_sent: 0,
                    },
                );
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(SendError::NotConnected(device.1.clone()))
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                drop(st);
                tracing::warn!(namespace = %device.0, device = %device.1, "agent stopped reading its stream; disconnecting it");
                self.drop_connection(
                    &device,
                    Status::unavailable("the agent did not read its stream; reconnect"),
                );
                Err(SendError::Stalled(device.1.clone()))
            }
        }
    }

    /// Asks the agent to stop a command and its running step. Never waits. Returns false
    /// when nothing of it is in flight on a connected device.
    pub fn cancel(&self, uid: &str, reason: CancelReason) -> bool {
        let mut st = self.state();
        let State {
            inflight, agents, ..
        } = &mut *st;
        let mut sent = false;
        let mut stalled = vec![];
        for (key, f) in inflight.iter_mut().filter(|(k, _)| belongs(k, uid)) {
            let Some(conn) = agents.get(&f.target.device) else {
                continue;
            };
            let msg = OperatorMessage {
                msg: Some(operator_message::Msg::Cancel(Cancel {
                    command_uid: key.clone(),
                    reason: reason as i32,
                })),
            };
            match conn.tx.try_send(Ok(msg)) {
                Ok(()) => {
                    tracing::info!(uid = %key, reason = reason.as_str_name(), "cancel sent to the agent");
                    f.cancel_sent.get_or_insert_with(Instant::now);
                    sent = true;
                }
                Err(mpsc::error::TrySendError::Full(_)) => stalled.push(f.target.device.clone()),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(st);
        for d in stalled {
            self.drop_connection(
                &d,
                Status::unavailable("the agent did not read its stream; reconnect"),
            );
        }
        sent
    }

    /// Stops waiting for a command and drops what it reported (it is recorded, or it was
    /// finished by the operator).
    pub fn forget(&self, uid: &str) {
        let mut st = self.state();
        st.inflight.retain(|k, _| !belongs(k, uid));
        let gone: Vec<String> = st
            .results
            .keys()
            .filter(|k| belongs(k, uid))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = st.results.remove(&k) {
                st.result_bytes = st.result_bytes.saturating_sub(r.bytes());
            }
        }
    }

    /// Drops a recorded result (an `-auto` step now in status).
    pub fn drop_report(&self, exec_uid: &str) {
        let mut st = self.state();
        if let Some(r) = st.results.remove(exec_uid) {
            st.result_bytes = st.result_bytes.saturating_sub(r.bytes());
        }
    }

    /// Devices with a live stream to this gateway.
    pub fn connected_devices(&self) -> Vec<DeviceKey> {
        self.state().agents.keys().cloned().collect()
    }

    /// Closes a device's stream (its Device was deleted: the certificate is revoked).
    pub fn disconnect_device(&self, device: &DeviceKey) {
        self.drop_connection(
            device,
            Status::permission_denied(
                "this device was deleted: its certificate is revoked; enroll again",
            ),
        );
    }

    /// Ends a device's stream: the agent is told why, its in-flight work is forgotten (it is
    /// sent again when the agent is back) and its commands and Device are woken.
    fn drop_connection(&self, device: &DeviceKey, why: Status) {
        let (conn, woken) = {
            let mut st = self.state();
            let conn = st.agents.remove(device);
            if conn.is_none() {
                return;
            }
            let link = st.links.entry(device.clone()).or_default();
            link.connected = false;
            link.disconnected_at = Some(jiff::Timestamp::now());
            let uids: Vec<String> = st
                .inflight
                .iter()
                .filter(|(_, f)| &f.target.device == device)
                .map(|(u, _)| u.clone())
                .collect();
            let woken: Vec<ObjectRef<Command>> = uids
                .into_iter()
                .filter_map(|u| st.inflight.remove(&u).map(|f| f.target.object_ref()))
                .collect();
            (conn, woken)
        };
        if let Some(conn) = conn {
            let _ = conn.tx.try_send(Err(why));
        }
        self.metrics.agents_connected.dec();
        for r in woken {
            self.command_wakes.wake(r);
        }
        self.device_wakes.wake(device.clone());
    }

    /// Registers a device's new stream. A device has one live stream: while the current one
    /// showed signs of life within two heartbeats, a second stream with the same identity (a
    /// copied certificate) is refused; an older, silent one is replaced (the agent
    /// reconnected before the gateway noticed the old stream died).
    fn register(
        &self,
        device: DeviceKey,
        hello: Hello,
        tx: mpsc::Sender<Result<OperatorMessage, Status>>,
    ) -> Result<u64, Status> {
        let now = jiff::Timestamp::now();
        let live_window = jiff::SignedDuration::try_from(self.heartbeat * 2).unwrap_or_default();
        let old = {
            let mut st = self.state();
            let live = st.agents.contains_key(&device)
                && st
                    .links
                    .get(&device)
                    .and_then(|l| l.last_seen)
                    .is_some_and(|seen| now.duration_since(seen) < live_window);
            if live {
                if let Some(l) = st.links.get_mut(&device) {
                    l.duplicates_refused += 1;
                }
                drop(st);
                self.metrics.duplicate_connections.inc();
                self.device_wakes.wake(device.clone());
                tracing::warn!(namespace = %device.0, device = %device.1, "refused a second live stream for this device");
                return Err(Status::already_exists(format!(
                    "device {} already has a live connection: a second agent with the same certificate is refused",
                    device.1
                )));
            }
            st.next_conn += 1;
            let id = st.next_conn;
            let link = st.links.entry(device.clone()).or_default();
            link.connected = true;
            link.hello = Some(bounded_hello(hello));
            link.last_seen = Some(now);
            link.disconnected_at = None;
            (st.agents.insert(device.clone(), Conn { id, tx }), id)
        };
        match old.0 {
            // A reconnect replaces the old stream; tell the old one why it ends.
            Some(old) => {
                let _ = old.tx.try_send(Err(Status::aborted(
                    "replaced by a newer connection of this device",
                )));
            }
            None => self.metrics.agents_connected.inc(),
        }
        self.device_wakes.wake(device);
        Ok(old.1)
    }

    fn unregister(&self, device: &DeviceKey, id: u64) {
        let current = self.state().agents.get(device).is_some_and(|c| c.id == id);
        if current {
            self.drop_connection(device, Status::aborted("stream ended"));
        }
    }

    fn seen(&self, device: &DeviceKey) {
        if let Some(l) = self.state().links.get_mut(device) {
            l.last_seen = Some(jiff::Timestamp::now());
        }
        self.device_wakes.wake(device.clone());
    }

    /// What the agent says of the device's isolation (each heartbeat): kept with its hello
    /// for the Device's status, bounded, and a change wakes the device.
    fn isolation_seen(&self, device: &DeviceKey, iso: Option<liveresponse_api::proto::Isolation>) {
        let iso = iso.map(|i| liveresponse_api::proto::Isolation {
            since: bounded(&i.since, 64),
            by: bounded(&i.by, 256),
        });
        let changed = {
            let mut st = self.state();
            match st.links.get_mut(device).and_then(|l| l.hello.as_mut()) {
                Some(h) if h.isolation != iso => {
                    h.isolation = iso;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.device_wakes.wake(device.clone());
        }
    }

    /// Writes a getfile chunk, outside the gateway's lock: the stream's read loop waits
    /// for the disk, which is the back-pressure a fast agent needs.
    fn on_file_chunk(
        &self,
        device: &DeviceKey,
        uid: &str,
        chunk: liveresponse_api::proto::FileChunk,
    ) -> Result<(), Status> {
        let (sink, wake) = {
            let mut st = self.state();
            let Some(f) = st.inflight.get_mut(uid) else {
                return Ok(());
            };
            if &f.target.device != device {
                return Err(Status::permission_denied(
                    "that command belongs to another device",
                ));
            }
            let Some(sink) = f.file.clone() else {
                return Err(Status::invalid_argument(
                    "a file chunk for a command that moves no file",
                ));
            };
            let wake = f
                .progress_woken
                .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if wake {
                f.progress_woken = Some(Instant::now());
            }
            (sink, wake.then(|| f.target.object_ref()))
        };
        let len = chunk.data.len();
        blocking(|| {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(
                chunk.offset,
                &chunk.data,
                chunk.total_size,
            )
        });
        self.metrics.file_bytes.inc_by(len as u64);
        if let Some(r) = wake {
            self.command_wakes.wake(r);
        }
        Ok(())
    }

    fn on_event(
        &self,
        device: &DeviceKey,
        ev: liveresponse_api::proto::CommandEvent,
    ) -> Result<(), Status> {
        let uid = ev.command_uid;
        let mut st = self.state();
        // Events of commands not in flight here are late replays of something already
        // recorded or forgotten: ignore them.
        let Some(f) = st.inflight.get_mut(&uid) else {
            return Ok(());
        };
        // A malicious agent must not reach another device's commands.
        if &f.target.device != device {
            return Err(Status::permission_denied(
                "that command belongs to another device",
            ));
        }
        match ev.event {
            Some(command_event::Event::Output(chunk)) => f.sink.push(&chunk.data),
            Some(command_event::Event::Progress(p)) => {
                // Only a count the status can show as such; an agent names no other unit.
                if p.unit != "files" || p.done > p.total {
                    return Ok(());
                }
                f.work = Some((p.done, p.total));
                let wake = f
                    .progress_woken
                    .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                if wake {
                    f.progress_woken = Some(Instant::now());
                    let r = f.target.object_ref();
                    drop(st);
                    self.command_wakes.wake(r);
                }
            }
            // Handled by on_file_chunk before the lock is taken.
            Some(command_event::Event::File(_)) => {}
            Some(command_event::Event::Completed(c)) => {
                let Some(f) = st.inflight.remove(&uid) else {
                    return Ok(());
                };
                // Everything an agent says ends up in status: bounded, so no status write
                // can grow past what etcd takes.
                let mut warnings: Vec<String> = c
                    .warnings
                    .iter()
                    .take(MAX_WARNINGS)
                    .map(|w| bounded(w, MAX_WARNING))
                    .collect();
                if c.warnings.len() > MAX_WARNINGS {
                    warnings.push(format!(
                        "{} more warnings cut",
                        c.warnings.len() - MAX_WARNINGS
                    ));
                }
                let mut working_directory = c.working_directory;
                if working_directory.len() > MAX_PATH {
                    working_directory.clear();
                    warnings.push(format!(
                        "the agent reported a working directory longer than {MAX_PATH} bytes; the session stays where it was"
                    ));
                }
                let report = Report {
                    step: f.target.step,
                    outcome: Outcome::try_from(c.outcome).unwrap_or(Outcome::Unspecified),
                    exit_code: c.exit_code,
                    error_reason: crate::status::reason(&c.error_reason),
                    error_message: bounded(&c.error_message, MAX_MESSAGE),
                    working_directory,
                    warnings,
                    output: f.sink.finish(c.output_size, &c.output_sha256),
                    file: f.file.as_ref().map(|sink| {
                        sink.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .finish(c.file.as_ref())
                    }),
                };
                tracing::info!(%uid, outcome = report.outcome.as_str_name(), "agent reported a result");
                st.result_bytes += report.bytes();
                st.result_order.push_back(uid.clone());
                st.results.insert(uid, report);
                while st.result_bytes > MAX_RESULT_BYTES {
                    let Some(old) = st.result_order.pop_front() else {
                        break;
                    };
                    if let Some(r) = st.results.remove(&old) {
                        tracing::warn!(uid = %old, "too many unrecorded results; dropping one (its command is sent again)");
                        st.result_bytes = st.result_bytes.saturating_sub(r.bytes());
                    }
                }
                // The order list only needs the uids still held.
                if st.result_order.len() > 2 * st.results.len() + 64 {
                    let State {
                        result_order,
                        results,
                        ..
                    } = &mut *st;
                    result_order.retain(|u| results.contains_key(u));
                }
                drop(st);
                self.command_wakes.wake(f.target.object_ref());
            }
            None => {}
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
        let Some(secret) = self.find_token(ns, &req.bootstrap_token).await? else {
            // Same answer whatever was wrong, so a caller learns nothing about the namespace.
            return Err(Status::unauthenticated(
                "the bootstrap token is not valid for this namespace: ask your live response administrator for a current token",
            ));
        };
        // Whoever holds the token may learn why it does not serve them.
        check_token(&secret, name, jiff::Timestamp::now()).map_err(Status::permission_denied)?;
        self.check_not_revoked(ns, name).await?;
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
        self.count_use(ns, &secret.name_any(), name).await?;
        let (cert_pem, fp) = self
            .ca
            .sign_device(&req.csr_pem, ns, name, self.device_cert_lifetime(ns))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec = DeviceSpec {
            enrollment: Enrollment::ExternalHost,
            node_name: None,
            certificate_sha256: Some(fp),
            previous_certificate_sha256: None,
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
            ca_pem: self.ca.bundle_pem.clone(),
            device: name.to_string(),
            namespace: ns.to_string(),
        })
    }

    /// The bootstrap token Secret of `ns` holding `token`: from the cache of labelled
    /// Secrets, or (a token created moments ago) from the API server.
    async fn find_token(&self, ns: &str, token: &str) -> Result<Option<Secret>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let holds = |s: &Secret| {
            s.data
                .as_ref()
                .and_then(|d| d.get("token"))
                .is_some_and(|t| constant_time_eq(&t.0, token.as_bytes()))
        };
        if let Some(store) = self.tokens.get()
            && let Some(s) = store
                .state()
                .into_iter()
                .find(|s| s.namespace().as_deref() == Some(ns) && holds(s))
        {
            return Ok(Some((*s).clone()));
        }
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let list = secrets
            .list(&ListParams::default().labels(&format!("{BOOTSTRAP_LABEL}=true")))
            .await
            .map_err(internal)?;
        Ok(list.items.into_iter().find(holds))
    }

    /// At most `enroll_per_minute` enrollments per source address and minute: a guessed or
    /// leaked token cannot be tried at line rate.
    fn limit_enrollments(&self, ip: std::net::IpAddr) -> Result<(), Status> {
        let mut m = self.enrollments.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 10_000 {
            m.retain(|_, (start, _)| start.elapsed() < Duration::from_secs(60));
        }
        let e = m.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= Duration::from_secs(60) {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
        if e.1 > self.enroll_per_minute {
            return Err(Status::resource_exhausted(format!(
                "more than {} enrollments from {ip} in a minute; wait a minute and retry",
                self.enroll_per_minute
            )));
        }
        Ok(())
    }

    /// Gives the token cache to the gateway (it starts before the caches do).
    pub fn set_token_store(&self, store: kube::runtime::reflector::Store<Secret>) {
        let _ = self.tokens.set(store);
    }

    /// The namespaces' settings, for their device certificate lifetime.
    pub fn set_settings_store(&self, store: kube::runtime::reflector::Store<LiveResponseSettings>) {
        let _ = self.settings.set(store);
    }

    /// Life of a new certificate for a device of `ns`: its settings', else this gateway's.
    fn device_cert_lifetime(&self, ns: &str) -> Duration {
        self.settings
            .get()
            .and_then(|s| s.get(&ObjectRef::new("default").within(ns)))
            .and_then(|s| s.spec.device_certificate_lifetime.clone())
            .and_then(|l| liveresponse_api::crd::parse_duration(&l))
            .unwrap_or(self.device_cert_lifetime)
    }

    /// A device whose Device was deleted (revoked) may not enroll again until an admin
    /// clears its record.
    async fn check_not_revoked(&self, ns: &str, name: &str) -> Result<(), Status> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let record = cms.get_opt(REVOKED_CONFIGMAP).await.map_err(internal)?;
        if let Some(when) = record
            .and_then(|c| c.data)
            .and_then(|d| d.get(name).cloned())
        {
            return Err(Status::permission_denied(format!(
                "device {name} was revoked ({when}); a live response administrator must clear the record before it enrolls again: kubectl -n {ns} patch configmap {REVOKED_CONFIGMAP} --type json -p '[{{\"op\":\"remove\",\"path\":\"/data/{name}\"}}]'"
            )));
        }
        Ok(())
    }

    /// Counts one use of the token (compare-and-set on its `uses` annotation), refusing
    /// when it has none left.
    async fn count_use(&self, ns: &str, secret: &str, device: &str) -> Result<(), Status> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        for _ in 0..10 {
            let Some(fresh) = secrets.get_opt(secret).await.map_err(internal)? else {
                return Err(Status::unauthenticated(
                    "the bootstrap token was deleted: ask your live response administrator for a current token",
                ));
            };
            check_token(&fresh, device, jiff::Timestamp::now())
                .map_err(Status::permission_denied)?;
            let uses = token_uses(&fresh) + 1;
            let patch = serde_json::json!({ "metadata": {
                "resourceVersion": fresh.resource_version(),
                "annotations": { USES_ANNOTATION: uses.to_string() },
            }});
            match secrets
                .patch(secret, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(internal(e)),
            }
        }
        Err(Status::unavailable(
            "the bootstrap token is being used by many devices at once; retry",
        ))
    }

    /// Signs a new certificate for a connected device and records its fingerprint, keeping
    /// the one the agent holds as `previousCertificateSha256`, so an agent that never gets
    /// the answer can still connect with it and renew again. The agent names what it holds;
    /// only a fingerprint already accepted for this device (recorded, or the stream's own,
    /// `stream_fp`) is believed, else the recorded current one is kept.
    async fn renew(
        &self,
        device: &DeviceKey,
        stream_fp: &str,
        req: &RenewRequest,
    ) -> Result<Renewed, String> {
        let csr_pem = &req.csr_pem;
        let (ns, name) = device;
        let (cert_pem, fp) = self
            .ca
            .sign_device(csr_pem, ns, name, self.device_cert_lifetime(ns))
            .map_err(|e| e.to_string())?;
        let devices: Api<Device> = Api::namespaced(self.client.clone(), ns);
        let dev = devices
            .get(name)
            .await
            .map_err(|e| format!("cannot read the Device: {e}"))?;
        if dev.metadata.deletion_timestamp.is_some() {
            return Err("the Device is being deleted".into());
        }
        let previous = kept_fingerprint(&req.held_sha256, &dev.spec, stream_fp);
        // The resourceVersion makes this a compare-and-swap with enrollment and deletion.
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": dev.metadata.resource_version },
            "spec": {
                "certificateSha256": fp,
                "previousCertificateSha256": previous,
            },
        });
        devices
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| format!("cannot record the new certificate: {e}"))?;
        let renew_after =
            pki::renew_after_pem(&cert_pem, jiff::Timestamp::now()).map_err(|e| e.to_string())?;
        tracing::info!(namespace = %ns, device = %name, renew_after_s = renew_after.as_secs(), "device certificate renewed");
        Ok(Renewed {
            certificate_pem: cert_pem,
            ca_bundle_pem: self.ca.bundle_pem.clone(),
            renew_after_seconds: renew_after.as_secs(),
            refused: String::new(),
        })
    }

    /// Who is on the other end of a stream: the device its certificate was issued for, as
    /// long as that Device still exists and recorded this very certificate (or the one
    /// before its last renewal). Also says when that certificate is due for renewal.
    async fn authenticate(
        &self,
        certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    ) -> Result<(DeviceKey, String, Duration), Status> {
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
        let held = pki::fingerprint(leaf.as_ref());
        let fp = Some(held.clone());
        let renew = pki::renew_after(leaf.as_ref(), jiff::Timestamp::now())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let devices: Api<Device> = Api::namespaced(self.client.clone(), &ns);
        let dev = devices.get_opt(&name).await.map_err(internal)?;
        match dev {
            Some(d)
                if d.metadata.deletion_timestamp.is_none()
                    && (d.spec.certificate_sha256 == fp
                        || d.spec.previous_certificate_sha256 == fp) =>
            {
                Ok(((ns, name), held, renew))
            }
            _ => Err(Status::permission_denied(format!(
                "the certificate for device {name} in {ns} is revoked (the Device was deleted or re-enrolled); enroll again"
            ))),
        }
    }
}

/// The fingerprint to keep accepting after a renewal: the one the agent says it holds, if
/// that is already accepted for the device; else the recorded current one.
fn kept_fingerprint(claimed: &str, spec: &DeviceSpec, stream_fp: &str) -> Option<String> {
    let accepted = spec.certificate_sha256.as_deref() == Some(claimed)
        || spec.previous_certificate_sha256.as_deref() == Some(claimed)
        || stream_fp == claimed;
    if accepted {
        Some(claimed.to_string())
    } else {
        spec.certificate_sha256.clone()
    }
}

/// Least time between two certificate renewals on one stream.
const RENEW_INTERVAL: Duration = Duration::from_secs(5);

fn renewed_refusal_msg(why: String) -> Renewed {
    Renewed {
        refused: bounded(&why, MAX_MESSAGE),
        ..Default::default()
    }
}

fn renewed_refusal(why: &str) -> OperatorMessage {
    OperatorMessage {
        msg: Some(operator_message::Msg::Renewed(renewed_refusal_msg(
            why.to_string(),
        ))),
    }
}

/// Records in the tenant namespace that a device was revoked, so its old bootstrap token
/// cannot enroll it again until an admin clears the record.
pub const REVOKED_CONFIGMAP: &str = "liveresponse-revoked-devices";
/// How many devices a bootstrap token enrolled (kept by the operator on the Secret).
pub const USES_ANNOTATION: &str = "liveresponse.io/uses";

fn token_uses(s: &Secret) -> u64 {
    s.annotations()
        .get(USES_ANNOTATION)
        .and_then(|u| u.parse().ok())
        .unwrap_or(0)
}

fn token_field(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether a bootstrap token Secret may enroll `device` now: its optional `expiration` (RFC
/// 3339), `max-uses` and `device-name-pattern` (`*` matches any run of characters).
pub fn check_token(s: &Secret, device: &str, now: jiff::Timestamp) -> Result<(), String> {
    if let Some(exp) = token_field(s, "expiration") {
        let exp: jiff::Timestamp = exp.parse().map_err(|_| {
            format!("the bootstrap token's expiration {exp:?} is not an RFC 3339 time; ask your administrator to fix the Secret")
        })?;
        if now >= exp {
            return Err(format!(
                "the bootstrap token expired at {exp}: ask your live response administrator for a current token"
            ));
        }
    }
    if let Some(max) = token_field(s, "max-uses") {
        let max: u64 = max.parse().map_err(|_| {
            format!("the bootstrap token's max-uses {max:?} is not a number; ask your administrator to fix the Secret")
        })?;
        if token_uses(s) >= max {
            return Err(format!(
                "the bootstrap token was already used {max} time(s), its limit: ask your live response administrator for a new token"
            ));
        }
    }
    if let Some(pattern) = token_field(s, "device-name-pattern")
        && !glob_match(&pattern, device)
    {
        return Err(format!(
            "this bootstrap token enrolls only devices named {pattern:?}, not {device:?}"
        ));
    }
    Ok(())
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Writes the revocation record of a deleted Device.
pub async fn record_revocation(client: kube::Client, ns: &str, name: &str) -> kube::Result<()> {
    let cms: Api<ConfigMap> = Api::namespaced(client, ns);
    let note = format!(
        "revoked at {}: its Device was deleted; remove this key to let it enroll again",
        jiff::Timestamp::now()
    );
    let patch = serde_json::json!({ "data": { name: note } });
    match cms
        .patch(
            REVOKED_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(REVOKED_CONFIGMAP.into()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                },
                data: Some([(name.to_string(), note)].into_iter().collect()),
                ..Default::default()
            };
            cms.create(&PostParams::default(), &cm).await.map(|_| ())
        }
        Err(e) => Err(e),
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
        if let Some(addr) = req.remote_addr() {
            self.0.limit_enrollments(addr.ip())?;
        }
        self.0.enroll(req.into_inner()).await.map(Response::new)
    }

    type AttachStream = ReceiverStream<Result<OperatorMessage, Status>>;
    type FetchStream = ReceiverStream<Result<ContentChunk, Status>>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let (device, _, _) = self.0.authenticate(req.peer_certs()).await?;
        let ask = req.into_inner();
        let source = self
            .0
            .content_source(&device, &ask.command_uid, &ask.name)?;
        tracing::info!(uid = %ask.command_uid, library = %source.library, offset = ask.offset, "serving a library file to its device");
        content::serve(self.0.clone(), ask.command_uid, source, ask.offset)
            .await
            .map(Response::new)
    }

    async fn attach(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let gw = self.0.clone();
        let (device, held, renew_after) = gw.authenticate(req.peer_certs()).await?;
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
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        if hello.protocol_version != PROTOCOL_VERSION {
            let reason = incompatible(hello.protocol_version);
            tracing::warn!(device = %device.1, %reason, "refusing agent");
            let _ = tx.try_send(Ok(OperatorMessage {
                msg: Some(operator_message::Msg::Reject(Reject {
                    reason: reason.clone(),
                })),
            }));
            let _ = tx.try_send(Err(Status::failed_precondition(reason)));
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let welcome = OperatorMessage {
            msg: Some(operator_message::Msg::Welcome(Welcome {
                device: device.1.clone(),
                namespace: device.0.clone(),
                heartbeat_seconds: u32::try_from(gw.heartbeat.as_secs()).unwrap_or(5),
                ca_bundle_pem: gw.ca.bundle_pem.clone(),
                renew_after_seconds: renew_after.as_secs(),
            })),
        };
        let hostname = crate::status::truncate(&hello.hostname, 253);
        // The welcome goes first, so no Execute can reach the agent before it; a refused
        // registration drops the stream with it unsent.
        tx.try_send(Ok(welcome))
            .map_err(|_| Status::aborted("stream closed"))?;
        // Weak: the stream must still end when the gateway drops the connection.
        let answers = tx.downgrade();
        let conn_id = gw.register(device.clone(), hello, tx)?;
        tracing::info!(namespace = %device.0, device = %device.1, %hostname, "agent connected");
        tokio::spawn(async move {
            let idle = gw.heartbeat * 3;
            // An agent that sends heartbeats in a tight loop must not flood anything.
            let mut last_seen: Option<Instant> = None;
            // Signing is work an agent could ask for in a loop: one renewal at a time, and
            // not more often than every RENEW_INTERVAL.
            let mut last_renewal: Option<Instant> = None;
            let reason = loop {
                match tokio::time::timeout(idle, inbound.message()).await {
                    Err(_) => break format!("no heartbeat for {}s", idle.as_secs()),
                    Ok(Err(e)) => break format!("stream error: {}", e.message()),
                    Ok(Ok(None)) => break "stream closed".to_string(),
                    Ok(Ok(Some(m))) => match m.msg {
                        Some(agent_message::Msg::Heartbeat(hb)) => {
                            gw.isolation_seen(&device, hb.isolation);
                            if last_seen.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                                last_seen = Some(Instant::now());
                                gw.seen(&device);
                            }
                        }
                        Some(agent_message::Msg::Event(
                            liveresponse_api::proto::CommandEvent {
                                command_uid,
                                event: Some(command_event::Event::File(chunk)),
                            },
                        )) => {
                            if let Err(s) = gw.on_file_chunk(&device, &command_uid, chunk) {
                                break format!("protocol violation: {}", s.message());
                            }
                        }
                        Some(agent_message::Msg::Event(ev)) => {
                            if let Err(s) = gw.on_event(&device, ev) {
                                break format!("protocol violation: {}", s.message());
                            }
                        }
                        Some(agent_message::Msg::Renew(r)) => {
                            let Some(tx) = answers.upgrade() else {
                                continue;
                            };
                            if last_renewal.is_some_and(|t| t.elapsed() < RENEW_INTERVAL) {
                                let _ = tx.try_send(Ok(renewed_refusal(
                                    "renewals are limited to one every 5s",
                                )));
                                continue;
                            }
                            last_renewal = Some(Instant::now());
                            let (gw, device, held) = (gw.clone(), device.clone(), held.clone());
                            // Off the read loop: the API calls must not delay heartbeats.
                            tokio::spawn(async move {
                                let answer = match gw.renew(&device, &held, &r).await {
                                    Ok(r) => r,
                                    Err(why) => {
                                        tracing::warn!(namespace = %device.0, device = %device.1, %why, "certificate renewal refused");
                                        renewed_refusal_msg(why)
                                    }
                                };
                                let _ = tx.try_send(Ok(OperatorMessage {
                                    msg: Some(operator_message::Msg::Renewed(answer)),
                                }));
                            });
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

mod content;
#[cfg(test)]
mod fuzz;

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

    fn token(fields: &[(&str, &str)], uses: Option<&str>) -> Secret {
        let mut s = Secret {
            data: Some(
                fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            k8s_openapi::ByteString(v.as_bytes().to_vec()),
                        )
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        if let Some(u) = uses {
            s.metadata.annotations = Some([(USES_ANNOTATION.to_string(), u.to_string())].into());
        }
        s
    }

    #[test]
    fn bootstrap_token_policies() {
        let now: jiff::Timestamp = "2026-06-01T00:00:00Z".parse().unwrap_or_default();
        assert_eq!(
            check_token(&token(&[("token", "t")], None), "web-1", now),
            Ok(())
        );
        let expired = token(
            &[("token", "t"), ("expiration", "2026-05-31T23:59:59Z")],
            None,
        );
        let e = check_token(&expired, "web-1", now)
            .err()
            .unwrap_or_default();
        assert!(e.contains("expired"), "{e}");
        let fresh = token(
            &[("token", "t"), ("expiration", "2026-06-02T00:00:00Z")],
            None,
        );
        assert_eq!(check_token(&fresh, "web-1", now), Ok(()));
        let used = token(&[("token", "t"), ("max-uses", "2")], Some("2"));
        let e = check_token(&used, "web-1", now).err().unwrap_or_default();
        assert!(e.contains("already used 2"), "{e}");
        let left = token(&[("token", "t"), ("max-uses", "2")], Some("1"));
        assert_eq!(check_token(&left, "web-1", now), Ok(()));
        let named = token(&[("token", "t"), ("device-name-pattern", "web-*")], None);
        assert_eq!(check_token(&named, "web-1", now), Ok(()));
        let e = check_token(&named, "db-1", now).err().unwrap_or_default();
        assert!(e.contains("web-*"), "{e}");
        let bad = token(&[("token", "t"), ("expiration", "tomorrow")], None);
        assert!(check_token(&bad, "web-1", now).is_err());
    }

    #[test]
    fn a_renewal_keeps_the_certificate_the_agent_holds_if_it_was_accepted() {
        let spec = DeviceSpec {
            certificate_sha256: Some("cur".into()),
            previous_certificate_sha256: Some("prev".into()),
            ..Default::default()
        };
        // Stored the last renewal: it holds the current one.
        assert_eq!(
            kept_fingerprint("cur", &spec, "cur").as_deref(),
            Some("cur")
        );
        // Lost the last answer and came back with the previous one.
        assert_eq!(
            kept_fingerprint("prev", &spec, "prev").as_deref(),
            Some("prev")
        );
        // A long-lived stream opened with a certificate renewed twice since.
        assert_eq!(
            kept_fingerprint("old", &spec, "old").as_deref(),
            Some("old")
        );
        // A made-up fingerprint is not believed.
        assert_eq!(
            kept_fingerprint("forged", &spec, "cur").as_deref(),
            Some("cur")
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*-prod", "db-prod"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxcyyb"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
