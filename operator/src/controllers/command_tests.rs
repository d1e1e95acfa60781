//! The command decision table: one case per transition, no API server.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::ObjectMeta;
use liveresponse_api::command::parse_command;
use liveresponse_api::crd::{
    Command, CommandPhase, CommandSpec, CommandStatus, CommandStep, OutputFormat,
    REQUESTED_BY_ANNOTATION, SessionPhase, Time,
};
use liveresponse_api::proto::{CancelReason, Outcome};

use super::*;
use crate::gateway::Report;
use crate::sink::{OutputProblem, OutputSummary};

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap_or_default()
}

const T0: &str = "2026-01-01T00:00:00Z";

fn t(secs: i64) -> jiff::Timestamp {
    ts(T0)
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or_default()
}

fn cmd(verb: &str, args: &[&str], phase: Option<CommandPhase>) -> Command {
    let mut c = Command::new(
        "c1",
        CommandSpec {
            session: "s1".into(),
            command: verb.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            output: OutputFormat::Table,
            background: false,
            timeout_seconds: None,
            cancel: false,
        },
    );
    c.metadata = ObjectMeta {
        name: Some("c1".into()),
        namespace: Some("t1".into()),
        uid: Some("u1".into()),
        creation_timestamp: Some(Time(t(0))),
        annotations: Some(BTreeMap::from([(
            REQUESTED_BY_ANNOTATION.to_string(),
            "alice".to_string(),
        )])),
        ..Default::default()
    };
    c.status = phase.map(|p| CommandStatus {
        phase: Some(p),
        id: (p != CommandPhase::Pending).then_some(1),
        start_time: (p == CommandPhase::Running).then(|| Time(t(1))),
        ..Default::default()
    });
    c
}

fn session(phase: SessionPhase) -> SessionFacts {
    SessionFacts {
        name: "s1".into(),
        phase: Some(phase),
        created: t(0),
        requested_by: "alice".into(),
        device: "d1".into(),
        on_behalf_of: None,
        working_directory: Some("/etc".into()),
    }
}

/// A connected session on a connected device, ten seconds after creation.
fn obs(c: &Command) -> Observed {
    Observed {
        now: t(10),
        uptime: Duration::from_secs(3600),
        restart_grace: Duration::from_secs(20),
        disconnect_grace: Duration::from_secs(30),
        parsed: parse_command(&c.spec.command, &c.spec.args).map_err(|e| e.to_string()),
        session: Some(session(SessionPhase::Connected)),
        limits: Limits::default(),
        device: DeviceFacts {
            connected: true,
            offline_since: None,
        },
        blocked_by_earlier: None,
        exec: ExecState::default(),
        access: Ok(()),
        content: None,
        rules: Vec::new(),
    }
}

fn finish(d: Decision) -> Finish {
    match d {
        Decision::Finish(f) => *f,
        other => panic!("expected Finish, got {other:?}"),
    }
}

fn report(step: Option<usize>, outcome: Outcome) -> Report {
    Report {
        step,
        outcome,
        exit_code: if outcome == Outcome::Succeeded { 0 } else { 1 },
        error_reason: String::new(),
        error_message: String::new(),
        working_directory: String::new(),
        warnings: vec![],
        file: None,
        output: Ok(OutputSummary {
            inline: "PATH\n/tmp\n".into(),
            truncated: false,
            size: 10,
            sha256: "ab".repeat(32),
            spilled: None,
        }),
    }
}

// ---- Pending

#[test]
fn pending_is_queued_with_its_canonical_line() {
    let c = cmd("processes", &["-name", "sshd"], None);
    assert_eq!(
        decide(&c, &obs(&c)),
        Decision::Queue {
            command_line: "processes -name sshd".into()
        }
    );
}

#[test]
fn a_background_command_says_so_in_its_line() {
    let mut c = cmd("processes", &[], Some(CommandPhase::Pending));
    c.spec.background = true;
    assert_eq!(
        decide(&c, &obs(&c)),
        Decision::Queue {
            command_line: "processes &".into()
        }
    );
}

