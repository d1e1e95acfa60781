//! The LibraryFile controller: fetch → [`decide`] → apply. It reads the file's content
//! (inline, a ConfigMap or Secret key, or an uploaded artifact), checks its size against the
//! namespace's `maxLibraryFileSize`, its digest against the `sha256` pin and its signature
//! against the namespace's `trustedSigners`, and records what it found in the status, which
//! only this controller writes.
//!
//! It runs again when the referenced ConfigMap or Secret changes and when the namespace's
//! settings change (see `main.rs`). Nothing here logs or records file contents or Secret
//! values: only names, sizes, digests and key fingerprints.
//!
//! An unsigned file is Ready with `signed: false`: whether unsigned content may run is
//! decided on the device, at run time, with the settings of that moment.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use liveresponse_api::crd::{
    LibraryFile, LibraryFilePhase, LibraryFileSpec, LibraryFileStatus, OutputFormat, SettingsSpec,
    parse_size,
};
use liveresponse_api::signing;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::artifacts::StoreError;
use crate::context::Context;
use crate::error::Result;
use crate::status::set_condition;

/// `maxLibraryFileSize` when the settings do not say (or say something unreadable).
pub const DEFAULT_MAX_SIZE: u64 = 250 << 20;

/// How soon to look again for an artifact that is not uploaded yet: nothing announces an
/// upload to this controller.
const ARTIFACT_RETRY: Duration = Duration::from_secs(30);

/// Why the content could not be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchProblem {
    /// The ConfigMap, Secret, key or artifact does not exist; says which and what to do.
    Missing(String),
    /// Larger than the limit; `size` when it is known.
    TooLarge { size: Option<u64>, limit: u64 },
    /// Present but unusable (an artifact whose bytes no longer match their digest).
    Unusable(String),
}

/// The namespace's `maxLibraryFileSize` in bytes.
pub fn max_size(settings: &SettingsSpec) -> u64 {
    parse_size(&settings.max_library_file_size).unwrap_or(DEFAULT_MAX_SIZE)
}

/// The status a library file should have. Pure: the content (or why there is none), the
/// namespace's settings and the time come in; the previous status only keeps each
/// condition's `lastTransitionTime` when its status did not change.
pub fn decide(
    lf: &LibraryFile,
    fetched: Result<Vec<u8>, FetchProblem>,
    settings: &SettingsSpec,
    now: jiff::Timestamp,
) -> LibraryFileStatus {
    let spec = &lf.spec;
    let mut st = LibraryFileStatus {
        conditions: lf
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        observed_generation: lf.metadata.generation,
        ..Default::default()
    };
    let verdict = judge(spec, fetched, settings, &mut st);
    let (ready, reason, message) = match verdict {
        Ok((reason, message)) => {
            st.phase = Some(LibraryFilePhase::Ready);
            (true, reason, message)
        }
        Err((reason, message)) => {
            st.phase = Some(LibraryFilePhase::Invalid);
            st.message = Some(message.clone());
            (false, reason, message)
        }
    };
    set_condition(
        &mut st.conditions,
        "Ready",
        ready,
        reason,
        &message,
        lf.metadata.generation,
        now,
    );
    st
}

type Verdict = std::result::Result<(&'static str, String), (&'static str, String)>;

