//! Runs commands: parses them with the registry, hands OS work to the provider on a blocking
//! thread, answers the agent-level commands (help, status, trace) itself, and reports events.
//!
//! A command is known by its Command's uid. The executor remembers the uids it ran and their
//! results, so a re-sent Execute (the operator restarted, or retried) never runs a command
//! twice: it keeps running, or its result is sent again.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use liveresponse_api::command::{
    Handler, Invocation, OutputFormat, agent_commands, help_answer, parse_command,
};
use liveresponse_api::proto::{
    self, AgentMessage, CancelReason, CommandEvent, Completed, Execute, Outcome, OutputChunk,
    agent_message, command_event,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::content::{ChannelSlot, Files, Scratch, Verified};
use crate::logging::{SessionLevels, command_span};
use crate::provider::{CommandResult, ExecContext, ExecError, Provider};

/// How many finished results are kept for replay, and how many bytes of output in all: a
/// result evicted here is not lost for good, it only cannot be replayed (the operator fails
/// the command if it never arrived).
const REMEMBERED: usize = 512;
const REMEMBERED_BYTES: usize = 64 * 1024 * 1024;
/// Output travels in chunks of this size.
const CHUNK: usize = 256 * 1024;
/// How long a stopped command's worker gets to notice its flag before it is abandoned:
/// a worker blocked in the kernel (a hung NFS read, a FUSE file that never answers)
/// never will, and the session must not wait for it.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a running command looks at its cancel flag and deadline.
const STOP_POLL: Duration = Duration::from_millis(100);

struct Job {
    cancelled: Arc<AtomicBool>,
    /// getfile: where the operator's copy ends, when a new Execute said so while it ran.
    resume: Arc<Mutex<Option<u64>>>,
    reason: Arc<Mutex<Option<CancelReason>>>,
    started: Instant,
    line: String,
}

/// A worker thread abandoned by a command that ended without it.
struct Stuck {
    line: String,
    since: Instant,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Job>,
    /// Abandoned workers still blocked, by command uid: `status` shows them until their
    /// thread returns at last.
    stuck: HashMap<String, Stuck>,
    done: HashMap<String, Vec<AgentMessage>>,
    done_bytes: usize,
    order: VecDeque<String>,
    sender: Option<mpsc::Sender<AgentMessage>>,
}

/// Shared by the connection loop and the command tasks.
pub struct Executor {
    provider: Box<dyn Provider>,
    host_root: PathBuf,
    started: Instant,
    state: Mutex<State>,
    /// `trace -level` of each session.
    levels: SessionLevels,
    /// getfile's bytes per second, when limited.
    transfer_rate: Mutex<Option<u64>>,
    /// Where putfile and run put library files, and whom they trust.
    files: Mutex<Files>,
    /// The current connection's channel, for fetching library files.
    channel: ChannelSlot,
    /// The remediation journal in the state folder.
    journal: Mutex<Option<Arc<crate::journal::Journal>>>,
    /// The gateway's URL (isolation keeps it reachable).
    gateway: Mutex<Option<String>>,
    /// The rule files last compiled, for analyze and scan.
    rule_cache: crate::analysis::RuleCache,
}

/// A library file fetched and verified for putfile or run.
struct Staged {
    verified: Verified,
    content: proto::Content,
    /// run's scratch folder, removed once the script ended.
    scratch: Option<Scratch>,
}

impl Executor {
    pub fn new(
        provider: Box<dyn Provider>,
        host_root: PathBuf,
        levels: SessionLevels,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            host_root,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            levels,
            transfer_rate: Mutex::new(None),
            files: Mutex::new(Files::new(
                std::env::temp_dir().join("liveresponse-agent"),
                None,
            )),
            channel: ChannelSlot::default(),
            journal: Mutex::new(None),
            gateway: Mutex::new(None),
            rule_cache: crate::analysis::RuleCache::default(),
        })
    }

    pub fn set_gateway(&self, url: &str) {
        *self.gateway.lock().unwrap_or_else(|p| p.into_inner()) = Some(url.to_string());
    }

    /// The device's isolation as this agent recorded it (for heartbeats and the hello).
    pub fn isolation(&self) -> Option<proto::Isolation> {
        #[cfg(target_os = "linux")]
        {
            let dir = self.files().state_dir;
            crate::provider::linux::isolate::current(&dir).map(|r| proto::Isolation {
                since: r.since,
                by: r.by,
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    /// Where putfile and run keep library files, and whom they trust.
    pub fn set_files(&self, files: Files) {
        let journal = match crate::journal::Journal::open(&files.state_dir) {
            Ok(j) => Some(Arc::new(j)),
            Err(e) => {
                tracing::error!(dir = %files.state_dir.display(), error = %e, "cannot open the remediation journal; remediate and undo will fail");
                None
            }
        };
        *self.journal.lock().unwrap_or_else(|p| p.into_inner()) = journal;
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = files;
    }

    fn files(&self) -> Files {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The channel of the current connection (library files are fetched over it).
    pub fn set_channel(&self, channel: Option<tonic::transport::Channel>) {
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }

    /// Limits getfile to this many bytes per second.
    pub fn set_transfer_rate(&self, rate: Option<u64>) {
        *self.transfer_rate.lock().unwrap_or_else(|p| p.into_inner()) = rate;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn os(&self) -> &'static str {
        self.provider.os()
    }

    /// What this agent can run, for the hello.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self
            .provider
            .capabilities()
            .iter()
            .map(|s| s.to_string())
            .collect();
        caps.extend(agent_commands().iter().map(|s| s.to_string()));
        caps.sort();
        caps.dedup();
        caps
    }

    /// Uids still running (sent with heartbeats).
    pub fn running(&self) -> Vec<String> {
        self.state().running.keys().cloned().collect()
    }

    /// Where events go: the current stream. While disconnected, events of finished commands
    /// wait in the replay memory.
    pub fn set_sender(&self, sender: Option<mpsc::Sender<AgentMessage>>) {
        self.state().sender = sender;
    }

    async fn send(&self, msg: AgentMessage) {
        let tx = self.state().sender.clone();
        if let Some(tx) = tx {
            let _ = tx.send(msg).await;
        }
    }

    pub async fn execute(self: &Arc<Self>, exec: Execute) {
        let uid = exec.command_uid.clone();
        let replay = {
            let st = self.state();
            if let Some(job) = st.running.get(&uid) {
                if liveresponse_api::command::moves_a_file(&exec.command) {
                    tracing::info!(%uid, offset = exec.resume_offset, "already sending; going on from where the operator's copy ends");
                    *job.resume.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(exec.resume_offset);
                } else {
                    tracing::info!(%uid, "already running; not starting it again");
                }
                return;
            }
            st.done.get(&uid).cloned()
        };
        if let Some(events) = replay {
            tracing::info!(%uid, "already finished; sending its result again");
            for e in events {
                self.send(e).await;
            }
            return;
        }
        let job = Job {
            cancelled: Arc::new(AtomicBool::new(false)),
            resume: Arc::new(Mutex::new(None)),
            reason: Arc::new(Mutex::new(None)),
            started: Instant::now(),
            line: format!("{} {}", exec.command, exec.args.join(" ")),
        };
        let cancelled = job.cancelled.clone();
        let reason = job.reason.clone();
        let resume = job.resume.clone();
        self.state().running.insert(uid.clone(), job);
        let me = self.clone();
        let span = command_span(&exec.session, &uid);
        let work = async move {
            tracing::info!(%uid, command = %exec.command, session = %exec.session, "running");
            let events = me.run(&exec, cancelled, reason, resume).await;
            // A getfile is not replayed from memory: its chunks are not kept, so a new
            // Execute sends what the operator lacks again, which reading allows.
            if liveresponse_api::command::moves_a_file(&exec.command) {
                me.state().running.remove(&uid);
                for e in events {
                    me.send(e).await;
                }
                return;
            }
            {
                let mut st = me.state();
                st.running.remove(&uid);
                st.done_bytes += events_size(&events);
                st.done.insert(uid.clone(), events.clone());
                st.order.push_back(uid.clone());
                while st.order.len() > REMEMBERED || st.done_bytes > REMEMBERED_BYTES {
                    let Some(old) = st.order.pop_front() else {
                        break;
                    };
                    if let Some(ev) = st.done.remove(&old) {
                        st.done_bytes = st.done_bytes.saturating_sub(events_size(&ev));
                    }
                }
            }
            for e in events {
                me.send(e).await;
            }
        };
        tokio::spawn(work.instrument(span));
    }

    /// Stops a running command: the provider sees the flag and returns.
    pub fn cancel(&self, uid: &str, why: CancelReason) {
        let st = self.state();
        if let Some(job) = st.running.get(uid) {
            tracing::info!(%uid, reason = why.as_str_name(), "stopping");
            if let Ok(mut r) = job.reason.lock() {
                *r = Some(why);
            }
            job.cancelled.store(true, Ordering::SeqCst);
        }
    }

    async fn run(
        self: &Arc<Self>,
        exec: &Execute,
        cancelled: Arc<AtomicBool>,
        reason: Arc<Mutex<Option<CancelReason>>>,
        resume: Arc<Mutex<Option<u64>>>,
    ) -> Vec<AgentMessage> {
        let uid = exec.command_uid.clone();
        let inv = match parse_command(&exec.command, &exec.args) {
            Ok(inv) => inv,
            Err(e) => return failed(&uid, "ParseError", &e.to_string()),
        };
        let name = inv.spec.name;
        // `-output json` typed as an argument wins over the Command's spec.output.
        let format =
            inv.output
                .unwrap_or(match proto::OutputFormat::try_from(exec.output_format) {
                    Ok(proto::OutputFormat::Json) => OutputFormat::Json,
                    _ => OutputFormat::Table,
                });
        let spec = inv.spec;
        let result = if inv.spec.answered_by_agent() {
            self.agent_command(&inv, &exec.session)
        } else if inv.spec.handler == Handler::Operator {
            Err(ExecError::Failed(format!(
                "{name} is answered by the operator, not by the agent"
            )))
        } else if !self.provider.capabilities().contains(&name) {
            let os = self.provider.os();
            let on_this_os = liveresponse_api::command::Platform::from_name(os)
                .is_some_and(|p| inv.spec.supports(p));
            Err(if on_this_os {
                ExecError::Failed(format!(
                    "{name} is not implemented by this agent ({}) yet",
                    env!("CARGO_PKG_VERSION")
                ))
            } else {
                ExecError::NotSupported {
                    command: name.to_string(),
                    os: os.to_string(),
                }
            })
        } else {
            let mut ctx = ExecContext {
                host_root: self.host_root.clone(),
                working_directory: if exec.working_directory.is_empty() {
                    "/".into()
                } else {
                    exec.working_directory.clone()
                },
                cancelled,
                deadline: (exec.timeout_seconds > 0)
                    .then(|| Instant::now() + Duration::from_secs(u64::from(exec.timeout_seconds))),
                notes: Arc::default(),
                command_uid: uid.clone(),
                journal: self
                    .journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                state_dir: Some(self.files().state_dir),
                gateway: self
                    .gateway
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                rules: None,
                progress: self.progress_sink(&uid),
                requested_by: exec.requested_by.clone(),
            };
            // A fetch that stalls must still end on cancel and at the deadline.
            let staging = tokio::select! {
                r = async {
                    let staged = self.stage(exec, name, &ctx).await?;
                    let rules = self.stage_rules(exec, &ctx).await?;
                    Ok((staged, rules))
                } => r,
                why = stopped(ctx.cancelled.clone(), ctx.deadline) => Err(why),
            };
            match staging {
                Err(e) => Err(e),
                Ok((staged, rules)) => {
                    ctx.rules = rules;
                    let me = self.clone();
                    // The blocking thread does not inherit the task's span; the provider's
                    // lines must still name the command.
                    let span = tracing::Span::current();
                    let deadline = ctx.deadline;
                    let stop = ctx.cancelled.clone();
                    let transfer =
                        liveresponse_api::command::moves_a_file(name).then(|| Transfer {
                            uid: uid.clone(),
                            start: exec.resume_offset,
                            max: exec.max_file_bytes,
                            resume,
                        });
                    let max_output = usize::try_from(exec.max_output_bytes)
                        .ok()
                        .filter(|m| *m > 0)
                        .unwrap_or(64 << 20);
                    let work = move || {
                        span.in_scope(|| match (transfer, staged) {
                            (Some(t), _) => me.getfile(&ctx, &inv, t),
                            (None, Some(s)) => me.use_content(&ctx, &inv, s, max_output),
                            (None, None) => me.provider.execute(&ctx, &inv),
                        })
                    };
                    let mut worker = tokio::task::spawn_blocking(work);
                    tokio::select! {
                        joined = &mut worker => match joined {
                            Ok(r) => r,
                            Err(e) => Err(ExecError::Failed(format!("the command crashed: {e}"))),
                        },
                        why = stopped(stop, deadline) => {
                            self.abandon(&uid, exec, worker);
                            Err(why)
                        }
                    }
                }
            }
        };
        match result {
            Ok(r) => {
                // Rendering, hashing and chunking tens of MiB is CPU work: off the runtime's
                // threads, or heartbeats of this very stream would starve behind it.
                let max = exec.max_output_bytes;
                let uid2 = uid.clone();
                let work = move || {
                    let text = liveresponse_api::output::render(spec, &r.records, format);
                    let limit = usize::try_from(max).unwrap_or(usize::MAX);
                    if max > 0 && text.len() > limit {
                        let msg = format!(
                            "the output is {} bytes, more than this namespace's maxOutputSize ({max} bytes): narrow the command (a smaller folder, -name) or ask a settings admin to raise maxOutputSize",
                            text.len(),
                        );
                        return failed(&uid2, "OutputTooLarge", &msg);
                    }
                    let mut events =
                        succeeded(&uid2, text.into_bytes(), r.working_directory, r.warnings);
                    for e in &mut events {
                        if let Some(agent_message::Msg::Event(CommandEvent {
                            event: Some(command_event::Event::Completed(c)),
                            ..
                        })) = &mut e.msg
                        {
                            c.file = r.file.clone();
                            c.exit_code = r.exit_code.unwrap_or(0);
                        }
                    }
                    events
                };
                match tokio::task::spawn_blocking(work).await {
                    Ok(events) => events,
                    Err(e) => failed(
                        &uid,
                        "AgentError",
                        &format!("rendering the output crashed: {e}"),
                    ),
                }
            }
            Err(ExecError::Cancelled) => {
                let why = reason.lock().ok().and_then(|r| *r);
                let (outcome, text) = if why == Some(CancelReason::Timeout) {
                    (Outcome::TimedOut, "stopped: the command timed out")
                } else if why == Some(CancelReason::SessionEnded) {
                    (Outcome::Cancelled, "stopped: the session ended")
                } else {
                    (Outcome::Cancelled, "stopped: the command was cancelled")
                };
                completed(&uid, outcome, 130, "Cancelled", text)
            }
            Err(ExecError::TimedOut) => completed(
                &uid,
                Outcome::TimedOut,
                124,
                "TimedOut",
                "the command reached its time limit",
            ),
            Err(e) => failed(&uid, e.reason(), &e.to_string()),
        }
    }

    /// Leaves a worker that did not stop in time to finish on its own, remembered for
    /// `status` until it does: a blocked thread cannot be killed, only not waited for.
    fn abandon(
        self: &Arc<Self>,
        uid: &str,
        exec: &Execute,
        worker: tokio::task::JoinHandle<Result<CommandResult, ExecError>>,
    ) {
        tracing::warn!(%uid, "the worker did not stop within {STOP_GRACE:?}; abandoning it");
        self.state().stuck.insert(
            uid.to_owned(),
            Stuck {
                line: format!("{} {}", exec.command, exec.args.join(" ")),
                since: Instant::now(),
            },
        );
        let me = self.clone();
        let uid = uid.to_owned();
        tokio::spawn(async move {
            let _ = worker.await;
            tracing::info!(%uid, "an abandoned worker returned at last");
            me.state().stuck.remove(&uid);
        });
    }

    /// putfile and run: fetches the library file named in `exec.content` and verifies it
    /// (size, SHA-256, signature) before anything uses it. Other commands stage nothing.
    async fn stage(
        &self,
        exec: &Execute,
        name: &str,
        ctx: &ExecContext,
    ) -> Result<Option<Staged>, ExecError> {
        if !matches!(name, "putfile" | "run") {
            return Ok(None);
        }
        let content = exec.content.clone().ok_or_else(|| {
            ExecError::Failed(format!(
                "the operator sent {name} without its library file; the operator is older than this agent"
            ))
        })?;
        if !crate::content::is_plain_name(&content.file_name) {
            return Err(ExecError::InvalidArgument(format!(
                "library file {} has the file name {:?}, which is not a plain file name",
                content.name, content.file_name
            )));
        }
        let files = self.files();
        let (dest, scratch) = if name == "putfile" {
            std::fs::create_dir_all(&files.drop_dir).map_err(|e| {
                ExecError::Failed(format!("cannot create {}: {e}", files.drop_dir.display()))
            })?;
            let part = files.drop_dir.join(format!(
                ".liveresponse-{}.part",
                crate::content::file_name_of(&exec.command_uid)
            ));
            let _ = std::fs::remove_file(&part);
            (part, None)
        } else {
            let scratch = Scratch::new(&files.state_dir.join("run"), &exec.command_uid)?;
            (scratch.0.join(&content.file_name), Some(scratch))
        };
        let slot = self.channel.clone();
        let channel = move || slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tracing::info!(library = %content.name, size = content.size, sha256 = %content.sha256, "fetching a library file");
        let fetched = crate::content::fetch(
            channel,
            &exec.command_uid,
            &content,
            &dest,
            &ctx.cancelled,
            ctx.deadline,
        )
        .await;
        // Hashing (and a signature's read) of up to maxLibraryFileSize is blocking work.
        let verified = match fetched {
            Ok(()) => {
                let (dest, content, own) =
                    (dest.clone(), content.clone(), files.own_signers.clone());
                tokio::task::spawn_blocking(move || {
                    crate::content::verify(&dest, &content, own.as_deref())
                })
                .await
                .unwrap_or_else(|e| Err(ExecError::Failed(format!("verifying crashed: {e}"))))
            }
            Err(e) => Err(e),
        };
        match verified {
            Ok(verified) => {
                tracing::info!(library = %content.name, signer = verified.signer.as_deref().unwrap_or(""), "library file verified");
                Ok(Some(Staged {
                    verified,
                    content,
                    scratch,
                }))
            }
            Err(e) => {
                tracing::warn!(library = %content.name, error = %e, "library file refused");
                let _ = std::fs::remove_file(&dest);
                Err(e)
            }
        }
    }

    /// Sends a long command's progress on the current stream, at most once a second (and
    /// at the end), never waiting for room in the queue.
    fn progress_sink(self: &Arc<Self>, uid: &str) -> crate::provider::ProgressSink {
        let me = Arc::downgrade(self);
        let uid = uid.to_string();
        let last: Mutex<Option<Instant>> = Mutex::new(None);
        crate::provider::ProgressSink::new(move |done, total, unit| {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) && done < total {
                return;
            }
            *last = Some(Instant::now());
            let Some(tx) = me.upgrade().and_then(|me| me.state().sender.clone()) else {
                return;
            };
            let _ = tx.try_send(event(
                &uid,
                command_event::Event::Progress(proto::WorkProgress {
                    done,
                    total,
                    unit: unit.into(),
                }),
            ));
        })
    }

    /// analyze, scan and remediate -auto: the rule files in `exec.rules`, fetched (or
    /// found from an earlier command, by digest), verified and compiled, once per set.
    async fn stage_rules(
        &self,
        exec: &Execute,
        ctx: &ExecContext,
    ) -> Result<Option<Arc<crate::analysis::RuleSet>>, ExecError> {
        use crate::analysis::{RuleFile, RuleSet};
        if exec.rules.is_empty() {
            return Ok(None);
        }
        if let Some(set) = self.rule_cache.get(&exec.rules) {
            return Ok(Some(set));
        }
        let files = self.files();
        let dir = files.state_dir.join("rules");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        for content in &exec.rules {
            // The digest names the file: nothing else from the operator goes into a path.
            if content.sha256.len() != 64 || !content.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                problems.push(format!(
                    "rule file {} has no valid SHA-256: not used",
                    content.name
                ));
                continue;
            }
            let dest = dir.join(content.sha256.to_ascii_lowercase());
            let own = files.own_signers.clone();
            let check = |dest: PathBuf, content: proto::Content, own: Option<Vec<String>>| async move {
                tokio::task::spawn_blocking(move || {
                    crate::content::verify(&dest, &content, own.as_deref())
                })
                .await
                .unwrap_or_else(|e| Err(ExecError::Failed(format!("verifying crashed: {e}"))))
            };
            if !(dest.exists()
                && check(dest.clone(), content.clone(), own.clone())
                    .await
                    .is_ok())
            {
                let part = dir.join(format!(
                    "{}.part.{}",
                    content.sha256.to_ascii_lowercase(),
                    crate::content::file_name_of(&exec.command_uid)
                ));
                let _ = std::fs::remove_file(&part);
                let slot = self.channel.clone();
                let channel = move || slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let fetched = crate::content::fetch(
                    channel,
                    &exec.command_uid,
                    content,
                    &part,
                    &ctx.cancelled,
                    ctx.deadline,
                )
                .await;
                let verified = match fetched {
                    Ok(()) => check(part.clone(), content.clone(), own.clone()).await,
                    Err(e @ (ExecError::Cancelled | ExecError::TimedOut)) => {
                        let _ = std::fs::remove_file(&part);
                        return Err(e);
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = verified.and_then(|_| {
                    std::fs::rename(&part, &dest)
                        .map_err(|e| ExecError::Failed(format!("cannot keep it: {e}")))
                }) {
                    let _ = std::fs::remove_file(&part);
                    tracing::warn!(library = %content.name, error = %e, "rule file refused");
                    problems.push(format!("rule file {} was not used: {e}", content.name));
                    continue;
                }
            }
            loaded.push(RuleFile {
                content: content.clone(),
                path: dest,
            });
        }
        // A file that failed to arrive may arrive next time: only a whole set is kept.
        let whole = problems.is_empty();
        let set = tokio::task::spawn_blocking(move || {
            let mut set = RuleSet::load(&loaded);
            set.problems.extend(problems);
            set
        })
        .await
        .map_err(|e| ExecError::Failed(format!("compiling the rules crashed: {e}")))?;
        tracing::info!(rules = %set.describe(), problems = set.problems.len(), "rule files compiled");
        let set = Arc::new(set);
        if whole {
            self.rule_cache.put(&exec.rules, set.clone());
        }
        Ok(Some(set))
    }

    /// putfile puts the verified file into the drop folder; run runs it.
    fn use_content(
        &self,
        ctx: &ExecContext,
        inv: &Invocation,
        staged: Staged,
        max_output: usize,
    ) -> Result<CommandResult, ExecError> {
        let v = &staged.verified;
        if inv.spec.name == "putfile" {
            let files = self.files();
            let keep = inv.has_flag("keep");
            let placed = crate::content::place(
                &files,
                v,
                &staged.content.file_name,
                inv.has_flag("overwrite"),
                keep,
            );
            if placed.is_err() {
                let _ = std::fs::remove_file(&v.path);
            }
            let path = placed?;
            tracing::info!(path = %path.display(), size = v.size, keep, "library file put on the device");
            return Ok(CommandResult::with_records(vec![serde_json::json!({
                "path": path.display().to_string(),
                "size": v.size,
                "sha256": v.sha256,
                "signer": v.signer,
                "kept": keep,
            })]));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&v.path, std::fs::Permissions::from_mode(0o700)).map_err(
                |e| ExecError::Failed(format!("cannot make {} executable: {e}", v.path.display())),
            )?;
        }
        // One argument, exactly as given: no splitting, no shell.
        let params: Vec<String> = inv
            .get("parameters")
            .map(str::to_string)
            .into_iter()
            .collect();
        let wd = ctx
            .host_root
            .join(ctx.working_directory.trim_start_matches('/'));
        let cwd = if wd.is_dir() {
            wd
        } else {
            staged
                .scratch
                .as_ref()
                .map_or_else(|| ctx.host_root.clone(), |s| s.0.clone())
        };
        let r = self
            .provider
            .run_script(ctx, &v.path, &params, &cwd, max_output / 2);
        drop(staged);
        r
    }

    /// Streams a file to the operator (on a blocking thread): chunks go to whatever
    /// stream is current, and wait while there is none.
    fn getfile(
        &self,
        ctx: &ExecContext,
        inv: &Invocation,
        t: Transfer,
    ) -> Result<CommandResult, ExecError> {
        let opened = if inv.spec.name == "collect" {
            // Built once per command and kept: a transfer resumed after a reconnect must
            // find the same bytes.
            let dir = self.files().state_dir.join("collect");
            std::fs::create_dir_all(&dir)
                .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", dir.display())))?;
            let safe = crate::content::file_name_of(&t.uid);
            let package = dir.join(format!("{safe}.tar.gz"));
            if !package.exists() {
                tracing::info!(package = %package.display(), "building the investigation package");
                self.provider.collect(ctx, &package)?;
            }
            let file = std::fs::File::open(&package)
                .map_err(|e| ExecError::Failed(format!("cannot open the package: {e}")))?;
            let meta = file
                .metadata()
                .map_err(|e| ExecError::Failed(format!("cannot open the package: {e}")))?;
            crate::provider::OpenedFile {
                path: format!("/collect-{}.tar.gz", &safe[..safe.len().min(8)]),
                file,
                size: meta.len(),
                modified: meta.modified().ok(),
            }
        } else {
            let path = inv
                .get("path")
                .ok_or_else(|| ExecError::InvalidArgument("getfile needs a path".into()))?;
            self.provider.open_file(ctx, path)?
        };
        tracing::info!(path = %opened.path, size = opened.size, from = t.start, "sending a file");
        let send = |chunk: proto::FileChunk| {
            let Some(tx) = self.state().sender.clone() else {
                return false;
            };
            tx.blocking_send(event(&t.uid, command_event::Event::File(chunk)))
                .is_ok()
        };
        let rate = *self.transfer_rate.lock().unwrap_or_else(|p| p.into_inner());
        let summary =
            crate::transfer::send_file(opened, t.start, t.max, rate, ctx, &t.resume, &send)?;
        tracing::info!(path = %summary.path, size = summary.size, sha256 = %summary.sha256, "file sent");
        let mut r = CommandResult::with_records(vec![serde_json::json!({
            "path": summary.path,
            "size": summary.size,
            "sha256": summary.sha256,
        })]);
        r.file = Some(summary);
        Ok(r)
    }

    fn agent_command(&self, inv: &Invocation, session: &str) -> Result<CommandResult, ExecError> {
        match inv.spec.name {
            // The same answer as the console's, one record per line.
            "help" => {
                let text =
                    help_answer(inv).map_err(|e| ExecError::InvalidArgument(e.to_string()))?;
                Ok(CommandResult::with_records(
                    text.lines()
                        .map(|line| serde_json::json!({ "text": line }))
                        .collect(),
                ))
            }
            "status" => {
                let st = self.state();
                let mut records: Vec<serde_json::Value> = st
                    .running
                    .iter()
                    .map(|(uid, j)| {
                        serde_json::json!({
                            "id": uid, "command": j.line.trim(), "phase": "Running",
                            "duration": format!("{}s", j.started.elapsed().as_secs()),
                        })
                    })
                    .collect();
                records.extend(st.stuck.iter().map(|(uid, s)| {
                    serde_json::json!({
                        "id": uid, "command": s.line.trim(), "phase": "Stuck",
                        "duration": format!("{}s", s.since.elapsed().as_secs()),
                    })
                }));
                records.push(serde_json::json!({
                    "id": "agent", "command": format!("liveresponse-agent {} on {}", env!("CARGO_PKG_VERSION"), self.provider.os()),
                    "phase": "Up", "duration": format!("{}s", self.started.elapsed().as_secs()),
                }));
                Ok(CommandResult::with_records(records))
            }
            // Only this session's commands: the agent's own level stays as configured.
            "trace" => {
                let level = match inv.get("level") {
                    Some(level) => self
                        .levels
                        .set(session, level)
                        .map_err(ExecError::InvalidArgument)?,
                    None => self.levels.shown(session),
                };
                Ok(CommandResult::with_records(vec![
                    serde_json::json!({ "level": level, "session": session }),
                ]))
            }
            other => Err(ExecError::Failed(format!(
                "{other} is not an agent command"
            ))),
        }
    }
}

/// What a getfile needs besides its invocation.
struct Transfer {
    uid: String,
    start: u64,
    max: u64,
    resume: Arc<Mutex<Option<u64>>>,
}

/// Resolves once the command should have stopped (cancelled, or past its deadline) and
/// its worker has had [`STOP_GRACE`] to notice: the error it ends with.
async fn stopped(cancelled: Arc<AtomicBool>, deadline: Option<Instant>) -> ExecError {
    let why = loop {
        if cancelled.load(Ordering::SeqCst) {
            break ExecError::Cancelled;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break ExecError::TimedOut;
        }
        tokio::time::sleep(STOP_POLL).await;
    };
    tokio::time::sleep(STOP_GRACE).await;
    why
}

fn event(uid: &str, e: command_event::Event) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Event(CommandEvent {
            command_uid: uid.to_string(),
            event: Some(e),
        })),
    }
}

