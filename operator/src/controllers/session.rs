//! The LiveResponseSession controller: fetch → [`decide`] → apply. Admission against the
//! settings and limits, connecting to the device (woken when its agent comes), expiry when
//! the device stays offline past `offlineQueueTimeout` or no command comes for
//! `idleTimeout`, and ending (state Disconnected or deletion).
//!
//! The session's phase, times, message and `Ready` condition are written here only; the
//! command controller advances `commandCount` (by compare-and-set, its ids),
//! `lastActivityTime` and `workingDirectory`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use liveresponse_api::crd::{
    LiveResponseSession, SessionPhase, SessionState, SettingsSpec, Time, parse_duration,
};
use liveresponse_api::proto::CancelReason;
use serde_json::json;

use crate::context::Context;
use crate::controllers::command::{DeviceFacts, Limits};
use crate::controllers::{offline_deadline, plus, until};
use crate::error::{Error, Result};
use crate::status::set_condition;

pub const FINALIZER: &str = "liveresponse.io/session";

/// Everything [`decide`] looks at besides the session.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: jiff::Timestamp,
    /// The namespace's settings, when live response is enabled there.
    pub settings: Option<SettingsSpec>,
    /// The admission verdict against the limits (see [`admit`]).
    pub admission: Result<(), String>,
    pub device_exists: bool,
    pub device: DeviceFacts,
    /// Some command of the session has not finished.
    pub busy: bool,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Wait(Option<Duration>),
    /// Admitted; the device's agent is not here yet.
    Connecting,
    Connect,
    End {
        phase: SessionPhase,
        reason: &'static str,
        message: String,
    },
}

fn phase(s: &LiveResponseSession) -> Option<SessionPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

fn end(phase: SessionPhase, reason: &'static str, message: String) -> Decision {
    Decision::End {
        phase,
        reason,
        message,
    }
}

/// Decides the next step of a session's life. Pure: every fact comes in `o`.
pub fn decide(s: &LiveResponseSession, o: &Observed) -> Decision {
    let current = phase(s);
    if current.is_some_and(SessionPhase::is_final) {
        return Decision::Wait(None);
    }
    if s.spec.state == SessionState::Disconnected {
        return end(
            SessionPhase::Disconnected,
            "Disconnected",
            "the analyst ended the session".into(),
        );
    }
    let ns = s.namespace().unwrap_or_default();
    let Some(settings) = &o.settings else {
        return end(
            SessionPhase::Rejected,
            "Disabled",
            format!(
                "live response is not enabled in namespace {ns}: a live response settings admin must create LiveResponseSettings \"default\" with spec.enabled: true (for example: kubectl -n {ns} apply -f config/samples/settings.yaml)"
            ),
        );
    };
    if matches!(current, None | Some(SessionPhase::Pending))
        && let Err(reason) = &o.admission
    {
        return end(SessionPhase::Rejected, "LimitReached", reason.clone());
    }
    if !o.device_exists {
        return end(
            SessionPhase::Failed,
            "DeviceNotFound",
            format!(
                "device {} does not exist in namespace {ns} (kubectl liveresponse devices lists the enrolled devices)",
                s.spec.device
            ),
        );
    }
    let created = s.creation_timestamp().map_or(o.now, |t| t.0);
    match current {
        Some(SessionPhase::Connected) => {}
        _ if o.device.connected => return Decision::Connect,
        _ => {
            let offline_limit = Limits::from_settings(settings).offline_queue_timeout;
            let deadline = offline_deadline(created, o.device.offline_since, offline_limit);
            if o.now >= deadline {
                return end(
                    SessionPhase::Expired,
                    "OfflineQueueTimeout",
                    format!(
                        "device {} stayed offline for the namespace's offlineQueueTimeout ({}s) after the session was opened; its queued commands timed out. Open a new session once the device is back",
                        s.spec.device,
                        offline_limit.as_secs()
                    ),
                );
            }
            return if current == Some(SessionPhase::Connecting) {
                // The agent's arrival wakes the session; the deadline ends it otherwise.
                Decision::Wait(Some(until(o.now, deadline)))
            } else {
                Decision::Connecting
            };
        }
    }
    // Connected: expire after idleTimeout without a command.
    let idle = s
        .spec
        .idle_timeout
        .as_deref()
        .and_then(parse_duration)
        .or_else(|| parse_duration(&settings.idle_timeout))
        .unwrap_or(Duration::from_secs(1800));
    let st = s.status.clone().unwrap_or_default();
    let since = st
        .last_activity_time
        .or(st.start_time)
        .map_or(created, |t| t.0);
    let deadline = plus(since, idle);
    if o.now < deadline {
        return Decision::Wait(Some(until(o.now, deadline)));
    }
    if o.busy {
        // The command's end wakes the session.
        return Decision::Wait(None);
    }
    end(
        SessionPhase::Expired,
        "Idle",
        format!("no command for {}s (idleTimeout)", idle.as_secs()),
    )
}

