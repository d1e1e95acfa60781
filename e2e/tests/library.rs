//! The library on the real control plane: the operator checks each LibraryFile's content
//! (inline or from a ConfigMap), its digest pin, its size limit and its SSH signature
//! against the namespace's trusted signers, and checks again when the ConfigMap changes.
//! Library files are written by the library-admin user, ConfigMaps and settings by admin.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::eventually;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{
    KeyRef, LibraryFile, LibraryFilePhase, LibraryFileSpec, LibraryFileStatus, LibrarySource,
};
use sha2::{Digest, Sha256};

use crate::Env;

const T: Duration = Duration::from_secs(60);

// Signed once with OpenSSH (`ssh-keygen -Y sign -n liveresponse.io`); see
// api/testdata/sshsig/README.md.
const SCRIPT: &str = include_str!("../../api/testdata/sshsig/script.sh");
const ALLOWED: &str = include_str!("../../api/testdata/sshsig/allowed_signers");
const ED25519_SIG: &str = include_str!("../../api/testdata/sshsig/script.sh.ed25519.sig");
const ECDSA_SIG: &str = include_str!("../../api/testdata/sshsig/script.sh.ecdsa.sig");

/// The fixture's allowed-signers line of the ed25519 key (principal alice@example.com).
fn alice() -> Result<&'static str> {
    ALLOWED
        .lines()
        .find(|l| l.contains("ssh-ed25519"))
        .context("the fixture's ed25519 line")
}

pub(crate) fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub(crate) fn spec(file_name: &str, source: LibrarySource) -> LibraryFileSpec {
    LibraryFileSpec {
        file_name: file_name.into(),
        description: Some("e2e library file".into()),
        parameters: None,
        source,
        sha256: None,
        signature: None,
        analysis: None,
    }
}

pub(crate) fn inline(text: &str) -> LibrarySource {
    LibrarySource {
        inline: Some(text.into()),
        ..Default::default()
    }
}

pub(crate) fn from_config_map(name: &str, key: &str) -> LibrarySource {
    LibrarySource {
        config_map_ref: Some(KeyRef {
            name: name.into(),
            key: key.into(),
        }),
        ..Default::default()
    }
}

/// Applies a LibraryFile as the library-admin user.
pub(crate) async fn put(env: &Env, ns: &str, name: &str, spec: LibraryFileSpec) -> Result<()> {
    let api: Api<LibraryFile> = Api::namespaced(env.cluster.client("library-admin").await?, ns);
    api.patch(
        name,
        &PatchParams::apply("e2e-library").force(),
        &Patch::Apply(LibraryFile::new(name, spec)),
    )
    .await
    .with_context(|| format!("applying LibraryFile {name} as library-admin"))?;
    Ok(())
}

/// Applies a ConfigMap with one key as admin.
pub(crate) async fn config_map(
    env: &Env,
    ns: &str,
    name: &str,
    key: &str,
    text: &str,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(env.cluster.client("admin").await?, ns);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name },
        "data": { key: text },
    });
    api.patch(
        name,
        &PatchParams::apply("e2e-library").force(),
        &Patch::Apply(cm),
    )
    .await
    .with_context(|| format!("applying ConfigMap {name}"))?;
    Ok(())
}

/// Waits until the operator checked the current generation and `want` holds of the status.
pub(crate) async fn status_where(
    env: &Env,
    ns: &str,
    name: &str,
    what: &str,
    want: impl Fn(&LibraryFileStatus) -> bool,
) -> Result<LibraryFileStatus> {
    let api: Api<LibraryFile> = Api::namespaced(env.cluster.client("admin").await?, ns);
    let last = std::sync::Mutex::new(None);
    let r = eventually(&format!("LibraryFile {name}: {what}"), T, || async {
        let lf = api.get(name).await?;
        let Some(st) = lf.status.clone() else {
            return Ok(None);
        };
        if let Ok(mut l) = last.lock() {
            *l = Some(st.clone());
        }
        let current = st.observed_generation == lf.metadata.generation;
        Ok((current && want(&st)).then_some(st))
    })
    .await;
    r.with_context(|| {
        format!(
            "last status seen: {:?}",
            last.lock().ok().and_then(|l| l.clone())
        )
    })
}

fn message(st: &LibraryFileStatus) -> &str {
    st.message.as_deref().unwrap_or_default()
}

