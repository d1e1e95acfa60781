//! The operator's certificate authority: created on first start and kept in a Secret, it
//! signs the gateway's serving certificate and each enrolled device's client certificate.
//! A device certificate names its namespace and device in a URI SAN; the gateway trusts
//! that only together with the fingerprint recorded in the Device, so deleting the Device
//! revokes the certificate. Device certificates are short-lived and renewed by the agent
//! over its stream; the CA itself is rotated in three steps ([`Rotation`]).

use std::collections::BTreeMap;
use std::time::Duration;

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
/// Device certificates start this long before they are signed: a host whose clock is a
/// little behind must not find its new certificate "not yet valid".
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Default life of a device certificate.
pub const DEFAULT_DEVICE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The CA's certificate and key, and every CA certificate that is trusted.
pub struct Ca {
    /// The CA that signs now.
    pub cert_pem: String,
    key_pem: String,
    /// The signing CA, then, during a rotation, the next CA (`ca prepare` was run) or the
    /// retired one (`ca switch` was run). The gateway accepts device certificates from any
    /// of them and agents trust the gateway's certificate from any of them.
    pub bundle_pem: String,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The three steps of a CA rotation, each followed by an operator restart. Agents learn
/// the bundle on every connection, so between the steps every agent must have connected
/// once (`prepare`, then a restart that reconnects them all) or renewed its certificate
/// (`switch`, then one device-certificate lifetime) before the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Rotation {
    /// Creates the next CA; it joins the bundle, the current CA still signs.
    Prepare,
    /// The next CA signs from now on; the old one is kept, as retired, in the bundle.
    Switch,
    /// Drops the retired CA: certificates it signed are no longer accepted.
    Finish,
}

const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NEXT_CRT: &str = "next.crt";
const NEXT_KEY: &str = "next.key";
const RETIRED_CRT: &str = "retired.crt";

