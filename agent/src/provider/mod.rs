//! OS providers: what a device command finds out about the machine the agent runs on.
//!
//! The executor parses a command with the registry, then hands the [`Invocation`] to the
//! provider of this OS together with an [`ExecContext`]. Providers read, except for the
//! remediation verbs (`remediate`, `undo`), which change the device only through the
//! journal in [`ExecContext::journal`]. Every host file they read is read
//! below [`ExecContext::host_root`], so the same code serves an agent installed on the host
//! and one in a DaemonSet that mounts the host at `/host`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use liveresponse_api::command::Invocation;

#[cfg(target_os = "linux")]
pub mod linux;

/// How many notes a command keeps: enough to name what matters, not enough to bloat a
/// status.
const MAX_NOTES: usize = 20;

/// What an executor gives a provider for one command.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// The host's filesystem root as the agent sees it: "/" for an agent on the host,
    /// "/host" in a DaemonSet, a temporary directory in tests. Host files are read below
    /// it, and symbolic links are resolved against it, so a link never leads out of it.
    pub host_root: PathBuf,
    /// The session's working directory: an absolute device path, i.e. as seen from the
    /// host, without the `host_root` prefix. Relative paths resolve against it.
    pub working_directory: String,
    /// Set by the executor when the command is cancelled or timed out; long loops check it
    /// often and return [`ExecError::Cancelled`].
    pub cancelled: Arc<AtomicBool>,
    /// Optional hard deadline; reaching it gives [`ExecError::TimedOut`].
    pub deadline: Option<Instant>,
    /// Host files the provider refused or cut short (a FIFO, a file too large): parsers
    /// that skip optional files silently would otherwise hide them from the analyst.
    pub notes: Arc<Mutex<Vec<String>>>,
    /// The Command's uid: what makes a remediation act once however often it is sent.
    pub command_uid: String,
    /// The remediation journal, where the agent has a state folder.
    pub journal: Option<Arc<crate::journal::Journal>>,
    /// The agent's state folder (isolation's record).
    pub state_dir: Option<PathBuf>,
    /// The gateway's URL: what isolation keeps reachable.
    pub gateway: Option<String>,
    /// analyze, scan and remediate -auto: the namespace's rule files, compiled.
    pub rules: Option<Arc<crate::analysis::RuleSet>>,
    /// Where a long command says how far it got (the Command's status.progress).
    pub progress: ProgressSink,
    /// The user whose session sent the command, as the operator says.
    pub requested_by: String,
}

/// Receives `(done, total, unit)` of a long command ("files"); the executor sends it on,
/// at most about once a second, and drops what does not fit its queue rather than slow
/// the work.
#[derive(Clone, Default)]
pub struct ProgressSink(Option<Arc<ProgressFn>>);

type ProgressFn = dyn Fn(u64, u64, &'static str) + Send + Sync;

impl ProgressSink {
    pub fn new(f: impl Fn(u64, u64, &'static str) + Send + Sync + 'static) -> Self {
        ProgressSink(Some(Arc::new(f)))
    }

    pub fn report(&self, done: u64, total: u64, unit: &'static str) {
        if let Some(f) = &self.0 {
            f(done, total, unit);
        }
    }
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProgressSink(set)"
        } else {
            "ProgressSink(none)"
        })
    }
}

impl ExecContext {
    /// A context for the host root `host_root`, working directory "/", no deadline.
    pub fn new(host_root: impl Into<PathBuf>) -> Self {
        ExecContext {
            host_root: host_root.into(),
            working_directory: "/".to_owned(),
            cancelled: Arc::new(AtomicBool::new(false)),
            deadline: None,
            notes: Arc::default(),
            command_uid: String::new(),
            journal: None,
            state_dir: None,
            gateway: None,
            rules: None,
            progress: ProgressSink::default(),
            requested_by: String::new(),
        }
    }

    /// Keeps a note for the command's warnings; bounded, since a host can hold any number
    /// of hostile files.
    pub fn note(&self, text: String) {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        if notes.len() < MAX_NOTES && !notes.contains(&text) {
            notes.push(text);
        } else if notes.len() == MAX_NOTES {
            notes.push("more files were skipped; only the first ones are named".to_owned());
        }
    }

    /// The notes kept so far, emptied.
    pub fn take_notes(&self) -> Vec<String> {
        std::mem::take(&mut *self.notes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Err when the command was cancelled or ran past its deadline; long loops call this
    /// between units of work.
    pub fn check(&self) -> Result<(), ExecError> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(ExecError::Cancelled);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ExecError::TimedOut);
        }
        Ok(())
    }
}

/// What a provider gives back for one command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandResult {
    /// Structured records, one JSON object per row; keys are camelCase and include every
    /// table column key of the command's `spec.columns`.
    pub records: Vec<serde_json::Value>,
    /// Set by `cd`: the new canonical working directory (device path, without host_root).
    pub working_directory: Option<String>,
    /// Notes for the analyst that are not records, e.g. what findfile skipped.
    pub warnings: Vec<String>,
    /// getfile: what was sent.
    pub file: Option<liveresponse_api::proto::FileSummary>,
    /// run: the script's exit code (a command that ran is otherwise 0).
    pub exit_code: Option<i32>,
}

