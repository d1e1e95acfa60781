//! The batch's decisions, without I/O.

use std::collections::BTreeMap;

use kube::api::ObjectMeta;
use liveresponse_api::command::parse_command;
use liveresponse_api::crd::{
    BatchCommand, BatchPhase, BatchSpec, CommandPhase, REQUESTED_BY_ANNOTATION, SessionPhase,
};

use super::*;

fn t(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
}

fn batch(max: i32) -> BatchCommand {
    BatchCommand {
        metadata: ObjectMeta {
            name: Some("hunt".into()),
            namespace: Some("ns".into()),
            uid: Some("u1".into()),
            generation: Some(1),
            annotations: Some(BTreeMap::from([(
                REQUESTED_BY_ANNOTATION.to_string(),
                "alice".to_string(),
            )])),
            ..Default::default()
        },
        spec: BatchSpec {
            selector: None,
            devices: vec![],
            command: "processes".into(),
            args: vec!["-name".into(), "sshd".into()],
            max_concurrency: max,
            timeout_seconds: None,
            reason: None,
            cancel: false,
        },
        status: None,
    }
}

fn obs(picked: &[&str]) -> Observed {
    Observed {
        now: t(0),
        enabled: true,
        parsed: parse_command("processes", &["-name".into(), "sshd".into()])
            .map_err(|e| e.to_string()),
        access: Ok(()),
        picked: picked.iter().map(|s| s.to_string()).collect(),
        missing: vec![],
        children: BTreeMap::new(),
    }
}

fn child(device: &str, phase: Option<CommandPhase>) -> (String, ChildFacts) {
    (
        device.to_string(),
        ChildFacts {
            session: child_name("hunt", device),
            session_phase: Some(SessionPhase::Connected),
            session_active: true,
            command: Some(CommandFacts {
                name: child_name("hunt", device),
                phase,
                exit_code: phase
                    .filter(|p| p.is_final())
                    .map(|p| i32::from(p != CommandPhase::Succeeded)),
                error: (phase == Some(CommandPhase::Failed))
                    .then(|| "AgentError: boom".to_string()),
                cancel: false,
            }),
        },
    )
}

/// Runs `decide` and stores the status it wants, as the API server would.
fn step(b: &mut BatchCommand, o: &Observed) -> Plan {
    let plan = decide(b, o);
    b.status = Some(plan.status.clone());
    plan
}

#[test]
fn starts_at_most_max_concurrency_and_follows_children_to_the_end() {
    let mut b = batch(2);
    let mut o = obs(&["d1", "d2", "d3"]);
    let plan = step(&mut b, &o);
    assert_eq!(plan.create, vec!["d1", "d2"]);
    let st = plan.status;
    assert_eq!(st.phase, Some(BatchPhase::Running));
    assert_eq!(st.total, 3);
    assert_eq!((st.counts.running, st.counts.pending), (2, 1));
    assert_eq!(st.command_line.as_deref(), Some("processes -name sshd"));

    // The cache has not seen the children yet: they are created again (refused as existing),
    // and no third one starts.
    let plan = step(&mut b, &o);
    assert_eq!(plan.create, vec!["d1", "d2"]);

    // d1 finishes: d3 gets its slot, d1's session is ended.
    o.children = BTreeMap::from([
        child("d1", Some(CommandPhase::Succeeded)),
        child("d2", Some(CommandPhase::Running)),
    ]);
    let plan = step(&mut b, &o);
    assert_eq!(plan.create, vec!["d3"]);
    assert_eq!(plan.end_sessions, vec![child_name("hunt", "d1")]);
    assert_eq!(plan.status.counts.succeeded, 1);

    o.children.extend([
        child("d2", Some(CommandPhase::Failed)),
        child("d3", Some(CommandPhase::Succeeded)),
    ]);
    let plan = step(&mut b, &o);
    let st = plan.status;
    assert_eq!(st.phase, Some(BatchPhase::Failed));
    assert_eq!((st.counts.succeeded, st.counts.failed), (2, 1));
    let d2 = st.results.iter().find(|r| r.device == "d2").cloned();
    assert_eq!(
        d2.as_ref().and_then(|r| r.error.clone()).as_deref(),
        Some("AgentError: boom")
    );
    assert_eq!(d2.and_then(|r| r.exit_code), Some(1));
    assert!(st.completion_time.is_some());
    assert_eq!(
        st.message.as_deref(),
        Some("2 of 3 devices succeeded; 1 failed, 0 timed out, 0 cancelled")
    );

    // Finished: nothing more is created, whatever the cache says.
    o.children.clear();
    let plan = step(&mut b, &o);
    assert!(plan.create.is_empty());
    assert_eq!(plan.status.phase, Some(BatchPhase::Failed));
}

