//! Fuzzing of every parser of host content (issue 10): crontabs and anacrontab,
//! authorized_keys, /proc/modules, unit files, `systemctl list-units`, passwd and group,
//! the /proc/net socket tables and /proc/PID/cmdline. A hostile or broken host decides
//! these bytes, so each parser gets arbitrary bytes (no panic, its own invariants) and
//! well-formed input generated from known values (the values come back).
//!
//! Cases per test come from `LR_FUZZ_CASES` (`make fuzz` sets a large number); the
//! default keeps `cargo test` quick.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

use super::hostfs::Accounts;
use super::network::{parse_tcp, parse_udp};
use super::persistence::{
    base64_decode, base64_encode_unpadded, is_key_type, parse_anacrontab, parse_authorized_key,
    parse_crontab,
};
use super::processes::parse_cmdline;
use super::system::{Unit, parse_list_units, parse_module, timer_schedule, timer_target};

/// Failing inputs are kept next to this file (`fuzz.regressions`) and replayed first.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("LR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// Text as the agent reads a host file: any bytes, invalid UTF-8 replaced.
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Host-file text biased towards the characters these formats care about.
fn host_text() -> impl Strategy<Value = String> {
    let pieces: Vec<&'static str> = vec![
        "\n",
        "\r\n",
        " ",
        "\t",
        "#",
        ";",
        "=",
        ":",
        "@",
        "*",
        "\\",
        "\"",
        "[",
        "]",
        "[Service]",
        "[Timer]",
        "ExecStart=",
        "OnCalendar=",
        "Unit=",
        "@reboot",
        "@daily",
        "0",
        "1",
        "7",
        "*/5",
        "root",
        "ssh-rsa",
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "command=\"",
        "AAAA",
        "==",
        "x",
        "é",
        "\u{a0}",
        "\u{fffd}",
        "\0",
        "●",
        "-",
        ",",
        "(OE)",
        "Live",
        "0x0",
        "/bin/sh",
    ];
    prop_oneof![
        vec(any::<u8>(), 0..200).prop_map(|b| lossy(&b)),
        vec(
            prop_oneof![4 => select(pieces).prop_map(str::to_owned), 1 => any::<String>()],
            0..40
        )
        .prop_map(|p| p.concat()),
    ]
}

