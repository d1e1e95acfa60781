//! Device certificates: short-lived and renewed over the stream, revoked at once by deleting
//! the Device, and a CA that rotates without losing an agent.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::eventually;
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::api::Api;
use liveresponse_api::crd::{Device, SessionPhase};
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{AgentMessage, Hello, PROTOCOL_VERSION, agent_message};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::Env;

const T: Duration = Duration::from_secs(60);

/// The SHA-256 of a PEM certificate's DER, as the Device records it.
fn fingerprint(pem_file: &Path) -> Result<String> {
    let pem = std::fs::read(pem_file)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", pem_file.display()))?;
    Ok(hex::encode(Sha256::digest(&pem.contents)))
}

async fn device_fingerprints(env: &Env, ns: &str, device: &str) -> Result<(String, String)> {
    let client = env.cluster.client("admin").await?;
    let d = Api::<Device>::namespaced(client, ns).get(device).await?;
    Ok((
        d.spec.certificate_sha256.unwrap_or_default(),
        d.spec.previous_certificate_sha256.unwrap_or_default(),
    ))
}

/// A command through a fresh session succeeds on `device`.
async fn works(env: &Env, ns: &str, device: &str, session: &str) -> Result<()> {
    let client = env.cluster.client("analyst-basic").await?;
    lr::open_session(&client, ns, session, device, "analyst-basic", None).await?;
    lr::wait_session(&client, ns, session, SessionPhase::Connected, T).await?;
    let c = Cmd::new(session, "dir", &["/"])
        .run(&client, ns, &format!("{session}-dir"))
        .await?;
    lr::succeeded(&c)?;
    lr::disconnect(&client, ns, session).await
}

/// Opens a stream as an agent with the given key and certificate; the gateway's welcome, or
/// why there was none.
async fn attach_with(
    env: &Env,
    ca: &str,
    cert: &str,
    key: &str,
) -> Result<std::result::Result<(), String>> {
    let tls = ClientTlsConfig::new()
        .domain_name("127.0.0.1")
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let channel = match Endpoint::from_shared(env.stack.gateway()?)?
        .tls_config(tls)?
        .connect()
        .await
    {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("connect: {e:?}"))),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await?;
    let resp = AgentGatewayClient::new(channel)
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(s) => return Ok(Err(format!("{:?}: {}", s.code(), s.message()))),
    };
    match tokio::time::timeout(Duration::from_secs(10), resp.into_inner().message()).await {
        Ok(Ok(Some(_))) => Ok(Ok(())),
        other => Ok(Err(format!("{other:?}"))),
    }
}

/// With a 30 s certificate life set in the namespace's settings, the agent renews at two
/// thirds of it over its stream: the Device records the new fingerprint (and the old one as
/// previous), the agent's files hold the new certificate, and after the first certificate
/// expired a restarted agent still connects and works.
pub async fn agents_renew_short_lived_certificates(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-renew", "renewer");
    let stack = &env.stack;
    stack.tenant(ns, "  deviceCertificateLifetime: 30s\n")?;
    let root = host_root("renew")?;
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    let enrolled = Instant::now();
    let cert_file = stack.agent_dir(ns, device).join("device.crt");
    let first = fingerprint(&cert_file)?;
    let (recorded, _) = device_fingerprints(env, ns, device).await?;
    ensure!(
        recorded == first,
        "the Device records {recorded}, the agent holds {first}"
    );

    let renewed = eventually("the agent to renew its certificate", T, || async {
        let (current, previous) = device_fingerprints(env, ns, device).await?;
        Ok((current != first).then_some((current, previous)))
    })
    .await?;
    ensure!(renewed.1 == first, "previous fingerprint: {:?}", renewed.1);
    ensure!(
        enrolled.elapsed() < Duration::from_secs(30),
        "renewed only after the first certificate expired"
    );
    let held = eventually("the agent to store its renewed certificate", T, || async {
        let fp = fingerprint(&cert_file)?;
        Ok((fp != first).then_some(fp))
    })
    .await?;
    let (current, _) = device_fingerprints(env, ns, device).await?;
    // It may have renewed once more meanwhile; it holds one the Device accepts.
    let (now_current, now_previous) = device_fingerprints(env, ns, device).await?;
    ensure!(
        held == now_current || held == now_previous || held == current,
        "the agent holds {held}, the Device records {now_current} (previous {now_previous})"
    );

    // Past the first certificate's life, a new connection must use a renewed one.
    let left = Duration::from_secs(32).saturating_sub(enrolled.elapsed());
    tokio::time::sleep(left).await;
    stack.kill_agent(ns, device);
    stack.wait_device(ns, device, false, T)?;
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    works(env, ns, device, "after-renewal").await
}

/// Deleting a Device cuts its agent's live stream at once: the agent is told it is revoked
/// and stops.
pub async fn deleting_a_device_cuts_its_stream(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-cut", "doomed");
    let stack = &env.stack;
    stack.tenant(ns, "")?;
    let root = host_root("cut")?;
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    let pid = stack.agent_pid(ns, device).context("the agent runs")?;
    // From before the delete: kubectl returns once the Device is gone, and the cut may
    // already have happened by then.
    let deleted = Instant::now();
    env.cluster
        .kubectl_ok("admin", &["-n", ns, "delete", "lrdev", device], None)?;
    while stack.agent_pid(ns, device).is_some() && deleted.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = deleted.elapsed();
    ensure!(
        stack.agent_pid(ns, device).is_none(),
        "agent {pid} still runs 60s after its Device was deleted; its log:\n{}",
        stack.tail(&format!("agent-{ns}-{device}"))
    );
    ensure!(
        took < Duration::from_secs(2),
        "the stream was cut {took:?} after the delete, not within 2s"
    );
    let log = stack.tail(&format!("agent-{ns}-{device}"));
    ensure!(log.contains("revoked"), "the agent was not told why: {log}");
    println!("device deleted -> agent stream cut in {took:?}");
    Ok(())
}