#[test]
fn all_succeeded_is_succeeded() {
    let mut b = batch(10);
    let mut o = obs(&["d1", "d2"]);
    step(&mut b, &o);
    o.children = BTreeMap::from([
        child("d1", Some(CommandPhase::Succeeded)),
        child("d2", Some(CommandPhase::Succeeded)),
    ]);
    let plan = step(&mut b, &o);
    assert_eq!(plan.status.phase, Some(BatchPhase::Succeeded));
}

#[test]
fn the_device_set_is_taken_once() {
    let mut b = batch(1);
    let mut o = obs(&["d1"]);
    step(&mut b, &o);
    // A device that matches later does not join.
    o.picked = vec!["d1".into(), "d9".into()];
    o.children = BTreeMap::from([child("d1", Some(CommandPhase::Succeeded))]);
    let plan = step(&mut b, &o);
    assert_eq!(plan.status.total, 1);
    assert_eq!(plan.status.phase, Some(BatchPhase::Succeeded));
}

#[test]
fn missing_named_devices_fail_alone() {
    let mut b = batch(5);
    let mut o = obs(&["d1"]);
    o.missing = vec!["ghost".into()];
    let plan = step(&mut b, &o);
    assert_eq!(plan.create, vec!["d1"]);
    let ghost = plan
        .status
        .results
        .iter()
        .find(|r| r.device == "ghost")
        .cloned();
    assert_eq!(ghost.as_ref().map(|r| r.phase), Some(CommandPhase::Failed));
    assert!(
        ghost
            .and_then(|r| r.error)
            .is_some_and(|e| e.contains("does not exist"))
    );
}

#[test]
fn cancel_cancels_running_children_and_never_starts_the_rest() {
    let mut b = batch(1);
    let mut o = obs(&["d1", "d2"]);
    step(&mut b, &o);
    o.children = BTreeMap::from([child("d1", Some(CommandPhase::Running))]);
    b.spec.cancel = true;
    let plan = step(&mut b, &o);
    assert_eq!(plan.cancel, vec![child_name("hunt", "d1")]);
    assert!(plan.create.is_empty());
    assert_eq!(
        plan.status.phase,
        Some(BatchPhase::Running),
        "d1 still has to stop"
    );
    let d2 = plan
        .status
        .results
        .iter()
        .find(|r| r.device == "d2")
        .map(|r| r.phase);
    assert_eq!(d2, Some(CommandPhase::Cancelled));
    o.children = BTreeMap::from([child("d1", Some(CommandPhase::Cancelled))]);
    let plan = step(&mut b, &o);
    assert_eq!(plan.status.phase, Some(BatchPhase::Cancelled));
    assert_eq!(plan.status.counts.cancelled, 2);
}

#[test]
fn cancel_reaches_a_child_the_cache_has_not_seen() {
    let mut b = batch(2);
    let o = obs(&["d1", "d2"]);
    step(&mut b, &o);
    b.spec.cancel = true;
    // Both were created by the first pass; the cache shows neither yet.
    let plan = step(&mut b, &o);
    assert_eq!(
        plan.cancel,
        vec![child_name("hunt", "d1"), child_name("hunt", "d2")]
    );
    assert!(plan.create.is_empty());
    assert_eq!(plan.status.phase, Some(BatchPhase::Cancelled));
}

#[test]
fn refusals_before_start_say_why() {
    let b = batch(1);
    let mut o = obs(&["d1"]);
    o.access = Err("alice may not run the advanced command getfile".into());
    let st = decide(&b, &o).status;
    assert_eq!(st.phase, Some(BatchPhase::Failed));
    assert!(st.message.unwrap_or_default().contains("may not run"));

    let st = decide(&b, &obs(&[])).status;
    assert!(st.message.unwrap_or_default().contains("no Device"));

    let mut o = obs(&["d1"]);
    o.enabled = false;
    let st = decide(&b, &o).status;
    assert!(st.message.unwrap_or_default().contains("not enabled"));

    let mut long = batch(1);
    long.metadata.name = Some("x".repeat(64));
    let plan = decide(&long, &obs(&["d1"]));
    assert!(plan.create.is_empty());
    assert!(
        plan.status
            .message
            .unwrap_or_default()
            .contains("at most 63")
    );

    let mut unstamped = batch(1);
    unstamped.metadata.annotations = None;
    let plan = decide(&unstamped, &obs(&["d1"]));
    assert!(plan.create.is_empty());
    assert!(
        plan.status
            .message
            .unwrap_or_default()
            .contains("admission policies")
    );
}

#[test]
fn child_names_are_valid_and_stable() {
    assert_eq!(child_name("hunt", "web-1"), "hunt-web-1");
    let long = child_name(&"b".repeat(200), &"d".repeat(200));
    assert!(long.len() <= 253, "{}", long.len());
    assert_eq!(long, child_name(&"b".repeat(200), &"d".repeat(200)));
    assert_ne!(long, child_name(&"b".repeat(200), &"e".repeat(200)));
}
