//! Library files on the device: fetched from the operator for `putfile` and `run`, checked
//! here before anything is written in place or run, and the drop folder putfile fills.
//!
//! The operator says what it validated (`Execute.content`: size, SHA-256, signature, the
//! namespace's trusted signers); the bytes come separately (`Fetch`) from the source as it
//! is now. So the device refuses content that changed after validation, and content from an
//! altered store, whatever the operator serves. An agent started with `--trusted-signers`
//! trusts only its own list and never runs unsigned content, so even a compromised operator
//! cannot make it run what no trusted key signed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{Content, FetchRequest};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::provider::ExecError;

/// Name of the file that lists what putfile put without `-keep`: removed at the next start.
const TEMPORARY_LIST: &str = "drop-temporary";
/// How often a broken fetch is tried again (from where it stopped) before the command fails.
const FETCH_ATTEMPTS: u32 = 5;

/// Where library files go on this device, and whom it trusts.
#[derive(Clone, Debug)]
pub struct Files {
    /// The agent's state folder: run's scratch folders and the drop list live here.
    pub state_dir: PathBuf,
    /// putfile's destination.
    pub drop_dir: PathBuf,
    /// `--trusted-signers`: when set, only these signers are trusted and unsigned content
    /// is refused, whatever the operator says.
    pub own_signers: Option<Vec<String>>,
}

impl Files {
    pub fn new(state_dir: PathBuf, drop_dir: Option<PathBuf>) -> Self {
        Files {
            drop_dir: drop_dir.unwrap_or_else(|| state_dir.join("drop")),
            state_dir,
            own_signers: None,
        }
    }

    /// Deletes what putfile put without `-keep` before the agent last stopped.
    pub fn clean_drop(&self) {
        let list = self.state_dir.join(TEMPORARY_LIST);
        let Ok(text) = std::fs::read_to_string(&list) else {
            return;
        };
        for name in text.lines().filter(|n| is_plain_name(n)) {
            let path = self.drop_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a file putfile put without -keep")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a file putfile put without -keep")
                }
            }
        }
        let _ = std::fs::remove_file(list);
        // Scratch folders of runs the agent did not see end.
        let _ = std::fs::remove_dir_all(self.state_dir.join("run"));
        // Packages of collects: kept a day, so a transfer cut by this restart resumes on
        // the same bytes.
        let day = std::time::Duration::from_secs(24 * 3600);
        for e in std::fs::read_dir(self.state_dir.join("collect"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Records (or forgets, with `keep`) a putfile's file for removal at the next start.
    fn mark_temporary(&self, name: &str, keep: bool) -> std::io::Result<()> {
        let list = self.state_dir.join(TEMPORARY_LIST);
        let text = std::fs::read_to_string(&list).unwrap_or_default();
        let mut names: Vec<&str> = text.lines().filter(|n| *n != name).collect();
        if !keep {
            names.push(name);
        }
        let tmp = list.with_extension("tmp");
        std::fs::write(&tmp, names.join("\n") + "\n")?;
        std::fs::rename(tmp, list)
    }
}

/// A library file's name as a file name: one plain component.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains(['/', '\\', '\0'])
}

/// What was fetched and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// The principal whose signature was verified; `None` for allowed unsigned content.
    pub signer: Option<String>,
}

