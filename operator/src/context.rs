//! What every reconciler shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use liveresponse_api::crd::{Command, LiveResponseSession};

use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// Field manager of the operator's server-side-apply status patches.
pub const MANAGER: &str = "liveresponse-operator";

type SessionLock = Arc<tokio::sync::Mutex<()>>;

pub struct Context {
    pub client: Client,
    pub gateway: Arc<Gateway>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub commands: Store<Command>,
    pub sessions: Store<LiveResponseSession>,
    /// When this process started: commands found Running after a restart get a grace period
    /// for their agent to reconnect before they are failed.
    pub started: Instant,
    /// Serialises id assignment per session, so two commands never get the same id.
    session_locks: Mutex<HashMap<(String, String), SessionLock>>,
    /// Wakes Commands of a session when one of them finishes (the next may start).
    pub wake: tokio::sync::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<Command>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        gateway: Arc<Gateway>,
        metrics: Metrics,
        instance: &str,
        commands: Store<Command>,
        sessions: Store<LiveResponseSession>,
        wake: tokio::sync::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<Command>>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "liveresponse-operator".into(),
                instance: Some(instance.into()),
            },
        );
        Self {
            client,
            gateway,
            metrics,
            recorder,
            commands,
            sessions,
            started: Instant::now(),
            session_locks: Mutex::new(HashMap::new()),
            wake,
        }
    }

    pub fn session_lock(&self, ns: &str, session: &str) -> SessionLock {
        let mut locks = self.session_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks
            .entry((ns.to_string(), session.to_string()))
            .or_default()
            .clone()
    }

    /// Records a Kubernetes Event on an object; failures are logged, never fatal.
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
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!(error = %e, "could not record an event");
        }
    }
}

/// Now as a Kubernetes timestamp.
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

/// Parses a Go-style duration (`30m`, `1h30m`, `90s`, `500ms`), as the CRDs validate them.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            's' => 1.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("72h"), Some(Duration::from_secs(72 * 3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration(""), None);
    }
}
