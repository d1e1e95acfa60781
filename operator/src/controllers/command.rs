//! The Command controller: parse with the registry, number the command in its session, run
//! commands of a session one at a time (unless background), dispatch to the device's agent,
//! enforce timeout and cancel, and record the result — one status write per phase.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use liveresponse_api::command::parse_command;
use liveresponse_api::crd::{
    Command, CommandPhase, LiveResponseSession, LiveResponseSettings, REQUESTED_BY_ANNOTATION,
    SessionPhase, SettingsSpec,
};
use liveresponse_api::proto::{Completed, Execute, Outcome};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::context::{Context, now, parse_duration};
use crate::error::Result;
use crate::gateway::{CommandTarget, step_uid};

/// How long a Running command whose agent is not (yet) connected to this replica waits,
/// after an operator restart, for the agent to come back before it is failed.
const RESTART_GRACE: Duration = Duration::from_secs(20);

/// Verbs whose default timeout is the settings' longCommandTimeout.
const LONG_VERBS: &[&str] = &["getfile", "findfile", "run"];

fn phase(c: &Command) -> Option<CommandPhase> {
    c.status.as_ref().and_then(|s| s.phase)
}

pub async fn reconcile(c: Arc<Command>, ctx: Arc<Context>) -> Result<Action> {
    let current = phase(&c);
    if current.is_some_and(CommandPhase::is_final) {
        return Ok(Action::await_change());
    }
    let ns = c.namespace().unwrap_or_default();
    let uid = c.uid().unwrap_or_default();
    let sessions: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(session) = sessions.get_opt(&c.spec.session).await? else {
        let msg = format!(
            "session {} does not exist in namespace {ns}",
            c.spec.session
        );
        finish(
            &ctx,
            &c,
            CommandPhase::Failed,
            "SessionNotFound",
            &msg,
            None,
        )
        .await?;
        return Ok(Action::await_change());
    };

    if matches!(current, None | Some(CommandPhase::Pending)) {
        return queue(&c, &session, &ctx).await;
    }

    let session_phase = session.status.as_ref().and_then(|s| s.phase);
    if c.spec.cancel && current == Some(CommandPhase::Queued) {
        finish(
            &ctx,
            &c,
            CommandPhase::Cancelled,
            "Cancelled",
            "cancelled before it started",
            None,
        )
        .await?;
        return Ok(Action::await_change());
    }
    if let Some(p) = session_phase.filter(|p| p.is_final()) {
        if ctx.gateway.is_inflight(&uid) {
            ctx.gateway.cancel(&uid, "cancelled").await;
            ctx.gateway.forget(&uid);
        }
        let msg = format!("the session ended ({p:?}) before the command finished");
        finish(&ctx, &c, CommandPhase::Failed, "SessionEnded", &msg, None).await?;
        return Ok(Action::await_change());
    }
    let settings = Api::<LiveResponseSettings>::namespaced(ctx.client.clone(), &ns)
        .get_opt("default")
        .await?
        .map(|s| s.spec)
        .unwrap_or_default();
    let device = (ns.clone(), session.spec.device.clone());

    match current {
        Some(CommandPhase::Queued) => {
            if session_phase != Some(SessionPhase::Connected) {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            if !c.spec.background && earlier_command_running(&c, &ctx) {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            if !ctx.gateway.is_connected(&device) {
                return wait_offline(&c, &ctx, &settings, &device.1).await;
            }
            dispatch(&c, &session, &ctx, &settings, device).await
        }
        Some(CommandPhase::Running) => {
            let deadline = deadline(&c, &settings);
            let left = deadline.map(|d| d.duration_since(jiff::Timestamp::now()));
            let left = left.map(|l| Duration::try_from(l).unwrap_or_default());
            if left == Some(Duration::ZERO) {
                ctx.gateway.cancel(&uid, "timed out").await;
                ctx.gateway.forget(&uid);
                let secs = timeout_of(&c, &settings).as_secs();
                let msg = format!(
                    "the command did not finish within {secs}s; the agent was told to stop it"
                );
                finish(&ctx, &c, CommandPhase::TimedOut, "TimedOut", &msg, None).await?;
                return Ok(Action::await_change());
            }
            if ctx.gateway.is_inflight(&uid) {
                if c.spec.cancel {
                    ctx.gateway.cancel(&uid, "cancelled").await;
                    // The agent answers with Cancelled; if it does not, do not wait forever.
                    return Ok(Action::requeue(Duration::from_secs(10)));
                }
                return Ok(Action::requeue(
                    left.unwrap_or(Duration::from_secs(60))
                        .min(Duration::from_secs(60)),
                ));
            }
            // Running here but not in flight: this operator restarted, or a cancel was not
            // confirmed. Re-send it: the agent knows the command's uid and never runs it
            // twice; it resumes reporting, or replays the result it already has.
            if c.spec.cancel && ctx.started.elapsed() > RESTART_GRACE {
                finish(
                    &ctx,
                    &c,
                    CommandPhase::Cancelled,
                    "Cancelled",
                    "cancelled",
                    None,
                )
                .await?;
                return Ok(Action::await_change());
            }
            if ctx.gateway.is_connected(&device) {
                let (target, exec) = next_execution(&c, &session, &settings, device);
                if let Err(e) = ctx.gateway.execute(target, exec).await {
                    tracing::info!(command = %c.name_any(), error = %e, "re-dispatch failed");
                }
                if c.spec.cancel {
                    ctx.gateway.cancel(&uid, "cancelled").await;
                }
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            if ctx.started.elapsed() < RESTART_GRACE {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            let msg = format!("device {} disconnected while the command ran", device.1);
            finish(
                &ctx,
                &c,
                CommandPhase::Failed,
                "DeviceDisconnected",
                &msg,
                None,
            )
            .await?;
            Ok(Action::await_change())
        }
        _ => Ok(Action::await_change()),
    }
}

/// Pending → Queued: parse, number, own.
async fn queue(c: &Command, session: &LiveResponseSession, ctx: &Context) -> Result<Action> {
    let ns = c.namespace().unwrap_or_default();
    let inv = match parse_command(&c.spec.command, &c.spec.args) {
        Ok(inv) => inv,
        Err(e) => {
            finish(
                ctx,
                c,
                CommandPhase::Failed,
                "ParseError",
                &e.to_string(),
                None,
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    // Only the session's requester may type in it; admission says who created the command.
    let requester = c.annotations().get(REQUESTED_BY_ANNOTATION).cloned();
    match requester {
        None => {
            let msg = format!(
                "the command carries no {REQUESTED_BY_ANNOTATION} annotation: install the admission policies in config/admission (MutatingAdmissionPolicy liveresponse-command-requester)"
            );
            finish(ctx, c, CommandPhase::Failed, "Unattributed", &msg, None).await?;
            return Ok(Action::await_change());
        }
        Some(user) if user != session.spec.requested_by => {
            let msg = format!(
                "session {} belongs to {}; {user} cannot run commands in it: open your own session",
                session.name_any(),
                session.spec.requested_by
            );
            finish(ctx, c, CommandPhase::Failed, "NotSessionOwner", &msg, None).await?;
            return Ok(Action::await_change());
        }
        Some(_) => {}
    }
    let mut line = inv.render();
    if c.spec.background {
        line.push_str(" &");
    }
    let lock = ctx.session_lock(&ns, &c.spec.session);
    let _guard = lock.lock().await;
    // Ids come from the API server's view, not the cache, so a restart never reuses one.
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    let all = api.list(&Default::default()).await?;
    let max = all
        .items
        .iter()
        .filter(|o| o.spec.session == c.spec.session)
        .filter_map(|o| o.status.as_ref().and_then(|s| s.id))
        .max()
        .unwrap_or(0);
    let id = max + 1;
    let owner = session.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o
    });
    if let Some(owner) = owner {
        api.patch(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "ownerReferences": [owner] } })),
        )
        .await?;
    }
    api.patch_status(
        &c.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": {
            "id": id, "commandLine": line, "phase": "Queued", "observedGeneration": c.metadata.generation
        }})),
    )
    .await?;
    let sessions: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    sessions
        .patch_status(
            &session.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "commandCount": id, "lastActivityTime": now() } })),
        )
        .await?;
    Ok(Action::requeue(Duration::from_millis(200)))
}