/// An inline script is Ready with its digest and size, unsigned.
pub async fn inline_script_is_ready_with_its_digest(env: &'static Env) -> Result<()> {
    let ns = "lr-lib-inline";
    env.stack.tenant(ns, "")?;
    let text = "#!/bin/sh\necho inline\n";
    put(env, ns, "inline", spec("inline.sh", inline(text))).await?;
    let st = status_where(env, ns, "inline", "Ready", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;
    ensure!(
        st.sha256.as_deref() == Some(sha(text.as_bytes()).as_str()),
        "{st:?}"
    );
    ensure!(st.size == Some(text.len() as i64), "{st:?}");
    ensure!(!st.signed && st.signer.is_none(), "{st:?}");
    let ready = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("a Ready condition")?;
    ensure!(
        ready.status == "True" && ready.message.contains("allowUnsignedScripts"),
        "{ready:?}"
    );
    Ok(())
}

/// A ConfigMap-sourced file follows its ConfigMap: an edit changes the recorded digest, and
/// makes a file whose sha256 pin no longer matches Invalid, naming both digests.
pub async fn config_map_edits_are_followed_and_pins_enforced(env: &'static Env) -> Result<()> {
    let ns = "lr-lib-cm";
    env.stack.tenant(ns, "")?;
    let (v1, v2, v3) = (
        "echo version 1\n",
        "echo version 2\n",
        "echo version 3, not pinned\n",
    );
    config_map(env, ns, "scripts", "collect.sh", v1).await?;
    put(
        env,
        ns,
        "follows",
        spec("collect.sh", from_config_map("scripts", "collect.sh")),
    )
    .await?;
    status_where(env, ns, "follows", "v1's digest", |st| {
        st.phase == Some(LibraryFilePhase::Ready) && st.sha256 == Some(sha(v1.as_bytes()))
    })
    .await?;

    config_map(env, ns, "scripts", "collect.sh", v2).await?;
    status_where(env, ns, "follows", "v2's digest after the edit", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
            && st.sha256 == Some(sha(v2.as_bytes()))
            && st.size == Some(v2.len() as i64)
    })
    .await?;

    let mut pinned = spec(
        "collect-pinned.sh",
        from_config_map("scripts", "collect.sh"),
    );
    pinned.sha256 = Some(sha(v2.as_bytes()));
    put(env, ns, "pinned", pinned).await?;
    status_where(env, ns, "pinned", "Ready with the pinned content", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;

    config_map(env, ns, "scripts", "collect.sh", v3).await?;
    let st = status_where(env, ns, "pinned", "Invalid after the edit", |st| {
        st.phase == Some(LibraryFilePhase::Invalid)
    })
    .await?;
    let m = message(&st);
    ensure!(
        m.contains(&sha(v2.as_bytes())) && m.contains(&sha(v3.as_bytes())),
        "the message names both digests: {m}"
    );
    status_where(env, ns, "follows", "v3's digest", |st| {
        st.sha256 == Some(sha(v3.as_bytes()))
    })
    .await?;

    // A key that is not in the ConfigMap is explained.
    put(
        env,
        ns,
        "wrong-key",
        spec("nothing.sh", from_config_map("scripts", "nothing.sh")),
    )
    .await?;
    let st = status_where(env, ns, "wrong-key", "Invalid", |st| {
        st.phase == Some(LibraryFilePhase::Invalid)
    })
    .await?;
    ensure!(
        message(&st).contains("no key nothing.sh"),
        "{}",
        message(&st)
    );
    Ok(())
}

/// A file signed with ssh-keygen by a trusted key is signed by that principal; one signed
/// by a key the settings do not list is Invalid and says the key is untrusted.
pub async fn signatures_are_checked_against_trusted_signers(env: &'static Env) -> Result<()> {
    let ns = "lr-lib-signed";
    let alice = alice()?;
    env.stack.tenant(
        ns,
        &format!("  trustedSigners:\n  - {}\n", serde_json::to_string(alice)?),
    )?;

    let mut good = spec("signed.sh", inline(SCRIPT));
    good.signature = Some(ED25519_SIG.into());
    put(env, ns, "signed", good).await?;
    let st = status_where(env, ns, "signed", "Ready and signed", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;
    ensure!(st.signed, "{st:?}");
    ensure!(st.signer.as_deref() == Some("alice@example.com"), "{st:?}");

    // The ECDSA key of the fixture signed the same content, but is not trusted here.
    let mut other = spec("other.sh", inline(SCRIPT));
    other.signature = Some(ECDSA_SIG.into());
    put(env, ns, "other", other).await?;
    let st = status_where(env, ns, "other", "Invalid", |st| {
        st.phase == Some(LibraryFilePhase::Invalid)
    })
    .await?;
    ensure!(!st.signed, "{st:?}");
    let m = message(&st);
    ensure!(
        m.contains("untrusted") && m.contains("trustedSigners") && m.contains("SHA256:"),
        "an untrusted message with the key's fingerprint: {m}"
    );

    // Trusting that key too (a settings change) makes it signed, with no edit of the file.
    let ops = ALLOWED
        .lines()
        .find(|l| l.contains("ecdsa-sha2-nistp256"))
        .context("the fixture's ecdsa line")?;
    let settings = serde_json::json!({ "spec": { "trustedSigners": [alice, ops] } });
    env.cluster.kubectl_ok(
        "admin",
        &[
            "-n",
            ns,
            "patch",
            "lrset",
            "default",
            "--type=merge",
            "-p",
            &settings.to_string(),
        ],
        None,
    )?;
    let st = status_where(env, ns, "other", "Ready once its key is trusted", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;
    ensure!(
        st.signed && st.signer.as_deref() == Some("ops@example.com"),
        "{st:?}"
    );
    Ok(())
}

/// Content over the namespace's maxLibraryFileSize is Invalid, "too large".
pub async fn oversized_content_is_invalid(env: &'static Env) -> Result<()> {
    let ns = "lr-lib-size";
    env.stack.tenant(ns, "  maxLibraryFileSize: 1Ki\n")?;
    put(
        env,
        ns,
        "small",
        spec("small.sh", inline(&"a".repeat(1024))),
    )
    .await?;
    put(env, ns, "big", spec("big.sh", inline(&"a".repeat(1025)))).await?;
    status_where(env, ns, "small", "Ready at exactly the limit", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;
    let st = status_where(env, ns, "big", "Invalid", |st| {
        st.phase == Some(LibraryFilePhase::Invalid)
    })
    .await?;
    let m = message(&st);
    ensure!(
        m.contains("too large") && m.contains("maxLibraryFileSize"),
        "{m}"
    );
    ensure!(st.size == Some(1025), "{st:?}");
    Ok(())
}

/// `kubectl liveresponse library upload`: the content goes through the file API (only a
/// library admin may), a LibraryFile names it by sha256 and the operator verifies the
/// signature; content over maxLibraryFileSize is refused before it is stored.
pub async fn upload_through_the_file_api(env: &'static Env) -> Result<()> {
    let ns = "lr-lib-upload";
    let alice = alice()?;
    env.stack.tenant(
        ns,
        &format!(
            "  maxLibraryFileSize: 4Ki\n  trustedSigners:\n  - {}\n",
            serde_json::to_string(alice)?
        ),
    )?;
    let dir = e2e::fixture::host_root("library-upload")?;
    let script = dir.join("Triage Script.sh");
    std::fs::write(&script, SCRIPT)?;
    let sig = dir.join("triage.sig");
    std::fs::write(&sig, ED25519_SIG)?;
    let (script_s, sig_s) = (
        script.to_string_lossy().into_owned(),
        sig.to_string_lossy().into_owned(),
    );
    let upload = [
        "-n",
        ns,
        "library",
        "upload",
        &script_s,
        "--signature",
        &sig_s,
    ];

    let (ok, _, err) = e2e::lr::cli(&env.cluster, "analyst-advanced", &upload)?;
    ensure!(
        !ok && err.contains("forbidden"),
        "an analyst could upload: {err}"
    );

    let (ok, out, err) = e2e::lr::cli(&env.cluster, "library-admin", &upload)?;
    ensure!(ok, "upload failed: {err}");
    ensure!(
        out.contains("libraryfile/triage-script.sh Ready")
            && out.contains("signed by alice@example.com"),
        "{out}"
    );
    let api: Api<LibraryFile> = Api::namespaced(env.cluster.client("admin").await?, ns);
    let lf = api.get("triage-script.sh").await?;
    ensure!(
        lf.spec.source.artifact.as_deref() == Some(sha(SCRIPT.as_bytes()).as_str())
            && lf.spec.file_name == "Triage Script.sh",
        "{:?}",
        lf.spec
    );

    // A rule file for analyze and scan: the same upload with --analysis.
    let rules = dir.join("webshells.yar");
    std::fs::write(&rules, "rule x { strings: $a = \"eval(\" condition: $a }\n")?;
    let (ok, _, err) = e2e::lr::cli(
        &env.cluster,
        "library-admin",
        &[
            "-n",
            ns,
            "library",
            "upload",
            &rules.to_string_lossy(),
            "--analysis",
            "yara",
        ],
    )?;
    ensure!(ok, "upload --analysis yara failed: {err}");
    let lf = api.get("webshells.yar").await?;
    ensure!(
        lf.spec.analysis == Some(liveresponse_api::crd::AnalysisRules::Yara),
        "the rule file's kind: {:?}",
        lf.spec.analysis
    );

    let big = dir.join("big.sh");
    std::fs::write(&big, "#".repeat(8 << 10))?;
    let (ok, _, err) = e2e::lr::cli(
        &env.cluster,
        "library-admin",
        &["-n", ns, "library", "upload", &big.to_string_lossy()],
    )?;
    ensure!(!ok && err.contains("maxLibraryFileSize"), "{err}");
    ensure!(
        api.get_opt("big.sh").await?.is_none(),
        "an oversized upload was named"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
