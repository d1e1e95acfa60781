use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, Time};

/// Annotation admission stamps on every new Command with the user who created it
/// (config/admission/command-requester.yaml); users can neither set nor change it.
pub const REQUESTED_BY_ANNOTATION: &str = "liveresponse.io/requested-by";
/// Annotation admission stamps with the creator's groups, comma-separated, so the operator
/// can re-check what the creator may do (a SubjectAccessReview).
pub const REQUESTED_BY_GROUPS_ANNOTATION: &str = "liveresponse.io/requested-by-groups";

/// One command typed in a live response session, as the console (or GitOps, or a playbook)
/// creates it. Its status is the command log entry: phase, timing, exit code and output.
/// Only `spec.cancel` may change after creation, and only from false to true.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "Command",
    namespaced,
    status = "CommandStatus",
    shortname = "lrc",
    category = "liveresponse",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.session"),
    printcolumn(name = "ID", type_ = "integer", json_path = ".status.id"),
    printcolumn(name = "Command", type_ = "string", json_path = ".status.commandLine"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.timeoutSeconds) == has(oldSelf.timeoutSeconds) && (!has(self.timeoutSeconds) || self.timeoutSeconds == oldSelf.timeoutSeconds)").message("spec.timeoutSeconds is immutable: create a new Command instead"))]
#[serde(rename_all = "camelCase")]
pub struct CommandSpec {
    /// Name of the LiveResponseSession (in this namespace) the command runs in. Immutable.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.session is immutable: create a new Command instead"))]
    pub session: String,
    /// The command's verb, the first word typed at the console: `processes`, `getfile`,
    /// `library`... (`kubectl liveresponse help` lists them). Advanced verbs need the
    /// `liveresponse-advanced` role. Immutable.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.command is immutable: create a new Command instead"))]
    pub command: String,
    /// Everything typed after the verb, one list item per argument, exactly as typed but
    /// without quotes: positional values in order, `-name value` pairs, flags such as
    /// `-auto`. Example: `["/var/log/syslog", "-auto"]`. Immutable.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.args is immutable: create a new Command instead"))]
    #[x_kube(validation = Rule::new("self.all(a, size(a) <= 4096)").message("each argument is at most 4096 characters"))]
    pub args: Vec<String>,
    /// Output format of `status.output`: `table` (the main columns) or `json` (all fields).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.output is immutable: create a new Command instead"))]
    pub output: OutputFormat,
    /// Run without blocking the session's next command (the console's trailing `&`).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.background is immutable: create a new Command instead"))]
    pub background: bool,
    /// Give up (phase `TimedOut`) after this many seconds, 1 to 86400. Defaults to the
    /// namespace's LiveResponseSettings `commandTimeout` (`longCommandTimeout` for
    /// getfile, findfile and run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<i64>,
    /// Set to true to stop the command: the agent stops the work (kills a script, aborts a
    /// transfer) and the phase becomes `Cancelled`. Cannot be set back to false.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.cancel cannot go back to false: a cancelled command stays cancelled"))]
    pub cancel: bool,
}

/// The command language's own type: `spec.output` and the console's `-output` are one thing.
pub use crate::command::OutputFormat;

/// Lifecycle of a command.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CommandPhase {
    /// Accepted by the API server, not yet parsed by the operator.
    Pending,
    /// Parsed and waiting: for the previous command of the session, or for the device.
    Queued,
    /// Sent to the agent, which is working on it.
    Running,
    /// Finished with exit code 0.
    Succeeded,
    /// Finished with an error; see `error`.
    Failed,
    /// Stopped by `spec.cancel`.
    Cancelled,
    /// Stopped after `timeoutSeconds`.
    TimedOut,
}

impl CommandPhase {
    /// Whether the command has finished for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

/// A prerequisite that `-auto` ran before the command itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandStep {
    /// Canonical command line of the step.
    pub command_line: String,
    /// How the step ended.
    pub phase: CommandPhase,
    /// Exit code of the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What the step reported, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A command's output as stored in status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandOutput {
    /// Format of `content`.
    pub format: OutputFormat,
    /// The output, at most 64 KiB inline; see `truncated`.
    #[serde(default)]
    pub content: String,
    /// Whether `content` holds only the first 64 KiB of the output.
    #[serde(default)]
    pub truncated: bool,
    /// Size of the whole output in bytes.
    #[serde(default)]
    pub size: i64,
    /// SHA-256 of the whole output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Key of the whole output in the artifact store, when it was kept there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// Notes from the device that are not records, such as what findfile skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A file a command moved (getfile).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileRef {
    /// Path of the file on the device.
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256 of the content, verified end to end.
    pub sha256: String,
    /// Key of the content in the artifact store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
}

/// How far a transfer has come.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferProgress {
    /// Bytes the operator holds, verified in order.
    pub bytes: i64,
    /// Size of the whole file.
    pub total_bytes: i64,
    /// Where an interrupted transfer resumed, when it did (bytes kept, not sent again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<i64>,
    /// What `bytes` and `totalBytes` count when it is not bytes: `files` for a scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// What a remediate or undo command changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Remediation {
    /// Kind of entity: file, process, service, registry, scheduledtask, startupitem.
    pub entity_type: String,
    /// The entity as the analyst named it (path, pid, service name...).
    pub entity: String,
    /// What was done: quarantined, killed, disabled, restored...
    pub action: String,
    /// Journal id on the device that `undo` restores from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_id: Option<String>,
}

/// Why a command did not succeed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandError {
    /// Machine-readable reason in CamelCase: `ParseError`, `NotSupported`,
    /// `DeviceDisconnected`, `AgentError`...
    pub reason: String,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}

/// What the operator and the agent reported of a command.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CommandStatus {
    /// Sequence number of the command in its session, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// The command as a canonical console line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    /// Where the command is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CommandPhase>,
    /// When the agent started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How long it ran, from creation to completion (`1.2s`), set once it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Exit code the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Prerequisites run by `-auto`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CommandStep>,
    /// The command's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<CommandOutput>,
    /// How far a transfer (getfile) has come, updated about once a second while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TransferProgress>,
    /// The file a getfile moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
    /// What a remediate or undo changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<Remediation>,
    /// Why the command failed, was cancelled or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
    /// Standard conditions (`Complete`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