/// Fills size, digest and signer into `st`; the condition's reason and message.
fn judge(
    spec: &LibraryFileSpec,
    fetched: Result<Vec<u8>, FetchProblem>,
    settings: &SettingsSpec,
    st: &mut LibraryFileStatus,
) -> Verdict {
    let limit = max_size(settings);
    let content = match fetched {
        Ok(c) => c,
        Err(FetchProblem::Missing(m)) => return Err(("ContentMissing", m)),
        Err(FetchProblem::Unusable(m)) => return Err(("ContentUnusable", m)),
        Err(FetchProblem::TooLarge { size, limit }) => {
            st.size = size.and_then(|s| i64::try_from(s).ok());
            return Err(("TooLarge", too_large(size, limit)));
        }
    };
    let size = content.len() as u64;
    st.size = i64::try_from(size).ok();
    if size > limit {
        return Err(("TooLarge", too_large(Some(size), limit)));
    }
    let digest = hex::encode(Sha256::digest(&content));
    st.sha256 = Some(digest.clone());
    if let Some(pin) = &spec.sha256
        && !pin.eq_ignore_ascii_case(&digest)
    {
        return Err((
            "DigestMismatch",
            format!(
                "the content's SHA-256 is {digest}, but spec.sha256 pins {pin}: the source changed since the pin was written; update spec.sha256 (and the signature) if the new content is intended, or restore the pinned content"
            ),
        ));
    }
    if let Some(sig) = spec.signature.as_deref().filter(|s| !s.trim().is_empty()) {
        return match signing::verify(&content, sig, &settings.trusted_signers) {
            Ok(principal) => {
                st.signed = true;
                st.signer = Some(principal.clone());
                Ok((
                    "Signed",
                    format!("{size} bytes, sha256 {digest}, signed by {principal}"),
                ))
            }
            Err(e) => Err(("SignatureInvalid", format!("signature rejected: {e}"))),
        };
    }
    let note = if settings.allow_unsigned_scripts {
        "unsigned; devices use it because the namespace's allowUnsignedScripts is true"
    } else {
        "unsigned: devices refuse to run or put it while the namespace's allowUnsignedScripts is false; add spec.signature (ssh-keygen -Y sign -n liveresponse.io) from a key in trustedSigners"
    };
    Ok(("Unsigned", format!("{size} bytes, sha256 {digest}; {note}")))
}

fn too_large(size: Option<u64>, limit: u64) -> String {
    let what = match size {
        Some(s) => format!("the content is too large: {s} bytes"),
        None => "the content is too large".to_string(),
    };
    format!(
        "{what}, more than the namespace's maxLibraryFileSize ({limit} bytes); use a smaller file, or have a settings admin raise maxLibraryFileSize in LiveResponseSettings"
    )
}

// ---------------------------------------------------------------------------------------
// the `library` command's answer

/// One output record of `library`: what an analyst needs to pick a file and call it.
pub fn record(lf: &LibraryFile) -> serde_json::Value {
    let st = lf.status.clone().unwrap_or_default();
    let params = lf.spec.parameters.as_ref();
    json!({
        "name": lf.name_any(),
        "fileName": lf.spec.file_name,
        "phase": st.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into()),
        "size": st.size,
        "sha256": st.sha256,
        "signed": st.signed,
        "signer": st.signer,
        "description": lf.spec.description,
        "parameters": params.and_then(|p| p.description.clone()),
        "example": params.and_then(|p| p.example.clone()),
        "message": st.message,
        "analysis": lf.spec.analysis.map(|a| a.wire_name()),
    })
}

/// The `library` command's output: one record per file, sorted by file name, rendered
/// with the `library` command's registry columns (table) or as a JSON array.
pub fn listing(files: &[LibraryFile], format: OutputFormat) -> String {
    let mut sorted: Vec<&LibraryFile> = files.iter().collect();
    sorted
        .sort_by(|a, b| (&a.spec.file_name, a.name_any()).cmp(&(&b.spec.file_name, b.name_any())));
    let records: Vec<serde_json::Value> = sorted.into_iter().map(record).collect();
    match liveresponse_api::command::find("library") {
        Some(spec) => liveresponse_api::output::render(spec, &records, format),
        // The registry always has `library`; JSON still says everything if it did not.
        None => serde_json::to_string_pretty(&records).unwrap_or_else(|_| "[]".into()),
    }
}

// ---------------------------------------------------------------------------------------
// fetch and apply

