//! The operator's certificate authority: created on first start and kept in a Secret, it
//! signs the gateway's serving certificate and each enrolled device's client certificate.
//! A device certificate names its namespace and device in a URI SAN; the gateway trusts
//! that only together with the fingerprint recorded in the Device, so deleting the Device
//! revokes the certificate.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Name of the Secret that holds the CA.
pub const CA_SECRET: &str = "liveresponse-ca";
const URI_PREFIX: &str = "liveresponse://device/";

/// The CA's certificate and key.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// Loads the CA from its Secret, creating both on first start. Two replicas starting at
    /// once race on the create; the loser reads the winner's.
    pub async fn load_or_create(client: kube::Client, namespace: &str) -> Result<Self> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        if let Some(s) = api.get_opt(CA_SECRET).await? {
            return Self::from_secret(&s);
        }
        let ca = Self::generate()?;
        let mut data = BTreeMap::new();
        data.insert(
            "ca.crt".to_string(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        );
        data.insert(
            "ca.key".to_string(),
            ByteString(ca.key_pem.clone().into_bytes()),
        );
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".into(),
                    "liveresponse".into(),
                )])),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("liveresponse.io/ca".into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(ca),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Self::from_secret(&api.get(CA_SECRET).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn from_secret(s: &Secret) -> Result<Self> {
        let get = |k: &str| -> Result<String> {
            let bytes = s
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .ok_or_else(|| Error::Pki(format!("Secret {CA_SECRET} has no {k}")))?;
            String::from_utf8(bytes.0.clone())
                .map_err(|_| Error::Pki(format!("{k} is not PEM text")))
        };
        Ok(Self {
            cert_pem: get("ca.crt")?,
            key_pem: get("ca.key")?,
        })
    }

    /// A fresh self-signed CA (ten years).
    pub fn generate() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "liveresponse agent CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// The gateway's serving certificate for the given DNS names and IP addresses.
    pub fn serving_cert(&self, names: &[String]) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "liveresponse-gateway");
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(n.clone().try_into()?),
                });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a device's CSR. Only the CSR's public key is used: the subject and SANs are the
    /// operator's, so an agent cannot ask for another identity. Returns the PEM and the
    /// certificate's SHA-256 fingerprint.
    pub fn sign_device(
        &self,
        csr_pem: &str,
        namespace: &str,
        device: &str,
    ) -> Result<(String, String)> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            Error::Invalid(format!("the certificate signing request is not valid: {e}"))
        })?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, device);
        params
            .distinguished_name
            .push(DnType::OrganizationName, namespace);
        params.subject_alt_names.push(SanType::URI(
            format!("{URI_PREFIX}{namespace}/{device}").try_into()?,
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = jiff::Timestamp::now();
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        let year = i32::from(now.to_zoned(jiff::tz::TimeZone::UTC).year()) + 1;
        params.not_after = rcgen::date_time_ymd(year, 12, 31);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The (namespace, device) a client certificate was issued for, from its URI SAN.
pub fn device_identity(der: &[u8]) -> Result<(String, String)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Invalid(format!("unreadable client certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Invalid(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| Error::Invalid("the client certificate names no device".into()))?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix(URI_PREFIX)
            && let Some((ns, dev)) = rest.split_once('/')
            && !ns.is_empty()
            && !dev.is_empty()
            && !dev.contains('/')
        {
            return Ok((ns.to_string(), dev.to_string()));
        }
    }
    Err(Error::Invalid(
        "the client certificate names no device".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (String, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "someone-else");
        let csr = params.serialize_request(&key).expect("csr");
        (csr.pem().expect("pem"), key)
    }

    #[test]
    fn device_certificates_carry_the_operators_identity_not_the_csrs() {
        let ca = Ca::generate().expect("ca");
        let (csr, _key) = csr();
        let (pem, fp) = ca.sign_device(&csr, "tenant-a", "host-1").expect("sign");
        let der = pem_to_der(&pem);
        assert_eq!(
            device_identity(&der).expect("identity"),
            ("tenant-a".into(), "host-1".into())
        );
        assert_eq!(fingerprint(&der), fp);
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = Ca::generate().expect("ca");
        let err = ca.sign_device(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "ns",
            "d",
        );
        assert!(matches!(err, Err(Error::Invalid(m)) if m.contains("not valid")));
    }

    #[test]
    fn serving_cert_has_ip_and_dns_names() {
        let ca = Ca::generate().expect("ca");
        let issued = ca
            .serving_cert(&["127.0.0.1".into(), "localhost".into()])
            .expect("serving");
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
    }

    pub(crate) fn pem_to_der(pem: &str) -> Vec<u8> {
        use x509_parser::pem::parse_x509_pem;
        parse_x509_pem(pem.as_bytes()).expect("pem").1.contents
    }
}