fn completed(
    uid: &str,
    outcome: Outcome,
    exit_code: i32,
    reason: &str,
    message: &str,
) -> Vec<AgentMessage> {
    vec![event(
        uid,
        command_event::Event::Completed(Completed {
            outcome: outcome as i32,
            exit_code,
            error_reason: reason.to_string(),
            error_message: message.to_string(),
            ..Default::default()
        }),
    )]
}

fn failed(uid: &str, reason: &str, message: &str) -> Vec<AgentMessage> {
    completed(uid, Outcome::Failed, 1, reason, message)
}

fn events_size(events: &[AgentMessage]) -> usize {
    events
        .iter()
        .map(|e| match &e.msg {
            Some(agent_message::Msg::Event(CommandEvent {
                event: Some(command_event::Event::Output(c)),
                ..
            })) => c.data.len(),
            _ => 64,
        })
        .sum()
}

fn succeeded(
    uid: &str,
    data: Vec<u8>,
    working_directory: Option<String>,
    warnings: Vec<String>,
) -> Vec<AgentMessage> {
    let mut events: Vec<AgentMessage> = data
        .chunks(CHUNK)
        .map(|c| {
            event(
                uid,
                command_event::Event::Output(OutputChunk { data: c.to_vec() }),
            )
        })
        .collect();
    events.push(event(
        uid,
        command_event::Event::Completed(Completed {
            outcome: Outcome::Succeeded as i32,
            exit_code: 0,
            working_directory: working_directory.unwrap_or_default(),
            warnings,
            output_size: data.len() as u64,
            output_sha256: hex::encode(Sha256::digest(&data)),
            ..Default::default()
        }),
    ));
    events
}