#[test]
fn pending_that_does_not_parse_fails() {
    let c = cmd("processes", &["-bogus"], None);
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(
        (f.phase, f.reason.as_str()),
        (CommandPhase::Failed, "ParseError")
    );
}

#[test]
fn pending_without_the_admission_stamp_fails() {
    let mut c = cmd("processes", &[], None);
    c.metadata.annotations = None;
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(f.reason, "Unattributed");
    assert!(f.message.contains("config/admission"), "{}", f.message);
}

#[test]
fn pending_typed_by_someone_else_fails() {
    let mut c = cmd("processes", &[], None);
    c.metadata.annotations = Some(BTreeMap::from([(
        REQUESTED_BY_ANNOTATION.to_string(),
        "mallory".to_string(),
    )]));
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(f.reason, "NotSessionOwner");
    assert!(f.message.contains("mallory"), "{}", f.message);
}

#[test]
fn an_advanced_verb_the_api_server_denies_fails_closed() {
    let c = cmd("getfile", &["/etc/shadow"], None);
    let mut o = obs(&c);
    o.access = Err("analyst-basic may not run the advanced command getfile".into());
    let f = finish(decide(&c, &o));
    assert_eq!(
        (f.phase, f.reason.as_str()),
        (CommandPhase::Failed, "Forbidden")
    );
    assert!(f.message.contains("analyst-basic"), "{}", f.message);
}

#[test]
fn a_verb_that_may_not_run_in_the_background_is_refused() {
    let mut c = cmd("cd", &["/tmp"], None);
    c.spec.background = true;
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(f.reason, "BackgroundNotAllowed");
}

#[test]
fn a_command_without_its_session_fails() {
    let c = cmd("processes", &[], None);
    let mut o = obs(&c);
    o.session = None;
    assert_eq!(finish(decide(&c, &o)).reason, "SessionNotFound");
}

#[test]
fn pending_in_an_ended_session_fails() {
    let c = cmd("processes", &[], None);
    let mut o = obs(&c);
    o.session = Some(session(SessionPhase::Disconnected));
    assert_eq!(finish(decide(&c, &o)).reason, "SessionEnded");
}

// ---- Queued

#[test]
fn queued_is_dispatched_and_marked_running() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    match decide(&c, &obs(&c)) {
        Decision::Dispatch { exec, mark_running } => {
            assert!(mark_running);
            assert_eq!(exec.uid, "u1");
            assert_eq!(exec.step, None);
            assert_eq!(exec.verb, "dir");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn queued_with_auto_dispatches_its_first_prerequisite() {
    let c = cmd(
        "getfile",
        &["/etc/passwd", "-auto"],
        Some(CommandPhase::Queued),
    );
    match decide(&c, &obs(&c)) {
        Decision::Dispatch { exec, .. } => {
            assert_eq!(exec.uid, "u1.step-0");
            assert_eq!(exec.step, Some(0));
            assert_eq!(exec.verb, "fileinfo");
            assert_eq!(exec.args, vec!["/etc/passwd".to_string()]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_run_whose_library_file_cannot_be_used_fails_before_it_is_sent() {
    let c = cmd("run", &["collect.sh"], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.content = Some(Err("library file collect is not ready: unsigned".into()));
    let f = finish(decide(&c, &o));
    assert_eq!(f.reason, "LibraryFileUnusable");
    assert!(f.message.contains("not ready"), "{}", f.message);
    // Usable: sent, and the content goes with it (apply fills Execute.content from `o`).
    o.content = Some(Ok(liveresponse_api::proto::Content::default()));
    assert!(matches!(decide(&c, &o), Decision::Dispatch { .. }));
}

#[test]
fn a_console_only_command_is_not_a_command() {
    let c = cmd("library", &["upload", "./x.sh"], None);
    assert_eq!(finish(decide(&c, &obs(&c))).reason, "ConsoleOnly");
}

#[test]
fn queued_cancelled_before_it_started() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Queued));
    c.spec.cancel = true;
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(f.phase, CommandPhase::Cancelled);
    assert_eq!(f.cancel_on_agent, None);
}

#[test]
fn queued_waits_behind_an_earlier_command() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.blocked_by_earlier = Some(false);
    assert_eq!(decide(&c, &o), Decision::Wait(None));
    // One still taking its id does not wake this one: look again shortly.
    o.blocked_by_earlier = Some(true);
    assert_eq!(decide(&c, &o), Decision::Wait(Some(Duration::from_secs(1))));
}

#[test]
fn a_background_command_does_not_wait_behind_others() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Queued));
    c.spec.background = true;
    let mut o = obs(&c);
    o.blocked_by_earlier = Some(false);
    assert!(matches!(decide(&c, &o), Decision::Dispatch { .. }));
}

