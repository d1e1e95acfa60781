//! Helpers that drive live response objects as a user would: open a session, run a command
//! and wait for its final phase.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use liveresponse_api::crd::{
    Command, CommandError, CommandPhase, CommandSpec, LiveResponseSession, LiveResponseSettings,
    OutputFormat, SessionPhase, SessionSpec, SessionState,
};

use crate::eventually;

/// Opens a session as `user` (who must be the requester) to `device`.
pub async fn open_session(
    client: &Client,
    ns: &str,
    name: &str,
    device: &str,
    user: &str,
    idle: Option<&str>,
) -> Result<()> {
    let api: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    let s = LiveResponseSession::new(
        name,
        SessionSpec {
            device: device.into(),
            reason: Some("e2e".into()),
            requested_by: user.into(),
            idle_timeout: idle.map(str::to_string),
            state: SessionState::Active,
        },
    );
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

/// Waits until the session is in `want`, failing early when it ends in another final phase.
pub async fn wait_session(
    client: &Client,
    ns: &str,
    name: &str,
    want: SessionPhase,
    timeout: Duration,
) -> Result<LiveResponseSession> {
    let api: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("session {name} to be {want:?}"),
        timeout,
        || async {
            let s = api.get(name).await?;
            let phase = s.status.as_ref().and_then(|st| st.phase);
            if phase == Some(want) {
                return Ok(Some(s));
            }
            if let Some(p) = phase.filter(|p| p.is_final()) {
                bail!(
                    "session {name} ended {p:?} instead of {want:?}: {:?}",
                    s.status.and_then(|st| st.message)
                );
            }
            Ok(None)
        },
    )
    .await
}

/// Sets `spec.state: Disconnected`.
pub async fn disconnect(client: &Client, ns: &str, name: &str) -> Result<()> {
    let api: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"state": "Disconnected"}})),
    )
    .await?;
    Ok(())
}

/// A Command to create.
pub struct Cmd<'a> {
    pub session: &'a str,
    pub verb: &'a str,
    pub args: &'a [&'a str],
    pub json: bool,
    pub background: bool,
    pub timeout_seconds: Option<i64>,
}

impl<'a> Cmd<'a> {
    pub fn new(session: &'a str, verb: &'a str, args: &'a [&'a str]) -> Self {
        Self {
            session,
            verb,
            args,
            json: false,
            background: false,
            timeout_seconds: None,
        }
    }
    pub fn json(mut self) -> Self {
        self.json = true;
        self
    }
    pub fn background(mut self) -> Self {
        self.background = true;
        self
    }
    pub fn timeout(mut self, secs: i64) -> Self {
        self.timeout_seconds = Some(secs);
        self
    }

    /// Creates the Command; returns its name.
    pub async fn create(&self, client: &Client, ns: &str, name: &str) -> Result<String> {
        let api: Api<Command> = Api::namespaced(client.clone(), ns);
        let c = Command::new(
            name,
            CommandSpec {
                session: self.session.into(),
                command: self.verb.into(),
                args: self.args.iter().map(|s| s.to_string()).collect(),
                output: if self.json {
                    OutputFormat::Json
                } else {
                    OutputFormat::Table
                },
                background: self.background,
                timeout_seconds: self.timeout_seconds,
                cancel: false,
            },
        );
        Ok(api.create(&PostParams::default(), &c).await?.name_any())
    }

    /// Creates the Command and waits for its final phase.
    pub async fn run(&self, client: &Client, ns: &str, name: &str) -> Result<Command> {
        self.create(client, ns, name).await?;
        wait_final(client, ns, name, Duration::from_secs(60)).await
    }
}

/// Waits until a command reaches a final phase.
pub async fn wait_final(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<Command> {
    wait_phase(client, ns, name, timeout, |p| p.is_final()).await
}

/// Waits until a command's phase satisfies `pred`.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    pred: impl Fn(CommandPhase) -> bool,
) -> Result<Command> {
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    eventually(&format!("command {name}"), timeout, || async {
        let c = api.get(name).await?;
        Ok(c.status
            .as_ref()
            .and_then(|s| s.phase)
            .filter(|p| pred(*p))
            .map(|_| c))
    })
    .await
}

/// The phase of a command (`None` before the operator saw it).
pub fn phase(c: &Command) -> Option<CommandPhase> {
    c.status.as_ref().and_then(|s| s.phase)
}

/// The inline output of a command.
pub fn content(c: &Command) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.output.as_ref())
        .map(|o| o.content.clone())
        .unwrap_or_default()
}

/// The device's notes on a command's output (what it skipped, cut or could not read).
pub fn warnings(c: &Command) -> Vec<String> {
    c.status
        .as_ref()
        .and_then(|s| s.output.as_ref())
        .map(|o| o.warnings.clone())
        .unwrap_or_default()
}

/// The output records of a JSON command.
pub fn records(c: &Command) -> Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(&content(c))?)
}

/// Requires Succeeded, with the error in the failure message otherwise.
pub fn succeeded(c: &Command) -> Result<()> {
    if phase(c) != Some(CommandPhase::Succeeded) {
        bail!(
            "command {} ({:?}) ended {:?}: {:?}",
            c.name_any(),
            c.status.as_ref().and_then(|s| s.command_line.clone()),
            phase(c),
            c.status.as_ref().and_then(|s| s.error.clone())
        );
    }
    Ok(())
}

/// Why a command did not succeed (`status.error`).
pub fn error(c: &Command) -> Option<CommandError> {
    c.status.as_ref().and_then(|s| s.error.clone())
}

/// The command's number in its session (`status.id`), once the operator assigned it.
pub fn id(c: &Command) -> Option<i64> {
    c.status.as_ref().and_then(|s| s.id)
}

/// Waits until the operator numbered the command, and returns its id.
pub async fn wait_id(client: &Client, ns: &str, name: &str, timeout: Duration) -> Result<i64> {
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    eventually(&format!("command {name} to get an id"), timeout, || async {
        let c = api.get(name).await?;
        if let Some(p) = phase(&c).filter(|p| p.is_final())
            && id(&c).is_none()
        {
            bail!("command {name} ended {p:?} without an id: {:?}", error(&c));
        }
        Ok(id(&c))
    })
    .await
}

/// Merges `fields` (camelCase, as in YAML) into the namespace's LiveResponseSettings spec,
/// as the settings admin `client` would with `kubectl patch`.
pub async fn set_settings(client: &Client, ns: &str, fields: serde_json::Value) -> Result<()> {
    let api: Api<LiveResponseSettings> = Api::namespaced(client.clone(), ns);
    api.patch(
        "default",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": fields })),
    )
    .await
    .with_context(|| format!("setting {fields} in {ns}'s LiveResponseSettings"))?;
    Ok(())
}

/// Runs the console, `kubectl liveresponse ARGS`, as `user`: whether it succeeded, its
/// stdout and its stderr.
pub fn cli(cluster: &crate::Cluster, user: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new(crate::stack::target_bin("kubectl-liveresponse"))
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig(user))
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
