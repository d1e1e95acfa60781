//! A hostile agent, driven by hand over the real protocol with a real device certificate:
//! what it says reaches the API server bounded.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::api::Api;
use liveresponse_api::crd::{CommandPhase, Device, SessionPhase};
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{
    AgentMessage, CommandEvent, Completed, Heartbeat, Hello, Outcome, PROTOCOL_VERSION,
    agent_message, command_event, operator_message,
};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Env;

const T: Duration = Duration::from_secs(60);

/// An agent that answers its command with a 10 MiB error message and a reason full of
/// control characters, after a hello with a 1 MiB hostname: the command fails with a
/// bounded message, the Device's hostname is bounded, and the operator keeps serving.
pub async fn oversized_agent_strings_are_bounded(env: &'static Env) -> Result<()> {
    let ns = "lr-hostile-agent";
    let device = "mouthy";
    let stack = &env.stack;
    let root = host_root("hostile-agent")?;
    stack.tenant(ns, "")?;
    // The real agent enrolls once; the test then speaks for it with its certificate.
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    stack.kill_agent(ns, device);
    stack.wait_device(ns, device, false, T)?;
    let (inbound, tx) = attach_as(env, ns, device, &"h".repeat(1 << 20)).await?;
    let mut inbound = inbound?;
    let beat = {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let hb = AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())),
                };
                if tx.send(hb).await.is_err() {
                    break;
                }
            }
        })
    };
    let result = async {
        stack.wait_device(ns, device, true, T)?;
        let client = env.cluster.client("analyst-advanced").await?;
        lr::open_session(&client, ns, "s", device, "analyst-advanced", None).await?;
        lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
        Cmd::new("s", "processes", &[])
            .create(&client, ns, "big-error")
            .await?;
        // Answer the Execute the operator sends.
        let exec = tokio::time::timeout(T, async {
            loop {
                match inbound.message().await? {
                    Some(m) => {
                        if let Some(operator_message::Msg::Execute(e)) = m.msg {
                            return Ok::<_, anyhow::Error>(e);
                        }
                    }
                    None => bail!("the gateway closed the stream"),
                }
            }
        })
        .await
        .context("no Execute within 60s")??;
        let huge = "E".repeat(10 << 20);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Event(CommandEvent {
                command_uid: exec.command_uid.clone(),
                event: Some(command_event::Event::Completed(Completed {
                    outcome: Outcome::Failed as i32,
                    exit_code: 1,
                    error_reason: "Bad\u{1b}[2JReason".into(),
                    error_message: huge,
                    warnings: vec!["w".repeat(10 << 10); 300],
                    working_directory: format!("/{}", "d".repeat(1 << 20)),
                    ..Default::default()
                })),
            })),
        })
        .await?;
        let c = lr::wait_final(&client, ns, "big-error", T).await?;
        let st = c.status.clone().context("no status")?;
        let err = st.error.context("no error")?;
        ensure!(
            lr::phase(&c) == Some(CommandPhase::Failed),
            "phase {:?}",
            lr::phase(&c)
        );
        ensure!(err.reason == "AgentError", "reason {:?}", err.reason);
        ensure!(
            err.message.len() <= 4200 && err.message.starts_with("EEEE"),
            "message of {} bytes",
            err.message.len()
        );
        ensure!(
            err.message.ends_with("more bytes cut]"),
            "the cut is not said: …{}",
            &err.message[err.message.len().saturating_sub(60)..]
        );
        let warnings = st.output.map(|o| o.warnings).unwrap_or_default();
        let total: usize = warnings.iter().map(String::len).sum();
        ensure!(
            warnings.len() <= 102 && total <= 200 * 1024,
            "{} warnings, {total} bytes",
            warnings.len()
        );
        let dev = Api::<Device>::namespaced(env.cluster.client("admin").await?, ns)
            .get(device)
            .await?;
        let hostname = dev
            .status
            .and_then(|s| s.hostname)
            .context("no hostname recorded")?;
        ensure!(
            hostname.len() <= 300,
            "hostname of {} bytes",
            hostname.len()
        );
        Ok(())
    }
    .await;
    beat.abort();
    drop(tx);
    result
}

