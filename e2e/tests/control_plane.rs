//! The control plane itself: real RBAC, real tokens, CRDs with status and watch, garbage
//! collection, and the start-up script's own promises.

use std::path::PathBuf;
use std::process::Command as Proc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{eventually, is_forbidden};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::Env;

fn config_map(name: &str) -> Result<ConfigMap> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name },
        "data": { "k": "v" }
    }))?)
}

/// RBAC is real: system:masters may, an unbound user may not, a bound user then may.
pub async fn rbac_is_enforced(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = c.namespace("rbac").await?;

    let admin: Api<ConfigMap> = Api::namespaced(c.client("admin").await?, &ns);
    admin
        .create(&PostParams::default(), &config_map("by-admin")?)
        .await?;
    admin.delete("by-admin", &DeleteParams::default()).await?;

    let outsider: Api<ConfigMap> = Api::namespaced(c.client("outsider").await?, &ns);
    let r = outsider
        .create(&PostParams::default(), &config_map("by-outsider")?)
        .await;
    ensure!(
        is_forbidden(&r),
        "outsider must get 403 Forbidden, got {r:?}"
    );
    // The same through kubectl, as a user would see it.
    let out = c.kubectl("outsider", &["-n", &ns, "create", "configmap", "x"], None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("forbidden"),
        "kubectl as outsider: {err}"
    );

    let basic: Api<ConfigMap> = Api::namespaced(c.client("analyst-basic").await?, &ns);
    let r = basic
        .create(&PostParams::default(), &config_map("by-basic")?)
        .await;
    ensure!(
        is_forbidden(&r),
        "analyst-basic without a role must be forbidden, got {r:?}"
    );
    c.kubectl_ok(
        "admin",
        &[
            "-n",
            &ns,
            "create",
            "role",
            "cm-writer",
            "--verb=create,get,delete",
            "--resource=configmaps",
        ],
        None,
    )?;
    c.kubectl_ok(
        "admin",
        &[
            "-n",
            &ns,
            "create",
            "rolebinding",
            "cm-writer",
            "--role=cm-writer",
            "--user=analyst-basic",
        ],
        None,
    )?;
    // RBAC caches take a moment to see a new binding.
    eventually(
        "analyst-basic to be allowed",
        Duration::from_secs(10),
        || async {
            match basic
                .create(&PostParams::default(), &config_map("by-basic")?)
                .await
            {
                Ok(_) => Ok(Some(())),
                Err(kube::Error::Api(s)) if s.is_forbidden() => Ok(None),
                Err(e) => Err(e.into()),
            }
        },
    )
    .await?;
    basic.delete("by-basic", &DeleteParams::default()).await?;
    // Still forbidden in another namespace: the Role is namespaced.
    let elsewhere: Api<ConfigMap> = Api::namespaced(c.client("analyst-basic").await?, "default");
    let r = elsewhere
        .create(&PostParams::default(), &config_map("by-basic")?)
        .await;
    ensure!(
        is_forbidden(&r),
        "the Role must not reach namespace default, got {r:?}"
    );
    c.drop_namespace(&ns).await
}