fn earlier_command_running(c: &Command, ctx: &Context) -> bool {
    let my_id = c.status.as_ref().and_then(|s| s.id).unwrap_or(i64::MAX);
    ctx.commands.state().iter().any(|o| {
        o.namespace() == c.namespace()
            && o.spec.session == c.spec.session
            && !o.spec.background
            && o.uid() != c.uid()
            && matches!(phase(o), Some(CommandPhase::Queued | CommandPhase::Running))
            && o.status.as_ref().and_then(|s| s.id).unwrap_or(i64::MAX) < my_id
    })
}

async fn wait_offline(
    c: &Command,
    ctx: &Context,
    settings: &SettingsSpec,
    device: &str,
) -> Result<Action> {
    let limit =
        parse_duration(&settings.offline_queue_timeout).unwrap_or(Duration::from_secs(72 * 3600));
    let created = c
        .creation_timestamp()
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let waited =
        Duration::try_from(jiff::Timestamp::now().duration_since(created)).unwrap_or_default();
    if waited >= limit {
        let msg = format!(
            "device {device} stayed disconnected for {}s (offlineQueueTimeout {}); the command was not run",
            waited.as_secs(),
            settings.offline_queue_timeout
        );
        finish(
            ctx,
            c,
            CommandPhase::Failed,
            "DeviceDisconnected",
            &msg,
            None,
        )
        .await?;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(
        (limit - waited).min(Duration::from_secs(2)),
    ))
}

