use super::*;
use liveresponse_api::crd::{KeyRef, LibrarySource, ScriptParameters};
use sha2::{Digest, Sha256};

// Made by OpenSSH (see api/testdata/sshsig/README.md).
const SCRIPT: &[u8] = include_bytes!("../../../api/testdata/sshsig/script.sh");
const ALLOWED: &str = include_str!("../../../api/testdata/sshsig/allowed_signers");
const ED25519_SIG: &str = include_str!("../../../api/testdata/sshsig/script.sh.ed25519.sig");

fn t(s: &str) -> jiff::Timestamp {
    s.parse().unwrap_or_default()
}

fn file(name: &str, spec: LibraryFileSpec) -> LibraryFile {
    let mut lf = LibraryFile::new(name, spec);
    lf.metadata.namespace = Some("tenant".into());
    lf.metadata.generation = Some(3);
    lf
}

fn spec(file_name: &str) -> LibraryFileSpec {
    LibraryFileSpec {
        file_name: file_name.into(),
        description: None,
        parameters: None,
        source: LibrarySource {
            inline: Some("echo hi\n".into()),
            ..Default::default()
        },
        sha256: None,
        signature: None,
        analysis: None,
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn settings(signers: &[&str], allow_unsigned: bool) -> SettingsSpec {
    SettingsSpec {
        trusted_signers: signers.iter().map(|s| s.to_string()).collect(),
        allow_unsigned_scripts: allow_unsigned,
        ..Default::default()
    }
}

fn ready(st: &LibraryFileStatus) -> &liveresponse_api::crd::Condition {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition")
}

fn invalid(st: &LibraryFileStatus, reason: &str, needles: &[&str]) {
    assert_eq!(st.phase, Some(LibraryFilePhase::Invalid), "{st:?}");
    assert!(!st.signed);
    assert_eq!(st.signer, None);
    let c = ready(st);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason));
    let msg = st.message.as_deref().unwrap_or_default();
    assert_eq!(c.message, msg);
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
}

#[test]
fn unsigned_file_is_ready_and_says_devices_refuse_it() {
    let lf = file("hi", spec("hi.sh"));
    let now = t("2026-01-01T00:00:00Z");
    let st = decide(&lf, Ok(b"echo hi\n".to_vec()), &settings(&[], false), now);
    assert_eq!(st.phase, Some(LibraryFilePhase::Ready));
    assert_eq!(st.size, Some(8));
    assert_eq!(st.sha256.as_deref(), Some(sha(b"echo hi\n").as_str()));
    assert!(!st.signed);
    assert_eq!(st.message, None);
    assert_eq!(st.observed_generation, Some(3));
    let c = ready(&st);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Unsigned"));
    assert!(c.message.contains("refuse to run"), "{}", c.message);
    assert!(c.message.contains("allowUnsignedScripts"), "{}", c.message);
    assert_eq!(c.observed_generation, Some(3));

    let st = decide(&lf, Ok(b"echo hi\n".to_vec()), &settings(&[], true), now);
    assert_eq!(st.phase, Some(LibraryFilePhase::Ready));
    assert!(
        ready(&st).message.contains("allowUnsignedScripts is true"),
        "{}",
        ready(&st).message
    );
}

