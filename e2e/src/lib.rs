//! End-to-end harness: a real control plane started by `e2e/cluster.sh`, clients and
//! `kubectl` for each static-token user, and a fresh namespace per test.
//!
//! The test binary (`tests/e2e.rs`) uses a custom harness so the control plane is brought
//! up once before the tests and down once after them, even when tests fail.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// The users of the static token file, each in its own group.
pub mod lr;
pub mod stack;

pub mod bench;
pub mod fixture;
pub mod process;
pub mod proxy;

pub const USERS: [&str; 6] = [
    "admin",
    "analyst-basic",
    "analyst-advanced",
    "library-admin",
    "settings-admin",
    "outsider",
];

/// Root of the repository (parent of `e2e/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Path of `e2e/cluster.sh`.
pub fn cluster_script() -> PathBuf {
    repo_root().join("e2e/cluster.sh")
}

/// A control plane started by `e2e/cluster.sh up` in its own state folder.
#[derive(Clone)]
pub struct Cluster {
    pub state: PathBuf,
    pub bin: PathBuf,
}

impl Cluster {
    /// Starts a control plane in `state` (a no-op when one already runs there).
    pub fn up(state: &Path) -> Result<Self> {
        let out = Proc::new(cluster_script())
            .arg("up")
            .env("LR_STATE_DIR", state)
            .stdin(Stdio::null())
            .output()
            .context("running e2e/cluster.sh up")?;
        if !out.status.success() {
            bail!(
                "e2e/cluster.sh up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bin = std::fs::read_to_string(state.join("bin.path"))
            .context("cluster.sh up wrote no bin.path")?
            .trim()
            .into();
        Ok(Self {
            state: state.to_path_buf(),
            bin,
        })
    }

    /// Stops the control plane and removes its state.
    pub fn down(&self) -> Result<()> {
        let out = Proc::new(cluster_script())
            .arg("down")
            .env("LR_STATE_DIR", &self.state)
            .output()
            .context("running e2e/cluster.sh down")?;
        if !out.status.success() {
            bail!(
                "e2e/cluster.sh down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The kubeconfig file of a user.
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.state.join(format!("kubeconfig-{user}"))
    }

    /// A client that authenticates as `user`.
    pub async fn client(&self, user: &str) -> Result<Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig(user))?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Runs the pinned `kubectl` as `user`, optionally feeding `stdin`.
    pub fn kubectl(&self, user: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        use std::io::Write;
        let mut child = Proc::new(self.bin.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig(user))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs `kubectl` as `user` and fails with its stderr when it fails.
    pub fn kubectl_ok(&self, user: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.kubectl(user, args, stdin)?;
        if !out.status.success() {
            bail!(
                "kubectl {} (as {user}) failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a fresh namespace for one test, so tests never see each other's objects.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let api: Api<Namespace> = Api::all(self.client("admin").await?);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "liveresponse.io/e2e": "true" } }
        }))?;
        api.create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    /// Deletes a test namespace (the controller-manager empties it in the background).
    pub async fn drop_namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client("admin").await?);
        api.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a kube error is the API server's 403 Forbidden.
pub fn is_forbidden<T>(r: &std::result::Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.is_forbidden())
}