fn timeout_of(c: &Command, settings: &SettingsSpec) -> Duration {
    if let Some(t) = c.spec.timeout_seconds {
        return Duration::from_secs(u64::try_from(t).unwrap_or(1).max(1));
    }
    let s = if LONG_VERBS.contains(&c.spec.command.as_str()) {
        &settings.long_command_timeout
    } else {
        &settings.command_timeout
    };
    parse_duration(s).unwrap_or(Duration::from_secs(600))
}

fn deadline(c: &Command, settings: &SettingsSpec) -> Option<jiff::Timestamp> {
    let start = c.status.as_ref()?.start_time.as_ref()?.0;
    let t = jiff::SignedDuration::try_from(timeout_of(c, settings)).ok()?;
    start.checked_add(t).ok()
}

/// What to send next: the next `-auto` prerequisite that has not run yet, or the command.
/// Steps take the command's positional values (`getfile PATH -auto` runs `fileinfo PATH`).
fn next_execution(
    c: &Command,
    session: &LiveResponseSession,
    settings: &SettingsSpec,
    device: (String, String),
) -> (CommandTarget, Execute) {
    let uid = c.uid().unwrap_or_default();
    let done = c.status.as_ref().map_or(0, |s| s.steps.len());
    let step = parse_command(&c.spec.command, &c.spec.args)
        .ok()
        .filter(|inv| inv.has_flag("auto"))
        .and_then(|inv| {
            let verb = inv.spec.prerequisites.get(done)?;
            let args: Vec<String> = inv.positional.iter().map(|(_, v)| v.clone()).collect();
            Some((verb.to_string(), args))
        });
    let (uid, verb, args, step_index) = match step {
        Some((verb, args)) => (step_uid(&uid, done), verb, args, Some(done)),
        None => (uid, c.spec.command.clone(), c.spec.args.clone(), None),
    };
    let target = CommandTarget {
        namespace: c.namespace().unwrap_or_default(),
        name: c.name_any(),
        session: session.name_any(),
        verb: verb.clone(),
        device,
        step: step_index,
    };
    let exec = Execute {
        command_uid: uid,
        command: verb,
        args,
        working_directory: session
            .status
            .as_ref()
            .and_then(|s| s.working_directory.clone())
            .unwrap_or_else(|| "/".into()),
        timeout_seconds: u32::try_from(timeout_of(c, settings).as_secs()).unwrap_or(u32::MAX),
        session: session.name_any(),
    };
    (target, exec)
}

async fn dispatch(
    c: &Command,
    session: &LiveResponseSession,
    ctx: &Context,
    settings: &SettingsSpec,
    device: (String, String),
) -> Result<Action> {
    let (target, exec) = next_execution(c, session, settings, device);
    if let Err(e) = ctx.gateway.execute(target, exec).await {
        tracing::info!(command = %c.name_any(), error = %e, "dispatch failed; will retry");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &c.namespace().unwrap_or_default());
    api.patch_status(
        &c.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "phase": "Running", "startTime": now() } })),
    )
    .await?;
    ctx.event(
        c,
        false,
        "Started",
        format!("sent to device {}", session.spec.device),
    )
    .await;
    Ok(Action::requeue(
        timeout_of(c, settings).min(Duration::from_secs(60)),
    ))
}

