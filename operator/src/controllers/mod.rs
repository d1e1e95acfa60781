//! One module per controller.

pub mod command;
pub mod device;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;

use crate::context::Context;
use crate::error::Error;

/// Shared error policy: count it, log it, retry with a short delay.
pub fn error_policy<K>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_obj, err, ctx| {
        ctx.metrics
            .reconcile_errors
            .with_label_values(&[controller])
            .inc();
        tracing::warn!(controller, error = %err, "reconcile failed");
        Action::requeue(Duration::from_secs(2))
    }
}
