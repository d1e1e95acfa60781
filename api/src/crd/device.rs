use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Condition, Time};

/// An endpoint enrolled into this namespace. The operator creates and updates it from the
/// agent's connection; users read it (and delete it to revoke the agent's certificate).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "Device",
    namespaced,
    status = "DeviceStatus",
    shortname = "lrdev",
    category = "liveresponse",
    printcolumn(name = "Hostname", type_ = "string", json_path = ".status.hostname"),
    printcolumn(name = "OS", type_ = "string", json_path = ".status.os"),
    printcolumn(name = "Connected", type_ = "boolean", json_path = ".status.connected"),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Session",
        type_ = "string",
        json_path = ".status.activeSession"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// How the agent proved its identity: `ExternalHost` (a client certificate signed by the
    /// operator's CA after enrolling with a bootstrap token) or `InCluster` (a projected
    /// ServiceAccount token of a DaemonSet pod, bound to its node).
    #[serde(default)]
    pub enrollment: Enrollment,
    /// For `InCluster` agents: the node named in the agent's token. The gateway refuses an
    /// agent that claims another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// SHA-256 fingerprint of the client certificate issued to an `ExternalHost` agent.
    /// Only a certificate with this fingerprint may connect as this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    /// The fingerprint before the last renewal: accepted (until that certificate expires)
    /// so an agent that lost the renewal's answer can still connect and renew again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_certificate_sha256: Option<String>,
}

/// How an agent authenticates.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Enrollment {
    /// A host outside the cluster with a certificate from the operator's CA.
    #[default]
    ExternalHost,
    /// A DaemonSet pod authenticated by its ServiceAccount token.
    InCluster,
}

/// Operating system family of a device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OsFamily {
    /// Microsoft Windows.
    Windows,
    /// Linux.
    Linux,
    /// Apple macOS.
    Macos,
}

/// What the operator last learnt from the device's agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Host name the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Operating system family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsFamily>,
    /// Operating system name and version, as the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// CPU architecture (`x86_64`, `aarch64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Version of the agent binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Names of the commands this agent can run on this device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Whether the agent's stream is open and its heartbeats are on time.
    #[serde(default)]
    pub connected: bool,
    /// When the operator last heard from the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// The operator replica that holds the agent's stream and dispatches its commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Set while the device is network-isolated (`isolate`; `release` ends it), as its
    /// agent reports it: since when, and by which command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<DeviceIsolation>,
    /// The session currently connected to this device, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_session: Option<String>,
    /// Standard conditions; `Connected` mirrors `connected` with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A device's network isolation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIsolation {
    /// When it was isolated (RFC 3339).
    pub since: String,
    /// Who isolated it: the session's user and the command's uid.
    pub by: String,
}
