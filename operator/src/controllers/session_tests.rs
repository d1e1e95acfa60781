//! The session decision table: one case per transition, no API server.

use std::sync::Arc;
use std::time::Duration;

use kube::api::ObjectMeta;
use liveresponse_api::crd::{
    LiveResponseSession, SessionPhase, SessionSpec, SessionState, SessionStatus, SettingsSpec, Time,
};

use super::*;
use crate::controllers::command::DeviceFacts;

fn t(secs: i64) -> jiff::Timestamp {
    "2026-01-01T00:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap_or_default()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or_default()
}

fn sess(
    name: &str,
    user: &str,
    device: &str,
    phase: Option<SessionPhase>,
    created: i64,
) -> LiveResponseSession {
    let mut s = LiveResponseSession::new(
        name,
        SessionSpec {
            device: device.into(),
            reason: None,
            requested_by: user.into(),
            idle_timeout: None,
            state: SessionState::Active,
        },
    );
    s.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("t1".into()),
        uid: Some(format!("uid-{name}")),
        creation_timestamp: Some(Time(t(created))),
        ..Default::default()
    };
    s.status = phase.map(|p| SessionStatus {
        phase: Some(p),
        start_time: (p == SessionPhase::Connected).then(|| Time(t(created))),
        ..Default::default()
    });
    s
}

fn enabled() -> SettingsSpec {
    SettingsSpec {
        enabled: true,
        ..Default::default()
    }
}

fn obs() -> Observed {
    Observed {
        now: t(10),
        settings: Some(enabled()),
        admission: Ok(()),
        device_exists: true,
        device: DeviceFacts {
            connected: true,
            offline_since: None,
        },
        busy: false,
    }
}

fn ended(d: Decision) -> (SessionPhase, &'static str, String) {
    match d {
        Decision::End {
            phase,
            reason,
            message,
        } => (phase, reason, message),
        other => panic!("expected End, got {other:?}"),
    }
}

#[test]
fn a_new_session_to_a_connected_device_connects() {
    let s = sess("s1", "alice", "d1", None, 0);
    assert_eq!(decide(&s, &obs()), Decision::Connect);
}

#[test]
fn a_new_session_to_an_offline_device_is_connecting() {
    let s = sess("s1", "alice", "d1", None, 0);
    let mut o = obs();
    o.device.connected = false;
    assert_eq!(decide(&s, &o), Decision::Connecting);
}

#[test]
fn connecting_waits_for_the_agent_until_the_offline_queue_timeout() {
    let s = sess("s1", "alice", "d1", Some(SessionPhase::Connecting), 0);
    let mut o = obs();
    o.device = DeviceFacts {
        connected: false,
        offline_since: Some(t(-1000)),
    };
    let mut st = enabled();
    st.offline_queue_timeout = "60s".into();
    o.settings = Some(st);
    assert_eq!(
        decide(&s, &o),
        Decision::Wait(Some(Duration::from_secs(50)))
    );
    o.now = t(60);
    let (phase, reason, message) = ended(decide(&s, &o));
    assert_eq!(
        (phase, reason),
        (SessionPhase::Expired, "OfflineQueueTimeout")
    );
    assert!(message.contains("offlineQueueTimeout"), "{message}");
}

#[test]
fn connecting_connects_when_the_agent_comes() {
    let s = sess("s1", "alice", "d1", Some(SessionPhase::Connecting), 0);
    assert_eq!(decide(&s, &obs()), Decision::Connect);
}

#[test]
fn the_analyst_ends_a_session() {
    let mut s = sess("s1", "alice", "d1", Some(SessionPhase::Connected), 0);
    s.spec.state = SessionState::Disconnected;
    assert_eq!(ended(decide(&s, &obs())).0, SessionPhase::Disconnected);
}

#[test]
fn disabled_live_response_rejects_and_says_how_to_enable() {
    let s = sess("s1", "alice", "d1", None, 0);
    let mut o = obs();
    o.settings = None;
    let (phase, _, message) = ended(decide(&s, &o));
    assert_eq!(phase, SessionPhase::Rejected);
    assert!(message.contains("enabled: true"), "{message}");
}

#[test]
fn a_limit_rejects_a_new_session_only() {
    let s = sess("s1", "alice", "d1", None, 0);
    let mut o = obs();
    o.admission = Err("full".into());
    assert_eq!(ended(decide(&s, &o)).0, SessionPhase::Rejected);
    // Already admitted: the verdict is not asked again.
    let s = sess("s1", "alice", "d1", Some(SessionPhase::Connected), 0);
    assert_eq!(
        decide(&s, &o),
        Decision::Wait(Some(Duration::from_secs(1790)))
    );
}

#[test]
fn a_missing_device_fails_the_session() {
    let s = sess("s1", "alice", "d1", None, 0);
    let mut o = obs();
    o.device_exists = false;
    assert_eq!(ended(decide(&s, &o)).0, SessionPhase::Failed);
}

