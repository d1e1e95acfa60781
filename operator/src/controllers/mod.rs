//! One module per controller.

pub mod artifact_gc;
pub mod batch;
pub mod command;
pub mod device;
pub mod library;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::error::Error;

/// Shared error policy: count it, log it with the object, retry with a per-object backoff.
pub fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action
where
    K: kube::Resource,
{
    move |obj, err, ctx| {
        ctx.metrics
            .reconcile_errors
            .with_label_values(&[controller])
            .inc();
        let ns = obj.namespace().unwrap_or_default();
        let name = obj.name_any();
        let delay = ctx.backoff(controller, &ns, &name);
        tracing::warn!(controller, namespace = %ns, name = %name, uid = obj.uid().unwrap_or_default(), error = %err, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
        Action::requeue(delay)
    }
}

/// `t + d`, saturating at the end of time.
pub fn plus(t: jiff::Timestamp, d: Duration) -> jiff::Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(jiff::Timestamp::MAX)
}

/// How long from `now` until `t` (zero once it passed).
pub fn until(now: jiff::Timestamp, t: jiff::Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or_default()
}

/// When work waiting for an offline device gives up: `limit` (the namespace's
/// `offlineQueueTimeout`) after the session was opened or the device went away, whichever
/// is later. Sessions and their commands share it, so both end at the same moment.
pub fn offline_deadline(
    session_created: jiff::Timestamp,
    offline_since: Option<jiff::Timestamp>,
    limit: Duration,
) -> jiff::Timestamp {
    let start = match offline_since {
        Some(t) if t > session_created => t,
        _ => session_created,
    };
    plus(start, limit)
}