#[test]
fn trusted_signature_makes_it_signed() {
    let mut s = spec("collect.sh");
    s.signature = Some(ED25519_SIG.into());
    s.sha256 = Some(sha(SCRIPT));
    let lf = file("collect", s);
    let signers: Vec<&str> = ALLOWED.lines().collect();
    let st = decide(
        &lf,
        Ok(SCRIPT.to_vec()),
        &settings(&signers, false),
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(st.phase, Some(LibraryFilePhase::Ready), "{st:?}");
    assert!(st.signed);
    assert_eq!(st.signer.as_deref(), Some("alice@example.com"));
    assert_eq!(ready(&st).reason, "Signed");
    assert_eq!(st.size, Some(SCRIPT.len() as i64));
}

#[test]
fn bad_signatures_are_invalid_and_say_why() {
    let mut s = spec("collect.sh");
    s.signature = Some(ED25519_SIG.into());
    let lf = file("collect", s);
    let now = t("2026-01-01T00:00:00Z");
    // Only the ECDSA key of the fixture is trusted: the Ed25519 signer is not.
    let others: Vec<&str> = ALLOWED.lines().filter(|l| !l.contains("ed25519")).collect();
    let st = decide(&lf, Ok(SCRIPT.to_vec()), &settings(&others, true), now);
    invalid(
        &st,
        "SignatureInvalid",
        &[
            "signature rejected",
            "SHA256:",
            "not in the namespace's trustedSigners",
        ],
    );
    // The digest is still reported: it helps to see which content was judged.
    assert_eq!(st.sha256.as_deref(), Some(sha(SCRIPT).as_str()));

    let all: Vec<&str> = ALLOWED.lines().collect();
    let st = decide(&lf, Ok(b"tampered".to_vec()), &settings(&all, true), now);
    invalid(&st, "SignatureInvalid", &["does not match the content"]);

    let st = decide(&lf, Ok(SCRIPT.to_vec()), &settings(&[], true), now);
    invalid(&st, "SignatureInvalid", &["no trustedSigners"]);

    let st = decide(&lf, Ok(SCRIPT.to_vec()), &settings(&["alice"], true), now);
    invalid(&st, "SignatureInvalid", &["trustedSigners line 1"]);

    let mut garbage = lf.clone();
    garbage.spec.signature = Some("not a signature".into());
    let st = decide(&garbage, Ok(SCRIPT.to_vec()), &settings(&all, true), now);
    invalid(&st, "SignatureInvalid", &["not an SSH signature"]);
}

#[test]
fn pin_mismatch_names_both_digests() {
    let pinned = sha(b"old content");
    let mut s = spec("x.sh");
    s.sha256 = Some(pinned.clone());
    let lf = file("x", s);
    let st = decide(
        &lf,
        Ok(b"new content".to_vec()),
        &settings(&[], true),
        t("2026-01-01T00:00:00Z"),
    );
    invalid(
        &st,
        "DigestMismatch",
        &[&pinned, &sha(b"new content"), "spec.sha256"],
    );
    let st = decide(
        &lf,
        Ok(b"old content".to_vec()),
        &settings(&[], true),
        t("2026-01-01T00:00:00Z"),
    );
    assert_eq!(st.phase, Some(LibraryFilePhase::Ready));
}

#[test]
fn too_large_content_is_invalid() {
    let lf = file("big", spec("big.bin"));
    let now = t("2026-01-01T00:00:00Z");
    let small = SettingsSpec {
        max_library_file_size: "1Ki".into(),
        ..Default::default()
    };
    let st = decide(&lf, Ok(vec![0u8; 1025]), &small, now);
    invalid(
        &st,
        "TooLarge",
        &[
            "too large",
            "1025 bytes",
            "1024 bytes",
            "maxLibraryFileSize",
        ],
    );
    assert_eq!(st.size, Some(1025));
    assert_eq!(st.sha256, None);
    // Exactly the limit is fine.
    let st = decide(&lf, Ok(vec![0u8; 1024]), &small, now);
    assert_eq!(st.phase, Some(LibraryFilePhase::Ready));
    // The fetch may know only that it is too large.
    let st = decide(
        &lf,
        Err(FetchProblem::TooLarge {
            size: None,
            limit: 1024,
        }),
        &small,
        now,
    );
    invalid(&st, "TooLarge", &["too large", "1024 bytes"]);
    assert_eq!(st.size, None);
    assert_eq!(max_size(&SettingsSpec::default()), DEFAULT_MAX_SIZE);
}

#[test]
fn missing_and_unusable_content_is_invalid() {
    let mut s = spec("x.sh");
    s.source = LibrarySource {
        config_map_ref: Some(KeyRef {
            name: "scripts".into(),
            key: "x.sh".into(),
        }),
        ..Default::default()
    };
    let lf = file("x", s);
    let now = t("2026-01-01T00:00:00Z");
    let st = decide(
        &lf,
        Err(FetchProblem::Missing(
            "ConfigMap scripts does not exist in namespace tenant".into(),
        )),
        &settings(&[], true),
        now,
    );
    invalid(&st, "ContentMissing", &["ConfigMap scripts does not exist"]);
    assert_eq!((st.size, st.sha256.as_deref()), (None, None));
    let st = decide(
        &lf,
        Err(FetchProblem::Unusable("the store was altered".into())),
        &settings(&[], true),
        now,
    );
    invalid(&st, "ContentUnusable", &["altered"]);
}

#[test]
fn a_second_look_changes_nothing_and_transitions_keep_time() {
    let mut lf = file("hi", spec("hi.sh"));
    let t0 = t("2026-01-01T00:00:00Z");
    let t1 = t("2026-01-01T00:05:00Z");
    let st = decide(&lf, Ok(b"a".to_vec()), &settings(&[], false), t0);
    lf.status = Some(st.clone());
    // Nothing changed: the same status, so no write.
    assert_eq!(
        decide(&lf, Ok(b"a".to_vec()), &settings(&[], false), t1),
        st
    );
    // Content changed but still Ready: the transition time stays.
    let st2 = decide(&lf, Ok(b"b".to_vec()), &settings(&[], false), t1);
    assert_ne!(st2.sha256, st.sha256);
    assert_eq!(ready(&st2).last_transition_time.0, t0);
    // Ready -> Invalid moves it, and Invalid fields do not linger once Ready again.
    lf.status = Some(st2);
    let mut pinned = lf.clone();
    pinned.spec.sha256 = Some(sha(b"zzz"));
    let st3 = decide(&pinned, Ok(b"b".to_vec()), &settings(&[], false), t1);
    assert_eq!(ready(&st3).last_transition_time.0, t1);
    lf.status = Some(st3);
    let st4 = decide(&lf, Ok(b"b".to_vec()), &settings(&[], false), t1);
    assert_eq!(st4.phase, Some(LibraryFilePhase::Ready));
    assert_eq!(st4.message, None);
    assert_eq!(st4.conditions.len(), 1);
}

fn listed() -> Vec<LibraryFile> {
    let mut a = spec("collect-logs.sh");
    a.description = Some("Collects logs\nfrom /var/log".into());
    a.parameters = Some(ScriptParameters {
        description: Some("-days N: how far back".into()),
        example: Some("-days 3".into()),
    });
    let mut a = file("collect", a);
    a.status = Some(LibraryFileStatus {
        phase: Some(LibraryFilePhase::Ready),
        size: Some(1234),
        sha256: Some("ab".repeat(32)),
        signed: true,
        signer: Some("alice@example.com".into()),
        ..Default::default()
    });
    let mut b = file("aaa-broken", spec("broken.ps1"));
    b.status = Some(LibraryFileStatus {
        phase: Some(LibraryFilePhase::Invalid),
        message: Some("ConfigMap x does not exist".into()),
        ..Default::default()
    });
    let c = file("new", spec("new.sh"));
    vec![a, b, c]
}

#[test]
fn listing_table_has_one_aligned_row_per_file() {
    let out = listing(&listed(), OutputFormat::Table);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "FILE",
            "RULES",
            "PHASE",
            "SIGNED",
            "SIZE",
            "DESCRIPTION"
        ],
        "{out}"
    );
    // Sorted by file name.
    assert!(lines[1].starts_with("aaa-broken"), "{out}");
    assert!(lines[2].starts_with("collect "), "{out}");
    assert!(lines[3].starts_with("new "), "{out}");
    for w in [
        "collect-logs.sh",
        "Ready",
        "true",
        "1234",
        "Collects logs from /var/log",
    ] {
        assert!(lines[2].contains(w), "{w}: {out}");
    }
    assert!(
        lines[1].contains("Invalid") && lines[1].contains("false"),
        "{out}"
    );
    // Not checked yet.
    assert!(lines[3].contains("Pending"), "{out}");
    let at = lines[0].find("PHASE").expect("PHASE");
    assert_eq!(&lines[2][at..at + 5], "Ready");
    assert_eq!(
        listing(&[], OutputFormat::Table),
        "(no results)\n",
        "an empty library says so"
    );
}