impl CommandResult {
    pub fn with_records(records: Vec<serde_json::Value>) -> Self {
        CommandResult {
            records,
            ..CommandResult::default()
        }
    }
}

/// Why a command failed; [`ExecError::reason`] is what `Command.status.error.reason` shows.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{command} is not supported on {os}")]
    NotSupported { command: String, os: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out")]
    TimedOut,
    #[error("{0}")]
    Failed(String),
}

impl ExecError {
    /// A stable, machine-readable name of the variant.
    pub fn reason(&self) -> &'static str {
        match self {
            ExecError::NotSupported { .. } => "NotSupported",
            ExecError::InvalidArgument(_) => "InvalidArgument",
            ExecError::NotFound(_) => "NotFound",
            ExecError::PermissionDenied(_) => "PermissionDenied",
            ExecError::Cancelled => "Cancelled",
            ExecError::TimedOut => "TimedOut",
            ExecError::Failed(_) => "Failed",
        }
    }
}

/// One implementation per OS. Synchronous on purpose: the executor runs it on a blocking
/// thread.
pub trait Provider: Send + Sync {
    /// `Device.status.os`: "linux", "windows", "macos".
    fn os(&self) -> &'static str;
    /// Command names (registry spec names, e.g. "processes", "findfile") this provider
    /// implements, for the agent's hello.
    fn capabilities(&self) -> Vec<&'static str>;
    fn execute(&self, ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError>;
    /// Opens a regular file for getfile, refusing what would hang or never end (FIFOs,
    /// sockets, devices, kernel pseudo files). The executor streams it.
    fn open_file(&self, ctx: &ExecContext, path: &str) -> Result<OpenedFile, ExecError> {
        let _ = (ctx, path);
        Err(ExecError::NotSupported {
            command: "getfile".to_owned(),
            os: self.os().to_owned(),
        })
    }
    /// Builds an investigation package (`collect`) at `out`, whole or not at all.
    fn collect(&self, ctx: &ExecContext, out: &std::path::Path) -> Result<(), ExecError> {
        let _ = (ctx, out);
        Err(ExecError::NotSupported {
            command: "collect".to_owned(),
            os: self.os().to_owned(),
        })
    }
    /// Runs a verified library script (`run`): `params` as its arguments, never through a
    /// shell; cancel and timeout stop its whole process tree. Output is kept up to
    /// `max_output` bytes per stream.
    fn run_script(
        &self,
        ctx: &ExecContext,
        script: &std::path::Path,
        params: &[String],
        cwd: &std::path::Path,
        max_output: usize,
    ) -> Result<CommandResult, ExecError> {
        let _ = (ctx, script, params, cwd, max_output);
        Err(ExecError::NotSupported {
            command: "run".to_owned(),
            os: self.os().to_owned(),
        })
    }
}

/// A regular file opened for reading, with what it looked like when opened.
pub struct OpenedFile {
    /// Its device path, links resolved.
    pub path: String,
    pub file: std::fs::File,
    pub size: u64,
    pub modified: Option<std::time::SystemTime>,
}

/// The provider for the OS this binary runs on.
pub fn for_this_os() -> Box<dyn Provider> {
    #[cfg(target_os = "linux")]
    {
        Box::new(linux::LinuxProvider::new())
    }
    #[cfg(not(target_os = "linux"))]
    {
        Box::new(Unsupported)
    }
}

/// Stands in on operating systems that have no provider yet, so the agent still connects
/// and every command gets a clear answer instead of a silent empty result.
#[cfg(not(target_os = "linux"))]
struct Unsupported;

#[cfg(not(target_os = "linux"))]
impl Provider for Unsupported {
    fn os(&self) -> &'static str {
        match std::env::consts::OS {
            "windows" => "windows",
            "macos" => "macos",
            other => other,
        }
    }

    fn capabilities(&self) -> Vec<&'static str> {
        Vec::new()
    }

    fn execute(&self, _ctx: &ExecContext, inv: &Invocation) -> Result<CommandResult, ExecError> {
        Err(ExecError::NotSupported {
            command: inv.spec.name.to_owned(),
            os: self.os().to_owned(),
        })
    }
}

/// "30.0 GiB", "4 MiB": sizes in messages.
pub fn human_size(bytes: u64) -> String {
    const UNITS: &[&str] = &["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_stable() {
        assert_eq!(
            ExecError::NotSupported {
                command: "registry".into(),
                os: "linux".into()
            }
            .to_string(),
            "registry is not supported on linux"
        );
        assert_eq!(ExecError::Cancelled.reason(), "Cancelled");
        assert_eq!(ExecError::TimedOut.reason(), "TimedOut");
        assert_eq!(ExecError::NotFound("x".into()).reason(), "NotFound");
    }

    #[test]
    fn check_sees_cancellation_and_deadline() {
        let mut ctx = ExecContext::new("/");
        assert!(ctx.check().is_ok());
        ctx.deadline = Some(Instant::now());
        assert!(matches!(ctx.check(), Err(ExecError::TimedOut)));
        ctx.cancelled.store(true, Ordering::Relaxed);
        assert!(matches!(ctx.check(), Err(ExecError::Cancelled)));
    }
}