/// A ServiceAccount token from TokenRequest passes TokenReview with the right username and
/// audience (agents will authenticate this way).
pub async fn service_account_tokens_are_reviewed(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = c.namespace("token").await?;
    let client = c.client("admin").await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "agent"}}))?,
    )
    .await?;
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": { "audiences": ["liveresponse"], "expirationSeconds": 600 }
    }))?;
    let tr = sas
        .create_token_request("agent", &PostParams::default(), &req)
        .await?;
    let token = tr
        .status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")?;
    ensure!(!token.is_empty(), "empty token");

    let reviews: Api<TokenReview> = Api::all(client);
    let review: TokenReview = serde_json::from_value(json!({
        "spec": { "token": token, "audiences": ["liveresponse"] }
    }))?;
    let got = reviews.create(&PostParams::default(), &review).await?;
    let st = got.status.context("TokenReview returned no status")?;
    ensure!(
        st.authenticated == Some(true),
        "token not authenticated: {:?}",
        st.error
    );
    let user = st.user.context("no user in TokenReview")?;
    let want = format!("system:serviceaccount:{ns}:agent");
    ensure!(
        user.username.as_deref() == Some(want.as_str()),
        "username {:?}, want {want}",
        user.username
    );
    ensure!(
        st.audiences
            .unwrap_or_default()
            .contains(&"liveresponse".to_string()),
        "audience liveresponse missing"
    );

    // A token for another audience is not accepted for ours.
    let other: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": ["someone-else"]}}))?;
    let other = sas
        .create_token_request("agent", &PostParams::default(), &other)
        .await?;
    let review: TokenReview = serde_json::from_value(json!({
        "spec": { "token": other.status.and_then(|s| s.token), "audiences": ["liveresponse"] }
    }))?;
    let got = reviews.create(&PostParams::default(), &review).await?;
    ensure!(
        got.status.and_then(|s| s.authenticated) != Some(true),
        "a token for another audience must not authenticate for liveresponse"
    );
    c.drop_namespace(&ns).await
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.liveresponse.io
spec:
  group: e2e.liveresponse.io
  names: { kind: Widget, plural: widgets, singular: widget }
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: { status: {} }
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties: { size: { type: integer } }
          status:
            type: object
            properties: { phase: { type: string } }
"#;

/// A CRD applied with kubectl becomes Established; a resource of it is created, its status
/// patched through the status subresource, and a watch sees the change.
pub async fn crd_status_and_watch(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    c.kubectl_ok("admin", &["apply", "-f", "-"], Some(WIDGET_CRD))?;
    c.kubectl_ok(
        "admin",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/widgets.e2e.liveresponse.io",
        ],
        None,
    )?;
    let ns = c.namespace("crd").await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("e2e.liveresponse.io", "v1", "Widget"),
        "widgets",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(c.client("admin").await?, &ns, &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "e2e.liveresponse.io/v1", "kind": "Widget",
        "metadata": { "name": "w1" }, "spec": { "size": 3 }
    }))?;
    // The first request after Established can still race discovery; retry briefly.
    eventually("creating a Widget", Duration::from_secs(10), || async {
        match api.create(&PostParams::default(), &obj).await {
            Ok(o) => Ok(Some(o)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;

    let mut events = watcher(
        api.clone(),
        watcher::Config::default().fields("metadata.name=w1"),
    )
    .applied_objects()
    .boxed();
    // Patching status through the main resource is ignored: status is a subresource.
    api.patch(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Ignored"}})),
    )
    .await?;
    api.patch_status(
        "w1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Ready"}})),
    )
    .await?;
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(o) = events.try_next().await? {
            if o.data["status"]["phase"] == "Ready" {
                return Ok::<_, anyhow::Error>(o);
            }
        }
        bail!("watch ended without seeing status.phase=Ready")
    })
    .await
    .context("no watch event with status.phase=Ready")??;
    ensure!(seen.data["spec"]["size"] == 3, "spec lost: {:?}", seen.data);
    let got = api.get("w1").await?;
    ensure!(
        got.data["status"]["phase"] == "Ready",
        "status read back: {:?}",
        got.data["status"]
    );
    c.drop_namespace(&ns).await
}

/// Deleting an owner garbage-collects its dependents: kube-controller-manager runs.
pub async fn owner_deletion_collects_dependents(env: &'static Env) -> Result<()> {
    let c = &env.cluster;
    let ns = c.namespace("gc").await?;
    let api: Api<ConfigMap> = Api::namespaced(c.client("admin").await?, &ns);
    let owner = api
        .create(&PostParams::default(), &config_map("owner")?)
        .await?;
    let uid = owner.metadata.uid.context("owner has no uid")?;
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{ "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid }]
        }
    }))?;
    api.create(&PostParams::default(), &dependent).await?;
    api.delete("owner", &DeleteParams::default()).await?;
    eventually(
        "the dependent to be garbage-collected",
        Duration::from_secs(60),
        || async { Ok(api.get_opt("dependent").await?.is_none().then_some(())) },
    )
    .await?;
    c.drop_namespace(&ns).await
}