#[test]
fn listing_json_has_every_field() {
    let out = listing(&listed(), OutputFormat::Json);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).expect("a JSON array");
    assert_eq!(v.len(), 3);
    let c = &v[1];
    assert_eq!(c["name"], "collect");
    assert_eq!(c["fileName"], "collect-logs.sh");
    assert_eq!(c["phase"], "Ready");
    assert_eq!(c["size"], 1234);
    assert_eq!(c["sha256"], "ab".repeat(32));
    assert_eq!(c["signed"], true);
    assert_eq!(c["signer"], "alice@example.com");
    assert_eq!(c["description"], "Collects logs\nfrom /var/log");
    assert_eq!(c["parameters"], "-days N: how far back");
    assert_eq!(c["example"], "-days 3");
    assert_eq!(v[0]["message"], "ConfigMap x does not exist");
    assert_eq!(v[2]["phase"], "Pending");
    assert_eq!(listing(&[], OutputFormat::Json).trim(), "[]");
}

#[test]
fn referencing_finds_files_of_that_source_in_that_namespace() {
    let (store, mut writer) = kube::runtime::reflector::store::<LibraryFile>();
    let mk = |name: &str, ns: &str, cm: Option<&str>, secret: Option<&str>| {
        let mut s = spec("f.sh");
        s.source = LibrarySource {
            config_map_ref: cm.map(|n| KeyRef {
                name: n.into(),
                key: "k".into(),
            }),
            secret_ref: secret.map(|n| KeyRef {
                name: n.into(),
                key: "k".into(),
            }),
            ..Default::default()
        };
        let mut lf = file(name, s);
        lf.metadata.namespace = Some(ns.into());
        lf
    };
    for lf in [
        mk("a", "t1", Some("scripts"), None),
        mk("b", "t1", Some("other"), None),
        mk("c", "t2", Some("scripts"), None),
        mk("d", "t1", None, Some("scripts")),
    ] {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(lf));
    }
    let names = |v: Vec<ObjectRef<LibraryFile>>| {
        let mut n: Vec<String> = v.into_iter().map(|r| r.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(referencing(&store, "t1", "scripts", false)), ["a"]);
    assert_eq!(names(referencing(&store, "t1", "scripts", true)), ["d"]);
    assert_eq!(names(in_namespace(&store, "t1")), ["a", "b", "d"]);
}

#[test]
fn status_patch_clears_what_the_new_verdict_leaves_out() {
    let mut lf = file("x", spec("x.sh"));
    lf.metadata.resource_version = Some("42".into());
    let st = LibraryFileStatus {
        phase: Some(LibraryFilePhase::Ready),
        size: Some(1),
        sha256: Some(sha(b"a")),
        ..Default::default()
    };
    let p = status_patch(&lf, &st).expect("patch");
    assert_eq!(p["metadata"]["resourceVersion"], "42");
    assert_eq!(p["status"]["phase"], "Ready");
    assert_eq!(p["status"]["signed"], false);
    for k in ["signer", "message", "conditions", "observedGeneration"] {
        assert!(p["status"].get(k).is_some_and(|v| v.is_null()), "{k}: {p}");
    }
}
