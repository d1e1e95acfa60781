use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;

/// Live response settings of a namespace (a tenant). One per namespace, named `default`;
/// only the settings-admin role may change it. Without it, or with `enabled: false`, every
/// session is Rejected. The defaults are Defender for Endpoint's published limits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "liveresponse.io",
    version = "v1alpha1",
    kind = "LiveResponseSettings",
    plural = "liveresponsesettings",
    singular = "liveresponsesettings",
    namespaced,
    status = "SettingsStatus",
    shortname = "lrset",
    category = "liveresponse",
    validation = Rule::new("self.metadata.name == 'default'").message("LiveResponseSettings must be named 'default': there is one per namespace"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(name = "Unsigned Scripts", type_ = "boolean", json_path = ".spec.allowUnsignedScripts"),
    printcolumn(name = "Max Sessions", type_ = "integer", json_path = ".spec.maxSessions"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SettingsSpec {
    /// Turn live response on for this namespace. Off (or no settings object) rejects every
    /// session.
    #[serde(default)]
    pub enabled: bool,
    /// Let `run` and `putfile` use library files without a trusted signature.
    #[serde(default)]
    pub allow_unsigned_scripts: bool,
    /// Keys whose signatures make a library file trusted, as lines of an SSH
    /// allowed-signers file: `principal [options] key-type base64-key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub trusted_signers: Vec<String>,
    /// Most sessions open at once in the namespace (1 to 10000).
    #[serde(default = "default_max_sessions")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_sessions: i32,
    /// Most sessions one user may have open at once (1 to 10000).
    #[serde(default = "default_sessions_per_user")]
    #[schemars(range(min = 1, max = 10000))]
    pub sessions_per_user: i32,
    /// Most sessions open to one device at once (1 to 100).
    #[serde(default = "default_sessions_per_device")]
    #[schemars(range(min = 1, max = 100))]
    pub sessions_per_device: i32,
    /// End a session after this long without a command (1m to 24h).
    #[serde(default = "default_idle_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("idleTimeout must be a duration between 1s and 24h, such as 30m"))]
    pub idle_timeout: String,
    /// Default timeout of a command (1s to 24h).
    #[serde(default = "default_command_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("commandTimeout must be a duration between 1s and 24h, such as 10m"))]
    pub command_timeout: String,
    /// Default timeout of getfile, findfile and run (1s to 24h).
    #[serde(default = "default_long_command_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("longCommandTimeout must be a duration between 1s and 24h, such as 30m"))]
    pub long_command_timeout: String,
    /// Largest file getfile may pull (a quantity such as `3Gi`, at most `1Ti`).
    #[serde(default = "default_max_file_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('1Ti')) <= 0").message("maxFileSize must be a size above 0 and at most 1Ti, such as 3Gi"))]
    pub max_file_size: String,
    /// Largest file putfile may push (a quantity such as `300Mi`, at most `1Ti`).
    #[serde(default = "default_max_put_file_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('1Ti')) <= 0").message("maxPutFileSize must be a size above 0 and at most 1Ti, such as 300Mi"))]
    pub max_put_file_size: String,
    /// Largest library file (a quantity such as `250Mi`, at most `1Ti`).
    #[serde(default = "default_max_library_file_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('1Ti')) <= 0").message("maxLibraryFileSize must be a size above 0 and at most 1Ti, such as 250Mi"))]
    pub max_library_file_size: String,
    /// How long a command waits for a disconnected device before it fails (1s to 720h).
    #[serde(default = "default_offline_queue_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('720h')").message("offlineQueueTimeout must be a duration between 1s and 720h, such as 72h"))]
    pub offline_queue_timeout: String,
    /// How long finished commands are kept before the operator deletes them (1s to 8760h).
    #[serde(default = "default_command_retention")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('8760h')").message("commandRetention must be a duration between 1s and 8760h, such as 720h"))]
    pub command_retention: String,
    /// Largest output one command may produce (a quantity such as `64Mi`, at most `1Gi`).
    /// The first 64 KiB are kept in `status.output`, with the size and sha256 of the whole;
    /// a larger output fails the command with `OutputTooLarge`.
    #[serde(default = "default_max_output_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)?$"))]
    #[x_kube(validation = Rule::new("quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('1Gi')) <= 0").message("maxOutputSize must be a size above 0 and at most 1Gi, such as 64Mi"))]
    pub max_output_size: String,
    /// Life of the client certificates of devices enrolled in this namespace (30s to
    /// 8760h). Agents renew them over their stream at two thirds of it; an agent offline
    /// for longer must enroll again. Unset: the operator's default (30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('30s') && duration(self) <= duration('8760h')").message("deviceCertificateLifetime must be a duration between 30s and 8760h, such as 720h"))]
    pub device_certificate_lifetime: Option<String>,
}

/// Parses a size as the settings write it (`64Mi`, `3Gi`, `1024`).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses a Go-style duration (`30m`, `1h30m`, `90s`, `500ms`), as the CRDs validate them.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let value: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            's' => 1.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            _ => return None,
        };
        total += value * unit;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_size};
    use std::time::Duration;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64Mi"), Some(64 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("3Gi"), Some(3 << 30));
        assert_eq!(parse_size("3G"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("72h"), Some(Duration::from_secs(72 * 3600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration(""), None);
    }
}

impl Default for SettingsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            allow_unsigned_scripts: false,
            trusted_signers: Vec::new(),
            max_sessions: default_max_sessions(),
            sessions_per_user: default_sessions_per_user(),
            sessions_per_device: default_sessions_per_device(),
            idle_timeout: default_idle_timeout(),
            command_timeout: default_command_timeout(),
            long_command_timeout: default_long_command_timeout(),
            max_file_size: default_max_file_size(),
            max_put_file_size: default_max_put_file_size(),
            max_library_file_size: default_max_library_file_size(),
            offline_queue_timeout: default_offline_queue_timeout(),
            command_retention: default_command_retention(),
            max_output_size: default_max_output_size(),
            device_certificate_lifetime: None,
        }
    }
}

fn default_max_sessions() -> i32 {
    25
}
fn default_sessions_per_user() -> i32 {
    10
}
fn default_sessions_per_device() -> i32 {
    1
}
fn default_idle_timeout() -> String {
    "30m".into()
}
fn default_command_timeout() -> String {
    "10m".into()
}
fn default_long_command_timeout() -> String {
    "30m".into()
}
fn default_max_file_size() -> String {
    "3Gi".into()
}
fn default_max_put_file_size() -> String {
    "300Mi".into()
}
fn default_max_library_file_size() -> String {
    "250Mi".into()
}
fn default_offline_queue_timeout() -> String {
    "72h".into()
}
fn default_command_retention() -> String {
    "720h".into()
}
fn default_max_output_size() -> String {
    "64Mi".into()
}

/// What the operator observed of the settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettingsStatus {
    /// Standard conditions (`Valid`: every trusted signer line parses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