/// Attaches as `device` with the certificate in its agent's state folder, saying `hostname`
/// in the hello; returns the stream (or the gateway's refusal) and the sender to keep it open.
async fn attach_as(
    env: &Env,
    ns: &str,
    device: &str,
    hostname: &str,
) -> Result<(
    std::result::Result<tonic::Streaming<liveresponse_api::proto::OperatorMessage>, tonic::Status>,
    mpsc::Sender<AgentMessage>,
)> {
    let stack = &env.stack;
    let dir = stack.agent_dir(ns, device);
    let tls = ClientTlsConfig::new()
        .domain_name("127.0.0.1")
        .ca_certificate(Certificate::from_pem(std::fs::read_to_string(
            stack.ca_file(),
        )?))
        .identity(Identity::from_pem(
            std::fs::read_to_string(dir.join("device.crt"))?,
            std::fs::read_to_string(dir.join("device.key"))?,
        ));
    let ch = Endpoint::from_shared(stack.gateway()?)?
        .tls_config(tls)?
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            hostname: hostname.into(),
            os: "linux".into(),
            ..Default::default()
        })),
    })
    .await?;
    let r = AgentGatewayClient::new(ch)
        .max_encoding_message_size(64 << 20)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    Ok((r, tx))
}

fn events(env: &Env, ns: &str, reason: &str) -> Result<String> {
    env.cluster.kubectl_ok(
        "admin",
        &[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            &format!("reason={reason}"),
            "-o",
            "custom-columns=NOTE:.message",
            "--no-headers",
        ],
        None,
    )
}

/// A copy of a live agent's certificate is refused (an Event and a metric say so) and the
/// real agent keeps working; a hello cannot rename the device.
pub async fn a_copied_certificate_is_refused_and_cannot_rename_the_device(
    env: &'static Env,
) -> Result<()> {
    let ns = "lr-copied-cert";
    let device = "original";
    let stack = &env.stack;
    let root = host_root("copied-cert")?;
    stack.tenant(ns, "")?;
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    let admin = env.cluster.client("admin").await?;
    let devices: Api<Device> = Api::namespaced(admin.clone(), ns);
    let recorded = devices
        .get(device)
        .await?
        .status
        .and_then(|s| s.hostname)
        .context("no hostname")?;

    let (r, _tx) = attach_as(env, ns, device, "thief").await?;
    match r {
        Err(s) => ensure!(
            s.code() == tonic::Code::AlreadyExists && s.message().contains("live connection"),
            "the copy was refused with {s:?}"
        ),
        Ok(_) => bail!("a second stream with a live device's certificate was accepted"),
    }
    e2e::eventually("a DuplicateConnection event", T, || async {
        Ok(events(env, ns, "DuplicateConnection")?
            .contains("certificate")
            .then_some(()))
    })
    .await?;
    let metrics = fetch_metrics(&stack.metrics_url()?)?;
    ensure!(
        metrics.lines().any(
            |l| l.starts_with("liveresponse_duplicate_connections_total") && !l.ends_with(" 0")
        ),
        "metric: {}",
        metrics
            .lines()
            .filter(|l| l.contains("duplicate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The real agent was not disturbed.
    let client = env.cluster.client("analyst-advanced").await?;
    lr::open_session(&client, ns, "s", device, "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
    lr::succeeded(
        &Cmd::new("s", "processes", &["-pid", "1"])
            .run(&client, ns, "still-works")
            .await?,
    )?;

    // Once the device is offline, its certificate connects, but the hello cannot rename it.
    stack.kill_agent(ns, device);
    stack.wait_device(ns, device, false, T)?;
    let (r, tx) = attach_as(env, ns, device, "renamed-by-thief").await?;
    ensure!(r.is_ok(), "the device's own certificate: {:?}", r.err());
    stack.wait_device(ns, device, true, T)?;
    e2e::eventually("an IdentityChanged event", T, || async {
        Ok(events(env, ns, "IdentityChanged")?
            .contains("renamed-by-thief")
            .then_some(()))
    })
    .await?;
    let now = devices
        .get(device)
        .await?
        .status
        .and_then(|s| s.hostname)
        .context("no hostname")?;
    ensure!(
        now == recorded,
        "the hostname changed from {recorded} to {now}"
    );
    drop(tx);
    Ok(())
}

fn fetch_metrics(url: &str) -> Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-sf", url])
        .output()?;
    ensure!(out.status.success(), "curl {url} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