#[test]
fn queued_waits_for_its_session_to_connect() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.session = Some(session(SessionPhase::Connecting));
    assert_eq!(decide(&c, &o), Decision::Wait(None));
}

#[test]
fn queued_for_an_offline_device_waits_until_the_offline_queue_timeout() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.session = Some(session(SessionPhase::Connecting));
    o.device = DeviceFacts {
        connected: false,
        offline_since: Some(ts("2025-06-01T00:00:00Z")),
    };
    o.limits.offline_queue_timeout = Duration::from_secs(60);
    // Counted from the session's creation (t0), not from when the device went away.
    assert_eq!(
        decide(&c, &o),
        Decision::Wait(Some(Duration::from_secs(50)))
    );
    o.now = t(60);
    let f = finish(decide(&c, &o));
    assert_eq!(
        (f.phase, f.reason.as_str()),
        (CommandPhase::TimedOut, "OfflineQueueTimeout")
    );
    assert!(f.message.contains("d1"), "{}", f.message);
}

#[test]
fn queued_in_a_connected_session_counts_from_the_device_leaving() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.device = DeviceFacts {
        connected: false,
        offline_since: Some(t(5)),
    };
    o.limits.offline_queue_timeout = Duration::from_secs(60);
    assert_eq!(
        decide(&c, &o),
        Decision::Wait(Some(Duration::from_secs(55)))
    );
}

#[test]
fn queued_in_an_ended_session_fails() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.session = Some(session(SessionPhase::Expired));
    assert_eq!(finish(decide(&c, &o)).reason, "SessionEnded");
}

#[test]
fn queued_already_sent_waits_for_the_cache() {
    let c = cmd("dir", &[], Some(CommandPhase::Queued));
    let mut o = obs(&c);
    o.exec.inflight = true;
    assert_eq!(decide(&c, &o), Decision::Wait(None));
}

// ---- Running

#[test]
fn running_past_its_timeout_times_out_and_stops_the_agent() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Running));
    c.spec.timeout_seconds = Some(5);
    let mut o = obs(&c);
    o.exec.inflight = true;
    o.now = t(6);
    let f = finish(decide(&c, &o));
    assert_eq!(f.phase, CommandPhase::TimedOut);
    assert_eq!(f.cancel_on_agent, Some(CancelReason::Timeout));
}

#[test]
fn running_in_flight_waits_until_its_deadline() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Running));
    c.spec.timeout_seconds = Some(100);
    let mut o = obs(&c);
    o.exec.inflight = true;
    // Started at t1, now t10: 91 s left.
    assert_eq!(
        decide(&c, &o),
        Decision::Wait(Some(Duration::from_secs(91)))
    );
}

#[test]
fn a_successful_report_finishes_with_its_output_and_directory() {
    let c = cmd("cd", &["/tmp"], Some(CommandPhase::Running));
    let mut o = obs(&c);
    let mut r = report(None, Outcome::Succeeded);
    r.working_directory = "/tmp".into();
    r.warnings = vec!["skipped /proc".into()];
    o.exec.report = Some(r);
    let f = finish(decide(&c, &o));
    assert_eq!(f.phase, CommandPhase::Succeeded);
    assert_eq!(f.exit_code, Some(0));
    assert_eq!(f.working_directory.as_deref(), Some("/tmp"));
    let out = f.output.unwrap_or_else(|| panic!("no output"));
    assert_eq!(out.content, "PATH\n/tmp\n");
    assert_eq!(out.size, 10);
    assert_eq!(out.warnings, vec!["skipped /proc".to_string()]);
}