/// Fetches `content` for command `uid` into `dest` (created new), resuming from what is
/// already written when the stream breaks, then checks it. `channel` is asked again on
/// each attempt: the agent may have reconnected meanwhile.
pub async fn fetch(
    channel: impl Fn() -> Option<Channel>,
    uid: &str,
    content: &Content,
    dest: &Path,
    cancelled: &AtomicBool,
    deadline: Option<Instant>,
) -> Result<(), ExecError> {
    use tokio::io::AsyncWriteExt;
    let mut file = tokio::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(dest)
        .await
        .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", dest.display())))?;
    let mut written: u64 = 0;
    let mut last_error = String::new();
    for attempt in 0..FETCH_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt.min(4))).await;
        }
        let stop = || -> Result<(), ExecError> {
            if cancelled.load(Ordering::Relaxed) {
                return Err(ExecError::Cancelled);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ExecError::TimedOut);
            }
            Ok(())
        };
        stop()?;
        let Some(ch) = channel() else {
            last_error = "not connected to the gateway".into();
            continue;
        };
        let mut client = AgentGatewayClient::new(ch).max_decoding_message_size(4 << 20);
        let mut stream = match client
            .fetch(FetchRequest {
                command_uid: uid.to_string(),
                offset: written,
                // The gateway serves a rule file by its name, the command's content without.
                name: if content.analysis.is_empty() {
                    String::new()
                } else {
                    content.name.clone()
                },
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if is_final(&s) => {
                return Err(ExecError::Failed(format!(
                    "the operator cannot serve {}: {}",
                    content.name,
                    s.message()
                )));
            }
            Err(s) => {
                last_error = s.message().to_string();
                continue;
            }
        };
        loop {
            stop()?;
            match stream.message().await {
                Ok(Some(chunk)) => {
                    written += chunk.data.len() as u64;
                    // More than was validated can only be refused; stop reading it.
                    if written > content.size {
                        return Err(refusal(
                            content,
                            &format!("more than {} bytes", content.size),
                        ));
                    }
                    file.write_all(&chunk.data).await.map_err(|e| {
                        ExecError::Failed(format!("cannot write {}: {e}", dest.display()))
                    })?;
                }
                Ok(None) => {
                    file.sync_all().await.map_err(|e| {
                        ExecError::Failed(format!("cannot write {}: {e}", dest.display()))
                    })?;
                    return Ok(());
                }
                Err(s) if is_final(&s) => {
                    return Err(ExecError::Failed(format!(
                        "the operator stopped serving {}: {}",
                        content.name,
                        s.message()
                    )));
                }
                Err(s) => {
                    last_error = s.message().to_string();
                    break;
                }
            }
        }
    }
    Err(ExecError::Failed(format!(
        "cannot fetch library file {} from the operator after {FETCH_ATTEMPTS} attempts: {last_error}",
        content.name
    )))
}

fn is_final(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::PermissionDenied
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
            | tonic::Code::Unauthenticated
    )
}

fn refusal(content: &Content, what: &str) -> ExecError {
    ExecError::PermissionDenied(format!(
        "refused library file {}: the operator served {what}, not the {} bytes with SHA-256 {} that were validated. The file changed after it was validated, or the artifact store was altered; have a library admin check it (kubectl get libraryfile {})",
        content.name, content.size, content.sha256, content.name
    ))
}

