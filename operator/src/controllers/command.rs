//! The Command controller, the one writer of `Command.status`: fetch what the world looks
//! like ([`Observed`]), [`decide`] without I/O what to do next ([`Decision`]), apply it.
//!
//! A command is parsed with the registry, numbered in its session (a counter in the
//! session's status, advanced by compare-and-set), run one at a time per session unless
//! `background`, dispatched to its device's agent (its `-auto` prerequisites first, each
//! recorded in `status.steps`), held to its timeout, cancel and the offline-queue timeout,
//! and finished from what the agent reported. Finished commands are deleted after
//! `commandRetention`. Every status write carries the resourceVersion it was decided on, so
//! a decision made on a stale view is refused by the API server and made again.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use liveresponse_api::command::{Invocation, Tier, TimeoutClass, parse_command};
use liveresponse_api::crd::{
    Command, CommandError, CommandOutput, CommandPhase, CommandStatus, CommandStep, FileRef,
    LiveResponseSession, OutputFormat, REQUESTED_BY_ANNOTATION, REQUESTED_BY_GROUPS_ANNOTATION,
    SessionPhase, SettingsSpec, Time, TransferProgress, parse_duration, parse_size,
};
use liveresponse_api::proto::{self, CancelReason, Execute, Outcome};
use serde_json::json;

use crate::context::Context;
use crate::controllers::{plus, until};
use crate::error::{Error, Result};
use crate::gateway::{CommandTarget, Progress, Report, SendError, step_uid};
use crate::sink::StagedFile;
use crate::status::set_condition;

/// How long the operator waits for an agent to confirm a cancel before it records the
/// command Cancelled anyway.
pub const CANCEL_CONFIRM: Duration = Duration::from_secs(10);

/// The namespace's limits that concern commands, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub command_timeout: Duration,
    pub long_command_timeout: Duration,
    pub offline_queue_timeout: Duration,
    pub retention: Duration,
    pub max_output: u64,
    /// Largest file getfile may pull.
    pub max_file_size: u64,
    /// Largest library file putfile may push.
    pub max_put_file_size: u64,
}

impl Limits {
    pub fn from_settings(s: &SettingsSpec) -> Self {
        Self {
            command_timeout: parse_duration(&s.command_timeout).unwrap_or(Duration::from_secs(600)),
            long_command_timeout: parse_duration(&s.long_command_timeout)
                .unwrap_or(Duration::from_secs(1800)),
            offline_queue_timeout: parse_duration(&s.offline_queue_timeout)
                .unwrap_or(Duration::from_secs(72 * 3600)),
            retention: parse_duration(&s.command_retention)
                .unwrap_or(Duration::from_secs(720 * 3600)),
            max_output: parse_size(&s.max_output_size).unwrap_or(64 << 20),
            max_file_size: parse_size(&s.max_file_size).unwrap_or(3 << 30),
            max_put_file_size: parse_size(&s.max_put_file_size).unwrap_or(300 << 20),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_settings(&SettingsSpec::default())
    }
}

/// What a command's reconciler knows of its session.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionFacts {
    pub name: String,
    pub phase: Option<SessionPhase>,
    pub created: jiff::Timestamp,
    pub requested_by: String,
    /// For a batch's child session (opened by the operator): the user who created the batch.
    pub on_behalf_of: Option<String>,
    pub device: String,
    pub working_directory: Option<String>,
}

/// What a reconciler knows of a device's link.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceFacts {
    /// Its agent has a stream to this operator.
    pub connected: bool,
    /// Since when it has not had one, when known.
    pub offline_since: Option<jiff::Timestamp>,
}

/// The state of the execution the command waits for (a step or the command itself).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecState {
    /// The gateway waits for the agent's result.
    pub inflight: bool,
    /// How long ago a cancel was sent, if one was.
    pub cancel_sent: Option<Duration>,
    /// What the agent reported, once it did.
    pub report: Option<Report>,
    /// This operator recorded the command final moments ago (its cache may lag behind).
    pub just_finished: bool,
    /// How far its transfer has come (getfile).
    pub progress: Option<Progress>,
}

/// Everything [`decide`] looks at besides the command.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: jiff::Timestamp,
    /// How long this operator has run: after a restart, agents get time to reconnect.
    pub uptime: Duration,
    pub restart_grace: Duration,
    /// How long a running command survives its device's disconnection.
    pub disconnect_grace: Duration,
    pub parsed: Result<Invocation, String>,
    pub session: Option<SessionFacts>,
    pub limits: Limits,
    pub device: DeviceFacts,
    /// An earlier command of the session that does not run in the background has not
    /// finished: `Some(true)` when it has no id yet (its number is being taken).
    pub blocked_by_earlier: Option<bool>,
    pub exec: ExecState,
    /// The API server's answer, asked again by the operator, whether the requester may run
    /// this verb (advanced verbs only): defence in depth behind the admission policies.
    pub access: Result<(), String>,
    /// putfile and run: the library file as validated, or why it cannot be used.
    pub content: Option<Result<proto::Content, String>>,
    /// analyze, scan and remediate -auto: the namespace's Ready rule files.
    pub rules: Vec<proto::Content>,
}

/// One execution to send to the agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Execution {
    pub uid: String,
    pub step: Option<usize>,
    pub verb: String,
    pub args: Vec<String>,
}

/// How a command ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    pub phase: CommandPhase,
    pub reason: String,
    pub message: String,
    pub exit_code: Option<i32>,
    pub output: Option<CommandOutput>,
    /// A last `-auto` step to record with it.
    pub step: Option<CommandStep>,
    /// Tell the agent to stop what it still does of the command.
    pub cancel_on_agent: Option<CancelReason>,
    /// `cd` moved the session here.
    pub working_directory: Option<String>,
    /// getfile: the verified copy to keep in the artifact store.
    pub file: Option<StagedFile>,
    /// The whole output, when it did not fit inline: (staging file, sha256).
    pub output_file: Option<(std::path::PathBuf, String)>,
}