/// Applies one rotation step to the CA Secret's data; says what it did and what comes next.
pub fn rotate(data: &mut BTreeMap<String, ByteString>, step: Rotation) -> Result<String> {
    let has = |k: &str, d: &BTreeMap<String, ByteString>| d.contains_key(k);
    match step {
        Rotation::Prepare => {
            if has(NEXT_CRT, data) {
                return Err(Error::Invalid(
                    "a rotation is already prepared: run `ca switch` once every agent has reconnected".into(),
                ));
            }
            if has(RETIRED_CRT, data) {
                return Err(Error::Invalid(
                    "the previous rotation is not finished: run `ca finish` once every device certificate was renewed".into(),
                ));
            }
            let next = Ca::generate()?;
            data.insert(NEXT_CRT.into(), ByteString(next.cert_pem.into_bytes()));
            data.insert(NEXT_KEY.into(), ByteString(next.key_pem.into_bytes()));
            Ok("prepared the next CA. Restart the operator so that every agent reconnects and learns it, then run `ca switch`".into())
        }
        Rotation::Switch => {
            let (Some(crt), Some(key)) = (data.remove(NEXT_CRT), data.remove(NEXT_KEY)) else {
                return Err(Error::Invalid(
                    "no rotation is prepared: run `ca prepare` first".into(),
                ));
            };
            let old = data.insert(CA_CRT.into(), crt);
            data.insert(CA_KEY.into(), key);
            if let Some(old) = old {
                data.insert(RETIRED_CRT.into(), old);
            }
            Ok("the next CA signs now. Restart the operator; agents get certificates from the new CA as they renew. After one device-certificate lifetime, run `ca finish`".into())
        }
        Rotation::Finish => {
            if data.remove(RETIRED_CRT).is_none() {
                return Err(Error::Invalid(
                    "no retired CA to drop: run `ca prepare` and `ca switch` first".into(),
                ));
            }
            Ok("dropped the retired CA. Restart the operator: certificates it signed are refused from now on".into())
        }
    }
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
            CA_CRT.to_string(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        );
        data.insert(
            CA_KEY.to_string(),
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

    /// Applies a rotation step to the CA Secret (with its resourceVersion, so two admins
    /// cannot interleave steps).
    pub async fn rotate_secret(
        client: kube::Client,
        namespace: &str,
        step: Rotation,
    ) -> Result<String> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let mut secret = api.get_opt(CA_SECRET).await?.ok_or_else(|| {
            Error::Invalid(format!(
                "there is no CA yet (Secret {namespace}/{CA_SECRET}): start the operator once first"
            ))
        })?;
        let mut data = secret.data.take().unwrap_or_default();
        let said = rotate(&mut data, step)?;
        // Refuse to write a Secret the operator could not load.
        Self::from_data(&data)?;
        secret.data = Some(data);
        api.replace(CA_SECRET, &PostParams::default(), &secret)
            .await?;
        Ok(said)
    }

    fn from_secret(s: &Secret) -> Result<Self> {
        Self::from_data(s.data.as_ref().unwrap_or(&BTreeMap::new()))
    }

    fn from_data(data: &BTreeMap<String, ByteString>) -> Result<Self> {
        let get = |k: &str| -> Result<Option<String>> {
            data.get(k)
                .map(|bytes| {
                    String::from_utf8(bytes.0.clone())
                        .map_err(|_| Error::Pki(format!("{k} is not PEM text")))
                })
                .transpose()
        };
        let need = |k: &str| -> Result<String> {
            get(k)?.ok_or_else(|| Error::Pki(format!("Secret {CA_SECRET} has no {k}")))
        };
        let cert_pem = need(CA_CRT)?;
        let key_pem = need(CA_KEY)?;
        let mut bundle_pem = cert_pem.clone();
        for extra in [get(NEXT_CRT)?, get(RETIRED_CRT)?].into_iter().flatten() {
            if !bundle_pem.ends_with('\n') {
                bundle_pem.push('\n');
            }
            bundle_pem.push_str(&extra);
        }
        let ca = Self {
            cert_pem,
            key_pem,
            bundle_pem,
        };
        // A key that does not match its certificate would sign certificates no one trusts.
        let key = KeyPair::from_pem(&ca.key_pem)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("{CA_CRT} is not a PEM certificate: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| Error::Pki(format!("{CA_CRT} is not a certificate: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Pki(format!(
                "{CA_KEY} does not belong to {CA_CRT} in Secret {CA_SECRET}"
            )));
        }
        Ok(ca)
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
        let cert_pem = cert.pem();
        Ok(Self {
            bundle_pem: cert_pem.clone(),
            cert_pem,
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
        lifetime: Duration,
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
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW.min(lifetime / 10);
        params.not_after = now + lifetime;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// How long until a certificate reaches two thirds of its life, when its agent renews it
/// (zero if that is past).
pub fn renew_after(der: &[u8], now: jiff::Timestamp) -> Result<Duration> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Invalid(format!("unreadable client certificate: {e}")))?;
    let from = cert.validity().not_before.timestamp();
    let to = cert.validity().not_after.timestamp();
    let at = from.saturating_add(to.saturating_sub(from).saturating_mul(2) / 3);
    let left = at.saturating_sub(now.as_second());
    Ok(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
}

/// [`renew_after`] of a PEM certificate.
pub fn renew_after_pem(pem: &str, now: jiff::Timestamp) -> Result<Duration> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| Error::Pki(format!("not a PEM certificate: {e}")))?;
    renew_after(&pem.contents, now)
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
pub(crate) mod tests {
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
        let (pem, fp) = ca
            .sign_device(&csr, "tenant-a", "host-1", DEFAULT_DEVICE_LIFETIME)
            .expect("sign");
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
            DEFAULT_DEVICE_LIFETIME,
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

    #[test]
    fn device_certificates_are_renewed_at_two_thirds_of_their_life() {
        let ca = Ca::generate().expect("ca");
        let (csr, _key) = csr();
        let now = jiff::Timestamp::now();
        let (pem, _) = ca
            .sign_device(&csr, "ns", "d", DEFAULT_DEVICE_LIFETIME)
            .expect("sign");
        let left = renew_after(&pem_to_der(&pem), now).expect("validity");
        // 30 days, started 5 minutes early: renewal comes after about 19 days 23 hours.
        let expected = (DEFAULT_DEVICE_LIFETIME + CLOCK_SKEW) * 2 / 3 - CLOCK_SKEW;
        assert!(left.abs_diff(expected) < Duration::from_secs(5), "{left:?}");
        // A test-sized life keeps a proportionate skew, so it is not renewed at once.
        let (pem, _) = ca
            .sign_device(&csr, "ns", "d", Duration::from_secs(30))
            .expect("sign");
        let left = renew_after(&pem_to_der(&pem), now).expect("validity");
        assert!((17..=20).contains(&left.as_secs()), "{left:?}");
        let later = now + jiff::SignedDuration::from_secs(60);
        assert_eq!(
            renew_after(&pem_to_der(&pem), later).expect("validity"),
            Duration::ZERO
        );
    }

    fn data_of(ca: &Ca) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (CA_CRT.into(), ByteString(ca.cert_pem.clone().into_bytes())),
            (CA_KEY.into(), ByteString(ca.key_pem.clone().into_bytes())),
        ])
    }

    #[test]
    fn a_rotation_keeps_both_cas_trusted_until_it_finishes() {
        let old = Ca::generate().expect("ca");
        let mut data = data_of(&old);
        let e = rotate(&mut data, Rotation::Switch).expect_err("nothing prepared");
        assert!(e.to_string().contains("ca prepare"), "{e}");
        rotate(&mut data, Rotation::Prepare).expect("prepare");
        assert!(rotate(&mut data, Rotation::Prepare).is_err());
        let prepared = Ca::from_data(&data).expect("load");
        assert_eq!(prepared.cert_pem, old.cert_pem, "the old CA still signs");
        assert_eq!(prepared.bundle_pem.matches("BEGIN CERTIFICATE").count(), 2);
        let next = String::from_utf8(data[NEXT_CRT].0.clone()).expect("pem");

        rotate(&mut data, Rotation::Switch).expect("switch");
        let switched = Ca::from_data(&data).expect("load");
        assert_eq!(switched.cert_pem, next, "the next CA signs");
        assert!(
            switched.bundle_pem.contains(&old.cert_pem),
            "the old is still trusted"
        );
        let e = rotate(&mut data, Rotation::Prepare).expect_err("unfinished");
        assert!(e.to_string().contains("ca finish"), "{e}");

        rotate(&mut data, Rotation::Finish).expect("finish");
        let finished = Ca::from_data(&data).expect("load");
        assert_eq!(finished.bundle_pem, next);
        assert!(rotate(&mut data, Rotation::Finish).is_err());
    }

    #[test]
    fn a_ca_secret_with_a_foreign_key_is_refused() {
        let a = Ca::generate().expect("ca");
        let b = Ca::generate().expect("ca");
        let mut data = data_of(&a);
        data.insert(CA_KEY.into(), ByteString(b.key_pem.clone().into_bytes()));
        assert!(Ca::from_data(&data).is_err());
    }

    pub(crate) fn pem_to_der(pem: &str) -> Vec<u8> {
        use x509_parser::pem::parse_x509_pem;
        parse_x509_pem(pem.as_bytes()).expect("pem").1.contents
    }
}