/// The LibraryFiles of `ns` whose source names this ConfigMap (or Secret), for the watches
/// that re-validate a file when its source changes.
pub fn referencing(
    store: &Store<LibraryFile>,
    ns: &str,
    name: &str,
    secret: bool,
) -> Vec<ObjectRef<LibraryFile>> {
    store
        .state()
        .into_iter()
        .filter(|lf| lf.namespace().as_deref() == Some(ns))
        .filter(|lf| {
            let r = if secret {
                lf.spec.source.secret_ref.as_ref()
            } else {
                lf.spec.source.config_map_ref.as_ref()
            };
            r.is_some_and(|r| r.name == name)
        })
        .map(|lf| ObjectRef::from_obj(lf.as_ref()))
        .collect()
}

/// Every LibraryFile of `ns` (its settings changed).
pub fn in_namespace(store: &Store<LibraryFile>, ns: &str) -> Vec<ObjectRef<LibraryFile>> {
    store
        .state()
        .into_iter()
        .filter(|lf| lf.namespace().as_deref() == Some(ns))
        .map(|lf| ObjectRef::from_obj(lf.as_ref()))
        .collect()
}

fn bounded(bytes: Vec<u8>, limit: u64) -> Result<Vec<u8>, FetchProblem> {
    let size = bytes.len() as u64;
    if size > limit {
        return Err(FetchProblem::TooLarge {
            size: Some(size),
            limit,
        });
    }
    Ok(bytes)
}

/// Reads the content, at most `limit` bytes of it where the source allows. An `Err` of the
/// outer result is a failure to ask (the API server, the store), retried; the inner one is
/// a verdict on the file.
async fn fetch(
    lf: &LibraryFile,
    ctx: &Context,
    limit: u64,
) -> Result<Result<Vec<u8>, FetchProblem>> {
    let ns = lf.namespace().unwrap_or_default();
    read_source(&ctx.client, &ctx.artifacts, &ns, &lf.spec.source, limit).await
}

/// Reads a library source as it is now (the gateway serves devices from it too, so what a
/// device gets is the source's current content, which the device checks against the pin).
pub async fn read_source(
    client: &kube::Client,
    artifacts: &crate::artifacts::ArtifactStore,
    ns: &str,
    src: &liveresponse_api::crd::LibrarySource,
    limit: u64,
) -> Result<Result<Vec<u8>, FetchProblem>> {
    let ns = ns.to_string();
    if let Some(text) = &src.inline {
        return Ok(bounded(text.clone().into_bytes(), limit));
    }
    if let Some(r) = &src.config_map_ref {
        // A ConfigMap is at most 1 MiB and the API server returns it whole.
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let Some(cm) = api.get_opt(&r.name).await? else {
            return Ok(Err(FetchProblem::Missing(format!(
                "ConfigMap {} does not exist in namespace {ns}; create it, or fix spec.source.configMapRef",
                r.name
            ))));
        };
        let binary = cm
            .binary_data
            .and_then(|mut d| d.remove(&r.key))
            .map(|b| b.0);
        let text = || {
            cm.data
                .and_then(|mut d| d.remove(&r.key))
                .map(String::into_bytes)
        };
        return Ok(match binary.or_else(text) {
            Some(bytes) => bounded(bytes, limit),
            None => Err(FetchProblem::Missing(format!(
                "ConfigMap {} has no key {} in binaryData or data; add it, or fix spec.source.configMapRef.key",
                r.name, r.key
            ))),
        });
    }
    if let Some(r) = &src.secret_ref {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let Some(secret) = api.get_opt(&r.name).await? else {
            return Ok(Err(FetchProblem::Missing(format!(
                "Secret {} does not exist in namespace {ns}; create it, or fix spec.source.secretRef",
                r.name
            ))));
        };
        return Ok(match secret.data.and_then(|mut d| d.remove(&r.key)) {
            Some(bytes) => bounded(bytes.0, limit),
            None => Err(FetchProblem::Missing(format!(
                "Secret {} has no key {}; add it, or fix spec.source.secretRef.key",
                r.name, r.key
            ))),
        });
    }
    if let Some(sha) = &src.artifact {
        return match artifacts.read_bounded(sha, limit).await {
            Ok(Some(bytes)) => Ok(Ok(bytes)),
            Ok(None) => Ok(Err(FetchProblem::Missing(format!(
                "no artifact {sha} is uploaded; upload the file with `kubectl liveresponse library upload`, or fix spec.source.artifact"
            )))),
            Err(StoreError::TooLarge { limit }) => Ok(Err(FetchProblem::TooLarge {
                size: artifacts.size_of(sha).await.ok().flatten(),
                limit,
            })),
            Err(StoreError::DigestMismatch { got, .. }) => {
                Ok(Err(FetchProblem::Unusable(format!(
                    "the artifact store holds other bytes (SHA-256 {got}) under {sha}: the store was altered; upload the file again"
                ))))
            }
            Err(e) => Err(crate::error::Error::Invalid(e.to_string())),
        };
    }
    Ok(Err(FetchProblem::Missing(
        "spec.source sets none of configMapRef, secretRef, inline or artifact; set exactly one"
            .into(),
    )))
}

