//! What every reconciler shares.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use liveresponse_api::crd::{Command, Device, LiveResponseSession, LiveResponseSettings};

use crate::artifacts::ArtifactStore;
use crate::controllers::command::{DeviceFacts, Limits};
use crate::gateway::{DeviceKey, Gateway};
use crate::metrics::Metrics;
use crate::wake::WakeQueue;

/// Field manager of the operator's server-side-apply status patches.
pub const MANAGER: &str = "liveresponse-operator";

/// How many uids of recently finished commands are remembered (see
/// [`Context::just_finished`]).
const FINISHED_MEMORY: usize = 4096;

/// The caches the reconcilers read.
pub struct Stores {
    pub commands: Store<Command>,
    pub sessions: Store<LiveResponseSession>,
    pub devices: Store<Device>,
    pub settings: Store<LiveResponseSettings>,
}

/// Who this operator is.
pub struct Who {
    /// Name of this replica.
    pub instance: String,
    /// The user name the API server knows it by (see [`Context::identity`]).
    pub identity: String,
}

/// Timing knobs (flags of the operator).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// After a restart, how long agents get to reconnect before their running commands fail.
    pub restart_grace: Duration,
    /// How long a running command survives its device's disconnection.
    pub disconnect_grace: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            restart_grace: Duration::from_secs(20),
            disconnect_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Default)]
struct Finished {
    set: HashSet<String>,
    order: VecDeque<String>,
}

pub struct Context {
    pub client: Client,
    pub gateway: Arc<Gateway>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub commands: Store<Command>,
    pub sessions: Store<LiveResponseSession>,
    pub devices: Store<Device>,
    pub settings: Store<LiveResponseSettings>,
    /// Sessions to look at again (a command finished, a device came or went).
    pub session_wakes: WakeQueue<ObjectRef<LiveResponseSession>>,
    /// When this process started: commands found Running after a restart get a grace period
    /// for their agent to reconnect before they are failed.
    pub started: Instant,
    pub restart_grace: Duration,
    pub disconnect_grace: Duration,
    finished: Mutex<Finished>,
    failures: Mutex<HashMap<(&'static str, String, String), u32>>,
    /// Where getfile results, full outputs and library uploads are kept.
    pub artifacts: Arc<ArtifactStore>,
    /// The operator's own user name, as the API server knows it: a batch's child sessions
    /// are opened in this name, which no one else can use (admission).
    pub identity: String,
}

impl Context {
    pub fn new(
        client: Client,
        gateway: Arc<Gateway>,
        metrics: Metrics,
        who: Who,
        stores: Stores,
        timing: Timing,
        artifacts: Arc<ArtifactStore>,
    ) -> Self {
        let Who { instance, identity } = who;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "liveresponse-operator".into(),
                instance: Some(instance),
            },
        );
        Self {
            client,
            gateway,
            metrics,
            recorder,
            commands: stores.commands,
            sessions: stores.sessions,
            devices: stores.devices,
            settings: stores.settings,
            session_wakes: WakeQueue::new(),
            started: Instant::now(),
            restart_grace: timing.restart_grace,
            disconnect_grace: timing.disconnect_grace,
            finished: Mutex::new(Finished::default()),
            failures: Mutex::new(HashMap::new()),
            artifacts,
            identity,
        }
    }

    /// The cached Commands of one session.
    pub fn session_commands(&self, ns: &str, session: &str) -> Vec<Arc<Command>> {
        commands_of(&self.commands, ns, session)
    }

    /// The namespace's settings (defaults when it has none).
    pub fn settings_of(&self, ns: &str) -> Option<Arc<LiveResponseSettings>> {
        self.settings.get(&ObjectRef::new("default").within(ns))
    }

    pub fn limits(&self, ns: &str) -> Limits {
        self.settings_of(ns)
            .map(|s| Limits::from_settings(&s.spec))
            .unwrap_or_default()
    }

    /// The device's link: this replica's gateway knows whether it is connected and since
    /// when it is not; after a restart, the Device's `lastSeen` says since when.
    pub fn device_facts(&self, key: &DeviceKey) -> DeviceFacts {
        let link = self.gateway.link(key);
        let connected = link.as_ref().is_some_and(|l| l.connected);
        let offline_since = link.and_then(|l| l.disconnected_at).or_else(|| {
            self.devices
                .get(&ObjectRef::new(&key.1).within(&key.0))
                .and_then(|d| d.status.as_ref().and_then(|s| s.last_seen.clone()))
                .map(|t| t.0)
        });
        DeviceFacts {
            connected,
            offline_since: if connected { None } else { offline_since },
        }
    }

    fn finished(&self) -> std::sync::MutexGuard<'_, Finished> {
        self.finished.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that this operator recorded a command final, until its cache shows it.
    pub fn mark_finished(&self, uid: &str) {
        let mut f = self.finished();
        if f.set.insert(uid.to_string()) {
            f.order.push_back(uid.to_string());
        }
        while f.order.len() > FINISHED_MEMORY {
            if let Some(old) = f.order.pop_front() {
                f.set.remove(&old);
            }
        }
    }

    pub fn just_finished(&self, uid: &str) -> bool {
        self.finished().set.contains(uid)
    }

    /// The delay before retrying an object whose reconcile failed `n` times in a row:
    /// 500 ms doubling up to a minute, per object.
    pub fn backoff(&self, kind: &'static str, ns: &str, name: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f
            .entry((kind, ns.to_string(), name.to_string()))
            .or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    pub fn reset_backoff(&self, kind: &'static str, ns: &str, name: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !f.is_empty() {
            f.remove(&(kind, ns.to_string(), name.to_string()));
        }
    }

    /// Records a Kubernetes Event on an object; failures are logged, never fatal. The write
    /// happens in the background: an Event must not hold up the reconcile that records it
    /// (a command's next step waits for that reconcile to return).
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        let (recorder, reference) = (self.recorder.clone(), obj.object_ref(&()));
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::debug!(error = %e, "could not record an event");
            }
        });
    }
}

/// The cached Commands of one session.
pub fn commands_of(store: &Store<Command>, ns: &str, session: &str) -> Vec<Arc<Command>> {
    store
        .state()
        .into_iter()
        .filter(|c| c.spec.session == session && c.metadata.namespace.as_deref() == Some(ns))
        .collect()
}

/// Now as a Kubernetes timestamp.
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

pub use liveresponse_api::crd::parse_duration;

/// 500 ms after the first failure, doubling, at most a minute.
pub fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(500u64 << exp).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::backoff_delay;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff_delay(1), Duration::from_millis(500));
        assert_eq!(backoff_delay(2), Duration::from_secs(1));
        assert_eq!(backoff_delay(4), Duration::from_secs(4));
        assert_eq!(backoff_delay(8), Duration::from_secs(60));
        assert_eq!(backoff_delay(1000), Duration::from_secs(60));
    }
}
