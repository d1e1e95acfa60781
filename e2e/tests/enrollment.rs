//! Enrollment like kubelet TLS bootstrap: tokens that expire, run out and name whom they
//! enroll; a revoked device stays out until an admin clears it; an agent deletes its token.

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e::eventually;
use e2e::fixture::host_root;
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{EnrollRequest, PROTOCOL_VERSION};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::Env;

const T: Duration = Duration::from_secs(60);

fn token_secret(ns: &str, name: &str, token: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{liveresponse.io/bootstrap-token: \"true\"}}\nstringData:\n  token: \"{token}\"\n{extra}"
    )
}

async fn enroll(
    env: &Env,
    ns: &str,
    token: &str,
    device: &str,
) -> Result<Result<(), tonic::Status>> {
    let ca = std::fs::read_to_string(env.stack.ca_file())?;
    let tls = ClientTlsConfig::new()
        .domain_name("127.0.0.1")
        .ca_certificate(Certificate::from_pem(&ca));
    let ch = Endpoint::from_shared(env.stack.gateway()?)?
        .tls_config(tls)?
        .connect()
        .await?;
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    Ok(AgentGatewayClient::new(ch)
        .enroll(EnrollRequest {
            namespace: ns.into(),
            bootstrap_token: token.into(),
            device_name: device.into(),
            csr_pem: csr,
            protocol_version: PROTOCOL_VERSION,
        })
        .await
        .map(|_| ()))
}

fn refused_with(r: &Result<(), tonic::Status>, words: &str) -> bool {
    matches!(r, Err(s) if s.message().contains(words))
}

pub async fn bootstrap_tokens_expire_run_out_and_name_their_devices(
    env: &'static Env,
) -> Result<()> {
    let ns = "lr-enroll";
    let stack = &env.stack;
    stack.tenant(ns, "")?;
    let apply = |y: String| {
        env.cluster
            .kubectl_ok("admin", &["apply", "-f", "-"], Some(&y))
    };
    apply(token_secret(
        ns,
        "expired",
        "token-expired-0123456789",
        "  expiration: \"2020-01-01T00:00:00Z\"\n",
    ))?;
    apply(token_secret(
        ns,
        "once",
        "token-once-0123456789",
        "  max-uses: \"1\"\n",
    ))?;
    apply(token_secret(
        ns,
        "web-only",
        "token-web-0123456789",
        "  device-name-pattern: \"web-*\"\n",
    ))?;

    let r = enroll(env, ns, "token-expired-0123456789", "e-1").await?;
    ensure!(refused_with(&r, "expired"), "expired token: {r:?}");
    let r = enroll(env, ns, "token-once-0123456789", "o-1").await?;
    ensure!(r.is_ok(), "first use of a one-use token: {r:?}");
    let r = enroll(env, ns, "token-once-0123456789", "o-2").await?;
    ensure!(refused_with(&r, "already used 1"), "second use: {r:?}");
    let r = enroll(env, ns, "token-web-0123456789", "db-1").await?;
    ensure!(refused_with(&r, "web-*"), "another name: {r:?}");
    let r = enroll(env, ns, "token-web-0123456789", "web-1").await?;
    ensure!(r.is_ok(), "a matching name: {r:?}");
    let r = enroll(env, ns, "not-a-token", "x-1").await?;
    ensure!(
        matches!(&r, Err(s) if s.code() == tonic::Code::Unauthenticated),
        "unknown token: {r:?}"
    );

    // A real agent removes its token file once enrolled.
    let root = host_root("enroll")?;
    stack.start_agent(ns, "rev", &root, &[])?;
    stack.wait_device(ns, "rev", true, T)?;
    let token_file = stack.agent_dir(ns, "rev").join("bootstrap.token");
    ensure!(
        !token_file.exists(),
        "{} is still there after enrollment",
        token_file.display()
    );

    // Revoked: its Device deleted, the namespace's token no longer enrolls that name...
    stack.kill_agent(ns, "rev");
    env.cluster
        .kubectl_ok("admin", &["-n", ns, "delete", "lrdev", "rev"], None)?;
    let token = std::fs::read_to_string(stack.bootstrap_token(ns)?)?;
    let r = eventually("the revocation to be recorded", T, || async {
        let r = enroll(env, ns, token.trim(), "rev").await?;
        Ok(refused_with(&r, "was revoked").then_some(r))
    })
    .await?;
    ensure!(
        refused_with(&r, "kubectl -n lr-enroll patch configmap"),
        "the refusal says how to clear it: {r:?}"
    );
    // ...until an admin clears the record.
    env.cluster.kubectl_ok(
        "admin",
        &[
            "-n",
            ns,
            "patch",
            "configmap",
            "liveresponse-revoked-devices",
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/data/rev"}]"#,
        ],
        None,
    )?;
    let r = enroll(env, ns, token.trim(), "rev").await?;
    ensure!(r.is_ok(), "after the record was cleared: {r:?}");
    Ok(())
}