/// Turns the agent's records into `status.output`: rendered in the requested format, the
/// first 64 KiB inline, with the size and sha256 of the whole.
pub fn render_output(
    c: &Command,
    records: &[serde_json::Value],
    warnings: &[String],
) -> serde_json::Value {
    let format = c.spec.output;
    // `-output json` typed as an argument wins over spec.output.
    let parsed = parse_command(&c.spec.command, &c.spec.args).ok();
    let format = parsed.as_ref().and_then(|i| i.output).unwrap_or(format);
    let text = match parsed.as_ref() {
        Some(inv) => liveresponse_api::output::render(inv.spec, records, format),
        None => serde_json::to_string_pretty(records).unwrap_or_default(),
    };
    let (inline, truncated) =
        liveresponse_api::output::truncate(&text, liveresponse_api::output::INLINE_LIMIT);
    json!({
        "format": format.as_str(),
        "content": inline,
        "truncated": truncated,
        "size": text.len(),
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "warnings": warnings,
    })
}

/// Moves a command to a final phase exactly once: the patch carries a JSON-patch `test` of
/// the phase it saw, so a racing finisher (a completion and a timeout) loses cleanly.
pub async fn finish(
    ctx: &Context,
    c: &Command,
    phase: CommandPhase,
    reason: &str,
    message: &str,
    extra: Option<serde_json::Value>,
) -> Result<bool> {
    let ns = c.namespace().unwrap_or_default();
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    let completed = now();
    let created = c.creation_timestamp().map(|t| t.0).unwrap_or(completed.0);
    let secs = completed.0.duration_since(created).as_secs_f64().max(0.0);
    let mut status = match extra {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    status.insert("phase".into(), json!(phase));
    status.insert("completionTime".into(), json!(completed));
    status.insert("duration".into(), json!(format!("{secs:.1}s")));
    if phase != CommandPhase::Succeeded {
        status.insert(
            "error".into(),
            json!({ "reason": reason, "message": message }),
        );
    }
    let seen = phase_of_live(&api, &c.name_any()).await?;
    if seen.is_some_and(CommandPhase::is_final) {
        return Ok(false);
    }
    let mut ops = vec![];
    match seen {
        Some(p) => ops.push(json!({ "op": "test", "path": "/status/phase", "value": p })),
        None => ops.push(json!({ "op": "add", "path": "/status", "value": {} })),
    }
    for (k, v) in status {
        ops.push(json!({ "op": "add", "path": format!("/status/{k}"), "value": v }));
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(ops))?;
    match api
        .patch_status(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => {}
        // The test op failed: someone else moved the phase first.
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let verb = c.spec.command.as_str();
    let result = format!("{phase:?}");
    ctx.metrics
        .commands
        .with_label_values(&[verb, result.as_str()])
        .inc();
    ctx.metrics
        .command_latency
        .with_label_values(&[verb])
        .observe(secs);
    let warning = phase != CommandPhase::Succeeded;
    let note = if warning {
        format!("{reason}: {message}")
    } else {
        "succeeded".into()
    };
    ctx.event(c, warning, &result, truncate_note(note)).await;
    wake_session(ctx, c);
    Ok(true)
}

fn truncate_note(mut s: String) -> String {
    if s.len() > 1000 {
        let mut end = 1000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

async fn phase_of_live(api: &Api<Command>, name: &str) -> Result<Option<CommandPhase>> {
    Ok(api.get_opt(name).await?.and_then(|c| phase(&c)))
}

/// Lets the next queued commands of the same session start now rather than at their requeue.
fn wake_session(ctx: &Context, c: &Command) {
    for o in ctx.commands.state() {
        if o.namespace() == c.namespace()
            && o.spec.session == c.spec.session
            && phase(&o) == Some(CommandPhase::Queued)
        {
            let _ = ctx.wake.send(ObjectRef::from_obj(o.as_ref()));
        }
    }
}

/// Records what the agent reported for an `-auto` prerequisite in `status.steps`; a failed
/// step fails the command, a successful one lets the next execution start.
async fn complete_step(
    ctx: &Context,
    c: &Command,
    step: usize,
    completed: Completed,
) -> Result<()> {
    let mut steps = c
        .status
        .as_ref()
        .map(|s| s.steps.clone())
        .unwrap_or_default();
    if steps.len() != step {
        // A replayed result of a step already recorded (a reconcile saw stale steps and sent
        // it again): move on to what comes next.
        let _ = ctx.wake.send(ObjectRef::from_obj(c));
        return Ok(());
    }
    let inv = parse_command(&c.spec.command, &c.spec.args).ok();
    let verb = inv
        .as_ref()
        .and_then(|i| i.spec.prerequisites.get(step).copied())
        .unwrap_or("step");
    let args: Vec<String> = inv
        .as_ref()
        .map(|i| i.positional.iter().map(|(_, v)| v.clone()).collect())
        .unwrap_or_default();
    let line = parse_command(verb, &args)
        .map(|i| i.render())
        .unwrap_or_else(|_| verb.to_string());
    let ok = Outcome::try_from(completed.outcome) == Ok(Outcome::Succeeded);
    steps.push(liveresponse_api::crd::CommandStep {
        command_line: line.clone(),
        phase: if ok {
            CommandPhase::Succeeded
        } else {
            CommandPhase::Failed
        },
        exit_code: Some(completed.exit_code),
        message: (!completed.error_message.is_empty()).then(|| completed.error_message.clone()),
    });
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), &c.namespace().unwrap_or_default());
    api.patch_status(
        &c.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "steps": steps } })),
    )
    .await?;
    if !ok {
        let msg = format!("prerequisite `{line}` failed: {}", completed.error_message);
        finish(
            ctx,
            c,
            CommandPhase::Failed,
            "PrerequisiteFailed",
            &msg,
            None,
        )
        .await?;
    } else {
        let _ = ctx.wake.send(ObjectRef::from_obj(c));
    }
    Ok(())
}

