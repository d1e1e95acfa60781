//! The Kubernetes client, built the way kubectl builds its own: from `--kubeconfig` (else
//! `KUBECONFIG`, else `~/.kube/config`, else the in-cluster service account) and
//! `--context`, so the analyst's own identity, RBAC and audit apply unchanged.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use liveresponse_api::crd::{Command, Device, LiveResponseSession};

use crate::error::{Error, Result, detail, is_transient};

/// Where to find the cluster; the global flags.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// A client and the namespace (tenant) every command works in.
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    pub namespace: String,
}

impl Ctx {
    pub async fn new(target: &Target) -> Result<Ctx> {
        let options = KubeConfigOptions {
            context: target.context.clone(),
            ..Default::default()
        };
        let config = match (&target.kubeconfig, &target.context) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(Error::Kubeconfig)?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(Error::Kubeconfig)?
            }
            // An explicit context only makes sense in a kubeconfig: no in-cluster fallback.
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(Error::Kubeconfig)?,
            (None, None) => Config::infer().await.map_err(Error::InferConfig)?,
        };
        let namespace = resolve_namespace(target.namespace.as_deref(), &config.default_namespace);
        let client = Client::try_from(config)?;
        Ok(Ctx { client, namespace })
    }

    pub fn sessions(&self) -> Api<LiveResponseSession> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn commands(&self) -> Api<Command> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn devices(&self) -> Api<Device> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The caller's user name as the API server authenticated it (what `kubectl auth
    /// whoami` prints): the value admission expects in `spec.requestedBy`.
    pub async fn whoami(&self) -> Result<String> {
        let api: Api<SelfSubjectReview> = Api::all(self.client.clone());
        let review = api
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await?;
        review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .filter(|u| !u.is_empty())
            .ok_or(Error::NoUsername)
    }
}

/// `-n` wins; then the kubeconfig context's namespace (kube already falls back to
/// `default` when the context has none).
pub fn resolve_namespace(flag: Option<&str>, from_config: &str) -> String {
    match flag {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ if !from_config.is_empty() => from_config.to_owned(),
        _ => "default".to_owned(),
    }
}

/// Backoff between retries of an idempotent call while the API server is unreachable.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 250u64.saturating_mul(1u64 << attempt.min(5));
    Duration::from_millis(ms.min(8_000))
}

/// Runs an idempotent API call (a get or a merge patch) until it succeeds or is refused,
/// telling `notice` about each failed attempt.
pub async fn retry<T, F, Fut>(mut notice: impl FnMut(String), mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(err) if is_transient(&err) => {
                notice(lost_connection(&detail(&err)));
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// A JSON merge patch of `spec` fields (the only writes the CLI makes after creating).
pub async fn merge_patch<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

/// The line shown while the API server cannot be reached.
pub fn lost_connection(detail: &str) -> String {
    format!("lost connection to the API server: {detail}; retrying")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_flag_wins_then_context_then_default() {
        assert_eq!(resolve_namespace(Some("team-a"), "ctx-ns"), "team-a");
        assert_eq!(resolve_namespace(None, "ctx-ns"), "ctx-ns");
        assert_eq!(resolve_namespace(Some(""), ""), "default");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(250));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(30), Duration::from_secs(8));
    }
}
