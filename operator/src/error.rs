//! The operator's one error type.

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate authority: {0}")]
    Pki(String),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("gateway: {0}")]
    Gateway(String),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Pki(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