#[cfg(test)]
mod tests {
    use liveresponse_api::command::{Tier, registry};

    use super::*;

    struct NoProvider;

    impl Provider for NoProvider {
        fn os(&self) -> &'static str {
            "linux"
        }
        fn capabilities(&self) -> Vec<&'static str> {
            Vec::new()
        }
        fn execute(&self, _: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
            Err(ExecError::Failed(format!(
                "{} reached the provider",
                inv.spec.name
            )))
        }
    }

    fn executor() -> Arc<Executor> {
        Executor::new(Box::new(NoProvider), "/".into(), SessionLevels::new("info"))
    }

    fn answer(ex: &Executor, session: &str, line: &str) -> Result<CommandResult, ExecError> {
        match liveresponse_api::command::parse_line(line) {
            Ok(parsed) => ex.agent_command(&parsed.invocation, session),
            Err(e) => panic!("{line}: {e}"),
        }
    }

    /// The registry decides what the agent answers itself; every such command has an
    /// answer here, and the hello announces them.
    #[test]
    fn agent_dispatch_follows_the_registry() {
        let ex = executor();
        for spec in registry().iter().filter(|s| s.answered_by_agent()) {
            let result = answer(&ex, "s1", spec.examples[0]);
            assert!(result.is_ok(), "{}: {:?}", spec.name, result.err());
        }
        for spec in registry().iter().filter(|s| !s.answered_by_agent()) {
            if spec.tier == Tier::Console {
                continue;
            }
            let result = answer(&ex, "s1", spec.examples[0]);
            assert!(
                result.is_err_and(|e| e.to_string().contains("not an agent command")),
                "{} is not the agent's",
                spec.name
            );
        }
        let caps = ex.capabilities();
        for name in agent_commands() {
            assert!(
                caps.iter().any(|c| c == name),
                "{name} missing from {caps:?}"
            );
        }
    }

    #[test]
    fn help_is_the_consoles_answer_line_by_line() {
        let ex = executor();
        let records = answer(&ex, "s1", "help getfile").map(|r| r.records);
        let text: Vec<String> = records
            .unwrap_or_default()
            .iter()
            .map(|r| r["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        let expected = liveresponse_api::command::help_for("getfile").unwrap_or_default();
        assert_eq!(text.join("\n"), expected.trim_end_matches('\n'));
    }

    #[test]
    fn trace_sets_and_shows_the_sessions_level_only() {
        let ex = executor();
        let level = |session: &str, line: &str| {
            answer(&ex, session, line)
                .ok()
                .and_then(|r| r.records.first().map(|r| r["level"].clone()))
        };
        assert_eq!(level("s1", "trace"), Some("info".into()));
        assert_eq!(level("s1", "trace -level debug"), Some("debug".into()));
        assert_eq!(level("s1", "trace"), Some("debug".into()));
        assert_eq!(level("s2", "trace"), Some("info".into()));
        assert_eq!(
            ex.levels.get("s1"),
            Some(tracing::level_filters::LevelFilter::DEBUG)
        );
        assert_eq!(ex.levels.get("s2"), None);
    }

    /// Blocks in open() of a FIFO that has no writer, as the old provider did: a thread
    /// that no cancel flag reaches.
    struct BlockedProvider(PathBuf);

    impl Provider for BlockedProvider {
        fn os(&self) -> &'static str {
            "linux"
        }
        fn capabilities(&self) -> Vec<&'static str> {
            vec!["fileinfo"]
        }
        fn execute(&self, _: &ExecContext, _: &Invocation) -> Result<CommandResult, ExecError> {
            let _ = std::fs::read(&self.0);
            Ok(CommandResult::default())
        }
    }

    async fn completion(rx: &mut mpsc::Receiver<AgentMessage>) -> Option<Completed> {
        while let Some(msg) = rx.recv().await {
            if let Some(agent_message::Msg::Event(CommandEvent {
                event: Some(command_event::Event::Completed(c)),
                ..
            })) = msg.msg
            {
                return Some(c);
            }
        }
        None
    }

    /// An executor whose provider blocks opening a FIFO until someone opens its other end.
    fn blocked_executor() -> (
        tempfile::TempDir,
        PathBuf,
        Arc<Executor>,
        mpsc::Receiver<AgentMessage>,
    ) {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let ex = Executor::new(
            Box::new(BlockedProvider(fifo.clone())),
            "/".into(),
            SessionLevels::new("info"),
        );
        let (tx, rx) = mpsc::channel(16);
        ex.set_sender(Some(tx));
        (dir, fifo, ex, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_ends_a_command_whose_worker_is_blocked() {
        let (_dir, fifo, ex, mut rx) = blocked_executor();
        let exec = Execute {
            command_uid: "u1".into(),
            command: "fileinfo".into(),
            args: vec!["/fifo".into()],
            session: "s1".into(),
            ..Default::default()
        };
        ex.execute(exec).await;
        assert_eq!(ex.running(), vec!["u1".to_owned()]);
        let asked = Instant::now();
        ex.cancel("u1", CancelReason::User);
        let done = tokio::time::timeout(Duration::from_secs(10), completion(&mut rx))
            .await
            .ok()
            .flatten();
        let took = asked.elapsed();
        let done = done.unwrap();
        assert_eq!(done.outcome, Outcome::Cancelled as i32);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(ex.running().is_empty());
        let status = answer(&ex, "s1", "status").unwrap();
        assert!(
            status
                .records
                .iter()
                .any(|r| r["id"] == "u1" && r["phase"] == "Stuck"),
            "{:?}",
            status.records
        );
        // Once the read can finish, the thread returns and is forgotten.
        let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        drop(writer);
        // Wait for the thread to return (bounded), whatever the machine's load.
        let gone = Instant::now() + Duration::from_secs(10);
        loop {
            let status = answer(&ex, "s1", "status").unwrap();
            if status.records.iter().all(|r| r["id"] != "u1") {
                break;
            }
            assert!(Instant::now() < gone, "still stuck: {:?}", status.records);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadline_ends_a_command_whose_worker_is_blocked() {
        let (_dir, fifo, ex, mut rx) = blocked_executor();
        ex.execute(Execute {
            command_uid: "u2".into(),
            command: "fileinfo".into(),
            args: vec!["/fifo".into()],
            timeout_seconds: 1,
            ..Default::default()
        })
        .await;
        let done = tokio::time::timeout(Duration::from_secs(10), completion(&mut rx))
            .await
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(done.outcome, Outcome::TimedOut as i32);
        let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        drop(writer);
    }
}