fn pids_of(state: &std::path::Path) -> Result<Vec<u32>> {
    ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .map(|n| {
            let s = std::fs::read_to_string(state.join(format!("{n}.pid")))?;
            Ok(s.trim().parse()?)
        })
        .collect()
}

fn script(state: &std::path::Path, verb: &str) -> Result<std::process::Output> {
    Ok(Proc::new(e2e::cluster_script())
        .arg(verb)
        .env("LR_STATE_DIR", state)
        .output()?)
}

/// `up` twice and `down` twice both succeed; after `down` no process it started remains.
pub async fn cluster_script_is_idempotent(_env: &'static Env) -> Result<()> {
    let state = e2e::repo_root().join(format!("e2e/.state/idempotent-{}", std::process::id()));
    let first = script(&state, "up")?;
    ensure!(
        first.status.success(),
        "first up: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&first.stdout).contains("export KUBECONFIG="),
        "no export line"
    );
    let pids = pids_of(&state)?;
    let second = script(&state, "up")?;
    ensure!(
        second.status.success(),
        "second up: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&second.stderr).contains("already up"),
        "second up restarted it"
    );
    ensure!(pids_of(&state)? == pids, "second up changed the processes");
    let status = script(&state, "status")?;
    ensure!(
        status.status.success(),
        "status: {}",
        String::from_utf8_lossy(&status.stdout)
    );

    for round in ["first", "second"] {
        let down = script(&state, "down")?;
        ensure!(
            down.status.success(),
            "{round} down: {}",
            String::from_utf8_lossy(&down.stderr)
        );
    }
    for pid in pids {
        ensure!(
            !PathBuf::from(format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "process {pid} still runs after down"
        );
    }
    ensure!(
        !state.exists(),
        "down left the state folder {}",
        state.display()
    );
    let status = script(&state, "status")?;
    ensure!(!status.status.success(), "status after down must say down");
    Ok(())
}

/// Without Go, or when a module cannot be fetched, the build says which and what to do.
pub async fn missing_go_is_explained(_env: &'static Env) -> Result<()> {
    let build = e2e::repo_root().join("e2e/cluster/build.sh");
    let empty_cache = tempdir("nocache")?;
    // No Go on PATH (only the basic tools the script itself needs).
    let out = Proc::new("bash")
        .arg(&build)
        .env("PATH", "/usr/bin:/bin")
        .env("LR_CACHE_DIR", &empty_cache)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if which_go_in("/usr/bin:/bin") {
        // A machine with a system Go in /usr/bin cannot show this case; the fetch case below still runs.
        eprintln!("note: Go is in /usr/bin here; skipping the no-Go half");
    } else {
        ensure!(!out.status.success(), "build.sh without Go must fail");
        ensure!(
            err.contains("Go is not installed") && err.contains("Install Go"),
            "message: {err}"
        );
    }
    // Go present, but no module can be fetched and none is cached.
    let modcache = tempdir("modcache")?;
    let out = Proc::new("bash")
        .arg(&build)
        .env("LR_CACHE_DIR", &empty_cache)
        .env("GOPROXY", "off")
        .env("GOMODCACHE", &modcache)
        .env("GOFLAGS", "-modcacherw")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "build.sh without modules must fail");
    ensure!(
        err.contains("could not be fetched")
            && err.contains("GOPROXY=off")
            && err.contains("go: ")
            && err.contains("@v"),
        "message must name the module and what to do: {err}"
    );
    let _ = std::fs::remove_dir_all(&empty_cache);
    let _ = std::fs::remove_dir_all(&modcache);
    Ok(())
}

fn which_go_in(path: &str) -> bool {
    path.split(':')
        .any(|d| std::path::Path::new(d).join("go").exists())
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("lr-e2e-{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