/// Checks a fetched file against what was validated: size, SHA-256, then the signature
/// (or that unsigned content is allowed). Nothing is run or put in place before this.
pub fn verify(
    path: &Path,
    content: &Content,
    own_signers: Option<&[String]>,
) -> Result<Verified, ExecError> {
    let io = |e: std::io::Error| ExecError::Failed(format!("cannot read {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let sha256 = hex::encode(hasher.finalize());
    if size != content.size || !sha256.eq_ignore_ascii_case(&content.sha256) {
        return Err(refusal(
            content,
            &format!("{size} bytes with SHA-256 {sha256}"),
        ));
    }
    let signers: &[String] = own_signers.unwrap_or(&content.trusted_signers);
    let signature = content.signature.trim();
    let signer = if signature.is_empty() {
        if own_signers.is_some() {
            return Err(ExecError::PermissionDenied(format!(
                "refused library file {}: it is unsigned, and this agent runs only content signed by a key of its --trusted-signers",
                content.name
            )));
        }
        if !content.allow_unsigned {
            return Err(ExecError::PermissionDenied(format!(
                "refused library file {}: it is unsigned and the namespace's allowUnsignedScripts is false; sign it (ssh-keygen -Y sign -n liveresponse.io) with a key in trustedSigners",
                content.name
            )));
        }
        None
    } else {
        // A signature covers the whole message; library files are bounded by
        // maxLibraryFileSize (250 MiB by default).
        let bytes = std::fs::read(path).map_err(io)?;
        match liveresponse_api::signing::verify(&bytes, signature, signers) {
            Ok(principal) => Some(principal),
            Err(e) => {
                return Err(ExecError::PermissionDenied(format!(
                    "refused library file {}: its signature does not verify on this device: {e}",
                    content.name
                )));
            }
        }
    };
    Ok(Verified {
        path: path.to_path_buf(),
        size,
        sha256,
        signer,
    })
}

/// putfile's last step: moves a verified file into the drop folder under its library file
/// name, refusing to replace one unless `overwrite`.
pub fn place(
    files: &Files,
    staged: &Verified,
    file_name: &str,
    overwrite: bool,
    keep: bool,
) -> Result<PathBuf, ExecError> {
    let dest = files.drop_dir.join(file_name);
    if !overwrite && std::fs::symlink_metadata(&dest).is_ok() {
        return Err(ExecError::InvalidArgument(format!(
            "{} already exists on the device; add -overwrite to replace it",
            dest.display()
        )));
    }
    if std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
        return Err(ExecError::InvalidArgument(format!(
            "{} is a folder on the device; it cannot be replaced by a file",
            dest.display()
        )));
    }
    // Recorded before the rename: a crash in between leaves a name to clean, not a file
    // nobody removes.
    files
        .mark_temporary(file_name, keep)
        .map_err(|e| ExecError::Failed(format!("cannot record the drop folder's files: {e}")))?;
    std::fs::rename(&staged.path, &dest).map_err(|e| {
        ExecError::Failed(format!("cannot move the file to {}: {e}", dest.display()))
    })?;
    Ok(dest)
}

/// A Command uid as a file name: the API server's uids are plain, but nothing a message
/// carries becomes a path unchecked.
pub fn file_name_of(uid: &str) -> String {
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A per-command scratch folder (0700), removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(parent: &Path, uid: &str) -> Result<Self, ExecError> {
        let dir = parent.join(file_name_of(uid));
        let _ = std::fs::remove_dir_all(&dir);
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        b.create(&dir)
            .map_err(|e| ExecError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Shared by the executor: the gateway channel of the current connection.
pub type ChannelSlot = Arc<std::sync::Mutex<Option<Channel>>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn content(bytes: &[u8]) -> Content {
        Content {
            name: "script".into(),
            file_name: "script.sh".into(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            signature: String::new(),
            trusted_signers: vec![],
            allow_unsigned: true,
            analysis: String::new(),
        }
    }

    #[test]
    fn changed_bytes_are_refused_and_unsigned_needs_permission() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"echo hi\n").expect("write");
        let c = content(b"echo hi\n");
        let v = verify(&p, &c, None).expect("verified");
        assert_eq!((v.size, v.signer), (8, None));

        std::fs::write(&p, b"echo HI\n").expect("write");
        let e = verify(&p, &c, None).expect_err("changed");
        assert!(e.to_string().contains("not the 8 bytes"), "{e}");
        assert_eq!(e.reason(), "PermissionDenied");

        std::fs::write(&p, b"echo hi\n").expect("write");
        let strict = Content {
            allow_unsigned: false,
            ..c.clone()
        };
        let e = verify(&p, &strict, None).expect_err("unsigned");
        assert!(
            e.to_string().contains("allowUnsignedScripts is false"),
            "{e}"
        );
        // The agent's own signers win over the operator's permission.
        let e = verify(&p, &c, Some(&[])).expect_err("own signers");
        assert!(e.to_string().contains("--trusted-signers"), "{e}");
    }

    #[test]
    fn putfile_refuses_to_overwrite_and_forgets_kept_files() {
        let dir = tempfile::tempdir().expect("dir");
        let files = Files::new(dir.path().to_path_buf(), None);
        std::fs::create_dir_all(&files.drop_dir).expect("drop");
        let stage = |body: &[u8]| {
            let p = dir.path().join("staged");
            std::fs::write(&p, body).expect("stage");
            verify(&p, &content(body), None).expect("verified")
        };
        let dest = place(&files, &stage(b"one"), "a.txt", false, false).expect("placed");
        assert_eq!(std::fs::read(&dest).expect("read"), b"one");
        let e = place(&files, &stage(b"two"), "a.txt", false, false).expect_err("exists");
        assert!(e.to_string().contains("-overwrite"), "{e}");
        place(&files, &stage(b"two"), "a.txt", true, false).expect("overwritten");
        assert_eq!(std::fs::read(&dest).expect("read"), b"two");
        place(&files, &stage(b"kept"), "b.txt", false, true).expect("kept");
        files.clean_drop();
        assert!(
            !dest.exists(),
            "a non-kept file is removed at the next start"
        );
        assert!(files.drop_dir.join("b.txt").exists(), "-keep survives");
    }

    #[test]
    fn names_are_single_components() {
        for bad in ["", ".", "..", "a/b", "../x", "a\\b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        assert!(is_plain_name("collect-logs.sh"));
    }
}