/// A word without whitespace, `#` or `=`, as crontab fields and account names are.
fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_./*@,-]{1,12}"
}

/// An option value with the characters that matter to quoting. sshd cannot hold a value
/// that ends in a backslash (it would escape the closing quote), so none does.
fn option_value() -> impl Strategy<Value = String> {
    "[a-z =,\"\\\\]{0,14}".prop_map(|v| if v.ends_with('\\') { v + "x" } else { v })
}

fn json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

proptest! {
    #![proptest_config(config(1_000))]

    /// Every job comes from a non-comment line, and its command is that line's tail, with
    /// its own spacing.
    #[test]
    fn fuzz_crontab(text in host_text(), system in any::<bool>()) {
        let user = (!system).then_some("alice");
        let lines: Vec<&str> = text.lines().collect();
        for task in parse_crontab(&text, "/etc/crontab", user) {
            let task = json(&task);
            let line = task["line"].as_u64().unwrap_or(0) as usize;
            prop_assert!(line >= 1 && line <= lines.len(), "{task}");
            let source = lines[line - 1].trim();
            prop_assert!(!source.starts_with('#'));
            let command = task["command"].as_str().unwrap_or("");
            prop_assert!(!command.is_empty() && source.ends_with(command), "{task} from {source:?}");
            prop_assert!(!task["schedule"].as_str().unwrap_or("").is_empty());
            if let Some(user) = user {
                prop_assert_eq!(task["user"].as_str(), Some(user));
            }
        }
    }

    /// A job written from known fields reads back as those fields.
    #[test]
    fn fuzz_crontab_known_jobs(
        schedule in prop_oneof![vec(word(), 5).prop_map(|w| w.join(" ")), Just("@reboot".to_owned())],
        user in word(),
        command in "[a-z/][ a-z0-9/|>&.$-]{0,30}",
        env in ("[A-Z_]{1,8}", select(vec!["=", " = ", " =", "= ", "\t=\t"]), "[a-z0-9@ *]{0,20}"),
    ) {
        // Only the @ shorthands are one word.
        prop_assume!(schedule == "@reboot" || !schedule.starts_with('@'));
        let command = command.trim_end().to_owned();
        // cron takes `NAME = value` for a variable whatever the value looks like.
        let (name, equals, value) = env;
        let text = format!("{name}{equals}{value}\n# a comment\n{schedule} {user} {command}\n");
        let tasks = parse_crontab(&text, "/etc/cron.d/job", None);
        prop_assert_eq!(tasks.len(), 1, "{:?}", text);
        let task = json(&tasks[0]);
        prop_assert_eq!(task["schedule"].as_str(), Some(schedule.as_str()));
        prop_assert_eq!(task["user"].as_str(), Some(user.as_str()));
        prop_assert_eq!(task["command"].as_str(), Some(command.as_str()));
        prop_assert_eq!(task["line"].as_u64(), Some(3));
    }

    #[test]
    fn fuzz_anacrontab(text in host_text()) {
        let lines: Vec<&str> = text.lines().collect();
        for task in parse_anacrontab(&text, "/etc/anacrontab") {
            let task = json(&task);
            let line = task["line"].as_u64().unwrap_or(0) as usize;
            prop_assert!(line >= 1 && line <= lines.len(), "{task}");
            let command = task["command"].as_str().unwrap_or("");
            prop_assert!(!command.is_empty() && lines[line - 1].trim().ends_with(command));
            prop_assert!(!task["name"].as_str().unwrap_or("").is_empty());
        }
    }

    #[test]
    fn fuzz_authorized_keys(line in host_text()) {
        if let Some(key) = parse_authorized_key(&line) {
            prop_assert!(is_key_type(&key.key_type), "{key:?}");
            prop_assert!(line.contains(&key.key_type));
            prop_assert!(key.forced_command.is_none() || key.options.is_some());
            if let Some(fp) = &key.fingerprint {
                // SHA-256 is 32 bytes: 43 unpadded base64 characters.
                prop_assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{fp}");
            }
            prop_assert!(key.comment.as_deref() != Some(""));
        }
    }

    /// A key line written from known parts reads back as those parts, options with
    /// quoted spaces included.
    #[test]
    fn fuzz_authorized_keys_known_lines(
        forced in proptest::option::of("[a-z /|.-]{0,20}"),
        key_type in select(vec!["ssh-rsa", "ssh-ed25519", "ecdsa-sha2-nistp256", "sk-ssh-ed25519@openssh.com"]),
        blob in vec(any::<u8>(), 1..64),
        comment in proptest::option::of("[a-z@.][a-z@. -]{0,15}[a-z]"),
    ) {
        let encoded = base64_encode_unpadded(&blob);
        let options = forced.as_ref().map(|c| format!("no-pty,command=\"{c}\""));
        let line = [options.clone(), Some(key_type.to_owned()), Some(encoded), comment.clone()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let Some(key) = parse_authorized_key(&line) else {
            return Err(TestCaseError::fail(format!("{line:?} gave no key")));
        };
        prop_assert_eq!(key.key_type, key_type);
        prop_assert_eq!(key.options, options);
        prop_assert_eq!(key.forced_command, forced);
        prop_assert_eq!(key.comment, comment);
        prop_assert!(key.fingerprint.is_some());
    }

    /// Options as sshd reads them (auth-options.c): comma-separated, values in double
    /// quotes where only `\"` is an escape. Another option's value may hold any text,
    /// `command="` included; the forced command is the `command` option's own value.
    #[test]
    fn fuzz_authorized_keys_options_as_sshd_reads_them(
        others in vec((select(vec!["from", "environment", "principals", "no-pty", "permitopen"]), option_value()), 0..4),
        command in option_value(),
        at in any::<prop::sample::Index>(),
    ) {
        let quote = |v: &str| format!("\"{}\"", v.replace('"', "\\\""));
        let mut options: Vec<String> = others
            .iter()
            .map(|(name, value)| if *name == "no-pty" { (*name).to_owned() } else { format!("{name}={}", quote(value)) })
            .collect();
        options.insert(at.index(options.len() + 1), format!("command={}", quote(&command)));
        let line = format!("{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host", options.join(","));
        let Some(key) = parse_authorized_key(&line) else {
            return Err(TestCaseError::fail(format!("{line:?} gave no key")));
        };
        prop_assert_eq!(key.forced_command.as_deref(), Some(command.as_str()), "{}", line);
        prop_assert_eq!(key.key_type.as_str(), "ssh-ed25519");
        prop_assert_eq!(key.comment.as_deref(), Some("me@host"));
    }

    #[test]
    fn fuzz_base64_round_trip(bytes in vec(any::<u8>(), 0..100), junk in host_text()) {
        prop_assert_eq!(base64_decode(&base64_encode_unpadded(&bytes)), Some(bytes));
        let _ = base64_decode(&junk);
    }

    #[test]
    fn fuzz_proc_modules(text in host_text()) {
        for line in text.lines() {
            if let Some(module) = parse_module(line) {
                let module = json(&module);
                prop_assert_eq!(module["name"].as_str(), line.split_whitespace().next());
            }
        }
    }

    /// Unit files: anything parses without panic, and the helpers that read a unit
    /// (ExecStart, timers) cope with whatever it holds.
    #[test]
    fn fuzz_unit_files(text in host_text()) {
        let unit = Unit::parse(&text);
        let _ = unit.exec_start();
        let _ = timer_schedule(&unit);
        prop_assert!(!timer_target(&unit, "x.timer").is_empty());
        for section in ["Service", "Timer", "Unit", ""] {
            let _ = unit.has_section(section);
        }
    }

    /// Assignments written from known values read back, later ones winning and an empty
    /// one resetting, across continuation lines and comments. systemd.syntax(7): a comment
    /// block after a line ending in a backslash is ignored, and the line continues with
    /// what follows it.
    #[test]
    fn fuzz_unit_files_known_values(
        values in vec(prop_oneof!["[a-zA-Z0-9/ ._=-]{0,20}", Just(String::new())], 1..6),
        continued in any::<bool>(),
        comments in vec(select(vec!["# note", "; note", "  # indented", "#", "# ends \\"]), 0..3),
        spacing in select(vec!["=", " = ", "\t="]),
    ) {
        let mut text = String::from("# generated\n[Service]\n; comment\n");
        for v in &values {
            text.push_str(&format!("ExecStart{spacing}{v}\n"));
        }
        if continued {
            text.push_str("ExecStart=/bin/a \\\n");
            for c in &comments {
                text.push_str(c);
                text.push('\n');
            }
            text.push_str("  --flag\n");
        }
        let unit = Unit::parse(&text);
        let mut expected: Vec<String> = Vec::new();
        for v in &values {
            if v.trim().is_empty() { expected.clear() } else { expected.push(v.trim().to_owned()) }
        }
        if continued {
            expected.push("/bin/a  --flag".to_owned());
        }
        let got: Vec<String> = unit.get_all("Service", "ExecStart").into_iter().map(str::to_owned).collect();
        prop_assert_eq!(got, expected, "{:?}", text);
    }

    #[test]
    fn fuzz_systemctl_list_units(text in host_text()) {
        for unit in parse_list_units(&text) {
            for field in [&unit.name, &unit.load, &unit.active, &unit.sub] {
                prop_assert!(!field.is_empty() && !field.contains(char::is_whitespace), "{unit:?}");
            }
            prop_assert_eq!(unit.description.trim(), unit.description.as_str());
        }
    }

    /// passwd and group: anything parses; the first entry of a uid names it, as getpwuid.
    #[test]
    fn fuzz_accounts(
        passwd in host_text(),
        group in host_text(),
        known in vec((word(), 0u32..5), 0..6),
    ) {
        let accounts = Accounts::parse(&passwd, &group);
        let _ = accounts.user(0);
        let _ = accounts.group(0);
        let mut text = String::from("# comment:x:0:0::/:/bin/sh\n");
        for (name, uid) in &known {
            text.push_str(&format!("{name}:x:{uid}:{uid}:gecos:/home/{name}:/bin/sh\n"));
        }
        let accounts = Accounts::parse(&text, &text);
        for uid in 0u32..6 {
            let first = known.iter().find(|(_, u)| *u == uid).map(|(n, _)| n.clone());
            prop_assert_eq!(accounts.user(uid), first.clone().unwrap_or_else(|| uid.to_string()));
            // A passwd line has group's three first fields too.
            prop_assert_eq!(accounts.group(uid), first.unwrap_or_else(|| uid.to_string()));
        }
    }

    /// The socket tables: anything gives rows or an error, never a panic.
    #[test]
    fn fuzz_proc_net_tables(bytes in prop_oneof![vec(any::<u8>(), 0..300), host_text().prop_map(String::into_bytes)]) {
        let _ = parse_tcp(&bytes);
        let _ = parse_udp(&bytes);
    }

    /// Rows written as the kernel writes them (addresses in host byte order, hex) read
    /// back as the sockets they describe.
    #[test]
    fn fuzz_proc_net_known_rows(
        rows in vec((any::<[u8; 16]>(), any::<u16>(), any::<[u8; 16]>(), any::<u16>(), 1u8..=12, any::<u32>(), any::<u64>()), 0..5),
        v6 in any::<bool>(),
    ) {
        let addr = |ip: &[u8; 16], port: u16| -> (String, SocketAddr) {
            if v6 {
                let words: Vec<String> = ip.chunks(4).map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))).collect();
                (format!("{}:{port:04X}", words.concat()), SocketAddr::new(Ipv6Addr::from(*ip).into(), port))
            } else {
                let v4 = [ip[0], ip[1], ip[2], ip[3]];
                (format!("{:08X}:{port:04X}", u32::from_ne_bytes(v4)), SocketAddr::new(Ipv4Addr::from(v4).into(), port))
            }
        };
        let mut table = String::from("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n");
        let mut expected = Vec::new();
        for (i, (lip, lport, rip, rport, state, uid, inode)) in rows.iter().enumerate() {
            let (l, local) = addr(lip, *lport);
            let (r, remote) = addr(rip, *rport);
            table.push_str(&format!("{i:4}: {l} {r} {state:02X} 00000000:00000000 00:00000000 00000000 {uid:5} 0 {inode} 1 0000000000000000 100 0 0 10 0\n"));
            expected.push((local, remote, *uid, *inode));
        }
        let tcp = parse_tcp(table.as_bytes());
        prop_assert!(tcp.is_ok(), "{:?}\n{}", tcp.err(), table);
        let got: Vec<_> = tcp.unwrap_or_default().into_iter().map(|s| (s.local, s.remote, s.uid, s.inode)).collect();
        prop_assert_eq!(got, expected);
    }

    /// /proc/PID/cmdline: NUL-separated, and whatever a process put there comes back
    /// without the separators.
    #[test]
    fn fuzz_cmdline(bytes in vec(prop_oneof![Just(0u8), any::<u8>()], 0..100), cut in any::<bool>()) {
        let cmd = parse_cmdline(&bytes, cut);
        prop_assert_eq!(cmd.cut, cut);
        prop_assert!(cmd.args.iter().all(|a| !a.is_empty() && !a.contains('\0')));
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let pieces: Vec<&str> = text.split('\0').filter(|p| !p.is_empty()).collect();
            prop_assert_eq!(cmd.args, pieces);
        }
    }
}
