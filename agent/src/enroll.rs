//! Enrollment: the agent's identity lives in its state folder (key, certificate, the
//! operator's CA). Without a certificate it enrolls once with a bootstrap token: it makes
//! a key, sends a CSR, and keeps what the operator's CA signed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use liveresponse_api::proto::agent_gateway_client::AgentGatewayClient;
use liveresponse_api::proto::{EnrollRequest, PROTOCOL_VERSION};
use rcgen::{CertificateParams, DnType, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The files that make an agent's identity.
pub struct Identityfiles {
    pub dir: PathBuf,
}

impl Identityfiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    fn key(&self) -> PathBuf {
        self.dir.join("device.key")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("device.crt")
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn enrolled(&self) -> bool {
        self.key().exists() && self.cert().exists() && self.ca().exists()
    }
    /// The TLS configuration for the stream: our certificate, and only the operator's CA.
    pub fn tls(&self, domain: &str) -> Result<ClientTlsConfig> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(ClientTlsConfig::new()
            .domain_name(domain)
            .ca_certificate(Certificate::from_pem(read(self.ca())?))
            .identity(Identity::from_pem(read(self.cert())?, read(self.key())?)))
    }
}

/// Enrolls with the gateway; writes key, certificate and CA into the state folder.
pub async fn enroll(
    files: &Identityfiles,
    gateway: &str,
    domain: &str,
    ca_pem: &str,
    namespace: &str,
    device: &str,
    token: &str,
) -> Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, device);
    let csr = params.serialize_request(&key)?.pem()?;
    let tls = ClientTlsConfig::new()
        .domain_name(domain)
        .ca_certificate(Certificate::from_pem(ca_pem));
    let channel = Endpoint::from_shared(gateway.to_string())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let resp = AgentGatewayClient::new(channel)
        .enroll(EnrollRequest {
            namespace: namespace.to_string(),
            bootstrap_token: token.to_string(),
            device_name: device.to_string(),
            csr_pem: csr,
            protocol_version: PROTOCOL_VERSION,
        })
        .await;
    let resp = match resp {
        Ok(r) => r.into_inner(),
        Err(s) => bail!("enrollment refused: {}", s.message()),
    };
    std::fs::create_dir_all(&files.dir)?;
    write_private(&files.key(), key.serialize_pem().as_bytes())?;
    std::fs::write(files.cert(), resp.certificate_pem)?;
    std::fs::write(files.ca(), resp.ca_pem)?;
    tracing::info!(namespace = %resp.namespace, device = %resp.device, "enrolled");
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}
