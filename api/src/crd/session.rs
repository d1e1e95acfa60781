use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, Time};

/// A live response session: one analyst's connection to one device. Create it to connect;
/// set `spec.state: Disconnected` (or delete it) to end it. Its Commands are its command log.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "LiveResponseSession",
    namespaced,
    status = "SessionStatus",
    shortname = "lrs",
    category = "liveresponse",
    printcolumn(name = "Device", type_ = "string", json_path = ".spec.device"),
    printcolumn(name = "Requester", type_ = "string", json_path = ".spec.requestedBy"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Started", type_ = "date", json_path = ".status.startTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// Name of the Device (in this namespace) to connect to. Immutable.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.device is immutable: open a new session for another device"))]
    pub device: String,
    /// Why the session was opened (the ticket or incident), shown in the command log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// The Kubernetes user that opens the session, as `kubectl auth whoami` prints it. The
    /// console stamps it; admission refuses a value that is not the requesting user. Immutable.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.requestedBy is immutable"))]
    pub requested_by: String,
    /// End the session after this long without a command (a Go duration such as `30m`,
    /// between 1m and 24h). Defaults to the namespace's LiveResponseSettings `idleTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("idleTimeout must be a duration between 1s and 24h, such as 30m"))]
    pub idle_timeout: Option<String>,
    /// `Active` while the analyst wants the session; set `Disconnected` to end it. A
    /// disconnected session cannot be reactivated.
    #[serde(default)]
    #[x_kube(validation = Rule::new("oldSelf == 'Active' || self == 'Disconnected'").message("a disconnected session cannot be reactivated: open a new session"))]
    pub state: SessionState,
}

/// What the analyst wants of a session.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum SessionState {
    /// Keep the session open.
    #[default]
    Active,
    /// End the session.
    Disconnected,
}

/// Lifecycle of a session.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SessionPhase {
    /// Accepted by the API server, not yet looked at by the operator.
    Pending,
    /// Admitted; waiting for the device's agent.
    Connecting,
    /// Commands can run.
    Connected,
    /// Ended by the analyst (`state: Disconnected`).
    Disconnected,
    /// Refused: live response disabled, a limit reached, or the device busy. See `message`.
    Rejected,
    /// Could not be served (the device does not exist or its agent failed). See `message`.
    Failed,
    /// Ended because no command ran for `idleTimeout`.
    Expired,
}

impl SessionPhase {
    /// Whether the session has ended for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Disconnected | Self::Rejected | Self::Failed | Self::Expired
        )
    }
}

/// What the operator observed of a session.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// Where the session is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// When the session became Connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// When its last command was created; the idle timeout counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<Time>,
    /// The device-side directory relative paths resolve against, as `cd` left it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
    /// How many commands the session has run.
    #[serde(default)]
    pub command_count: i64,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Human-readable explanation of the phase (why it was rejected, failed or expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
