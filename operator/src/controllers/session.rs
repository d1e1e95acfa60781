//! The LiveResponseSession controller: admission against settings and limits, connecting to
//! the device, idle expiry, and ending (state Disconnected or deletion).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use liveresponse_api::crd::{
    Device, LiveResponseSession, LiveResponseSettings, SessionPhase, SessionState, SettingsSpec,
};
use serde_json::json;

use crate::context::{Context, now, parse_duration};
use crate::error::{Error, Result};

pub const FINALIZER: &str = "liveresponse.io/session";

pub async fn reconcile(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, s, |ev| async {
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
    })
}

fn phase(s: &LiveResponseSession) -> Option<SessionPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

async fn apply(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    update_gauge(&ctx);
    let ns = s.namespace().unwrap_or_default();
    let current = phase(&s);
    if current.is_some_and(SessionPhase::is_final) {
        return Ok(Action::await_change());
    }
    if s.spec.state == SessionState::Disconnected {
        end(
            &s,
            &ctx,
            SessionPhase::Disconnected,
            "the analyst ended the session".into(),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let settings = Api::<LiveResponseSettings>::namespaced(ctx.client.clone(), &ns)
        .get_opt("default")
        .await?;
    let settings = match settings {
        Some(st) if st.spec.enabled => st.spec,
        _ => {
            let msg = format!(
                "live response is not enabled in namespace {ns}: a live response settings admin must create LiveResponseSettings \"default\" with spec.enabled: true (for example: kubectl -n {ns} apply -f config/samples/settings.yaml)"
            );
            end(&s, &ctx, SessionPhase::Rejected, msg).await?;
            return Ok(Action::await_change());
        }
    };

    if matches!(current, None | Some(SessionPhase::Pending))
        && let Err(reason) = admit(&s, &ctx, &settings)
    {
        end(&s, &ctx, SessionPhase::Rejected, reason).await?;
        return Ok(Action::await_change());
    }

    let device = Api::<Device>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&s.spec.device)
        .await?;
    let Some(device) = device else {
        let msg = format!(
            "device {} does not exist in namespace {ns} (kubectl liveresponse devices lists the enrolled devices)",
            s.spec.device
        );
        end(&s, &ctx, SessionPhase::Failed, msg).await?;
        return Ok(Action::await_change());
    };
    let connected = ctx
        .gateway
        .is_connected(&(ns.clone(), s.spec.device.clone()));

    match current {
        Some(SessionPhase::Connected) => {}
        _ if connected => {
            let st = json!({ "phase": "Connected", "startTime": now(), "observedGeneration": s.metadata.generation,
                "message": format!("connected to {}", s.spec.device) });
            patch_status(&ctx, &s, st).await?;
            mark_device(&ctx, &device, Some(&s.name_any())).await?;
            ctx.event(
                s.as_ref(),
                false,
                "Connected",
                format!("connected to device {}", s.spec.device),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Some(SessionPhase::Connecting) => return Ok(Action::requeue(Duration::from_secs(2))),
        _ => {
            let st = json!({ "phase": "Connecting", "observedGeneration": s.metadata.generation,
                "message": format!("waiting for the agent of {} to connect", s.spec.device) });
            patch_status(&ctx, &s, st).await?;
            return Ok(Action::requeue(Duration::from_secs(2)));
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
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let elapsed = jiff::Timestamp::now().duration_since(since);
    let elapsed = Duration::try_from(elapsed).unwrap_or_default();
    if elapsed >= idle {
        let running = ctx.commands.state().iter().any(|c| {
            c.spec.session == s.name_any()
                && c.namespace().as_deref() == Some(ns.as_str())
                && !c
                    .status
                    .as_ref()
                    .and_then(|x| x.phase)
                    .is_some_and(|p| p.is_final())
        });
        if !running {
            let msg = format!("no command for {}s (idleTimeout)", idle.as_secs());
            end(&s, &ctx, SessionPhase::Expired, msg).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(idle - elapsed + Duration::from_millis(200)))
}

/// Decides whether a new session may start. The order is deterministic — sessions already
/// admitted first, then pending ones by creation time and name — so when several sessions
/// race for the last slot, every reconcile picks the same winner.
fn admit(s: &LiveResponseSession, ctx: &Context, settings: &SettingsSpec) -> Result<(), String> {
    let ns = s.namespace().unwrap_or_default();
    let mut candidates: Vec<Arc<LiveResponseSession>> = ctx
        .sessions
        .state()
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
        .filter(|o| o.meta().deletion_timestamp.is_none() && o.spec.state == SessionState::Active)
        .filter(|o| !phase(o).is_some_and(SessionPhase::is_final))
        .collect();
    if !candidates.iter().any(|o| o.uid() == s.uid()) {
        candidates.push(Arc::new(s.clone()));
    }
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
    let (mut total, mut users, mut devices) = (
        0i32,
        std::collections::HashMap::new(),
        std::collections::HashMap::new(),
    );
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

/// Moves a session to a final phase, once.
async fn end(
    s: &LiveResponseSession,
    ctx: &Context,
    phase: SessionPhase,
    message: String,
) -> Result<()> {
    let st = json!({ "phase": phase, "endTime": now(), "message": message, "observedGeneration": s.metadata.generation });
    patch_status(ctx, s, st).await?;
    let warning = matches!(phase, SessionPhase::Rejected | SessionPhase::Failed);
    ctx.event(s, warning, &format!("{phase:?}"), message).await;
    cancel_commands(s, ctx).await;
    release_device(s, ctx).await
}

/// Clears `Device.status.activeSession` when it still names this session.
async fn release_device(s: &LiveResponseSession, ctx: &Context) -> Result<()> {
    let ns = s.namespace().unwrap_or_default();
    let device = Api::<Device>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&s.spec.device)
        .await?;
    if let Some(d) = device
        && d.status.as_ref().and_then(|x| x.active_session.as_deref())
            == Some(s.name_any().as_str())
    {
        mark_device(ctx, &d, None).await?;
    }
    Ok(())
}

/// Stops what the session's commands are doing on the device.
async fn cancel_commands(s: &LiveResponseSession, ctx: &Context) {
    let ns = s.namespace().unwrap_or_default();
    for c in ctx.commands.state() {
        if c.spec.session == s.name_any() && c.namespace().as_deref() == Some(ns.as_str()) {
            let uid = c.uid().unwrap_or_default();
            ctx.gateway.cancel(&uid, "cancelled").await;
        }
    }
}

async fn cleanup(s: Arc<LiveResponseSession>, ctx: Arc<Context>) -> Result<Action> {
    if !phase(&s).is_some_and(SessionPhase::is_final) {
        cancel_commands(&s, &ctx).await;
        release_device(&s, &ctx).await?;
    }
    Ok(Action::await_change())
}

async fn mark_device(ctx: &Context, d: &Device, session: Option<&str>) -> Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let api: Api<Device> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &d.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "activeSession": session } })),
    )
    .await?;
    Ok(())
}

async fn patch_status(
    ctx: &Context,
    s: &LiveResponseSession,
    status: serde_json::Value,
) -> Result<()> {
    let ns = s.namespace().unwrap_or_default();
    let api: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &s.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
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