#[test]
fn output_format_typed_as_an_argument_wins() {
    let c = cmd(
        "processes",
        &["-output", "json"],
        Some(CommandPhase::Running),
    );
    let mut o = obs(&c);
    o.exec.report = Some(report(None, Outcome::Succeeded));
    let f = finish(decide(&c, &o));
    assert_eq!(f.output.map(|o| o.format), Some(OutputFormat::Json));
}

#[test]
fn a_failed_report_carries_the_agents_reason() {
    let c = cmd("fileinfo", &["/nope"], Some(CommandPhase::Running));
    let mut o = obs(&c);
    let mut r = report(None, Outcome::Failed);
    r.error_reason = "NotFound".into();
    r.error_message = "/nope does not exist".into();
    o.exec.report = Some(r);
    let f = finish(decide(&c, &o));
    assert_eq!(
        (f.phase, f.reason.as_str(), f.message.as_str()),
        (CommandPhase::Failed, "NotFound", "/nope does not exist")
    );
}

#[test]
fn agent_confirmed_cancel_and_timeout() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    o.exec.report = Some(report(None, Outcome::Cancelled));
    assert_eq!(finish(decide(&c, &o)).phase, CommandPhase::Cancelled);
    o.exec.report = Some(report(None, Outcome::TimedOut));
    assert_eq!(finish(decide(&c, &o)).phase, CommandPhase::TimedOut);
}

#[test]
fn a_lost_chunk_fails_the_command() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    let mut r = report(None, Outcome::Succeeded);
    r.output = Err(OutputProblem::Lost {
        expected: 100,
        received: 60,
    });
    o.exec.report = Some(r);
    let f = finish(decide(&c, &o));
    assert_eq!(
        (f.phase, f.reason.as_str()),
        (CommandPhase::Failed, "OutputLost")
    );
    let mut r = report(None, Outcome::Succeeded);
    r.output = Err(OutputProblem::TooLarge { limit: 10 });
    o.exec.report = Some(r);
    assert_eq!(finish(decide(&c, &o)).reason, "OutputTooLarge");
}

#[test]
fn a_successful_step_is_recorded_then_the_command_runs() {
    let mut c = cmd(
        "getfile",
        &["/etc/passwd", "-auto"],
        Some(CommandPhase::Running),
    );
    let mut o = obs(&c);
    o.exec.report = Some(report(Some(0), Outcome::Succeeded));
    match decide(&c, &o) {
        Decision::RecordStep { step, exec_uid } => {
            assert_eq!(step.command_line, "fileinfo /etc/passwd");
            assert_eq!(step.phase, CommandPhase::Succeeded);
            assert_eq!(exec_uid, "u1.step-0");
        }
        other => panic!("{other:?}"),
    }
    // Once recorded, the command itself goes.
    if let Some(st) = c.status.as_mut() {
        st.steps.push(CommandStep {
            command_line: "fileinfo /etc/passwd".into(),
            phase: CommandPhase::Succeeded,
            exit_code: Some(0),
            message: None,
        });
    }
    let o = obs(&c);
    match decide(&c, &o) {
        Decision::Dispatch { exec, mark_running } => {
            assert!(!mark_running);
            assert_eq!((exec.uid.as_str(), exec.step), ("u1", None));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_step_fails_the_command() {
    let c = cmd(
        "getfile",
        &["/etc/passwd", "-auto"],
        Some(CommandPhase::Running),
    );
    let mut o = obs(&c);
    let mut r = report(Some(0), Outcome::Failed);
    r.error_message = "no such file".into();
    o.exec.report = Some(r);
    let f = finish(decide(&c, &o));
    assert_eq!(f.reason, "PrerequisiteFailed");
    assert!(f.message.contains("fileinfo /etc/passwd"), "{}", f.message);
    assert_eq!(f.step.map(|s| s.phase), Some(CommandPhase::Failed));
}

#[test]
fn cancel_while_running_asks_the_agent_then_waits_for_it() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Running));
    c.spec.cancel = true;
    let mut o = obs(&c);
    o.exec.inflight = true;
    assert_eq!(decide(&c, &o), Decision::CancelOnAgent(CancelReason::User));
    o.exec.cancel_sent = Some(Duration::from_secs(3));
    assert_eq!(decide(&c, &o), Decision::Wait(Some(Duration::from_secs(7))));
    o.exec.cancel_sent = Some(Duration::from_secs(11));
    let f = finish(decide(&c, &o));
    assert_eq!(f.phase, CommandPhase::Cancelled);
    assert!(f.message.contains("did not confirm"), "{}", f.message);
}

