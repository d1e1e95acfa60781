//! SSH signatures of library files (`ssh-keygen -Y sign -n liveresponse.io`), checked
//! against a namespace's `trustedSigners` (lines of an OpenSSH allowed-signers file).
//!
//! The operator checks them when a LibraryFile changes, and the agent checks them again
//! before it writes or runs the bytes, with this same code: both must agree on what is
//! trusted. No I/O here.

use ssh_key::{HashAlg, PublicKey, SshSig};

/// The signature namespace of library files (`ssh-keygen -Y sign -n liveresponse.io`).
pub const NAMESPACE: &str = "liveresponse.io";

/// The namespace earlier documentation told people to sign with; it names the same
/// thing, so signatures made with it stay valid.
pub const LEGACY_NAMESPACE: &str = "liveresponse";

const HOW_TO_SIGN: &str = "ssh-keygen -Y sign -n liveresponse.io -f KEY FILE";

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "the signature is not an SSH signature ({0}); sign the file with `{HOW_TO_SIGN}` and put the whole FILE.sig, its BEGIN and END SSH SIGNATURE lines included, in spec.signature"
    )]
    Malformed(String),
    #[error(
        "untrusted key: the signature was made by key {fingerprint}, which is not in the namespace's trustedSigners; sign with a trusted key, or have a settings admin add the key's allowed-signers line to LiveResponseSettings spec.trustedSigners"
    )]
    UntrustedKey {
        /// `SHA256:...`, as `ssh-keygen -l` prints it.
        fingerprint: String,
    },
    #[error(
        "the signature by {principal} does not match the content: the file changed after it was signed, or the signature is another file's; sign the current content again with `{HOW_TO_SIGN}`"
    )]
    BadSignature { principal: String },
    #[error("{0}")]
    WrongNamespace(String),
    #[error(
        "the namespace's LiveResponseSettings list no trustedSigners, so no signature can be trusted; a settings admin must add the signer's allowed-signers line (`principal key-type base64-key`) to spec.trustedSigners"
    )]
    NoTrustedSigners,
    #[error(
        "trustedSigners line {line}: {why}; write `principal[,principal...] [namespaces=\"liveresponse.io\"] key-type base64-key [comment]`, as in an OpenSSH allowed_signers file"
    )]
    BadSignerLine {
        /// One-based position in `trustedSigners`.
        line: usize,
        why: String,
    },
}

/// One trusted key: a parsed allowed-signers line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedSigner {
    /// The principals field as written (`alice@example.com` or `a@x,b@y`).
    pub principals: String,
    /// The signature namespaces the line allows (its `namespaces=` option); `None` when it
    /// has no such option, which allows any.
    pub namespaces: Option<Vec<String>>,
    pub key: PublicKey,
}

impl TrustedSigner {
    fn allows(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| pattern_match(n, namespace)))
    }
}

/// Parses `trustedSigners`. Blank lines and `#` comments are skipped; an entry that holds
/// several lines (a pasted file) is read line by line. Any line that does not parse is an
/// error rather than skipped: a half-read trust list would silently distrust someone.
pub fn parse_signers<S: AsRef<str>>(lines: &[S]) -> Result<Vec<TrustedSigner>, SignatureError> {
    let mut out = Vec::new();
    for (i, entry) in lines.iter().enumerate() {
        for text in entry.as_ref().lines() {
            let text = text.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            out.push(
                parse_line(text)
                    .map_err(|why| SignatureError::BadSignerLine { line: i + 1, why })?,
            );
        }
    }
    Ok(out)
}

