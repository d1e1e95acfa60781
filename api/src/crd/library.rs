use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;

/// A script or executable in the namespace's library, for `run` and `putfile`. Applying a
/// new version replaces the old one. Only the library-admin role may write it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "LibraryFile",
    namespaced,
    status = "LibraryFileStatus",
    shortname = "lrlib",
    category = "liveresponse",
    printcolumn(name = "File", type_ = "string", json_path = ".spec.fileName"),
    printcolumn(name = "Analysis", type_ = "string", json_path = ".spec.analysis"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Signed", type_ = "boolean", json_path = ".status.signed"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.size"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LibraryFileSpec {
    /// File name as `run` and `putfile` refer to it, e.g. `collect-logs.sh`. A plain name:
    /// no `/`, no `\`, not `.` or `..`, at most 255 characters.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.contains('/') && !self.contains('\\\\') && !self.contains('..') && self != '.'").message("fileName must be a plain file name such as collect-logs.sh: no '/', no '\\\\' and no '..'"))]
    pub file_name: String,
    /// What the file does, shown by `library`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// How to call it, shown by `library` and `help run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<ScriptParameters>,
    /// Where the bytes come from: exactly one of configMapRef, secretRef, inline, artifact.
    pub source: LibrarySource,
    /// Expected SHA-256 of the content (lowercase hex). When set, a file whose content has
    /// another digest is Invalid and never reaches a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: Option<String>,
    /// SSH signature of the content (`ssh-keygen -Y sign -n liveresponse.io -f key file`; the
    /// older namespace `liveresponse` is accepted too), checked by the operator and again by
    /// the agent, before it writes or runs the file, against the namespace's `trustedSigners`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub signature: Option<String>,
    /// Makes this file a rule set for `analyze`, `scan` and `remediate -auto` instead of a
    /// script: `Yara` (YARA rules source) or `Sha256List` (one malicious SHA-256 per line,
    /// optionally followed by a name; `#` starts a comment). Every Ready rule file of the
    /// namespace is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisRules>,
}

/// What kind of rules a library file holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum AnalysisRules {
    /// YARA rules source, as `yara-x` compiles it.
    Yara,
    /// One SHA-256 (hex) per line, optionally followed by a name.
    Sha256List,
}

impl AnalysisRules {
    /// The name `Execute.rules[].analysis` carries to the agent.
    pub fn wire_name(self) -> &'static str {
        match self {
            AnalysisRules::Yara => "yara",
            AnalysisRules::Sha256List => "sha256",
        }
    }
}

/// How to call a library script.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScriptParameters {
    /// What the parameters mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// An example value for `run NAME -parameters "..."`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub example: Option<String>,
}

/// Where a library file's bytes come from. Set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.configMapRef), has(self.secretRef), has(self.inline), has(self.artifact)].filter(x, x).size() == 1").message("source must set exactly one of configMapRef, secretRef, inline or artifact"))]
#[serde(rename_all = "camelCase")]
pub struct LibrarySource {
    /// A key of a ConfigMap in this namespace (binaryData or data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,
    /// A key of a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
    /// The content itself, for small text scripts (at most 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub inline: Option<String>,
    /// SHA-256 of content uploaded through the file API (`kubectl liveresponse library upload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub artifact: Option<String>,
}

/// A key of a ConfigMap or Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the ConfigMap or Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within it.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Whether a library file can be used.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum LibraryFilePhase {
    /// Content found, digest matches, signature (if any) verified.
    Ready,
    /// Cannot be used; see `message`.
    Invalid,
}

/// What the operator verified of a library file.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LibraryFileStatus {
    /// Ready or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LibraryFilePhase>,
    /// Size of the content in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// SHA-256 of the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Whether a signature by a trusted signer verified.
    #[serde(default)]
    pub signed: bool,
    /// The principal of the trusted signer whose key made the signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Why the file is Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