#[test]
fn cancel_of_a_command_not_in_flight_ends_it_at_once() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Running));
    c.spec.cancel = true;
    let f = finish(decide(&c, &obs(&c)));
    assert_eq!(f.phase, CommandPhase::Cancelled);
    assert_eq!(f.cancel_on_agent, Some(CancelReason::User));
}

#[test]
fn running_when_the_session_ends_fails_and_stops_the_agent() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    o.exec.inflight = true;
    o.session = Some(session(SessionPhase::Disconnected));
    let f = finish(decide(&c, &o));
    assert_eq!(f.reason, "SessionEnded");
    assert_eq!(f.cancel_on_agent, Some(CancelReason::SessionEnded));
}

#[test]
fn running_but_not_in_flight_is_sent_again_when_the_device_is_here() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    match decide(&c, &obs(&c)) {
        Decision::Dispatch { mark_running, .. } => assert!(!mark_running),
        other => panic!("{other:?}"),
    }
}

#[test]
fn just_finished_here_waits_for_the_cache_instead_of_sending_again() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    o.exec.just_finished = true;
    assert_eq!(decide(&c, &o), Decision::Wait(Some(Duration::from_secs(1))));
}

#[test]
fn after_an_operator_restart_agents_get_time_to_come_back() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    o.device = DeviceFacts {
        connected: false,
        offline_since: Some(t(-300)),
    };
    o.uptime = Duration::from_secs(5);
    assert_eq!(
        decide(&c, &o),
        Decision::Wait(Some(Duration::from_secs(15)))
    );
}

#[test]
fn a_brief_disconnect_is_waited_out_a_long_one_fails_the_command() {
    let c = cmd("dir", &[], Some(CommandPhase::Running));
    let mut o = obs(&c);
    o.device = DeviceFacts {
        connected: false,
        offline_since: Some(t(2)),
    };
    // Disconnected at t2, grace 30 s: wait until t32.
    assert_eq!(
        decide(&c, &o),
        Decision::Wait(Some(Duration::from_secs(22)))
    );
    o.now = t(32);
    let f = finish(decide(&c, &o));
    assert_eq!(
        (f.phase, f.reason.as_str()),
        (CommandPhase::Failed, "DeviceDisconnected")
    );
}

// ---- Finished

#[test]
fn finished_commands_are_kept_for_the_retention_then_deleted() {
    let mut c = cmd("dir", &[], Some(CommandPhase::Succeeded));
    if let Some(st) = c.status.as_mut() {
        st.completion_time = Some(Time(t(5)));
    }
    let mut o = obs(&c);
    o.limits.retention = Duration::from_secs(10);
    assert_eq!(
        decide(&c, &o),
        Decision::Done {
            delete_in: Duration::from_secs(5)
        }
    );
    o.now = t(20);
    assert_eq!(
        decide(&c, &o),
        Decision::Done {
            delete_in: Duration::ZERO
        }
    );
}

#[test]
fn timeouts_come_from_the_spec_or_the_verbs_class() {
    let limits = Limits::default();
    let c = cmd("findfile", &["x"], None);
    let parsed = parse_command("findfile", &["x".to_string()]).ok();
    assert_eq!(
        timeout_of(&c, parsed.as_ref(), &limits),
        limits.long_command_timeout
    );
    let c = cmd("dir", &[], None);
    let parsed = parse_command("dir", &[]).ok();
    assert_eq!(
        timeout_of(&c, parsed.as_ref(), &limits),
        limits.command_timeout
    );
    let mut c = cmd("findfile", &["x"], None);
    c.spec.timeout_seconds = Some(7);
    assert_eq!(timeout_of(&c, None, &limits), Duration::from_secs(7));
}