/// Verifies an armored SSH signature (`-----BEGIN SSH SIGNATURE-----`) of `content`
/// against the allowed-signers lines; returns the principals of the signer's line.
pub fn verify(
    content: &[u8],
    signature_armored: &str,
    trusted_signers: &[String],
) -> Result<String, SignatureError> {
    let signers = parse_signers(trusted_signers)?;
    if signers.is_empty() {
        return Err(SignatureError::NoTrustedSigners);
    }
    let sig = SshSig::from_pem(signature_armored.trim())
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let namespace = sig.namespace();
    if namespace != NAMESPACE && namespace != LEGACY_NAMESPACE {
        return Err(SignatureError::WrongNamespace(format!(
            "the signature is for SSH signature namespace '{}', not '{NAMESPACE}'; sign again with `{HOW_TO_SIGN}`",
            printable(namespace)
        )));
    }
    if !matches!(sig.hash_alg(), HashAlg::Sha256 | HashAlg::Sha512) {
        return Err(SignatureError::Malformed(
            "the hash algorithm is neither sha256 nor sha512".into(),
        ));
    }
    let same_key: Vec<&TrustedSigner> = signers
        .iter()
        .filter(|s| s.key.key_data() == sig.public_key())
        .collect();
    if same_key.is_empty() {
        return Err(SignatureError::UntrustedKey {
            fingerprint: PublicKey::from(sig.public_key().clone())
                .fingerprint(HashAlg::Sha256)
                .to_string(),
        });
    }
    let Some(signer) = same_key.iter().find(|s| s.allows(namespace)) else {
        return Err(SignatureError::WrongNamespace(format!(
            "the trustedSigners line of {} allows its key only for namespaces=\"{}\", and the signature is for '{}'; add {NAMESPACE} to that option or remove it",
            same_key[0].principals,
            same_key[0]
                .namespaces
                .as_deref()
                .unwrap_or_default()
                .join(","),
            printable(namespace)
        )));
    };
    signer
        .key
        .verify(namespace, content, &sig)
        .map_err(|_| SignatureError::BadSignature {
            principal: signer.principals.clone(),
        })?;
    Ok(signer.principals.clone())
}

/// A value from a signature, made safe to show on one line.
fn printable(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_default).collect()
}

/// Key types of OpenSSH public keys: the field that ends the options.
fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-")
        || word.starts_with("ecdsa-sha2-")
        || word.starts_with("sk-ssh-")
        || word.starts_with("sk-ecdsa-sha2-")
}

/// Splits off the first field: up to unquoted whitespace; double quotes group (a quoted
/// principal, an option value with commas or spaces).
fn next_field(s: &str) -> Result<(&str, &str), String> {
    let s = s.trim_start();
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    if quoted {
        return Err("a double quote is never closed".into());
    }
    Ok((s, ""))
}

fn parse_line(line: &str) -> Result<TrustedSigner, String> {
    let (principals, rest) = next_field(line)?;
    let principals = principals
        .strip_prefix('"')
        .and_then(|p| p.strip_suffix('"'))
        .unwrap_or(principals)
        .to_string();
    if principals.is_empty() {
        return Err("no principal".into());
    }
    let (mut word, mut rest) = next_field(rest)?;
    let mut namespaces = None;
    if !word.is_empty() && !is_key_type(word) {
        namespaces = parse_options(word)?;
        (word, rest) = next_field(rest)?;
    }
    if word.is_empty() {
        return Err("no key after the principal".into());
    }
    if !is_key_type(word) {
        return Err(format!(
            "'{}' is not an SSH key type such as ssh-ed25519",
            printable(word)
        ));
    }
    let (b64, _comment) = next_field(rest)?;
    if b64.is_empty() {
        return Err(format!("the {word} key has no base64 part"));
    }
    let key = PublicKey::from_openssh(&format!("{word} {b64}"))
        .map_err(|e| format!("the {word} key does not parse ({e})"))?;
    if key.algorithm().as_str() != word {
        return Err(format!(
            "the key is a {}, not a {word}",
            key.algorithm().as_str()
        ));
    }
    Ok(TrustedSigner {
        principals,
        namespaces,
        key,
    })
}

/// Options are comma-separated, values in double quotes. Only `namespaces=` is honoured;
/// every other option is refused, because ignoring one (an expiry, a certificate
/// authority) would trust more than the line says.
fn parse_options(options: &str) -> Result<Option<Vec<String>>, String> {
    let mut namespaces = None;
    let mut quoted = false;
    let mut start = 0;
    let mut items = Vec::new();
    for (i, c) in options.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&options[start..]);
    for item in items {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (item, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("namespaces", Some(v)) => {
                let v = v.trim_matches('"');
                namespaces = Some(
                    v.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(String::from)
                        .collect(),
                );
            }
            ("cert-authority", _) => {
                return Err("cert-authority lines (trusting every key a CA certified) are not supported; list each signer's own public key instead".into());
            }
            ("valid-after" | "valid-before", _) => {
                return Err(format!(
                    "the {name} option is not supported; remove it (and the line, once the key must no longer be trusted)"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown option '{}'; only namespaces=\"...\" is supported",
                    printable(name)
                ));
            }
        }
    }
    Ok(namespaces)
}

