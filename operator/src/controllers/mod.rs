//! One module per controller.

pub mod command;
pub mod device;
pub mod session;

use std::sync::Arc;

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
