//! The BatchCommand controller: fetch → [`decide`] → apply. A batch picks its devices once,
//! when it starts, then runs its command line on each through the ordinary machinery: a
//! child session (opened by the operator, owned by the batch, labelled with its name) and a
//! Command in it, at most `maxConcurrency` at a time. The batch's status is written here
//! only; the children's status by their own controllers.
//!
//! Child sessions do not count against the namespace's session limits (`admit` skips them),
//! and an analyst's session does not block them: the agent runs commands of different
//! sessions side by side. So a batch neither breaks an interactive session on one of its
//! devices nor waits for it; `maxConcurrency` bounds what the batch adds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::labels::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use liveresponse_api::command::{Invocation, Tier, parse_command};
use liveresponse_api::crd::{
    BATCH_LABEL, BatchCommand, BatchCounts, BatchPhase, BatchResult, BatchStatus, Command,
    CommandPhase, CommandSpec, LiveResponseSession, ON_BEHALF_OF_ANNOTATION, OutputFormat,
    REQUESTED_BY_ANNOTATION, SessionPhase, SessionSpec, SessionState, Time,
};
use serde_json::json;

use crate::context::Context;
use crate::controllers::command::may_run_advanced;
use crate::error::{Error, Result};
use crate::status::set_condition;

/// At most this many devices per batch: one status entry each must fit in the object.
pub const MAX_DEVICES: usize = 5000;

/// How often a running batch looks at its children without being woken.
const RECHECK: Duration = Duration::from_secs(2);

/// Children created at once by one reconcile.
const CREATE_PARALLELISM: usize = 32;

/// What one device's child looks like now.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildFacts {
    pub session: String,
    pub session_phase: Option<SessionPhase>,
    pub session_active: bool,
    /// The Command exists (it may not yet: created moments ago, or not at all).
    pub command: Option<CommandFacts>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CommandFacts {
    pub name: String,
    pub phase: Option<CommandPhase>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub cancel: bool,
}

/// Everything [`decide`] looks at besides the batch.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: jiff::Timestamp,
    /// Live response is enabled in the namespace.
    pub enabled: bool,
    pub parsed: Result<Invocation, String>,
    /// Whether the batch's creator may run its verb (asked only before it starts).
    pub access: Result<(), String>,
    /// Devices of the namespace the selector or the list picks, in name order; `missing`
    /// are listed names that do not exist.
    pub picked: Vec<String>,
    pub missing: Vec<String>,
    /// The children by device.
    pub children: BTreeMap<String, ChildFacts>,
}

/// What to do next.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub status: BatchStatus,
    /// Devices whose session and Command are to be created (again, if a create was lost).
    pub create: Vec<String>,
    /// Child Commands to cancel.
    pub cancel: Vec<String>,
    /// Child sessions whose command finished: end them so they do not idle on.
    pub end_sessions: Vec<String>,
}

/// The name of a device's child session and Command: the batch's name and the device's,
/// shortened with a digest when too long (names are at most 253 characters).
pub fn child_name(batch: &str, device: &str) -> String {
    let name = format!("{batch}-{device}");
    if name.len() <= 253 {
        return name;
    }
    use sha2::Digest;
    let digest = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..8]);
    let keep = 253 - digest.len() - 1;
    let mut head = name[..keep].to_string();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    format!("{head}-{digest}")
}

fn started(p: CommandPhase) -> bool {
    p != CommandPhase::Pending
}

fn counts(results: &[BatchResult]) -> BatchCounts {
    let mut c = BatchCounts::default();
    for r in results {
        match r.phase {
            CommandPhase::Pending => c.pending += 1,
            CommandPhase::Queued | CommandPhase::Running => c.running += 1,
            CommandPhase::Succeeded => c.succeeded += 1,
            CommandPhase::Failed => c.failed += 1,
            CommandPhase::Cancelled => c.cancelled += 1,
            CommandPhase::TimedOut => c.timed_out += 1,
        }
    }
    c
}

