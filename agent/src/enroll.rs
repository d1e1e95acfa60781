//! Enrollment: the agent's identity lives in its state folder (key, certificate, the
//! operator's CA bundle). Without a certificate it enrolls once with a bootstrap token: it
//! makes a key, sends a CSR, and keeps what the operator's CA signed. Certificates are
//! short-lived: the connection renews them over the stream and stores them here.

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
    /// A renewed key and certificate, written as one file before they replace the current
    /// pair, so a crash between the two replacements cannot pair a key with the wrong
    /// certificate: the next start finishes the job.
    fn renewal(&self) -> PathBuf {
        self.dir.join("renewal.pem")
    }
    pub fn enrolled(&self) -> bool {
        self.key().exists() && self.cert().exists() && self.ca().exists()
    }
    /// The TLS configuration for the stream: our certificate, and only the operator's CAs.
    /// Fails when the certificate has expired: retrying cannot help then.
    pub fn tls(&self, domain: &str) -> Result<ClientTlsConfig> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let cert = read(self.cert())?;
        if let Some(expired) = expired_on(&cert, jiff::Timestamp::now()) {
            bail!(
                "the certificate in {} expired on {expired}: this agent was offline for longer than its certificate's life and could not renew it. Delete its Device and enroll again with a new bootstrap token",
                self.cert().display()
            );
        }
        Ok(ClientTlsConfig::new()
            .domain_name(domain)
            .ca_certificate(Certificate::from_pem(read(self.ca())?))
            .identity(Identity::from_pem(cert, read(self.key())?)))
    }

    /// SHA-256 of the certificate held now (of its DER, as the Device records it).
    pub fn held_sha256(&self) -> Result<String> {
        use sha2::Digest;
        let pem = std::fs::read(self.cert())?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| {
            anyhow::anyhow!("{} is not a PEM certificate: {e}", self.cert().display())
        })?;
        Ok(hex::encode(sha2::Sha256::digest(&pem.contents)))
    }

    /// Keeps a renewed key and certificate for the next connection.
    pub fn store_renewal(&self, key_pem: &str, cert_pem: &str) -> Result<()> {
        if !cert_pem.contains(CERT_BEGIN) || key_pem.contains(CERT_BEGIN) {
            bail!("the renewed certificate is not a PEM certificate");
        }
        write_atomic(&self.renewal(), format!("{key_pem}{cert_pem}").as_bytes())?;
        self.finish_renewal()
    }

    /// Replaces the key and certificate with a stored renewal, if there is one.
    pub fn finish_renewal(&self) -> Result<()> {
        let text = match std::fs::read_to_string(self.renewal()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).context("reading the stored certificate renewal"),
        };
        let Some(at) = text.find(CERT_BEGIN) else {
            // Torn before the rename made it whole: the current pair still stands.
            std::fs::remove_file(self.renewal())?;
            return Ok(());
        };
        write_atomic(&self.key(), &text.as_bytes()[..at])?;
        write_atomic(&self.cert(), &text.as_bytes()[at..])?;
        std::fs::remove_file(self.renewal())?;
        Ok(())
    }

    /// Replaces the pinned CA file with the operator's current bundle (a CA rotation adds
    /// the next CA before it signs). Says whether it changed.
    pub fn store_ca_bundle(&self, bundle_pem: &str) -> Result<bool> {
        if !bundle_pem.contains(CERT_BEGIN) {
            return Ok(false);
        }
        if std::fs::read_to_string(self.ca()).is_ok_and(|c| c == bundle_pem) {
            return Ok(false);
        }
        write_atomic(&self.ca(), bundle_pem.as_bytes())?;
        Ok(true)
    }
}

const CERT_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

/// When a PEM certificate expired, if it has (an unreadable one is left to TLS to refuse).
fn expired_on(cert_pem: &str, now: jiff::Timestamp) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after;
    (not_after.timestamp() <= now.as_second()).then(|| not_after.to_string())
}