#[test]
fn idle_sessions_expire_unless_a_command_runs() {
    let s = sess("s1", "alice", "d1", Some(SessionPhase::Connected), 0);
    let mut o = obs();
    o.now = t(1800);
    o.busy = true;
    assert_eq!(decide(&s, &o), Decision::Wait(None));
    o.busy = false;
    let (phase, reason, _) = ended(decide(&s, &o));
    assert_eq!((phase, reason), (SessionPhase::Expired, "Idle"));
}

#[test]
fn activity_pushes_the_idle_deadline() {
    let mut s = sess("s1", "alice", "d1", Some(SessionPhase::Connected), 0);
    s.spec.idle_timeout = Some("60s".into());
    if let Some(st) = s.status.as_mut() {
        st.last_activity_time = Some(Time(t(30)));
    }
    assert_eq!(
        decide(&s, &obs()),
        Decision::Wait(Some(Duration::from_secs(80)))
    );
}

#[test]
fn ended_sessions_stay_ended() {
    let s = sess("s1", "alice", "d1", Some(SessionPhase::Expired), 0);
    assert_eq!(decide(&s, &obs()), Decision::Wait(None));
}

#[test]
fn admission_picks_the_same_winner_for_the_last_slot() {
    let settings = SettingsSpec {
        enabled: true,
        sessions_per_device: 1,
        ..Default::default()
    };
    let a = Arc::new(sess("a", "alice", "d1", None, 5));
    let b = Arc::new(sess("b", "bob", "d1", None, 3));
    let all = vec![a.clone(), b.clone()];
    assert!(
        admit(&b, &all, &settings, "operator").is_ok(),
        "the older one wins"
    );
    let err = admit(&a, &all, &settings, "operator")
        .err()
        .unwrap_or_default();
    assert!(err.contains("sessionsPerDevice"), "{err}");
    // An admitted session keeps its slot against an older newcomer.
    let c = Arc::new(sess("c", "carol", "d1", Some(SessionPhase::Connected), 9));
    let all = vec![a, b.clone(), c];
    assert!(admit(&b, &all, &settings, "operator").is_err());
}

#[test]
fn admission_counts_users_and_the_namespace() {
    let settings = SettingsSpec {
        enabled: true,
        sessions_per_user: 1,
        max_sessions: 3,
        sessions_per_device: 5,
        ..Default::default()
    };
    let a = Arc::new(sess("a", "alice", "d1", Some(SessionPhase::Connected), 0));
    let a2 = Arc::new(sess("a2", "alice", "d2", None, 1));
    let b = Arc::new(sess("b", "bob", "d3", Some(SessionPhase::Connected), 0));
    let c = Arc::new(sess("c", "carol", "d4", None, 2));
    let d = Arc::new(sess("d", "dave", "d5", None, 3));
    let all = vec![a, a2.clone(), b, c.clone(), d.clone()];
    let err = admit(&a2, &all, &settings, "operator")
        .err()
        .unwrap_or_default();
    assert!(err.contains("sessionsPerUser"), "{err}");
    // A refused session takes no slot: carol gets the third.
    assert!(admit(&c, &all, &settings, "operator").is_ok());
    let err = admit(&d, &all, &settings, "operator")
        .err()
        .unwrap_or_default();
    assert!(err.contains("maxSessions"), "{err}");
}

#[test]
fn batch_children_and_analysts_do_not_take_each_others_slots() {
    let settings = SettingsSpec {
        enabled: true,
        sessions_per_device: 1,
        sessions_per_user: 1,
        ..Default::default()
    };
    let batch_child = |name: &str, device: &str, by: &str| {
        let mut s = sess(name, by, device, None, 1);
        s.metadata.labels = Some(
            [(
                liveresponse_api::crd::BATCH_LABEL.to_string(),
                "b".to_string(),
            )]
            .into(),
        );
        Arc::new(s)
    };
    let analyst = Arc::new(sess("a", "alice", "d1", Some(SessionPhase::Connected), 0));
    let child1 = batch_child("b-d1", "d1", "operator");
    let child2 = batch_child("b-d2", "d2", "operator");
    let all = vec![analyst.clone(), child1.clone(), child2.clone()];
    // Two children of one "user" on a busy device: neither limit applies to them.
    assert!(admit(&child1, &all, &settings, "operator").is_ok());
    assert!(admit(&child2, &all, &settings, "operator").is_ok());
    // And an analyst arriving after them is not refused because of them.
    let late = Arc::new(sess("late", "bob", "d2", None, 5));
    let all = vec![analyst, child1, child2, late.clone()];
    assert!(admit(&late, &all, &settings, "operator").is_ok());
    // A user's own session labelled as a batch child is still counted: only the operator's
    // sessions are exempt.
    let fake = batch_child("fake", "d2", "mallory");
    let all = vec![late.clone(), fake];
    assert!(admit(&late, &all, &settings, "operator").is_err());
}
