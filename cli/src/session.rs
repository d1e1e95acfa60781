//! Opening, attaching to and ending a LiveResponseSession: what `connect`, `exec` and
//! `disconnect` share.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use liveresponse_api::crd::{LiveResponseSession, SessionPhase, SessionSpec, SessionState};

use crate::client::{Ctx, merge_patch, retry};
use crate::error::{Error, Result};
use crate::wait::{self, SPINNER_DELAY, Spinner};

/// How long to wait for the operator to confirm a disconnect before saying so.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The session object the CLI creates: the server picks the name (`<device>-xxxxx`).
pub fn new_session(device: &str, requested_by: &str, reason: Option<&str>) -> LiveResponseSession {
    LiveResponseSession {
        metadata: ObjectMeta {
            generate_name: Some(format!("{device}-")),
            ..Default::default()
        },
        spec: SessionSpec {
            device: device.to_owned(),
            reason: reason.filter(|r| !r.is_empty()).map(str::to_owned),
            requested_by: requested_by.to_owned(),
            idle_timeout: None,
            state: SessionState::Active,
        },
        status: None,
    }
}

pub fn name_of(session: &LiveResponseSession) -> String {
    session.metadata.name.clone().unwrap_or_default()
}

pub fn phase_of(session: &LiveResponseSession) -> Option<SessionPhase> {
    session.status.as_ref().and_then(|s| s.phase)
}

fn ended(session: &LiveResponseSession) -> Error {
    Error::SessionEnded {
        name: name_of(session),
        phase: phase_of(session).unwrap_or(SessionPhase::Failed),
        message: session.status.as_ref().and_then(|s| s.message.clone()),
    }
}

/// Creates a session for `device`, stamped with the caller's user name.
pub async fn create(ctx: &Ctx, device: &str, reason: Option<&str>) -> Result<LiveResponseSession> {
    let user = ctx.whoami().await?;
    let session = new_session(device, &user, reason);
    Ok(ctx
        .sessions()
        .create(&PostParams::default(), &session)
        .await?)
}

/// An existing session, checked to be for `device` and still open.
pub async fn attach(ctx: &Ctx, name: &str, device: &str) -> Result<LiveResponseSession> {
    let session = ctx.sessions().get(name).await?;
    if session.spec.device != device {
        return Err(Error::WrongDevice {
            name: name.to_owned(),
            actual: session.spec.device.clone(),
            wanted: device.to_owned(),
        });
    }
    if phase_of(&session).is_some_and(SessionPhase::is_final) {
        return Err(ended(&session));
    }
    Ok(session)
}

/// Waits until the session is Connected. A session that ends instead (Rejected, Failed...)
/// is an [`Error::SessionEnded`] carrying the operator's message; Ctrl+C is
/// [`Error::Interrupted`].
pub async fn wait_connected(ctx: &Ctx, name: &str) -> Result<LiveResponseSession> {
    let spinner = Spinner::start(format!("connecting {name}"), SPINNER_DELAY);
    let waiting = wait::until(
        ctx.sessions(),
        "session",
        name,
        |s: &LiveResponseSession| {
            phase_of(s).is_some_and(|p| p == SessionPhase::Connected || p.is_final())
        },
        |s| {
            let phase = phase_of(s).map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
            spinner.set_message(format!("connecting {name}: {phase}"));
        },
        |line| spinner.note(line),
    );
    let session = tokio::select! {
        result = waiting => result?,
        _ = tokio::signal::ctrl_c() => return Err(Error::Interrupted),
    };
    spinner.finish();
    if phase_of(&session) == Some(SessionPhase::Connected) {
        Ok(session)
    } else {
        Err(ended(&session))
    }
}

/// Asks the operator to end the session (`spec.state: Disconnected`) and waits, at most
/// `timeout`, until it has. Returns the final session, or `None` when it was deleted while
/// waiting; a session that does not exist at all is the API server's not-found error.
pub async fn end(ctx: &Ctx, name: &str, timeout: Duration) -> Result<Option<LiveResponseSession>> {
    let spinner = Spinner::start(format!("disconnecting {name}"), SPINNER_DELAY);
    let api = ctx.sessions();
    let patch = serde_json::json!({ "spec": { "state": "Disconnected" } });
    let patched = retry(
        |line| spinner.note(&line),
        || merge_patch(&api, name, &patch),
    )
    .await;
    match patched {
        Err(err) => return Err(err),
        Ok(s) if phase_of(&s).is_some_and(SessionPhase::is_final) => return Ok(Some(s)),
        Ok(_) => {}
    }
    let waiting = wait::until(
        api,
        "session",
        name,
        |s: &LiveResponseSession| phase_of(s).is_some_and(SessionPhase::is_final),
        |_| {},
        |line| spinner.note(line),
    );
    let result = match tokio::time::timeout(timeout, waiting).await {
        Ok(Ok(session)) => Ok(Some(session)),
        Ok(Err(Error::Deleted { .. } | Error::NotFound { .. })) => Ok(None),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(Error::Timeout(timeout.as_secs())),
    };
    spinner.finish();
    result
}

/// One line that says how `end` went, for stdout.
pub fn ended_line(name: &str, session: Option<&LiveResponseSession>) -> String {
    match session.and_then(phase_of) {
        Some(SessionPhase::Disconnected) => format!("session {name} disconnected"),
        Some(phase) => {
            let message = session
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s.message.as_deref())
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {}", crate::sanitize::text(m)))
                .unwrap_or_default();
            format!("session {name} ended {phase:?}{message}")
        }
        None if session.is_none() => format!("session {name} is gone"),
        None => format!("session {name} disconnected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_session_lets_the_server_name_it_after_the_device() {
        let s = new_session("host-1", "alice", Some("INC-4711"));
        assert_eq!(s.metadata.name, None);
        assert_eq!(s.metadata.generate_name.as_deref(), Some("host-1-"));
        assert_eq!(s.spec.requested_by, "alice");
        assert_eq!(s.spec.reason.as_deref(), Some("INC-4711"));
        assert_eq!(s.spec.state, SessionState::Active);
        let value = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(value["spec"]["requestedBy"], "alice");
        assert_eq!(value["metadata"]["generateName"], "host-1-");
        assert_eq!(value["kind"], "LiveResponseSession");
        // An empty --reason is no reason.
        assert_eq!(new_session("d", "u", Some("")).spec.reason, None);
    }
}