/// A new key and a CSR for it (the operator sets the subject).
pub fn new_key_and_csr(device: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, device);
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// The endpoint an agent enrolls through: it trusts only the operator's CA, since it has
/// no certificate of its own yet.
pub fn enroll_endpoint(gateway: &str, domain: &str, ca_pem: &str) -> Result<Endpoint> {
    let tls = ClientTlsConfig::new()
        .domain_name(domain)
        .ca_certificate(Certificate::from_pem(ca_pem));
    Ok(Endpoint::from_shared(gateway.to_string())?.tls_config(tls)?)
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
    let endpoint = enroll_endpoint(gateway, domain, ca_pem)?;
    enroll_over(files, endpoint, namespace, device, token).await
}

/// [`enroll`] through an endpoint the caller configured (the simulated fleet gives each
/// device its own loopback source address, as separate hosts would have).
pub async fn enroll_over(
    files: &Identityfiles,
    endpoint: Endpoint,
    namespace: &str,
    device: &str,
    token: &str,
) -> Result<()> {
    let (key, csr) = new_key_and_csr(device)?;
    let gateway = endpoint.uri().to_string();
    let channel = endpoint
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
    write_atomic(&files.key(), key.serialize_pem().as_bytes())?;
    write_atomic(&files.cert(), resp.certificate_pem.as_bytes())?;
    write_atomic(&files.ca(), resp.ca_pem.as_bytes())?;
    tracing::info!(namespace = %resp.namespace, device = %resp.device, "enrolled");
    Ok(())
}

/// Writes a file readable by its owner only, whole or not at all: a crash leaves the old
/// content, never half of the new.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, Identityfiles) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Identityfiles::new(dir.path());
        (dir, files)
    }

    fn self_signed(days: i64) -> String {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["x".into()]).expect("params");
        let now = rcgen::date_time_ymd(2025, 1, 1);
        params.not_before = now;
        params.not_after = now + std::time::Duration::from_secs(days as u64 * 86400);
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn a_renewal_replaces_key_and_certificate_together() {
        let (_d, files) = files();
        std::fs::write(files.key(), "old key").expect("key");
        std::fs::write(files.cert(), "old cert").expect("cert");
        let cert = self_signed(30);
        files
            .store_renewal(
                "-----BEGIN PRIVATE KEY-----\nnew\n-----END PRIVATE KEY-----\n",
                &cert,
            )
            .expect("store");
        assert!(
            std::fs::read_to_string(files.key())
                .expect("key")
                .contains("new")
        );
        assert_eq!(std::fs::read_to_string(files.cert()).expect("cert"), cert);
        assert!(!files.renewal().exists());
        assert!(files.store_renewal("key", "not a certificate").is_err());
        assert_eq!(std::fs::read_to_string(files.cert()).expect("cert"), cert);
    }

    #[test]
    fn a_renewal_stored_before_a_crash_is_finished_at_the_next_start() {
        let (_d, files) = files();
        std::fs::write(files.key(), "old key").expect("key");
        std::fs::write(files.cert(), "old cert").expect("cert");
        let cert = self_signed(30);
        std::fs::write(files.renewal(), format!("new key\n{cert}")).expect("renewal");
        files.finish_renewal().expect("finish");
        assert_eq!(
            std::fs::read_to_string(files.key()).expect("key"),
            "new key\n"
        );
        assert_eq!(std::fs::read_to_string(files.cert()).expect("cert"), cert);
        // Nothing stored: nothing changes.
        files.finish_renewal().expect("nothing to do");
        assert_eq!(std::fs::read_to_string(files.cert()).expect("cert"), cert);
    }

    #[test]
    fn an_expired_certificate_is_named_with_its_date() {
        let cert = self_signed(1);
        let now = jiff::Timestamp::now();
        assert!(expired_on(&cert, now).expect("expired").contains("2025"));
        let long = self_signed(365 * 30);
        assert_eq!(expired_on(&long, now), None);
        assert_eq!(expired_on("garbage", now), None);
    }

    #[test]
    fn the_ca_bundle_is_replaced_only_by_certificates() {
        let (_d, files) = files();
        std::fs::write(files.ca(), "old").expect("ca");
        assert!(!files.store_ca_bundle("").expect("empty"));
        let bundle = format!("{}{}", self_signed(30), self_signed(30));
        assert!(files.store_ca_bundle(&bundle).expect("bundle"));
        assert!(!files.store_ca_bundle(&bundle).expect("same"));
        assert_eq!(std::fs::read_to_string(files.ca()).expect("ca"), bundle);
    }
}