impl Finish {
    fn new(phase: CommandPhase, reason: &str, message: impl Into<String>) -> Self {
        Self {
            phase,
            reason: reason.into(),
            message: message.into(),
            exit_code: None,
            output: None,
            step: None,
            cancel_on_agent: None,
            working_directory: None,
            file: None,
            output_file: None,
        }
    }

    fn cancelling(mut self, why: CancelReason) -> Self {
        self.cancel_on_agent = Some(why);
        self
    }
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing until something changes, or until the duration passed.
    Wait(Option<Duration>),
    /// Pending → Queued: take the session's next id.
    Queue { command_line: String },
    /// Send an execution to the agent; `mark_running` moves Queued → Running.
    Dispatch { exec: Execution, mark_running: bool },
    /// Record a finished `-auto` step; the next execution follows.
    RecordStep { step: CommandStep, exec_uid: String },
    /// Ask the agent to stop, and wait for it to say it did.
    CancelOnAgent(CancelReason),
    /// Record how far the transfer has come.
    Progress(TransferProgress),
    /// A command the operator answers itself (`library`, `library delete`).
    AnswerHere,
    /// Move to a final phase.
    Finish(Box<Finish>),
    /// Finished: let the session's next commands go; delete once retention passed.
    Done { delete_in: Duration },
}

fn phase(c: &Command) -> Option<CommandPhase> {
    c.status.as_ref().and_then(|s| s.phase)
}

/// The command's timeout: its own, or the namespace's for its verb's timeout class.
pub fn timeout_of(c: &Command, parsed: Option<&Invocation>, limits: &Limits) -> Duration {
    if let Some(t) = c.spec.timeout_seconds {
        return Duration::from_secs(u64::try_from(t).unwrap_or(1).max(1));
    }
    if parsed.is_some_and(|i| i.spec.timeout == TimeoutClass::Long) {
        limits.long_command_timeout
    } else {
        limits.command_timeout
    }
}

/// What runs next on the agent: the next `-auto` prerequisite not yet recorded, or the
/// command itself. Steps take the command's positional values (`getfile PATH -auto` runs
/// `fileinfo PATH`).
pub fn current_execution(c: &Command, parsed: Option<&Invocation>) -> Execution {
    let uid = c.uid().unwrap_or_default();
    let done = c.status.as_ref().map_or(0, |s| s.steps.len());
    let step = parsed.filter(|i| i.has_flag("auto")).and_then(|inv| {
        let verb = inv.spec.prerequisites.get(done)?;
        let args: Vec<String> = inv.positional.iter().map(|(_, v)| v.clone()).collect();
        Some((verb.to_string(), args))
    });
    match step {
        Some((verb, args)) => Execution {
            uid: step_uid(&uid, done),
            step: Some(done),
            verb,
            args,
        },
        None => Execution {
            uid,
            step: None,
            verb: c.spec.command.clone(),
            args: c.spec.args.clone(),
        },
    }
}

/// The format `status.output` is rendered in: `-output` typed as an argument wins.
pub fn format_of(c: &Command, parsed: Option<&Invocation>) -> OutputFormat {
    parsed.and_then(|i| i.output).unwrap_or(c.spec.output)
}

/// Decides the next step of a command's life. Pure: every fact comes in `o`.
pub fn decide(c: &Command, o: &Observed) -> Decision {
    let current = phase(c);
    if current.is_some_and(CommandPhase::is_final) {
        let done = c
            .status
            .as_ref()
            .and_then(|s| s.completion_time.as_ref())
            .map_or(o.now, |t| t.0);
        return Decision::Done {
            delete_in: until(o.now, plus(done, o.limits.retention)),
        };
    }
    let Some(session) = &o.session else {
        return Decision::Finish(Box::new(Finish::new(
            CommandPhase::Failed,
            "SessionNotFound",
            format!(
                "session {} does not exist in this namespace; open a session first",
                c.spec.session
            ),
        )));
    };
    let session_ended = session.phase.filter(|p| p.is_final());
    match current {
        None | Some(CommandPhase::Pending) => decide_pending(c, o, session, session_ended),
        Some(CommandPhase::Queued) => decide_queued(c, o, session, session_ended),
        _ => decide_running(c, o, session, session_ended),
    }
}

fn fail(phase: CommandPhase, reason: &str, message: impl Into<String>) -> Decision {
    Decision::Finish(Box::new(Finish::new(phase, reason, message)))
}

fn decide_pending(
    c: &Command,
    o: &Observed,
    session: &SessionFacts,
    session_ended: Option<SessionPhase>,
) -> Decision {
    let inv = match &o.parsed {
        Ok(inv) => inv,
        Err(e) => return fail(CommandPhase::Failed, "ParseError", e.clone()),
    };
    if !inv.spec.is_command() {
        // `library upload`: its verb is a command verb, so admission lets it through.
        return fail(
            CommandPhase::Failed,
            "ConsoleOnly",
            format!(
                "{} runs in the console (kubectl liveresponse connect), not as a Command",
                inv.spec.name
            ),
        );
    }
    // Only the session's requester may type in it; admission says who created the command.
    match c.annotations().get(REQUESTED_BY_ANNOTATION) {
        None => {
            return fail(
                CommandPhase::Failed,
                "Unattributed",
                format!(
                    "the command carries no {REQUESTED_BY_ANNOTATION} annotation: install the admission policies in config/admission (MutatingAdmissionPolicy liveresponse-command-requester)"
                ),
            );
        }
        Some(user) if *user != session.requested_by => {
            return fail(
                CommandPhase::Failed,
                "NotSessionOwner",
                format!(
                    "session {} belongs to {}; {user} cannot run commands in it: open your own session",
                    session.name, session.requested_by
                ),
            );
        }
        Some(_) => {}
    }
    if let Err(why) = &o.access {
        return fail(CommandPhase::Failed, "Forbidden", why.clone());
    }
    if c.spec.background && !inv.spec.background_allowed {
        return fail(
            CommandPhase::Failed,
            "BackgroundNotAllowed",
            format!(
                "{} cannot run in the background: run it without `&` (spec.background: false)",
                inv.spec.name
            ),
        );
    }
    if let Some(p) = session_ended {
        return fail(
            CommandPhase::Failed,
            "SessionEnded",
            format!(
                "session {} has ended ({p:?}); open a new session",
                session.name
            ),
        );
    }
    let mut command_line = inv.render();
    if c.spec.background {
        command_line.push_str(" &");
    }
    Decision::Queue { command_line }
}

