//! Garbage collection of the artifact store: an artifact no Command or LibraryFile names is
//! deleted once it is older than a grace period (an upload waits that long for the
//! LibraryFile that will name it; a getfile's artifact is named moments after it is
//! stored). Staging files of transfers whose Command is gone or finished go too. Deleting
//! a Command (by hand or by `commandRetention`) therefore frees its file.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use liveresponse_api::crd::{Command, CommandPhase, LibraryFile};

use crate::artifacts::Listed;
use crate::context::Context;

/// The digests the cluster still names.
pub fn referenced(commands: &[Command], files: &[LibraryFile]) -> HashSet<String> {
    let mut keep = HashSet::new();
    for c in commands {
        if let Some(st) = &c.status {
            keep.extend(st.file.as_ref().and_then(|f| f.artifact.clone()));
            keep.extend(st.output.as_ref().and_then(|o| o.artifact.clone()));
        }
    }
    for f in files {
        keep.extend(f.spec.source.artifact.clone());
    }
    keep
}

/// What to delete: unnamed artifacts older than `grace`.
pub fn collectable(
    listed: &[Listed],
    keep: &HashSet<String>,
    now: jiff::Timestamp,
    grace: Duration,
) -> Vec<String> {
    let grace = jiff::SignedDuration::try_from(grace).unwrap_or(jiff::SignedDuration::MAX);
    listed
        .iter()
        .filter(|a| !keep.contains(&a.sha256) && now.duration_since(a.written) >= grace)
        .map(|a| a.sha256.clone())
        .collect()
}

/// Staging files (`UID.part`, `UID.out`, or an upload's) whose Command is not running any more; the
/// caller only offers files untouched for the grace period, so a live upload stays.
pub fn stale_staging(names: &[String], running: &HashSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            n.strip_suffix(".part")
                .or_else(|| n.strip_suffix(".out"))
                .is_some_and(|uid| !running.contains(uid))
        })
        .cloned()
        .collect()
}

async fn sweep(ctx: &Context, grace: Duration) -> anyhow::Result<()> {
    let commands = Api::<Command>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let files = Api::<LibraryFile>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    // Listed after the objects: an artifact stored since is younger than the grace.
    let listed = ctx.artifacts.list().await?;
    let keep = referenced(&commands, &files);
    for sha in collectable(&listed, &keep, jiff::Timestamp::now(), grace) {
        ctx.artifacts.delete(&sha).await?;
        tracing::info!(sha256 = %sha, "deleted an artifact nothing names any more");
    }
    let running: HashSet<String> = commands
        .iter()
        .filter(|c| {
            !c.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(CommandPhase::is_final)
        })
        .filter_map(|c| c.uid())
        .collect();
    let staging: Vec<String> = std::fs::read_dir(ctx.artifacts.staging_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= grace))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in stale_staging(&staging, &running) {
        let _ = std::fs::remove_file(ctx.artifacts.staging_dir().join(&name));
        tracing::info!(file = %name, "deleted a staging file of a transfer that ended");
    }
    Ok(())
}

/// Sweeps every `interval`, for as long as the operator leads.
pub async fn run(ctx: Arc<Context>, interval: Duration, grace: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = sweep(&ctx, grace).await {
            tracing::warn!(error = %format!("{e:#}"), "artifact garbage collection failed; trying again later");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveresponse_api::crd::{CommandSpec, CommandStatus, FileRef, LibraryFileSpec};

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    #[test]
    fn only_old_unnamed_artifacts_go() {
        let mut c = Command::new(
            "pull",
            serde_json::from_value::<CommandSpec>(
                serde_json::json!({"session": "s", "command": "getfile"}),
            )
            .unwrap(),
        );
        c.status = Some(CommandStatus {
            file: Some(FileRef {
                path: "/x".into(),
                size: 1,
                sha256: sha('a'),
                artifact: Some(sha('a')),
            }),
            ..Default::default()
        });
        let lf = LibraryFile::new(
            "lib",
            serde_json::from_value::<LibraryFileSpec>(serde_json::json!({
                "fileName": "x.sh", "source": {"artifact": sha('b')}
            }))
            .unwrap(),
        );
        let keep = referenced(&[c], &[lf]);
        let now = jiff::Timestamp::now();
        let old = now - jiff::SignedDuration::from_hours(2);
        let listed = [
            Listed {
                sha256: sha('a'),
                size: 1,
                written: old,
            },
            Listed {
                sha256: sha('b'),
                size: 1,
                written: old,
            },
            Listed {
                sha256: sha('c'),
                size: 1,
                written: old,
            },
            Listed {
                sha256: sha('d'),
                size: 1,
                written: now,
            },
        ];
        assert_eq!(
            collectable(&listed, &keep, now, Duration::from_secs(3600)),
            vec![sha('c')]
        );
    }

    #[test]
    fn staging_of_running_commands_stays() {
        let running: HashSet<String> = ["u1".to_string()].into();
        let names: Vec<String> = ["u1.part", "u2.part", "upload-7.part", "other"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            stale_staging(&names, &running),
            vec!["u2.part".to_string(), "upload-7.part".to_string()]
        );
    }
}
