//! `kubectl liveresponse library upload FILE`: the content goes through the file API (the
//! API server checks `create` on `libraryfiles/content` and audits it), then a LibraryFile
//! names it by sha256; the operator checks size, pin and signature and says Ready or
//! Invalid, which this waits for.

use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{AnalysisRules, LibraryFile, LibraryFilePhase};
use sha2::{Digest, Sha256};

use crate::client::Ctx;
use crate::error::{Error, Result};

/// A LibraryFile name from a file name: `Collect Logs.sh` → `collect-logs.sh`.
pub fn object_name(file_name: &str) -> String {
    let mut out = String::new();
    for c in file_name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut name: String = trimmed.chars().take(253).collect();
    if name.is_empty() {
        name = "library-file".into();
    }
    name
}

pub struct Upload<'a> {
    pub file: &'a Path,
    pub name: Option<&'a str>,
    pub signature: Option<&'a Path>,
    pub description: Option<&'a str>,
    /// Makes it a rule file for analyze and scan.
    pub analysis: Option<AnalysisRules>,
}

/// `yara` or `sha256` (the console's and the plugin's spelling) as the LibraryFile's.
pub fn analysis_of(name: &str) -> Option<AnalysisRules> {
    match name {
        "yara" => Some(AnalysisRules::Yara),
        "sha256" => Some(AnalysisRules::Sha256List),
        _ => None,
    }
}

pub async fn upload(ctx: &Ctx, u: &Upload<'_>) -> Result<()> {
    let file_name = u
        .file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Usage(format!("{} is not a file", u.file.display())))?;
    let content = std::fs::read(u.file)?;
    let signature = match u.signature {
        Some(p) => Some(std::fs::read_to_string(p)?),
        None => None,
    };
    let sha = hex::encode(Sha256::digest(&content));
    let name = u
        .name
        .map(str::to_string)
        .unwrap_or_else(|| object_name(&file_name));
    let path = format!(
        "/apis/files.liveresponse.io/v1alpha1/namespaces/{}/libraryfiles/{name}/content",
        ctx.namespace
    );
    let req = http::Request::post(path)
        .header("content-type", "application/octet-stream")
        .header("x-content-sha256", &sha)
        .body(content)
        .map_err(|e| Error::Usage(e.to_string()))?;
    crate::download::send(
        ctx,
        req,
        "uploads need create on libraryfiles/content in files.liveresponse.io: the liveresponse-library-admin role",
    )
    .await?;
    let api: Api<LibraryFile> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let obj = serde_json::json!({
        "apiVersion": "liveresponse.io/v1alpha1",
        "kind": "LibraryFile",
        "metadata": { "name": name },
        "spec": {
            "fileName": file_name,
            "description": u.description,
            "source": { "artifact": sha },
            "sha256": sha,
            "signature": signature,
        },
    });
    // Only when asked: the CRD's enum takes no null, and a script has no analysis kind.
    let mut obj = obj;
    if let Some(kind) = u.analysis {
        obj["spec"]["analysis"] = serde_json::json!(kind);
    }
    api.patch(
        &name,
        &PatchParams::apply("kubectl-liveresponse").force(),
        &Patch::Apply(&obj),
    )
    .await?;
    // The operator's verdict, so a bad signature is seen now rather than at `run`.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lf = api.get(&name).await?;
        let st = lf.status.unwrap_or_default();
        let current = st.sha256.as_deref() == Some(sha.as_str())
            || st.phase == Some(LibraryFilePhase::Invalid);
        match st.phase {
            Some(LibraryFilePhase::Ready) if current => {
                println!(
                    "libraryfile/{name} Ready: {file_name}, {} bytes, sha256 {sha}{}",
                    st.size.unwrap_or_default(),
                    match st.signer {
                        Some(s) if st.signed => format!(", signed by {s}"),
                        _ => ", unsigned".into(),
                    }
                );
                return Ok(());
            }
            Some(LibraryFilePhase::Invalid) if lf.metadata.generation == st.observed_generation => {
                return Err(Error::Usage(format!(
                    "libraryfile/{name} is Invalid: {}",
                    st.message.unwrap_or_default()
                )));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            println!(
                "libraryfile/{name} uploaded (sha256 {sha}); the operator has not checked it yet"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_dns_subdomains() {
        assert_eq!(object_name("Collect Logs.sh"), "collect-logs.sh");
        assert_eq!(object_name("triage.sh"), "triage.sh");
        assert_eq!(object_name("--x--"), "x");
        assert_eq!(object_name("Ä"), "library-file");
        assert_eq!(object_name(".hidden"), "hidden");
    }
}