/// When a command waiting for an offline device gives up: `offlineQueueTimeout` after the
/// session was opened or the device went away, whichever is later.
fn offline_deadline(o: &Observed, session: &SessionFacts) -> jiff::Timestamp {
    super::offline_deadline(
        session.created,
        o.device.offline_since,
        o.limits.offline_queue_timeout,
    )
}

fn decide_queued(
    c: &Command,
    o: &Observed,
    session: &SessionFacts,
    session_ended: Option<SessionPhase>,
) -> Decision {
    if c.spec.cancel {
        return fail(
            CommandPhase::Cancelled,
            "Cancelled",
            "cancelled before it started",
        );
    }
    let offline = !o.device.connected;
    let deadline = offline_deadline(o, session);
    if offline && o.now >= deadline {
        return fail(
            CommandPhase::TimedOut,
            "OfflineQueueTimeout",
            format!(
                "device {} stayed offline for the namespace's offlineQueueTimeout ({}s); the command was not run",
                session.device,
                o.limits.offline_queue_timeout.as_secs()
            ),
        );
    }
    if let Some(p) = session_ended {
        return fail(
            CommandPhase::Failed,
            "SessionEnded",
            format!(
                "session {} ended ({p:?}) before the command started",
                session.name
            ),
        );
    }
    let offline_wait = Decision::Wait(Some(until(o.now, deadline)));
    if session.phase != Some(SessionPhase::Connected) {
        // The session's change wakes this command.
        return if offline {
            offline_wait
        } else {
            Decision::Wait(None)
        };
    }
    if !c.spec.background {
        match o.blocked_by_earlier {
            Some(false) => return Decision::Wait(None),
            // Its id is being written; its status change does not wake this one.
            Some(true) => return Decision::Wait(Some(Duration::from_secs(1))),
            None => {}
        }
    }
    // The library lives in the cluster: no device needed, but the session's order holds.
    if o.parsed
        .as_ref()
        .is_ok_and(|i| i.spec.handler == liveresponse_api::command::Handler::Operator)
    {
        return Decision::AnswerHere;
    }
    if let Some(Err(why)) = &o.content {
        return fail(CommandPhase::Failed, "LibraryFileUnusable", why.clone());
    }
    if offline {
        return offline_wait;
    }
    if o.exec.inflight {
        // Already sent; the cache has not seen Running yet.
        return Decision::Wait(None);
    }
    Decision::Dispatch {
        exec: current_execution(c, o.parsed.as_ref().ok()),
        mark_running: true,
    }
}

fn decide_running(
    c: &Command,
    o: &Observed,
    session: &SessionFacts,
    session_ended: Option<SessionPhase>,
) -> Decision {
    let parsed = o.parsed.as_ref().ok();
    let timeout = timeout_of(c, parsed, &o.limits);
    let started = c
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or(o.now, |t| t.0);
    let deadline = plus(started, timeout);
    if o.now >= deadline {
        return Decision::Finish(Box::new(
            Finish::new(
                CommandPhase::TimedOut,
                "TimedOut",
                format!(
                    "the command did not finish within {}s; the agent was told to stop it",
                    timeout.as_secs()
                ),
            )
            .cancelling(CancelReason::Timeout),
        ));
    }
    if let Some(r) = &o.exec.report {
        return from_report(c, parsed, r);
    }
    if let Some(p) = session_ended {
        return Decision::Finish(Box::new(
            Finish::new(
                CommandPhase::Failed,
                "SessionEnded",
                format!(
                    "the session ended ({p:?}) before the command finished; the agent was told to stop it"
                ),
            )
            .cancelling(CancelReason::SessionEnded),
        ));
    }
    let left = until(o.now, deadline);
    if c.spec.cancel {
        if o.exec.inflight {
            return match o.exec.cancel_sent {
                None => Decision::CancelOnAgent(CancelReason::User),
                Some(ago) if ago >= CANCEL_CONFIRM => Decision::Finish(Box::new(Finish::new(
                    CommandPhase::Cancelled,
                    "Cancelled",
                    format!(
                        "cancelled; the agent did not confirm that it stopped within {}s",
                        CANCEL_CONFIRM.as_secs()
                    ),
                ))),
                Some(ago) => Decision::Wait(Some((CANCEL_CONFIRM - ago).min(left))),
            };
        }
        return Decision::Finish(Box::new(
            Finish::new(CommandPhase::Cancelled, "Cancelled", "cancelled")
                .cancelling(CancelReason::User),
        ));
    }
    if o.exec.inflight {
        if let Some(p) = progress_to_record(c, o.exec.progress) {
            return Decision::Progress(p);
        }
        return Decision::Wait(Some(left));
    }
    if o.exec.just_finished {
        return Decision::Wait(Some(Duration::from_secs(1)));
    }
    if o.device.connected {
        // Running, connected, and nothing in flight: this operator restarted, the agent
        // reconnected, or a step was just recorded. Send it (again): the agent knows the
        // uid, never runs it twice, and replays a result it already has.
        return Decision::Dispatch {
            exec: current_execution(c, parsed),
            mark_running: false,
        };
    }
    if o.uptime < o.restart_grace {
        return Decision::Wait(Some((o.restart_grace - o.uptime).min(left)));
    }
    let gone_since = o.device.offline_since.unwrap_or(o.now);
    let give_up = plus(gone_since, o.disconnect_grace);
    if o.now < give_up {
        return Decision::Wait(Some(until(o.now, give_up).min(left)));
    }
    fail(
        CommandPhase::Failed,
        "DeviceDisconnected",
        format!(
            "device {} disconnected while the command ran and was not back within {}s; run it again once the device is back",
            session.device,
            o.disconnect_grace.as_secs()
        ),
    )
}

