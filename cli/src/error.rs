//! The crate's one error type. Messages are written for the analyst: an API server refusal
//! (RBAC, an admission policy) is shown with the server's own text, because that text
//! names the command and the role that is missing.

use liveresponse_api::command::ParseError;
use liveresponse_api::crd::SessionPhase;

/// Exit status for success.
pub const EXIT_OK: i32 = 0;
/// Exit status when the work was attempted and did not succeed: a command that failed,
/// was cancelled or timed out, a session that was rejected, a refusal by the API server.
pub const EXIT_FAILED: i32 = 1;
/// Exit status for a command line that could not be understood; nothing was created.
pub const EXIT_USAGE: i32 = 2;
/// Exit status after the analyst stopped waiting with Ctrl+C (128 + SIGINT, as shells do).
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error("cannot find a Kubernetes configuration: {0}")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("{}", kube_message(.0))]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{0}")]
    Usage(String),
    #[error("the API server did not say who you are: its SelfSubjectReview has no username")]
    NoUsername,
    #[error("session {name} is {phase:?}{}", message_suffix(.message))]
    SessionEnded {
        name: String,
        phase: SessionPhase,
        message: Option<String>,
    },
    #[error("session {name} is for device {actual}, not {wanted}")]
    WrongDevice {
        name: String,
        actual: String,
        wanted: String,
    },
    #[error("{kind} {name} was deleted")]
    Deleted { kind: &'static str, name: String },
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("interrupted by Ctrl+C")]
    Interrupted,
    #[error("timed out after {0}s waiting for the operator")]
    Timeout(u64),
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("terminal: {0}")]
    Readline(#[from] rustyline::error::ReadlineError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("internal error: a background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Parse(_) | Error::Usage(_) => EXIT_USAGE,
            Error::Interrupted => EXIT_INTERRUPTED,
            _ => EXIT_FAILED,
        }
    }
}

impl From<kube::runtime::watcher::Error> for Error {
    fn from(err: kube::runtime::watcher::Error) -> Self {
        use kube::runtime::watcher::Error as W;
        match err {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => Error::Kube(e),
            W::WatchError(status) => Error::Kube(kube::Error::Api(status)),
            W::NoResourceVersion => Error::Usage(err.to_string()),
        }
    }
}

fn message_suffix(message: &Option<String>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

/// The API server's message verbatim when it answered; otherwise say the server could
/// not be reached, which is what every other kube error amounts to for an analyst.
pub fn kube_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(_) => detail(err),
        other => format!("cannot reach the API server: {other}"),
    }
}

/// What went wrong, without the "cannot reach" framing, for lines that already say the
/// connection was lost.
pub fn detail(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        kube::Error::Api(status) => {
            format!("the API server answered {} {}", status.code, status.reason)
        }
        other => other.to_string(),
    }
}

/// [`detail`] for the watcher's errors.
pub fn watch_detail(err: &kube::runtime::watcher::Error) -> String {
    use kube::runtime::watcher::Error as W;
    match err {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => detail(e),
        W::WatchError(status) => detail(&kube::Error::Api(status.clone())),
        W::NoResourceVersion => err.to_string(),
    }
}

/// A watch whose resourceVersion expired (410 Gone): the watcher relists by itself, so
/// this is not worth telling the analyst about.
pub fn is_expired_watch(err: &kube::runtime::watcher::Error) -> bool {
    matches!(err, kube::runtime::watcher::Error::WatchError(status) if status.code == 410)
}

/// Whether waiting and retrying can help: the server could not be reached or was
/// overloaded. A refusal (401, 403, 404, 422...) will not change by retrying.
pub fn is_transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => matches!(status.code, 408 | 410 | 429) || status.code >= 500,
        _ => true,
    }
}

/// [`is_transient`] for the watcher's errors.
pub fn is_transient_watch(err: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error as W;
    match err {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => is_transient(e),
        // 410 Gone (an expired resourceVersion) is routine: the watcher relists.
        W::WatchError(status) => matches!(status.code, 408 | 410 | 429) || status.code >= 500,
        W::NoResourceVersion => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.to_owned(),
            reason: "Forbidden".to_owned(),
            ..Default::default()
        }))
    }

    #[test]
    fn admission_refusal_is_shown_verbatim() {
        let msg = "commands.liveresponse.io \"s-1\" is forbidden: getfile is an advanced command: it needs the liveresponse-advanced role";
        let err = Error::from(api_error(403, msg));
        assert_eq!(err.to_string(), msg);
        assert_eq!(err.exit_code(), EXIT_FAILED);
        assert!(!is_transient(&api_error(403, msg)));
    }

    #[test]
    fn server_trouble_is_transient() {
        assert!(is_transient(&api_error(503, "unavailable")));
        assert!(is_transient(&api_error(429, "slow down")));
        assert!(!is_transient(&api_error(404, "not found")));
    }

    #[test]
    fn parse_errors_are_usage_errors() {
        let Err(err) = liveresponse_api::command::parse_line("procesess") else {
            panic!("procesess should not parse");
        };
        assert_eq!(Error::from(err).exit_code(), EXIT_USAGE);
    }
}