/// The merge patch that makes the status `st`, refused if the file changed since it was
/// read. Fields `st` leaves out are sent as null: a merge patch keeps what it does not
/// mention, and a stale `message` or `signer` must not outlive the verdict it belonged to.
pub fn status_patch(lf: &LibraryFile, st: &LibraryFileStatus) -> Result<serde_json::Value> {
    let mut status = serde_json::to_value(st)?;
    if let Some(fields) = status.as_object_mut() {
        for k in [
            "phase",
            "size",
            "sha256",
            "signer",
            "message",
            "conditions",
            "observedGeneration",
        ] {
            fields.entry(k).or_insert(serde_json::Value::Null);
        }
    }
    Ok(json!({
        "metadata": { "resourceVersion": lf.resource_version() },
        "status": status,
    }))
}

#[tracing::instrument(skip_all, fields(namespace = lf.namespace().unwrap_or_default(), name = %lf.name_any()))]
pub async fn reconcile(lf: Arc<LibraryFile>, ctx: Arc<Context>) -> Result<Action> {
    let ns = lf.namespace().unwrap_or_default();
    let name = lf.name_any();
    if lf.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Read the settings from the API server, not the cache: a settings change is what
    // woke this reconcile, and the cache may not have it yet.
    let settings_api: Api<liveresponse_api::crd::LiveResponseSettings> =
        Api::namespaced(ctx.client.clone(), &ns);
    let settings = settings_api
        .get_opt("default")
        .await?
        .map(|s| s.spec)
        .unwrap_or_default();
    let fetched = fetch(&lf, &ctx, max_size(&settings)).await?;
    let artifact_missing =
        lf.spec.source.artifact.is_some() && matches!(fetched, Err(FetchProblem::Missing(_)));
    let st = decide(&lf, fetched, &settings, jiff::Timestamp::now());
    if lf.status.as_ref() != Some(&st) {
        let api: Api<LibraryFile> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = status_patch(&lf, &st)?;
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            // Changed since it was read: the newer version is on its way.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            Err(e) => return Err(e.into()),
        }
        let before = lf.status.as_ref().and_then(|s| s.phase);
        if before != st.phase || before == Some(LibraryFilePhase::Invalid) {
            let invalid = st.phase == Some(LibraryFilePhase::Invalid);
            let note = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            tracing::info!(phase = ?st.phase, sha256 = st.sha256.as_deref().unwrap_or(""), signed = st.signed, "library file checked");
            ctx.event(
                lf.as_ref(),
                invalid,
                if invalid { "Invalid" } else { "Ready" },
                note,
            )
            .await;
        }
    }
    ctx.reset_backoff("library", &ns, &name);
    Ok(if artifact_missing {
        Action::requeue(ARTIFACT_RETRY)
    } else {
        Action::await_change()
    })
}

#[cfg(test)]
#[path = "library_tests.rs"]
mod tests;