/// The transfer's progress, when it moved since status last said.
fn progress_to_record(c: &Command, p: Option<Progress>) -> Option<TransferProgress> {
    let p = p?;
    let now = TransferProgress {
        bytes: i64::try_from(p.bytes).unwrap_or(i64::MAX),
        total_bytes: i64::try_from(p.total?).unwrap_or(i64::MAX),
        resumed_at: p.resumed_at.and_then(|r| i64::try_from(r).ok()),
        unit: p.unit.map(str::to_string),
    };
    let recorded = c.status.as_ref().and_then(|s| s.progress.as_ref());
    (recorded != Some(&now)).then_some(now)
}

fn step_line(parsed: Option<&Invocation>, step: usize) -> String {
    let verb = parsed
        .and_then(|i| i.spec.prerequisites.get(step).copied())
        .unwrap_or("step");
    let args: Vec<String> = parsed
        .map(|i| i.positional.iter().map(|(_, v)| v.clone()).collect())
        .unwrap_or_default();
    parse_command(verb, &args)
        .map(|i| i.render())
        .unwrap_or_else(|_| verb.to_string())
}

fn from_report(c: &Command, parsed: Option<&Invocation>, r: &Report) -> Decision {
    if let Some(step) = r.step {
        let line = step_line(parsed, step);
        let ok = r.outcome == Outcome::Succeeded;
        let record = CommandStep {
            command_line: line.clone(),
            phase: if ok {
                CommandPhase::Succeeded
            } else {
                CommandPhase::Failed
            },
            exit_code: Some(r.exit_code),
            message: (!r.error_message.is_empty()).then(|| r.error_message.clone()),
        };
        if ok {
            return Decision::RecordStep {
                step: record,
                exec_uid: step_uid(&c.uid().unwrap_or_default(), step),
            };
        }
        let mut f = Finish::new(
            CommandPhase::Failed,
            "PrerequisiteFailed",
            format!("prerequisite `{line}` failed: {}", r.error_message),
        );
        f.step = Some(record);
        f.exit_code = Some(r.exit_code);
        return Decision::Finish(Box::new(f));
    }
    let output = match &r.output {
        Ok(o) => o,
        Err(problem) => {
            let mut f = Finish::new(CommandPhase::Failed, problem.reason(), problem.message());
            f.exit_code = Some(r.exit_code);
            return Decision::Finish(Box::new(f));
        }
    };
    // A file that arrived but cannot be trusted fails a getfile the agent thinks went well.
    let file = match (&r.file, r.outcome) {
        (Some(Err(problem)), Outcome::Succeeded) => {
            let mut f = Finish::new(CommandPhase::Failed, problem.reason(), problem.message());
            f.exit_code = Some(r.exit_code);
            return Decision::Finish(Box::new(f));
        }
        (Some(Ok(staged)), Outcome::Succeeded) => Some(staged.clone()),
        _ => None,
    };
    let (phase, default_reason, default_message) = match r.outcome {
        Outcome::Succeeded => (CommandPhase::Succeeded, "", ""),
        Outcome::Cancelled => (
            CommandPhase::Cancelled,
            "Cancelled",
            "cancelled; the agent stopped the work",
        ),
        Outcome::TimedOut => (
            CommandPhase::TimedOut,
            "TimedOut",
            "the agent stopped the command at its time limit",
        ),
        Outcome::Failed | Outcome::Unspecified => (
            CommandPhase::Failed,
            "AgentError",
            "the agent reported a failure",
        ),
    };
    let reason = if r.error_reason.is_empty() || phase == CommandPhase::Cancelled {
        default_reason.to_string()
    } else {
        r.error_reason.clone()
    };
    let message = if r.error_message.is_empty() {
        default_message.to_string()
    } else {
        r.error_message.clone()
    };
    let mut f = Finish::new(phase, &reason, message);
    f.exit_code = Some(r.exit_code);
    f.output = Some(CommandOutput {
        format: format_of(c, parsed),
        content: output.inline.clone(),
        truncated: output.truncated,
        size: i64::try_from(output.size).unwrap_or(i64::MAX),
        sha256: Some(output.sha256.clone()),
        artifact: None,
        warnings: r.warnings.clone(),
    });
    if phase == CommandPhase::Succeeded && !r.working_directory.is_empty() {
        f.working_directory = Some(r.working_directory.clone());
    }
    f.output_file = output.spilled.clone().map(|p| (p, output.sha256.clone()));
    f.file = file;
    Decision::Finish(Box::new(f))
}

// ---------------------------------------------------------------------------------------
// fetch and apply

