//! Defence in depth: other users' metadata is out of reach, and the operator re-checks the
//! tier, so a missing admission policy binding fails closed.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use e2e::{eventually, is_forbidden};
use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{Command, CommandPhase, LiveResponseSession, SessionPhase};

use crate::Env;

const T: Duration = Duration::from_secs(60);

async fn tenant_with_device(env: &Env, ns: &str, device: &str) -> Result<()> {
    let root = host_root(ns)?;
    env.stack.tenant(ns, "  sessionsPerDevice: 2\n")?;
    env.stack.start_agent(ns, device, &root, &[])?;
    env.stack.wait_device(ns, device, true, T)?;
    Ok(())
}

fn forbidden_message<T: std::fmt::Debug>(r: &Result<T, kube::Error>) -> String {
    match r {
        Err(kube::Error::Api(s)) => s.message.clone(),
        other => format!("{other:?}"),
    }
}

/// A basic analyst can neither hang another user's session with a finalizer nor cut a
/// command loose from its session; the requester and the operator still can.
pub async fn metadata_of_others_objects_is_refused(env: &'static Env) -> Result<()> {
    let ns = "lr-metadata";
    let device = "meta-host";
    tenant_with_device(env, ns, device).await?;
    let advanced = env.cluster.client("analyst-advanced").await?;
    let basic = env.cluster.client("analyst-basic").await?;
    lr::open_session(&advanced, ns, "theirs", device, "analyst-advanced", None).await?;
    lr::wait_session(&advanced, ns, "theirs", SessionPhase::Connected, T).await?;
    let c = Cmd::new("theirs", "processes", &["-pid", "1"])
        .run(&advanced, ns, "theirs-ps")
        .await?;
    lr::succeeded(&c)?;
    ensure!(
        !c.metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .is_empty(),
        "the operator did not own the command by its session"
    );

    let sessions: Api<LiveResponseSession> = Api::namespaced(basic.clone(), ns);
    let r = sessions
        .patch(
            "theirs",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({ "metadata": { "finalizers": ["evil.example/hold"] } }),
            ),
        )
        .await;
    ensure!(is_forbidden(&r), "finalizer on another's session: {r:?}");
    let msg = forbidden_message(&r);
    ensure!(msg.contains("belongs to analyst-advanced"), "{msg}");

    let commands: Api<Command> = Api::namespaced(basic.clone(), ns);
    let r = commands
        .patch(
            "theirs-ps",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": { "ownerReferences": null } })),
        )
        .await;
    ensure!(
        is_forbidden(&r),
        "dropping another's owner reference: {r:?}"
    );
    let r = commands
        .patch(
            "theirs-ps",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": { "labels": { "x": "y" } } })),
        )
        .await;
    ensure!(is_forbidden(&r), "labelling another's command: {r:?}");

    // Nothing changed, and the requester may still label their own command.
    let c = Api::<Command>::namespaced(advanced.clone(), ns)
        .get("theirs-ps")
        .await?;
    ensure!(
        !c.metadata
            .owner_references
            .clone()
            .unwrap_or_default()
            .is_empty(),
        "the owner reference is gone"
    );
    let s = Api::<LiveResponseSession>::namespaced(advanced.clone(), ns)
        .get("theirs")
        .await?;
    ensure!(
        !s.metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|f| f.starts_with("evil")),
        "{:?}",
        s.metadata.finalizers
    );
    Api::<Command>::namespaced(advanced.clone(), ns)
        .patch(
            "theirs-ps",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "metadata": { "labels": { "ticket": "INC-1" } } })),
        )
        .await
        .context("the requester labels their own command")?;
    // Deleting the session (a settings admin's right) still cascades: the garbage
    // collector and the operator edit metadata too.
    Api::<LiveResponseSession>::namespaced(env.cluster.client("settings-admin").await?, ns)
        .delete("theirs", &Default::default())
        .await?;
    eventually("the command to go with its session", T, || async {
        Ok(Api::<Command>::namespaced(advanced.clone(), ns)
            .get_opt("theirs-ps")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    env.stack.kill_agent(ns, device);
    Ok(())
}

/// With the tier policy's binding deleted, the API server admits a basic analyst's
/// `getfile`, and the operator refuses it: it asks the API server again.
pub async fn advanced_verbs_fail_closed_without_the_tier_binding(env: &'static Env) -> Result<()> {
    let ns = "lr-failclosed";
    let device = "closed-host";
    tenant_with_device(env, ns, device).await?;
    let basic = env.cluster.client("analyst-basic").await?;
    lr::open_session(&basic, ns, "mine", device, "analyst-basic", None).await?;
    lr::wait_session(&basic, ns, "mine", SessionPhase::Connected, T).await?;
    env.cluster.kubectl_ok(
        "admin",
        &[
            "delete",
            "validatingadmissionpolicybinding",
            "liveresponse-command-tier",
        ],
        None,
    )?;
    let result = async {
        // The API server picks up the missing binding within moments.
        let mut n = 0;
        let name = eventually("the API server to admit a basic getfile", T, || {
            n += 1;
            let basic = basic.clone();
            let name = format!("grab-{n}");
            async move {
                match Cmd::new("mine", "getfile", &["/etc/hostname"])
                    .create(&basic, ns, &name)
                    .await
                {
                    Ok(created) => Ok(Some(created)),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(None)
                    }
                }
            }
        })
        .await?;
        let c = lr::wait_final(&basic, ns, &name, T).await?;
        let err = c.status.as_ref().and_then(|s| s.error.clone());
        match (lr::phase(&c), err) {
            (Some(CommandPhase::Failed), Some(e)) if e.reason == "Forbidden" => {
                ensure!(
                    e.message.contains("liveresponse-advanced"),
                    "message: {}",
                    e.message
                );
                Ok(())
            }
            (p, e) => bail!("a basic analyst's getfile ended {p:?} {e:?}"),
        }
    }
    .await;
    let restore = std::fs::read_to_string(e2e::repo_root().join("config/admission/commands.yaml"))?;
    env.cluster
        .kubectl_ok("admin", &["apply", "-f", "-"], Some(&restore))?;
    env.stack.kill_agent(ns, device);
    result
}