fn short(s: &str) -> String {
    const MAX: usize = 256;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn fail_to_start(b: &BatchCommand, o: &Observed, reason: &str, message: String) -> Plan {
    let mut st = b.status.clone().unwrap_or_default();
    st.phase = Some(BatchPhase::Failed);
    st.message = Some(message.clone());
    st.completion_time = Some(Time(o.now));
    set_condition(
        &mut st.conditions,
        "Complete",
        true,
        reason,
        &message,
        b.metadata.generation,
        o.now,
    );
    Plan {
        status: st,
        ..Plan::default()
    }
}

/// Decides the batch's next step. Pure: every fact comes in `o`.
pub fn decide(b: &BatchCommand, o: &Observed) -> Plan {
    let mut st = b.status.clone().unwrap_or_default();
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    let phase = st.phase;

    if phase.is_some_and(BatchPhase::is_final) {
        // Finished: only tidy up sessions a late command left open.
        return Plan {
            status: st,
            end_sessions: finished_open_sessions(o),
            ..Plan::default()
        };
    }

    if matches!(phase, None | Some(BatchPhase::Pending)) {
        let inv = match &o.parsed {
            Ok(inv) => inv,
            Err(e) => return fail_to_start(b, o, "ParseError", e.clone()),
        };
        if !inv.spec.is_command() {
            return fail_to_start(
                b,
                o,
                "ConsoleOnly",
                format!("{} runs in the console, not on devices", inv.spec.name),
            );
        }
        if name.len() > 63 {
            return fail_to_start(
                b,
                o,
                "NameTooLong",
                format!(
                    "the batch's name is {} characters; at most 63 fit, because it labels the batch's sessions and commands: create it again with a shorter name",
                    name.len()
                ),
            );
        }
        if !o.enabled {
            return fail_to_start(
                b,
                o,
                "Disabled",
                format!(
                    "live response is not enabled in namespace {ns}: a live response settings admin must create LiveResponseSettings \"default\" with spec.enabled: true"
                ),
            );
        }
        if b.annotations().get(REQUESTED_BY_ANNOTATION).is_none() {
            return fail_to_start(
                b,
                o,
                "Unattributed",
                format!(
                    "the batch carries no {REQUESTED_BY_ANNOTATION} annotation: install the admission policies in config/admission (MutatingAdmissionPolicy liveresponse-command-requester)"
                ),
            );
        }
        if let Err(why) = &o.access {
            return fail_to_start(b, o, "Forbidden", why.clone());
        }
        if b.spec.cancel {
            let mut plan = fail_to_start(b, o, "Cancelled", "cancelled before it started".into());
            plan.status.phase = Some(BatchPhase::Cancelled);
            return plan;
        }
        let targets: BTreeSet<&String> = o.picked.iter().chain(&o.missing).collect();
        if targets.is_empty() {
            return fail_to_start(
                b,
                o,
                "NoDevices",
                format!(
                    "no Device of namespace {ns} matches the selector or the names (kubectl liveresponse devices lists them with their labels)"
                ),
            );
        }
        if targets.len() > MAX_DEVICES {
            return fail_to_start(
                b,
                o,
                "TooManyDevices",
                format!(
                    "the batch picks {} devices; at most {MAX_DEVICES} fit in one batch: split it with a narrower selector",
                    targets.len()
                ),
            );
        }
        let missing: BTreeSet<&String> = o.missing.iter().collect();
        st.results = targets
            .into_iter()
            .map(|d| {
                if missing.contains(d) {
                    BatchResult {
                        device: d.clone(),
                        phase: CommandPhase::Failed,
                        exit_code: None,
                        error: Some(format!("device {d} does not exist in namespace {ns}")),
                        session: None,
                        command: None,
                    }
                } else {
                    BatchResult {
                        device: d.clone(),
                        phase: CommandPhase::Pending,
                        exit_code: None,
                        error: None,
                        session: None,
                        command: None,
                    }
                }
            })
            .collect();
        st.total = st.results.len() as i32;
        st.command_line = Some(inv.render());
        st.start_time = Some(Time(o.now));
        st.phase = Some(BatchPhase::Running);
        st.message = None;
    }

    // Running: follow the children.
    for r in &mut st.results {
        if r.phase.is_final() && r.session.is_none() {
            continue;
        }
        let Some(child) = o.children.get(&r.device) else {
            continue;
        };
        r.session = Some(child.session.clone());
        if let Some(c) = &child.command {
            r.command = Some(c.name.clone());
            let p = c.phase.unwrap_or(CommandPhase::Queued);
            r.phase = if p == CommandPhase::Pending {
                CommandPhase::Queued
            } else {
                p
            };
            r.exit_code = c.exit_code;
            r.error = c.error.as_deref().map(short);
        } else if r.phase == CommandPhase::Pending {
            r.phase = CommandPhase::Queued;
        }
    }

    let mut plan = Plan::default();
    if b.spec.cancel {
        for r in &mut st.results {
            match r.phase {
                CommandPhase::Pending => {
                    r.phase = CommandPhase::Cancelled;
                    r.error = Some("the batch was cancelled before this device's turn".into());
                }
                p if !p.is_final() => {
                    match o.children.get(&r.device).and_then(|c| c.command.as_ref()) {
                        Some(c) if !c.cancel => plan.cancel.push(c.name.clone()),
                        Some(_) => {}
                        // Not seen yet: the cache may lag behind a create of an earlier
                        // pass, so cancel it by name (a 404 means it never was created).
                        None => {
                            plan.cancel.push(child_name(&name, &r.device));
                            r.phase = CommandPhase::Cancelled;
                            r.error = Some("the batch was cancelled".into());
                        }
                    }
                }
                _ => {}
            }
        }
    } else {
        let in_flight = st
            .results
            .iter()
            .filter(|r| started(r.phase) && !r.phase.is_final())
            .count();
        let mut slots = (b.spec.max_concurrency.max(1) as usize).saturating_sub(in_flight);
        for r in &mut st.results {
            let lost = started(r.phase)
                && !r.phase.is_final()
                && o.children
                    .get(&r.device)
                    .is_none_or(|c| c.command.is_none());
            if lost {
                // Started, but its session or Command is not (yet) seen: create what is
                // missing; names are fixed, so a create that did happen is refused.
                plan.create.push(r.device.clone());
            } else if r.phase == CommandPhase::Pending && slots > 0 {
                slots -= 1;
                r.phase = CommandPhase::Queued;
                r.session = Some(child_name(&name, &r.device));
                r.command = Some(child_name(&name, &r.device));
                plan.create.push(r.device.clone());
            }
        }
    }
    plan.end_sessions = finished_open_sessions(o);

    st.counts = counts(&st.results);
    if st.results.iter().all(|r| r.phase.is_final()) {
        let c = &st.counts;
        let (phase, reason) = if b.spec.cancel {
            (BatchPhase::Cancelled, "Cancelled")
        } else if c.succeeded == st.total {
            (BatchPhase::Succeeded, "Succeeded")
        } else {
            (BatchPhase::Failed, "SomeDevicesFailed")
        };
        let message = format!(
            "{} of {} devices succeeded; {} failed, {} timed out, {} cancelled",
            c.succeeded, st.total, c.failed, c.timed_out, c.cancelled
        );
        st.phase = Some(phase);
        st.completion_time = Some(Time(o.now));
        set_condition(
            &mut st.conditions,
            "Complete",
            true,
            reason,
            &message,
            b.metadata.generation,
            o.now,
        );
        st.message = Some(message);
    } else {
        let c = &st.counts;
        set_condition(
            &mut st.conditions,
            "Complete",
            false,
            "Running",
            &format!(
                "{} running, {} waiting their turn, {} finished of {}",
                c.running,
                c.pending,
                st.total - c.running - c.pending,
                st.total
            ),
            b.metadata.generation,
            o.now,
        );
    }
    plan.status = st;
    plan
}

fn finished_open_sessions(o: &Observed) -> Vec<String> {
    o.children
        .values()
        .filter(|c| {
            c.session_active
                && !c.session_phase.is_some_and(SessionPhase::is_final)
                && c.command
                    .as_ref()
                    .and_then(|c| c.phase)
                    .is_some_and(CommandPhase::is_final)
        })
        .map(|c| c.session.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------
// fetch and apply

/// The Devices of the namespace the batch picks, and listed names that do not exist.
fn pick(b: &BatchCommand, ctx: &Context) -> Result<(Vec<String>, Vec<String>), String> {
    let ns = b.namespace().unwrap_or_default();
    let selector = match &b.spec.selector {
        Some(s) => Some(
            Selector::try_from(s.clone())
                .map_err(|e| format!("spec.selector is not a valid label selector: {e}"))?,
        ),
        None => None,
    };
    let mut picked = BTreeSet::new();
    let mut existing = BTreeSet::new();
    for d in ctx.devices.state() {
        if d.namespace().as_deref() != Some(ns.as_str()) || d.meta().deletion_timestamp.is_some() {
            continue;
        }
        let name = d.name_any();
        if selector.as_ref().is_some_and(|s| s.matches(d.labels())) {
            picked.insert(name.clone());
        }
        existing.insert(name);
    }
    let mut missing = Vec::new();
    for n in &b.spec.devices {
        if existing.contains(n) {
            picked.insert(n.clone());
        } else {
            missing.push(n.clone());
        }
    }
    missing.sort();
    missing.dedup();
    Ok((picked.into_iter().collect(), missing))
}

fn children(b: &BatchCommand, ctx: &Context) -> BTreeMap<String, ChildFacts> {
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    let uid = b.uid().unwrap_or_default();
    let ours = |meta: &ObjectMeta| {
        meta.namespace.as_deref() == Some(ns.as_str())
            && meta.labels.as_ref().and_then(|l| l.get(BATCH_LABEL)) == Some(&name)
    };
    let mut commands: BTreeMap<String, Arc<Command>> = BTreeMap::new();
    // Only what the operator itself created counts: a user can label their own objects.
    let by_operator =
        |c: &Command| c.annotations().get(REQUESTED_BY_ANNOTATION) == Some(&ctx.identity);
    for c in ctx.commands.state() {
        if ours(&c.metadata) && by_operator(&c) {
            commands.insert(c.spec.session.clone(), c);
        }
    }
    let mut out = BTreeMap::new();
    for s in ctx.sessions.state() {
        // Owned by this batch (not an older batch of the same name).
        if !ours(&s.metadata)
            || s.spec.requested_by != ctx.identity
            || !s.owner_references().iter().any(|o| o.uid == uid)
        {
            continue;
        }
        let st = s.status.as_ref();
        let command = commands.get(&s.name_any()).map(|c| {
            let cs = c.status.as_ref();
            CommandFacts {
                name: c.name_any(),
                phase: cs.and_then(|x| x.phase),
                exit_code: cs.and_then(|x| x.exit_code),
                error: cs
                    .and_then(|x| x.error.as_ref())
                    .map(|e| format!("{}: {}", e.reason, e.message)),
                cancel: c.spec.cancel,
            }
        });
        out.insert(
            s.spec.device.clone(),
            ChildFacts {
                session: s.name_any(),
                session_phase: st.and_then(|x| x.phase),
                session_active: s.spec.state == SessionState::Active,
                command,
            },
        );
    }
    out
}

async fn observe(b: &BatchCommand, ctx: &Context) -> Result<Observed> {
    let ns = b.namespace().unwrap_or_default();
    let parsed = parse_command(&b.spec.command, &b.spec.args).map_err(|e| e.to_string());
    let not_started = matches!(
        b.status.as_ref().and_then(|s| s.phase),
        None | Some(BatchPhase::Pending)
    );
    let enabled = ctx.settings_of(&ns).is_some_and(|s| s.spec.enabled);
    let (access, picked, missing) = if not_started {
        let access = match &parsed {
            Ok(inv) if inv.spec.tier == Tier::Advanced => {
                may_run_advanced(b, &b.spec.command, &b.spec.args, ctx).await?
            }
            _ => Ok(()),
        };
        match pick(b, ctx) {
            Ok((p, m)) => (access, p, m),
            Err(e) => (Err(e), Vec::new(), Vec::new()),
        }
    } else {
        (Ok(()), Vec::new(), Vec::new())
    };
    Ok(Observed {
        now: jiff::Timestamp::now(),
        enabled,
        parsed,
        access,
        picked,
        missing,
        children: children(b, ctx),
    })
}

#[tracing::instrument(skip_all, fields(namespace = b.namespace().unwrap_or_default(), name = %b.name_any(), uid = b.uid().unwrap_or_default()))]
pub async fn reconcile(b: Arc<BatchCommand>, ctx: Arc<Context>) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    let name = b.name_any();
    if b.meta().deletion_timestamp.is_some() {
        // Its children go with it (owner references).
        return Ok(Action::await_change());
    }
    let o = observe(&b, &ctx).await?;
    let plan = decide(&b, &o);
    tracing::debug!(create = plan.create.len(), cancel = plan.cancel.len(), end = plan.end_sessions.len(), phase = ?plan.status.phase, "decided");
    let r = apply(&b, plan, &ctx).await;
    match r {
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
            Ok(Action::requeue(Duration::from_millis(200)))
        }
        Ok(a) => {
            ctx.reset_backoff("batch", &ns, &name);
            Ok(a)
        }
        Err(e) => Err(e),
    }
}

async fn apply(b: &BatchCommand, plan: Plan, ctx: &Context) -> Result<Action> {
    let ns = b.namespace().unwrap_or_default();
    let sessions: Api<LiveResponseSession> = Api::namespaced(ctx.client.clone(), &ns);
    let commands: Api<Command> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Vec<_> = plan
        .create
        .iter()
        .cloned()
        .map(|device| {
            let (sessions, commands) = (sessions.clone(), commands.clone());
            async move { create_child(b, &device, &sessions, &commands, ctx).await }
        })
        .collect();
    let created: Vec<Result<()>> = futures::stream::iter(jobs)
        .buffer_unordered(CREATE_PARALLELISM)
        .collect()
        .await;
    let mut errors: Vec<Error> = created.into_iter().filter_map(Result::err).collect();
    for c in &plan.cancel {
        let patch = json!({ "spec": { "cancel": true } });
        match commands
            .patch(c, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => errors.push(e.into()),
        }
    }
    for s in &plan.end_sessions {
        let patch = json!({ "spec": { "state": SessionState::Disconnected } });
        match sessions
            .patch(s, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => errors.push(e.into()),
        }
    }
    let (before, after) = (b.status.as_ref().and_then(|s| s.phase), plan.status.phase);
    write_status(b, &plan.status, ctx).await?;
    if before != after {
        announce(b, &plan.status, ctx).await;
    }
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    if plan.status.phase.is_some_and(BatchPhase::is_final) {
        return Ok(Action::await_change());
    }
    // A child's change wakes the batch through the batch's own watches, but the children
    // are read from the session and command controllers' caches, which may not have that
    // change yet: look again shortly rather than wait for a change that already came.
    Ok(Action::requeue(RECHECK))
}

/// An Event when the batch starts or ends (`kubectl describe lrb` shows them), and the
/// finished-batches metric.
async fn announce(b: &BatchCommand, st: &BatchStatus, ctx: &Context) {
    let Some(phase) = st.phase else { return };
    let message = st.message.clone().unwrap_or_default();
    match phase {
        BatchPhase::Running => {
            let note = format!(
                "{} device(s) picked; running `{}`, {} at a time",
                st.total,
                st.command_line.as_deref().unwrap_or_default(),
                b.spec.max_concurrency
            );
            ctx.event(b, false, "Started", note).await;
        }
        BatchPhase::Pending => {}
        done => {
            ctx.metrics
                .batches
                .with_label_values(&[&format!("{done:?}")])
                .inc();
            ctx.event(
                b,
                done != BatchPhase::Succeeded,
                &format!("{done:?}"),
                message,
            )
            .await;
        }
    }
}

fn owner(b: &BatchCommand) -> Option<OwnerReference> {
    b.controller_owner_ref(&())
}

async fn create_child(
    b: &BatchCommand,
    device: &str,
    sessions: &Api<LiveResponseSession>,
    commands: &Api<Command>,
    ctx: &Context,
) -> Result<()> {
    let batch = b.name_any();
    let name = child_name(&batch, device);
    let requester = b
        .annotations()
        .get(REQUESTED_BY_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let labels = BTreeMap::from([(BATCH_LABEL.to_string(), batch.clone())]);
    let reason = match &b.spec.reason {
        Some(r) => format!("batch {batch} for {requester}: {r}"),
        None => format!("batch {batch} for {requester}"),
    };
    let session = LiveResponseSession {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                ON_BEHALF_OF_ANNOTATION.to_string(),
                requester,
            )])),
            owner_references: owner(b).map(|o| vec![o]),
            ..Default::default()
        },
        spec: SessionSpec {
            device: device.to_string(),
            reason: Some(short(&reason)),
            requested_by: ctx.identity.clone(),
            idle_timeout: None,
            state: SessionState::Active,
        },
        status: None,
    };
    ignore_exists(sessions.create(&PostParams::default(), &session).await)?;
    let command = Command {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: CommandSpec {
            session: name,
            command: b.spec.command.clone(),
            args: b.spec.args.clone(),
            // `batch results` merges every device's records into one table.
            output: OutputFormat::Json,
            background: false,
            timeout_seconds: b.spec.timeout_seconds,
            cancel: false,
        },
        status: None,
    };
    ignore_exists(commands.create(&PostParams::default(), &command).await)?;
    Ok(())
}

fn ignore_exists<T>(r: kube::Result<T>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(b: &BatchCommand, st: &BatchStatus, ctx: &Context) -> Result<()> {
    let mut st = st.clone();
    st.observed_generation = b.metadata.generation;
    if b.status.as_ref() == Some(&st) {
        return Ok(());
    }
    let api: Api<BatchCommand> =
        Api::namespaced(ctx.client.clone(), &b.namespace().unwrap_or_default());
    let patch = json!({
        "metadata": { "resourceVersion": b.resource_version() },
        "status": st,
    });
    api.patch_status(&b.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// The batch a child session or Command belongs to, by its label.
pub fn parent(meta: &ObjectMeta) -> Option<ObjectRef<BatchCommand>> {
    let name = meta.labels.as_ref()?.get(BATCH_LABEL)?;
    Some(ObjectRef::new(name).within(meta.namespace.as_deref()?))
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