/// Gathers what [`decide`] needs: the session from the API server (its working directory
/// must be current), everything else from caches and the gateway.
async fn observe(c: &Command, ctx: &Context) -> Result<Observed> {
    let ns = c.namespace().unwrap_or_default();
    let parsed = parse_command(&c.spec.command, &c.spec.args).map_err(|e| e.to_string());
    let limits = ctx.limits(&ns);
    let final_phase = phase(c).is_some_and(CommandPhase::is_final);
    let session = if final_phase {
        None
    } else {
        Api::<LiveResponseSession>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&c.spec.session)
            .await?
    };
    let session = session.map(|s| SessionFacts {
        name: s.name_any(),
        phase: s.status.as_ref().and_then(|st| st.phase),
        created: s
            .creation_timestamp()
            .map_or_else(jiff::Timestamp::now, |t| t.0),
        requested_by: s.spec.requested_by.clone(),
        on_behalf_of: s
            .annotations()
            .get(liveresponse_api::crd::ON_BEHALF_OF_ANNOTATION)
            .filter(|_| s.spec.requested_by == ctx.identity)
            .cloned(),
        device: s.spec.device.clone(),
        working_directory: s
            .status
            .as_ref()
            .and_then(|st| st.working_directory.clone()),
    });
    let device = session
        .as_ref()
        .map(|s| ctx.device_facts(&(ns.clone(), s.device.clone())))
        .unwrap_or_default();
    let access = match (&parsed, phase(c)) {
        (Ok(inv), None | Some(CommandPhase::Pending)) if inv.spec.tier == Tier::Advanced => {
            may_run_advanced(c, &c.spec.command, &c.spec.args, ctx).await?
        }
        _ => Ok(()),
    };
    let exec = current_execution(c, parsed.as_ref().ok());
    let uid = c.uid().unwrap_or_default();
    let inflight = ctx.gateway.inflight(&exec.uid);
    // Looked up only when it may be sent (queued, or running but not in flight here after
    // a restart or reconnect), not on every progress update.
    let may_send = match phase(c) {
        Some(CommandPhase::Queued) => true,
        Some(CommandPhase::Running) => inflight.is_none(),
        _ => false,
    };
    let content = match (&parsed, &session) {
        (Ok(inv), Some(_)) if may_send && matches!(inv.spec.name, "putfile" | "run") => {
            Some(library_content(inv, &ns, &limits, ctx).await?)
        }
        _ => None,
    };
    let rules = match (&parsed, &session) {
        (Ok(inv), Some(_)) if may_send && uses_rules(inv) => analysis_rules(&ns, ctx).await?,
        _ => Vec::new(),
    };
    Ok(Observed {
        now: jiff::Timestamp::now(),
        uptime: ctx.started.elapsed(),
        restart_grace: ctx.restart_grace,
        disconnect_grace: ctx.disconnect_grace,
        parsed,
        session,
        limits,
        device,
        blocked_by_earlier: blocked_by_earlier(c, ctx),
        exec: ExecState {
            inflight: inflight.is_some(),
            cancel_sent: inflight.flatten(),
            report: ctx.gateway.report(&exec.uid),
            just_finished: ctx.just_finished(&uid),
            progress: ctx.gateway.progress(&exec.uid),
        },
        access,
        content,
        rules,
    })
}

/// Whether the agent needs the namespace's rule files for this command (a `remediate
/// -auto` analyses its entity again right before it acts).
fn uses_rules(inv: &Invocation) -> bool {
    matches!(inv.spec.name, "analyze" | "scan")
        || (inv.spec.name == "remediate" && inv.has_flag("auto"))
}

/// The namespace's rule files for analyze and scan: every LibraryFile with
/// `spec.analysis` that is Ready for its current generation. One that is not Ready is left
/// out (its status says why), so a broken rule file never stops an analysis.
async fn analysis_rules(ns: &str, ctx: &Context) -> Result<Vec<proto::Content>> {
    use liveresponse_api::crd::{LibraryFile, LibraryFilePhase};
    let api: Api<LibraryFile> = Api::namespaced(ctx.client.clone(), ns);
    let settings = ctx
        .settings_of(ns)
        .map(|s| s.spec.clone())
        .unwrap_or_default();
    let mut rules: Vec<proto::Content> = api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|lf| {
            let kind = lf.spec.analysis?;
            let st = lf.status.clone()?;
            let ready = st.phase == Some(LibraryFilePhase::Ready)
                && st.observed_generation == lf.metadata.generation;
            ready.then(|| proto::Content {
                name: lf.name_any(),
                file_name: lf.spec.file_name.clone(),
                size: st
                    .size
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or_default(),
                sha256: st.sha256.clone().unwrap_or_default(),
                signature: lf.spec.signature.clone().unwrap_or_default(),
                trusted_signers: settings.trusted_signers.clone(),
                // Rules run no code on the device; the pinned digest is what they are
                // held to, and a signature, when there is one, must still verify.
                allow_unsigned: true,
                analysis: kind.wire_name().into(),
            })
        })
        .collect();
    // A stable order, so the agent's cache of compiled rules keys on the same list.
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rules)
}

/// The library file a putfile or run names, as its controller validated it, with what the
/// device needs to check it again: found by file name (or object name), Ready for its
/// current generation, and within maxPutFileSize for putfile.
async fn library_content(
    inv: &Invocation,
    ns: &str,
    limits: &Limits,
    ctx: &Context,
) -> Result<Result<proto::Content, String>> {
    use liveresponse_api::crd::{LibraryFile, LibraryFilePhase};
    let wanted = inv.get("name").unwrap_or_default();
    let api: Api<LibraryFile> = Api::namespaced(ctx.client.clone(), ns);
    let files = api.list(&Default::default()).await?.items;
    let Some(lf) = files
        .iter()
        .find(|f| f.spec.file_name == wanted)
        .or_else(|| files.iter().find(|f| f.name_any() == wanted))
    else {
        return Ok(Err(format!(
            "no library file named {wanted} in namespace {ns}; `library` lists them, and `kubectl liveresponse library upload` adds one"
        )));
    };
    let st = lf.status.clone().unwrap_or_default();
    let current = st.observed_generation == lf.metadata.generation;
    let (Some(LibraryFilePhase::Ready), true, Some(sha), Some(size)) =
        (st.phase, current, st.sha256.clone(), st.size)
    else {
        let why = st
            .message
            .clone()
            .unwrap_or_else(|| "it has not been validated yet; try again in a moment".into());
        return Ok(Err(format!(
            "library file {} is not ready: {why}",
            lf.name_any()
        )));
    };
    let size = u64::try_from(size).unwrap_or_default();
    if inv.spec.name == "putfile" && size > limits.max_put_file_size {
        return Ok(Err(format!(
            "library file {} is {size} bytes, more than the namespace's maxPutFileSize ({} bytes); ask a settings admin to raise maxPutFileSize",
            lf.name_any(),
            limits.max_put_file_size
        )));
    }
    let settings = ctx
        .settings_of(ns)
        .map(|s| s.spec.clone())
        .unwrap_or_default();
    Ok(Ok(proto::Content {
        name: lf.name_any(),
        file_name: lf.spec.file_name.clone(),
        size,
        sha256: sha,
        signature: lf.spec.signature.clone().unwrap_or_default(),
        trusted_signers: settings.trusted_signers,
        allow_unsigned: settings.allow_unsigned_scripts,
        analysis: String::new(),
    }))
}