/// OpenSSH's pattern match: `*` any run of characters, `?` one character, a leading `!`
/// negates (a negated pattern never grants here).
fn pattern_match(pattern: &str, s: &str) -> bool {
    if pattern.starts_with('!') {
        return false;
    }
    fn go(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::private::{Ed25519Keypair, KeypairData};
    use ssh_key::{LineEnding, PrivateKey};

    const SCRIPT: &[u8] = include_bytes!("../testdata/sshsig/script.sh");
    const ALLOWED: &str = include_str!("../testdata/sshsig/allowed_signers");
    const ED25519_SIG: &str = include_str!("../testdata/sshsig/script.sh.ed25519.sig");
    const ECDSA_SIG: &str = include_str!("../testdata/sshsig/script.sh.ecdsa.sig");
    const RSA_SIG: &str = include_str!("../testdata/sshsig/script.sh.rsa.sig");
    const FILE_NS_SIG: &str =
        include_str!("../testdata/sshsig/script.sh.ed25519-file-namespace.sig");
    const OLD_NS_SIG: &str = include_str!("../testdata/sshsig/script.sh.ed25519-old-namespace.sig");

    /// A deterministic Ed25519 key: the tests need no randomness.
    fn key(seed: u8, comment: &str) -> PrivateKey {
        let pair = Ed25519Keypair::from_seed(&[seed; 32]);
        PrivateKey::new(KeypairData::Ed25519(pair), comment).expect("key")
    }

    fn signer_line(principal: &str, k: &PrivateKey) -> String {
        format!(
            "{principal} {}",
            k.public_key().to_openssh().expect("public key")
        )
    }

    fn sign(k: &PrivateKey, namespace: &str, hash: HashAlg, content: &[u8]) -> String {
        k.sign(namespace, hash, content)
            .expect("sign")
            .to_pem(LineEnding::LF)
            .expect("pem")
    }

    fn allowed() -> Vec<String> {
        ALLOWED.lines().map(String::from).collect()
    }

    #[test]
    fn openssh_signatures_verify() {
        assert_eq!(
            verify(SCRIPT, ED25519_SIG, &allowed()),
            Ok("alice@example.com".into())
        );
        assert_eq!(
            verify(SCRIPT, ECDSA_SIG, &allowed()),
            Ok("ops@example.com".into())
        );
        assert_eq!(
            verify(SCRIPT, RSA_SIG, &allowed()),
            Ok("rsa-team@example.com,backup@example.com".into())
        );
        // The namespace older documentation named is ours too.
        assert_eq!(
            verify(SCRIPT, OLD_NS_SIG, &allowed()),
            Ok("alice@example.com".into())
        );
        // The whole allowed_signers file pasted as one entry reads the same.
        assert_eq!(
            verify(SCRIPT, ED25519_SIG, &[ALLOWED.to_string()]),
            Ok("alice@example.com".into())
        );
    }

    #[test]
    fn openssh_signature_of_changed_content_is_bad() {
        let mut changed = SCRIPT.to_vec();
        changed.extend_from_slice(b"rm -rf /\n");
        let e = verify(&changed, ED25519_SIG, &allowed()).expect_err("changed");
        assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
        assert!(e.to_string().contains("alice@example.com"), "{e}");
        assert!(e.to_string().contains("sign the current content"), "{e}");
    }

    #[test]
    fn other_namespaces_are_refused() {
        let e = verify(SCRIPT, FILE_NS_SIG, &allowed()).expect_err("file namespace");
        assert!(matches!(e, SignatureError::WrongNamespace(_)), "{e}");
        assert!(e.to_string().contains("'file'"), "{e}");
        assert!(e.to_string().contains("-n liveresponse.io"), "{e}");

        let k = key(1, "k");
        let line = signer_line("alice", &k);
        let e = verify(b"x", &sign(&k, "git", HashAlg::Sha512, b"x"), &[line])
            .expect_err("git namespace");
        assert!(matches!(e, SignatureError::WrongNamespace(_)), "{e}");
    }

    #[test]
    fn namespaces_option_is_honoured() {
        let k = key(2, "k");
        let pk = k.public_key().to_openssh().expect("pk");
        let content = b"echo hi\n";
        let sig = sign(&k, NAMESPACE, HashAlg::Sha256, content);
        let only_git = vec![format!("bob namespaces=\"git,file\" {pk}")];
        let e = verify(content, &sig, &only_git).expect_err("namespaces");
        assert!(matches!(e, SignatureError::WrongNamespace(_)), "{e}");
        assert!(e.to_string().contains("git,file"), "{e}");
        let ours = vec![format!("bob namespaces=\"git,liveresponse*\" {pk}")];
        assert_eq!(verify(content, &sig, &ours), Ok("bob".into()));
    }

    #[test]
    fn generated_keys_trusted_untrusted_and_tampered() {
        let trusted = key(3, "trusted");
        let other = key(4, "other");
        let signers = vec![
            "# the incident response team".to_string(),
            String::new(),
            signer_line("ir@example.com", &trusted),
        ];
        let content = b"Get-Process | Out-File procs.txt\r\n";
        for hash in [HashAlg::Sha256, HashAlg::Sha512] {
            let sig = sign(&trusted, NAMESPACE, hash, content);
            assert_eq!(verify(content, &sig, &signers), Ok("ir@example.com".into()));
            let e = verify(b"Get-Process\r\n", &sig, &signers).expect_err("tampered");
            assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
        }
        let sig = sign(&other, NAMESPACE, HashAlg::Sha512, content);
        let e = verify(content, &sig, &signers).expect_err("untrusted");
        let fp = other.public_key().fingerprint(HashAlg::Sha256).to_string();
        assert_eq!(
            e,
            SignatureError::UntrustedKey {
                fingerprint: fp.clone()
            }
        );
        assert!(fp.starts_with("SHA256:"), "{fp}");
        assert!(e.to_string().contains(&fp), "{e}");
        assert!(e.to_string().contains("trustedSigners"), "{e}");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let signers = allowed();
        let samples = [
            String::new(),
            "hello".into(),
            "-----BEGIN SSH SIGNATURE-----\n-----END SSH SIGNATURE-----\n".into(),
            "-----BEGIN SSH SIGNATURE-----\nU1NIU0lHAAAAAQ==\n-----END SSH SIGNATURE-----\n".into(),
            ED25519_SIG.replace("U1NIU0lH", "AAAAAAAA"),
            ED25519_SIG[..ED25519_SIG.len() / 2].to_string(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            "\u{0}\u{ff}é".into(),
        ];
        for s in samples {
            let e = verify(SCRIPT, &s, &signers).expect_err("garbage");
            assert!(matches!(e, SignatureError::Malformed(_)), "{s:?}: {e}");
            assert!(e.to_string().contains("ssh-keygen -Y sign"), "{e}");
        }
    }

    #[test]
    fn no_signers_says_who_must_add_one() {
        let e = verify(SCRIPT, ED25519_SIG, &[]).expect_err("none");
        assert_eq!(e, SignatureError::NoTrustedSigners);
        let comments = vec!["# nobody yet".to_string()];
        assert_eq!(
            verify(SCRIPT, ED25519_SIG, &comments),
            Err(SignatureError::NoTrustedSigners)
        );
    }

    #[test]
    fn signer_lines_parse_or_say_why() {
        let pk = key(5, "c").public_key().to_openssh().expect("pk");
        let ok = parse_signers(&[
            format!("alice {pk}"),
            format!("\"bob smith,carol\" namespaces=\"liveresponse.io,file\" {pk} a comment"),
        ])
        .expect("parse");
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].principals, "alice");
        assert_eq!(ok[0].namespaces, None);
        assert_eq!(ok[1].principals, "bob smith,carol");
        assert_eq!(
            ok[1].namespaces,
            Some(vec!["liveresponse.io".to_string(), "file".to_string()])
        );

        let bad = |line: String, needle: &str| {
            let e = parse_signers(&["# first".to_string(), line.clone()]).expect_err(&line);
            match &e {
                SignatureError::BadSignerLine { line: 2, why } => {
                    assert!(why.contains(needle), "{line}: {why}")
                }
                other => panic!("{line}: {other}"),
            }
            assert!(e.to_string().contains("allowed_signers"), "{e}");
        };
        bad(
            format!("ca@example.com cert-authority {pk}"),
            "cert-authority",
        );
        bad(format!("a valid-before=\"20300101\" {pk}"), "valid-before");
        bad(format!("a no-touch-required {pk}"), "unknown option");
        bad("alice".into(), "no key");
        bad("alice ssh-ed25519".into(), "no base64");
        bad("alice ssh-ed25519 AAAAnotakey".into(), "does not parse");
        bad(
            "alice opt=\"unclosed ssh-ed25519 AAAA".into(),
            "never closed",
        );
        let (kind, b64) = pk.split_once(' ').expect("pk");
        assert_eq!(kind, "ssh-ed25519");
        bad(format!("alice ssh-rsa {b64}"), "ssh-rsa key");
    }

    #[test]
    fn patterns() {
        assert!(pattern_match("liveresponse*", "liveresponse.io"));
        assert!(pattern_match("liveresponse.i?", "liveresponse.io"));
        assert!(pattern_match("liveresponse.io", "liveresponse.io"));
        assert!(!pattern_match("file", "liveresponse.io"));
        assert!(!pattern_match("!file", "liveresponse.io"));
    }
}