/// A session the operator opened for a BatchCommand: outside the session limits (the
/// batch's `maxConcurrency` bounds those), so a batch and an analyst's session on the same
/// device never refuse each other. Only the operator can open a session in its own name.
pub fn is_batch_child(s: &LiveResponseSession, operator: &str) -> bool {
    s.spec.requested_by == operator && s.labels().contains_key(liveresponse_api::crd::BATCH_LABEL)
}

/// Decides whether a new session may start. The order is deterministic — sessions already
/// admitted first, then pending ones by creation time and name — so when several sessions
/// race for the last slot, every reconcile picks the same winner. `others` are the
/// namespace's sessions; ended ones, deleted ones and `s` itself are skipped.
pub fn admit(
    s: &LiveResponseSession,
    others: &[Arc<LiveResponseSession>],
    settings: &SettingsSpec,
    operator: &str,
) -> Result<(), String> {
    if is_batch_child(s, operator) {
        return Ok(());
    }
    let mut candidates: Vec<&LiveResponseSession> = others
        .iter()
        .map(|o| o.as_ref())
        .filter(|o| o.uid() != s.uid())
        .filter(|o| !is_batch_child(o, operator))
        .filter(|o| o.meta().deletion_timestamp.is_none() && o.spec.state == SessionState::Active)
        .filter(|o| !phase(o).is_some_and(SessionPhase::is_final))
        .collect();
    candidates.push(s);
    let admitted = |o: &LiveResponseSession| {
        matches!(
            phase(o),
            Some(SessionPhase::Connecting | SessionPhase::Connected)
        )
    };
    candidates.sort_by(|a, b| {
        (
            !admitted(a),
            a.creation_timestamp().map(|t| t.0),
            a.name_any(),
        )
            .cmp(&(
                !admitted(b),
                b.creation_timestamp().map(|t| t.0),
                b.name_any(),
            ))
    });
    let (mut total, mut users, mut devices) = (0i32, HashMap::new(), HashMap::new());
    for o in candidates {
        let u = users.entry(o.spec.requested_by.clone()).or_insert(0i32);
        let d = devices.entry(o.spec.device.clone()).or_insert(0i32);
        let verdict = if total >= settings.max_sessions {
            Err(format!(
                "the namespace already has {} open sessions (maxSessions {}); end one first",
                total, settings.max_sessions
            ))
        } else if *u >= settings.sessions_per_user {
            Err(format!(
                "{} already has {} open sessions (sessionsPerUser {}); end one first",
                o.spec.requested_by, u, settings.sessions_per_user
            ))
        } else if *d >= settings.sessions_per_device {
            Err(format!(
                "device {} already has {} open session(s) (sessionsPerDevice {}); wait for it to end",
                o.spec.device, d, settings.sessions_per_device
            ))
        } else {
            total += 1;
            *u += 1;
            *d += 1;
            Ok(())
        };
        if o.uid() == s.uid() {
            return verdict;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// fetch and apply

fn observe(s: &LiveResponseSession, ctx: &Context) -> Observed {
    let ns = s.namespace().unwrap_or_default();
    let settings = ctx
        .settings_of(&ns)
        .filter(|st| st.spec.enabled)
        .map(|st| st.spec.clone());
    let admission = match (&settings, phase(s)) {
        (Some(st), None | Some(SessionPhase::Pending)) => {
            let others: Vec<_> = ctx
                .sessions
                .state()
                .into_iter()
                .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
                .collect();
            admit(s, &others, st, &ctx.identity)
        }
        _ => Ok(()),
    };
    let key = (ns.clone(), s.spec.device.clone());
    let device_exists = ctx
        .devices
        .get(&ObjectRef::new(&s.spec.device).within(&ns))
        .is_some();
    let name = s.name_any();
    let busy = ctx.session_commands(&ns, &name).iter().any(|c| {
        !c.status
            .as_ref()
            .and_then(|x| x.phase)
            .is_some_and(|p| p.is_final())
    });
    Observed {
        now: jiff::Timestamp::now(),
        settings,
        admission,
        device_exists,
        device: ctx.device_facts(&key),
        busy,
    }
}

#[tracing::instrument(skip_all, fields(namespace = s.namespace().unwrap_or_default(), name = %s.name_any(), uid = s.uid().unwrap_or_default()))]
pub async fn reconcile(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let api: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    let r = finalizer(&api, FINALIZER, s, |ev| async {
        match ev {
            Finalizer::Apply(s) => apply(s, ctx.clone()).await,
            Finalizer::Cleanup(s) => cleanup(s, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Gateway(other.to_string()),
    });
    let r = match r {
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        other => other,
    };
    if r.is_ok() {
        ctx.reset_backoff("session", &ns, &name);
    }
    r
}

async fn apply(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    update_gauge(&ctx);
    let o = observe(&s, &ctx);
    let decision = decide(&s, &o);
    tracing::debug!(?decision, "decided");
    let device = (s.namespace().unwrap_or_default(), s.spec.device.clone());
    match decision {
        Decision::Wait(Some(d)) => Ok(Action::requeue(d + Duration::from_millis(50))),
        Decision::Wait(None) => Ok(Action::await_change()),
        Decision::Connecting => {
            let mut st = s.status.clone().unwrap_or_default();
            st.phase = Some(SessionPhase::Connecting);
            st.message = Some(format!(
                "waiting for the agent of {} to connect",
                s.spec.device
            ));
            set_condition(
                &mut st.conditions,
                "Ready",
                false,
                "Connecting",
                "waiting for the device's agent",
                s.metadata.generation,
                o.now,
            );
            write_status(&ctx, &s, &st).await?;
            Ok(Action::await_change())
        }
        Decision::Connect => {
            let mut st = s.status.clone().unwrap_or_default();
            st.phase = Some(SessionPhase::Connected);
            st.start_time = Some(Time(o.now));
            st.message = Some(format!("connected to {}", s.spec.device));
            set_condition(
                &mut st.conditions,
                "Ready",
                true,
                "Connected",
                "commands can run",
                s.metadata.generation,
                o.now,
            );
            write_status(&ctx, &s, &st).await?;
            ctx.gateway.device_wakes.wake(device);
            ctx.event(
                s.as_ref(),
                false,
                "Connected",
                format!("connected to device {}", s.spec.device),
            )
            .await;
            Ok(Action::await_change())
        }
        Decision::End {
            phase,
            reason,
            message,
        } => {
            let mut st = s.status.clone().unwrap_or_default();
            st.phase = Some(phase);
            st.end_time = Some(Time(o.now));
            st.message = Some(message.clone());
            set_condition(
                &mut st.conditions,
                "Ready",
                false,
                reason,
                &message,
                s.metadata.generation,
                o.now,
            );
            write_status(&ctx, &s, &st).await?;
            let warning = matches!(phase, SessionPhase::Rejected | SessionPhase::Failed);
            ctx.event(s.as_ref(), warning, &format!("{phase:?}"), message)
                .await;
            wake_commands(&s, &ctx);
            ctx.gateway.device_wakes.wake(device);
            Ok(Action::await_change())
        }
    }
}

/// Writes the session's status, refused if the session changed since it was read.
async fn write_status(
    ctx: &Context,
    s: &LiveResponseSession,
    st: &liveresponse_api::crd::SessionStatus,
) -> Result<()> {
    let mut st = st.clone();
    st.observed_generation = s.metadata.generation;
    if s.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let ns = s.namespace().unwrap_or_default();
    let api: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "metadata": { "resourceVersion": s.resource_version() },
        "status": st,
    });
    api.patch_status(&s.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// The session's commands see its change (they end, or may run).
fn wake_commands(s: &LiveResponseSession, ctx: &Context) {
    let ns = s.namespace().unwrap_or_default();
    for c in ctx.session_commands(&ns, &s.name_any()) {
        ctx.gateway
            .command_wakes
            .wake(ObjectRef::from_obj(c.as_ref()));
    }
}

/// Deleting a session stops what its commands still do on the device; the commands
/// themselves go with it (ownerReferences).
async fn cleanup(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    let ns = s.namespace().unwrap_or_default();
    for c in ctx.session_commands(&ns, &s.name_any()) {
        ctx.gateway
            .cancel(&c.uid().unwrap_or_default(), CancelReason::SessionEnded);
    }
    ctx.gateway.device_wakes.wake((ns, s.spec.device.clone()));
    Ok(Action::await_change())
}

/// Recomputes the sessions-by-phase gauge from the controller's cache.
fn update_gauge(ctx: &Context) {
    let mut counts: std::collections::BTreeMap<String, i64> = [
        "Pending",
        "Connecting",
        "Connected",
        "Disconnected",
        "Rejected",
        "Failed",
        "Expired",
    ]
    .iter()
    .map(|p| (p.to_string(), 0))
    .collect();
    for s in ctx.sessions.state() {
        let p = phase(&s)
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into());
        *counts.entry(p).or_default() += 1;
    }
    for (p, n) in counts {
        ctx.metrics.sessions.with_label_values(&[p.as_str()]).set(n);
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