/// Asks the API server whether the creator of `obj` (a Command, or a BatchCommand) may
/// create `commands/advanced` (and the responder subresource `command` with `args` needs)
/// in its namespace, as the tier admission policy does: if that policy's binding is
/// missing, an advanced verb still fails, here.
pub async fn may_run_advanced<K: Resource>(
    obj: &K,
    command: &str,
    args: &[String],
    ctx: &Context,
) -> Result<Result<(), String>> {
    let tier = creator_may(obj, ctx, "commands", Some("advanced"), "create", |user, ns| {
        format!(
            "{user} may not run the advanced command {command}: it needs the liveresponse-advanced role (create on commands/advanced in namespace {ns}); ask your live response administrator for it"
        )
    })
    .await?;
    let further = parse_command(command, args)
        .ok()
        .and_then(|i| i.responder_subresource());
    match (tier, further) {
        (Ok(()), Some(sub)) => {
            creator_may(obj, ctx, "commands", Some(sub), "create", |user, ns| {
                format!(
                    "{user} may not run {command}: it needs the liveresponse-responder role (create on commands/{sub} in namespace {ns})"
                )
            })
            .await
        }
        (tier, _) => Ok(tier),
    }
}

/// Asks the API server whether the command's creator (the user and groups admission
/// stamped on it) may `verb` the liveresponse.io `resource` (`/subresource`) in the
/// command's namespace; when not, the refusal `denied(user, namespace)` words.
async fn creator_may<K: Resource>(
    c: &K,
    ctx: &Context,
    resource: &str,
    subresource: Option<&str>,
    verb: &str,
    denied: impl FnOnce(&str, &str) -> String,
) -> Result<Result<(), String>> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let ns = c.namespace().unwrap_or_default();
    let user = c.annotations().get(REQUESTED_BY_ANNOTATION).cloned();
    let groups = c.annotations().get(REQUESTED_BY_GROUPS_ANNOTATION).cloned();
    let (Some(user), Some(groups)) = (user, groups) else {
        return Ok(Err(format!(
            "the command does not say who created it ({REQUESTED_BY_ANNOTATION} and {REQUESTED_BY_GROUPS_ANNOTATION}): install the admission policies in config/admission"
        )));
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            groups: Some(
                groups
                    .split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            resource_attributes: Some(ResourceAttributes {
                group: Some(liveresponse_api::GROUP.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(str::to_string),
                verb: Some(verb.into()),
                namespace: Some(ns.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(ctx.client.clone());
    let answer = api.create(&Default::default(), &review).await?;
    let allowed = answer.status.is_some_and(|s| s.allowed);
    Ok(if allowed {
        Ok(())
    } else {
        Err(denied(&user, &ns))
    })
}

/// Whether an earlier command of the session that does not run in the background is
/// unfinished (see [`Observed::blocked_by_earlier`]).
fn blocked_by_earlier(c: &Command, ctx: &Context) -> Option<bool> {
    let my_id = c.status.as_ref().and_then(|s| s.id)?;
    let mine = c.creation_timestamp();
    let mut verdict = None;
    for o in ctx.session_commands(&c.namespace().unwrap_or_default(), &c.spec.session) {
        if o.spec.background || o.uid() == c.uid() || phase(&o).is_some_and(CommandPhase::is_final)
        {
            continue;
        }
        match o.status.as_ref().and_then(|s| s.id) {
            Some(id) if id < my_id => return Some(false),
            Some(_) => {}
            None if o.creation_timestamp() <= mine => verdict = Some(true),
            None => {}
        }
    }
    verdict
}

#[tracing::instrument(skip_all, fields(namespace = c.namespace().unwrap_or_default(), name = %c.name_any(), uid = c.uid().unwrap_or_default()))]
pub async fn reconcile(c: Arc<Command>, ctx: Arc<Context>) -> Result<Action> {
    let o = observe(&c, &ctx).await?;
    let decision = decide(&c, &o);
    tracing::debug!(?decision, "decided");
    let action = match apply(&c, &o, decision, &ctx).await {
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
            // Decided on a stale view; the newer one is on its way.
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        other => other,
    }?;
    ctx.reset_backoff("command", &c.namespace().unwrap_or_default(), &c.name_any());
    Ok(action)
}

fn wait(d: Option<Duration>) -> Action {
    match d {
        // A little past the deadline, so the next look sees it passed.
        Some(d) => Action::requeue(d + Duration::from_millis(50)),
        None => Action::await_change(),
    }
}

async fn apply(c: &Command, o: &Observed, decision: Decision, ctx: &Context) -> Result<Action> {
    let ns = c.namespace().unwrap_or_default();
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = c.uid().unwrap_or_default();
    match decision {
        Decision::Wait(d) => Ok(wait(d)),
        Decision::Queue { command_line } => queue(c, o, &command_line, ctx).await,
        Decision::Dispatch { exec, mark_running } => {
            let Some(session) = &o.session else {
                return Ok(Action::await_change());
            };
            let parsed = o.parsed.as_ref().ok();
            let timeout = timeout_of(c, parsed, &o.limits);
            let target = CommandTarget {
                namespace: ns.clone(),
                name: c.name_any(),
                device: (ns.clone(), session.device.clone()),
                step: exec.step,
            };
            let msg = Execute {
                command_uid: exec.uid.clone(),
                command: exec.verb.clone(),
                args: exec.args.clone(),
                working_directory: session
                    .working_directory
                    .clone()
                    .unwrap_or_else(|| "/".into()),
                timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
                session: session.name.clone(),
                output_format: match format_of(c, parsed) {
                    OutputFormat::Json => proto::OutputFormat::Json as i32,
                    OutputFormat::Table => proto::OutputFormat::Table as i32,
                },
                max_output_bytes: o.limits.max_output,
                // Set by the gateway from what it holds in staging.
                resume_offset: 0,
                max_file_bytes: o.limits.max_file_size,
                content: o.content.clone().and_then(|c| c.ok()),
                rules: o.rules.clone(),
                requested_by: match &session.on_behalf_of {
                    Some(user) => format!("{user} (batch)"),
                    None => session.requested_by.clone(),
                },
            };
            let sent = ctx.gateway.execute(target, msg);
            if let Err(SendError::Staging(why)) = &sent {
                tracing::error!(%why, "cannot stage a transfer");
                finish(
                    c,
                    o,
                    Finish::new(
                        CommandPhase::Failed,
                        "ArtifactStoreError",
                        format!("the operator cannot receive the file: {why}"),
                    ),
                    ctx,
                )
                .await?;
                return Ok(Action::await_change());
            }
            if let Err(e) = sent {
                // The device's return wakes this command.
                tracing::info!(error = %e, "not dispatched");
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            tracing::info!(exec_uid = %exec.uid, verb = %exec.verb, "dispatched");
            if mark_running {
                let mut st = c.status.clone().unwrap_or_default();
                st.phase = Some(CommandPhase::Running);
                st.start_time = Some(Time(o.now));
                set_condition(
                    &mut st.conditions,
                    "Complete",
                    false,
                    "Running",
                    "sent to the device",
                    c.metadata.generation,
                    o.now,
                );
                write_status(&api, c, &st).await?;
                ctx.event(
                    c,
                    false,
                    "Started",
                    format!("sent to device {}", session.device),
                )
                .await;
            }
            Ok(wait(Some(timeout)))
        }
        Decision::RecordStep { step, exec_uid } => {
            let mut st = c.status.clone().unwrap_or_default();
            st.steps.push(step);
            write_status(&api, c, &st).await?;
            ctx.gateway.drop_report(&exec_uid);
            Ok(Action::await_change())
        }
        Decision::AnswerHere => {
            let f = answer_here(c, o, ctx).await?;
            finish(c, o, f, ctx).await?;
            Ok(Action::await_change())
        }
        Decision::Progress(p) => {
            let mut st = c.status.clone().unwrap_or_default();
            st.progress = Some(p);
            write_status(&api, c, &st).await?;
            Ok(Action::await_change())
        }
        Decision::CancelOnAgent(why) => {
            ctx.gateway.cancel(&uid, why);
            Ok(wait(Some(CANCEL_CONFIRM)))
        }
        Decision::Finish(f) => {
            finish(c, o, *f, ctx).await?;
            Ok(Action::await_change())
        }
        Decision::Done { delete_in } => {
            if delete_in.is_zero() {
                match api.delete(&c.name_any(), &Default::default()).await {
                    Ok(_) => tracing::info!("deleted after commandRetention"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Action::await_change());
            }
            wake_followers(c, ctx);
            Ok(wait(Some(delete_in)))
        }
    }
}

/// Writes a command's whole status, refused if the object changed since it was read.
async fn write_status(api: &Api<Command>, c: &Command, st: &CommandStatus) -> Result<()> {
    let mut st = st.clone();
    st.observed_generation = c.metadata.generation;
    if c.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let patch = json!({
        "metadata": { "resourceVersion": c.resource_version() },
        "status": st,
    });
    api.patch_status(&c.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// Pending → Queued: own the command by its session, take the session's next id (a
/// compare-and-set on its counter), record it.
async fn queue(c: &Command, o: &Observed, line: &str, ctx: &Context) -> Result<Action> {
    let ns = c.namespace().unwrap_or_default();
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    // The cache may lag behind an earlier pass: never take a second id.
    let Some(mut fresh) = api.get_opt(&c.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if !matches!(phase(&fresh), None | Some(CommandPhase::Pending)) {
        return Ok(Action::await_change());
    }
    let sessions: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(session) = sessions.get_opt(&c.spec.session).await? else {
        return Ok(Action::requeue(Duration::from_millis(200)));
    };
    if let Some(owner) = session_owner(&session)
        && !fresh.owner_references().iter().any(|r| r.uid == owner.uid)
    {
        let mut owners = fresh.owner_references().to_vec();
        owners.push(owner);
        fresh = api
            .patch(
                &c.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": {
                    "ownerReferences": owners, "resourceVersion": fresh.resource_version() } })),
            )
            .await?;
    }
    let id = next_id(&sessions, session, o.now).await?;
    let mut st = fresh.status.clone().unwrap_or_default();
    st.id = Some(id);
    st.command_line = Some(line.to_string());
    st.phase = Some(CommandPhase::Queued);
    set_condition(
        &mut st.conditions,
        "Complete",
        false,
        "Queued",
        "waiting for its turn and its device",
        fresh.metadata.generation,
        o.now,
    );
    write_status(&api, &fresh, &st).await?;
    Ok(Action::await_change())
}

/// A non-controller owner reference to the session, so deleting it deletes its commands.
fn session_owner(s: &LiveResponseSession) -> Option<OwnerReference> {
    s.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o
    })
}

/// Advances the session's command counter by compare-and-set and returns the new value.
async fn next_id(
    sessions: &Api<LiveResponseSession>,
    mut session: LiveResponseSession,
    now: jiff::Timestamp,
) -> Result<i64> {
    for _ in 0..20 {
        let id = session.status.as_ref().map_or(0, |s| s.command_count) + 1;
        let patch = json!({
            "metadata": { "resourceVersion": session.resource_version() },
            "status": { "commandCount": id, "lastActivityTime": Time(now) },
        });
        match sessions
            .patch_status(
                &session.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => return Ok(id),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                match sessions.get_opt(&session.name_any()).await? {
                    Some(s) => session = s,
                    None => return Err(Error::Invalid("the session was deleted".into())),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Invalid(
        "the session's command counter kept changing; will retry".into(),
    ))
}

async fn finish(c: &Command, o: &Observed, f: Finish, ctx: &Context) -> Result<()> {
    let ns = c.namespace().unwrap_or_default();
    let uid = c.uid().unwrap_or_default();
    if let Some(why) = f.cancel_on_agent {
        ctx.gateway.cancel(&uid, why);
    }
    // The next command of the session must run where `cd` went: the session moves first,
    // and that command starts only once this one is seen final.
    if let Some(dir) = &f.working_directory {
        Api::<LiveResponseSession>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &c.spec.session,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "workingDirectory": dir } })),
            )
            .await?;
    }
    let created = c.creation_timestamp().map_or(o.now, |t| t.0);
    let secs = o.now.duration_since(created).as_secs_f64().max(0.0);
    let mut st = c.status.clone().unwrap_or_default();
    st.phase = Some(f.phase);
    st.completion_time = Some(Time(o.now));
    st.duration = Some(format!("{secs:.1}s"));
    if f.exit_code.is_some() {
        st.exit_code = f.exit_code;
    }
    if let Some(step) = f.step.clone() {
        st.steps.push(step);
    }
    if f.output.is_some() {
        st.output = f.output.clone();
    }
    if let (Some((path, sha)), Some(out)) = (&f.output_file, &mut st.output) {
        // Stored before status names it, as a getfile's file is.
        ctx.artifacts
            .put_staged(path, sha)
            .await
            .map_err(|e| Error::Invalid(format!("storing the whole output: {e}")))?;
        out.artifact = Some(sha.clone());
    }
    if let Some(staged) = &f.file {
        // The artifact is stored before status names it: a status that points at nothing
        // is worse than a retry.
        ctx.artifacts
            .put_staged(&staged.staged, &staged.sha256)
            .await
            .map_err(|e| Error::Invalid(format!("storing the file: {e}")))?;
        let size = i64::try_from(staged.size).unwrap_or(i64::MAX);
        st.file = Some(FileRef {
            path: staged.device_path.clone(),
            size,
            sha256: staged.sha256.clone(),
            artifact: Some(staged.sha256.clone()),
        });
        if let Some(p) = &mut st.progress {
            p.bytes = size;
            p.total_bytes = size;
        }
    }
    let ok = f.phase == CommandPhase::Succeeded;
    if ok && let Some(p) = &mut st.progress {
        // Done: whatever the last sample said, all of it moved.
        p.bytes = p.total_bytes;
    }
    if !ok {
        st.error = Some(CommandError {
            reason: f.reason.clone(),
            message: f.message.clone(),
        });
    }
    let reason = format!("{:?}", f.phase);
    set_condition(
        &mut st.conditions,
        "Complete",
        true,
        &reason,
        if ok { "succeeded" } else { &f.message },
        c.metadata.generation,
        o.now,
    );
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    write_status(&api, c, &st).await?;
    ctx.gateway.forget(&uid);
    ctx.gateway.discard_staging(&uid);
    ctx.mark_finished(&uid);
    let verb = c.spec.command.as_str();
    ctx.metrics
        .commands
        .with_label_values(&[verb, reason.as_str()])
        .inc();
    ctx.metrics
        .command_latency
        .with_label_values(&[verb])
        .observe(secs);
    let note = if ok {
        "succeeded".to_string()
    } else {
        format!("{}: {}", f.reason, f.message)
    };
    tracing::info!(phase = %reason, reason = %f.reason, "finished");
    ctx.event(c, !ok, &reason, crate::status::truncate(&note, 1000))
        .await;
    Ok(())
}

/// `library` lists the namespace's LibraryFiles; `library delete NAME` deletes one, if the
/// command's creator may delete LibraryFiles (the operator asks the API server).
async fn answer_here(c: &Command, o: &Observed, ctx: &Context) -> Result<Finish> {
    use liveresponse_api::crd::LibraryFile;
    let ns = c.namespace().unwrap_or_default();
    let Ok(inv) = &o.parsed else {
        return Ok(Finish::new(
            CommandPhase::Failed,
            "ParseError",
            "cannot parse",
        ));
    };
    let api: Api<LibraryFile> = Api::namespaced(ctx.client.clone(), &ns);
    let files = api.list(&Default::default()).await?.items;
    let format = format_of(c, Some(inv));
    let text = match inv.spec.name {
        "library" => crate::controllers::library::listing(&files, format),
        "library delete" => {
            let wanted = inv.get("name").unwrap_or_default();
            let Some(lf) = files
                .iter()
                .find(|f| f.spec.file_name == wanted || f.name_any() == wanted)
            else {
                return Ok(Finish::new(
                    CommandPhase::Failed,
                    "NotFound",
                    format!(
                        "no library file named {wanted} in namespace {ns}; `library` lists them"
                    ),
                ));
            };
            let refusal = |user: &str, ns: &str| {
                format!(
                    "{user} may not delete libraryfiles in namespace {ns}: it needs the liveresponse-library-admin role"
                )
            };
            if let Err(why) = creator_may(c, ctx, "libraryfiles", None, "delete", refusal).await? {
                return Ok(Finish::new(CommandPhase::Failed, "Forbidden", why));
            }
            api.delete(&lf.name_any(), &Default::default()).await?;
            let record = serde_json::json!([{ "fileName": lf.spec.file_name, "state": "deleted" }]);
            liveresponse_api::output::render(
                inv.spec,
                &record.as_array().cloned().unwrap_or_default(),
                format,
            )
        }
        other => {
            return Ok(Finish::new(
                CommandPhase::Failed,
                "NotSupported",
                format!("{other} is not answered by the operator"),
            ));
        }
    };
    let mut sink = crate::sink::OutputSink::new(o.limits.max_output);
    sink.push(text.as_bytes());
    let mut f = Finish::new(CommandPhase::Succeeded, "", "");
    f.exit_code = Some(0);
    match sink.finish(text.len() as u64, "") {
        Ok(out) => {
            f.output = Some(CommandOutput {
                format,
                content: out.inline,
                truncated: out.truncated,
                size: i64::try_from(out.size).unwrap_or(i64::MAX),
                sha256: Some(out.sha256),
                artifact: None,
                warnings: vec![],
            })
        }
        Err(p) => return Ok(Finish::new(CommandPhase::Failed, p.reason(), p.message())),
    }
    Ok(f)
}

/// A finished command lets the session's next commands start and may end an idle session.
fn wake_followers(c: &Command, ctx: &Context) {
    let ns = c.namespace().unwrap_or_default();
    for o in ctx.session_commands(&ns, &c.spec.session) {
        if matches!(
            phase(&o),
            None | Some(CommandPhase::Pending | CommandPhase::Queued)
        ) {
            ctx.gateway
                .command_wakes
                .wake(ObjectRef::from_obj(o.as_ref()));
        }
    }
    ctx.session_wakes
        .wake(ObjectRef::new(&c.spec.session).within(&ns));
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
