use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{CommandPhase, Condition, Time};

/// Label the operator puts on a batch's child sessions and commands: the batch's name.
pub const BATCH_LABEL: &str = "liveresponse.io/batch";
/// Annotation on a batch's child sessions: the user who created the batch (the sessions
/// themselves are opened by the operator).
pub const ON_BEHALF_OF_ANNOTATION: &str = "liveresponse.io/on-behalf-of";

/// One command line run on many devices of this namespace at once: every Device the
/// selector or the name list picks gets a session and a Command of its own, opened by the
/// operator for the batch, so admission tiers, RBAC, the audit log and the command log apply
/// as for an analyst's own commands. Only `spec.cancel` may change after creation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "BatchCommand",
    namespaced,
    status = "BatchStatus",
    shortname = "lrb",
    category = "liveresponse",
    printcolumn(name = "Command", type_ = "string", json_path = ".status.commandLine"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".status.total"),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.counts.succeeded"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.counts.failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.selector) || (has(self.devices) && size(self.devices) > 0)").message("say which devices: spec.selector (labels of Devices) and/or spec.devices (Device names)"))]
#[x_kube(validation = Rule::new("has(self.selector) == has(oldSelf.selector) && (!has(self.selector) || self.selector == oldSelf.selector) && has(self.timeoutSeconds) == has(oldSelf.timeoutSeconds) && (!has(self.timeoutSeconds) || self.timeoutSeconds == oldSelf.timeoutSeconds)").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Devices of this namespace whose labels match. Combined with `devices`, a device
    /// named in either is picked. The set is taken once, when the batch starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Names of Devices of this namespace.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    #[x_kube(validation = Rule::new("self.all(d, size(d) <= 253)").message("a device name is at most 253 characters"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
    pub devices: Vec<String>,
    /// The command's verb, as in a Command (`processes`, `run`...). Advanced verbs need the
    /// `liveresponse-advanced` role, as for one device.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
    pub command: String,
    /// Everything after the verb, one item per argument, as in a Command.
    #[serde(default)]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(a, size(a) <= 4096)").message("each argument is at most 4096 characters"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
    pub args: Vec<String>,
    /// How many devices run it at the same time (1 to 10000); the others wait their turn.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 10000))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
    pub max_concurrency: i32,
    /// Give up on a device (phase `TimedOut`) after this many seconds, 1 to 86400. Defaults
    /// to the namespace's `commandTimeout` (`longCommandTimeout` for getfile, findfile, run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<i64>,
    /// Why (the ticket or incident), shown in every child session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("only spec.cancel may change after a batch is created: create a new BatchCommand instead"))]
    pub reason: Option<String>,
    /// Set to true to stop the batch: running devices are cancelled, waiting ones never
    /// start. Cannot be set back to false.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.cancel cannot go back to false: a cancelled batch stays cancelled"))]
    pub cancel: bool,
}

fn default_max_concurrency() -> i32 {
    100
}

/// Lifecycle of a batch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum BatchPhase {
    /// Not yet looked at by the operator.
    Pending,
    /// Devices are running it or waiting their turn.
    Running,
    /// Every device succeeded.
    Succeeded,
    /// Finished, and at least one device did not succeed (see `counts` and `results`), or
    /// the batch could not start (see `message`).
    Failed,
    /// Stopped by `spec.cancel`.
    Cancelled,
}

impl BatchPhase {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// How many devices are in each phase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchCounts {
    /// Not started yet (waiting for a concurrency slot).
    pub pending: i32,
    /// Started: queued for the device or running on it.
    pub running: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub cancelled: i32,
    pub timed_out: i32,
}

/// One device's outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    /// The Device's name.
    pub device: String,
    /// `Pending` until the device's turn comes, then its Command's phase.
    pub phase: CommandPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed, in short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The child session (opened by the operator for this device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The child Command, whose status holds the device's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// What the operator observed of a batch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BatchStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BatchPhase>,
    /// The canonical command line every device runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    /// How many devices the batch picked when it started.
    #[serde(default)]
    pub total: i32,
    #[serde(default)]
    pub counts: BatchCounts,
    /// One entry per picked device, in name order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<BatchResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Why it failed to start, or a summary once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