/// Records what the agent reported for a command (or for one of its `-auto` steps).
pub async fn complete(
    ctx: &Context,
    ns: &str,
    name: &str,
    step: Option<usize>,
    completed: Completed,
    output: Vec<u8>,
) -> Result<()> {
    let api: Api<Command> = Api::namespaced(ctx.client.clone(), ns);
    let Some(c) = api.get_opt(name).await? else {
        return Ok(());
    };
    if phase(&c).is_some_and(CommandPhase::is_final) {
        return Ok(());
    }
    if let Some(step) = step {
        return complete_step(ctx, &c, step, completed).await;
    }
    let records: Vec<serde_json::Value> = if output.is_empty() {
        Vec::new()
    } else if output.ends_with(b"\0too-large") {
        let msg = format!(
            "the output was larger than {} MiB",
            crate::gateway::MAX_OUTPUT >> 20
        );
        finish(ctx, &c, CommandPhase::Failed, "OutputTooLarge", &msg, None).await?;
        return Ok(());
    } else {
        match serde_json::from_slice(&output) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("the agent sent output that is not a JSON list of records: {e}");
                finish(ctx, &c, CommandPhase::Failed, "AgentError", &msg, None).await?;
                return Ok(());
            }
        }
    };
    let outcome = Outcome::try_from(completed.outcome).unwrap_or(Outcome::Unspecified);
    let (phase, reason) = match outcome {
        Outcome::Succeeded => (CommandPhase::Succeeded, ""),
        Outcome::Cancelled => (CommandPhase::Cancelled, "Cancelled"),
        Outcome::TimedOut => (CommandPhase::TimedOut, "TimedOut"),
        Outcome::Failed | Outcome::Unspecified => (CommandPhase::Failed, "AgentError"),
    };
    let reason = if completed.error_reason.is_empty() {
        reason.to_string()
    } else {
        completed.error_reason.clone()
    };
    let mut extra = serde_json::Map::new();
    extra.insert("exitCode".into(), json!(completed.exit_code));
    extra.insert(
        "output".into(),
        render_output(&c, &records, &completed.warnings),
    );
    let message = if completed.error_message.is_empty() && phase == CommandPhase::Cancelled {
        "cancelled; the agent stopped the work".to_string()
    } else {
        completed.error_message.clone()
    };
    let done = finish(
        ctx,
        &c,
        phase,
        &reason,
        &message,
        Some(serde_json::Value::Object(extra)),
    )
    .await?;
    if done && phase == CommandPhase::Succeeded && !completed.working_directory.is_empty() {
        let sessions: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), ns);
        sessions
            .patch_status(
                &c.spec.session,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "status": { "workingDirectory": completed.working_directory } }),
                ),
            )
            .await?;
    }
    Ok(())
}