/// `liveresponse-operator ca STEP` as an admin: whether it succeeded, and what it said.
fn run_ca(env: &Env, step: &str) -> Result<(bool, String)> {
    let out = std::process::Command::new(e2e::stack::target_bin("liveresponse-operator"))
        .args(["--namespace", e2e::stack::OPERATOR_NAMESPACE, "ca", step])
        .env("KUBECONFIG", env.cluster.kubeconfig("admin"))
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

fn operator_ca(env: &Env, step: &str) -> Result<String> {
    let (ok, text) = run_ca(env, step)?;
    ensure!(ok, "ca {step}: {text}");
    Ok(text)
}

fn restart_operator(env: &Env) -> Result<()> {
    env.stack.kill_operator();
    env.stack.start_operator()
}

fn certs_in(file: &Path) -> Result<usize> {
    Ok(std::fs::read_to_string(file)?
        .matches("BEGIN CERTIFICATE")
        .count())
}

/// `openssl verify` of a certificate against one CA file.
fn signed_by(cert: &Path, ca: &Path) -> bool {
    std::process::Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(ca)
        .arg(cert)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A CA rotation in its three steps, each followed by an operator restart, with an agent
/// connected throughout: after `prepare` the agent holds both CAs; after `switch` it still
/// connects (the new CA serves, its old certificate is still accepted) and renews into a
/// certificate of the new CA; after `finish` it works, and a certificate of the old CA is
/// refused.
pub async fn the_ca_rotates_without_losing_an_agent(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-rotate", "steady");
    let stack = &env.stack;
    stack.tenant(ns, "  deviceCertificateLifetime: 30s\n")?;
    let root = host_root("rotate")?;
    stack.start_agent(ns, device, &root, &[])?;
    stack.wait_device(ns, device, true, T)?;
    let dir = stack.agent_dir(ns, device);
    let work = dir.with_extension("rotation");
    std::fs::create_dir_all(&work)?;
    let old_ca = work.join("old-ca.crt");
    std::fs::copy(stack.ca_file(), &old_ca)?;
    ensure!(certs_in(&old_ca)? == 1, "the CA bundle before a rotation");
    // A certificate of the old CA, for the end. It is accepted now:
    let old_cert = std::fs::read_to_string(dir.join("device.crt"))?;
    let old_key = std::fs::read_to_string(dir.join("device.key"))?;
    ensure!(
        signed_by(&dir.join("device.crt"), &old_ca),
        "openssl verify works here"
    );

    let said = operator_ca(env, "prepare")?;
    ensure!(
        said.contains("ca switch"),
        "prepare says what comes next: {said}"
    );
    let (again, _) = run_ca(env, "prepare")?;
    ensure!(!again, "a second prepare must be refused");
    restart_operator(env)?;
    eventually("the agent to hold both CAs", T, || async {
        Ok((certs_in(&dir.join("ca.crt"))? == 2).then_some(()))
    })
    .await?;
    stack.wait_device(ns, device, true, T)?;
    works(env, ns, device, "prepared").await?;

    operator_ca(env, "switch")?;
    restart_operator(env)?;
    stack.wait_device(ns, device, true, T)?;
    works(env, ns, device, "switched").await?;
    // The new CA is the bundle's first certificate now.
    let bundle = std::fs::read_to_string(stack.ca_file())?;
    let end = "-----END CERTIFICATE-----";
    let new_ca_pem = &bundle[..bundle.find(end).context("a PEM bundle")? + end.len()];
    let new_ca = work.join("new-ca.crt");
    std::fs::write(&new_ca, format!("{new_ca_pem}\n"))?;
    eventually(
        "the agent to renew into a certificate of the new CA",
        T,
        || async { Ok(signed_by(&dir.join("device.crt"), &new_ca).then_some(())) },
    )
    .await?;
    // A newly enrolled agent trusts the new CA from the start.
    stack.start_agent(ns, "newcomer", &root, &[])?;
    stack.wait_device(ns, "newcomer", true, T)?;

    operator_ca(env, "finish")?;
    restart_operator(env)?;
    stack.wait_device(ns, device, true, T)?;
    works(env, ns, device, "finished").await?;
    ensure!(certs_in(&stack.ca_file())? == 1, "the bundle after finish");
    // Refused by TLS (its CA is no longer trusted), before any fingerprint is looked at.
    let bundle = std::fs::read_to_string(stack.ca_file())?;
    match attach_with(env, &bundle, &old_cert, &old_key).await? {
        Ok(()) => anyhow::bail!("a certificate of the retired CA was accepted after `ca finish`"),
        Err(why) => ensure!(
            !why.contains("revoked") && !why.contains("PermissionDenied"),
            "the retired CA's certificate was refused by the fingerprint check, not by TLS: {why}"
        ),
    }
    stack.kill_agent(ns, "newcomer");
    Ok(())
}
