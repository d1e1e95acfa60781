//! Fuzzing of what an agent can send the gateway (issue 10): raw bytes decoded as an
//! `AgentMessage`, then handled as `attach` handles them (the hello bounded into the
//! Device's link, events into in-flight commands), with the bounds that keep an agent's
//! words out of etcd-sized trouble checked on every report. The output sink's own property
//! test is in `sink.rs`.
//!
//! Cases per test come from `LR_FUZZ_CASES` (`make fuzz` sets a large number); the
//! default keeps `cargo test` quick.

use liveresponse_api::output::INLINE_LIMIT;
use liveresponse_api::proto::{CommandEvent, Completed, Heartbeat, OutputChunk};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;
use prost::Message;

use super::*;

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

const DEVICE: (&str, &str) = ("ns", "dev");
const OTHER: (&str, &str) = ("ns", "other");
/// The command in flight on DEVICE, and one in flight on OTHER that DEVICE must not reach.
const OURS: &str = "cmd-1";
const THEIRS: &str = "cmd-2";

fn key(d: (&str, &str)) -> DeviceKey {
    (d.0.to_owned(), d.1.to_owned())
}

/// A gateway with DEVICE and OTHER connected and one command in flight on each. The
/// client points nowhere: nothing on this path talks to the API server.
struct Fixture {
    gw: Arc<Gateway>,
    // Keep the streams open so sends succeed.
    _rx: Vec<mpsc::Receiver<Result<OperatorMessage, Status>>>,
}

fn fixture(limit: u64) -> Fixture {
    // object_store's S3 client brings a second rustls provider; the process must pick one,
    // as the operator's main does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new("http://127.0.0.1:9".parse().expect("static url"));
    let client = kube::Client::try_from(config).expect("client without a server");
    let ca = Arc::new(Ca::generate().expect("ca"));
    let gw = Gateway::new(
        client,
        ca,
        "test".into(),
        Duration::from_secs(5),
        crate::metrics::Metrics::new(),
        crate::pki::DEFAULT_DEVICE_LIFETIME,
    );
    let mut rxs = Vec::new();
    for (device, uid) in [(DEVICE, OURS), (OTHER, THEIRS)] {
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        rxs.push(rx);
        gw.register(key(device), Hello::default(), tx)
            .expect("first connection");
        let target = CommandTarget {
            namespace: "ns".into(),
            name: uid.into(),
            device: key(device),
            step: None,
        };
        let exec = Execute {
            command_uid: uid.into(),
            max_output_bytes: limit,
            ..Default::default()
        };
        gw.execute(target, exec).expect("connected");
    }
    Fixture { gw, _rx: rxs }
}

/// Strings an agent may put anywhere: short, long, multi-byte, control characters.
fn agent_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => (select(vec!["a", "é", "\u{1f600}", "\n", "\0", "A1"]), 0usize..2500)
            .prop_map(|(s, n)| s.repeat(n)),
    ]
}

fn uid() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(OURS.to_owned()),
        Just(THEIRS.to_owned()),
        Just(format!("{OURS}.step-1")),
        any::<String>(),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        vec(agent_text(), 6),
        vec(prop_oneof![any::<String>(), "[a-z]{60,70}"], 0..300),
    )
        .prop_map(|(protocol_version, t, capabilities)| Hello {
            protocol_version,
            hostname: t[0].clone(),
            os: t[1].clone(),
            os_version: t[2].clone(),
            arch: t[3].clone(),
            agent_version: t[4].clone(),
            capabilities,
            isolation: Some(liveresponse_api::proto::Isolation {
                since: t[5].clone(),
                by: t[5].repeat(3),
            }),
        })
}

fn completed() -> impl Strategy<Value = Completed> {
    (
        any::<i32>(),
        any::<i32>(),
        vec(agent_text(), 4),
        vec(agent_text(), 0..120),
        prop_oneof![0u64..200, any::<u64>()],
    )
        .prop_map(|(outcome, exit_code, t, warnings, output_size)| Completed {
            outcome,
            exit_code,
            error_reason: t[0].clone(),
            error_message: t[1].clone(),
            working_directory: t[2].clone(),
            warnings,
            output_size,
            output_sha256: t[3].clone(),
            file: None,
        })
}

/// A message as a well-meaning or hostile agent would encode it.
fn agent_message() -> impl Strategy<Value = AgentMessage> {
    let event = (
        uid(),
        prop_oneof![
            Just(None),
            vec(any::<u8>(), 0..300)
                .prop_map(|data| Some(command_event::Event::Output(OutputChunk { data }))),
            completed().prop_map(|c| Some(command_event::Event::Completed(c))),
            (any::<u64>(), vec(any::<u8>(), 0..300), any::<u64>()).prop_map(
                |(offset, data, total_size)| Some(command_event::Event::File(
                    liveresponse_api::proto::FileChunk {
                        offset,
                        data,
                        total_size
                    }
                ))
            ),
        ],
    )
        .prop_map(|(command_uid, event)| CommandEvent { command_uid, event });
    prop_oneof![
        hello().prop_map(agent_message::Msg::Hello),
        vec(any::<String>(), 0..3).prop_map(|running| {
            let isolation = running.first().map(|t| liveresponse_api::proto::Isolation {
                since: t.clone(),
                by: t.repeat(100),
            });
            agent_message::Msg::Heartbeat(Heartbeat { running, isolation })
        }),
        event.prop_map(agent_message::Msg::Event),
    ]
    .prop_map(|m| AgentMessage { msg: Some(m) })
}

/// Bytes off the wire: an encoded message, the same with bytes flipped or cut, or noise.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => agent_message().prop_map(|m| m.encode_to_vec()),
        2 => (agent_message(), vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), any::<prop::sample::Index>())
            .prop_map(|(m, flips, cut)| {
                let mut b = m.encode_to_vec();
                if b.is_empty() {
                    return b;
                }
                for (at, byte) in flips {
                    let i = at.index(b.len());
                    b[i] ^= byte;
                }
                b.truncate(cut.index(b.len()) + 1);
                b
            }),
        1 => vec(any::<u8>(), 0..200),
    ]
}

fn check_hello(h: &Hello) -> Result<(), TestCaseError> {
    prop_assert!(h.hostname.len() <= 253);
    prop_assert!(h.os.len() <= 32 && h.arch.len() <= 32);
    prop_assert!(h.os_version.len() <= 256 && h.agent_version.len() <= 64);
    prop_assert!(h.capabilities.len() <= 256);
    prop_assert!(h.capabilities.iter().all(|c| c.len() <= 64));
    if let Some(i) = &h.isolation {
        prop_assert!(i.since.len() <= 64 && i.by.len() <= 256);
    }
    Ok(())
}

/// Everything of a report lands in a Command's status: bounded whatever the agent said.
fn check_report(r: &Report, received: u64) -> Result<(), TestCaseError> {
    prop_assert!(r.error_message.len() <= MAX_MESSAGE);
    prop_assert!(r.working_directory.len() <= MAX_PATH);
    prop_assert!(r.warnings.len() <= MAX_WARNINGS + 2);
    prop_assert!(r.warnings.iter().all(|w| w.len() <= MAX_WARNING));
    prop_assert!(
        r.error_reason.is_empty()
            || (r.error_reason.len() <= 64
                && r.error_reason.bytes().all(|b| b.is_ascii_alphanumeric())),
        "{:?}",
        r.error_reason
    );
    if let Ok(out) = &r.output {
        prop_assert!(out.inline.len() <= INLINE_LIMIT);
        prop_assert_eq!(out.size, received);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(300))]

    /// A stream of raw messages from DEVICE: nothing panics, decoding is stable, the hello
    /// is bounded, reports are bounded, and OTHER's command is never touched.
    #[test]
    fn fuzz_agent_messages(
        stream in vec(wire_bytes(), 1..8),
        limit in prop_oneof![Just(0u64), 1u64..1000, Just(u64::MAX)],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let _entered = runtime.enter();
        let Fixture { gw, _rx } = fixture(limit);
        let device = key(DEVICE);
        let mut received: u64 = 0;
        for bytes in stream {
            let Ok(msg) = AgentMessage::decode(bytes.as_slice()) else {
                continue;
            };
            let again = AgentMessage::decode(msg.encode_to_vec().as_slice());
            prop_assert_eq!(again.as_ref(), Ok(&msg));
            match msg.msg {
                Some(agent_message::Msg::Hello(h)) => check_hello(&bounded_hello(h))?,
                Some(agent_message::Msg::Heartbeat(hb)) => {
                    gw.seen(&device);
                    gw.isolation_seen(&device, hb.isolation);
                    if let Some(h) = gw.link(&device).and_then(|l| l.hello) {
                        check_hello(&h)?;
                    }
                }
                // Whatever the CSR, signing answers without panicking; the identity is the
                // stream's, never the CSR's.
                Some(agent_message::Msg::Renew(r)) => {
                    if let Ok((pem, _)) =
                        gw.ca.sign_device(&r.csr_pem, &device.0, &device.1, Duration::from_secs(60))
                    {
                        let der = crate::pki::tests::pem_to_der(&pem);
                        prop_assert_eq!(crate::pki::device_identity(&der).ok(), Some(device.clone()));
                    }
                }
                // A chunk for a command that moves no file, or another device's, ends the
                // stream as a protocol violation; it never panics or writes anything.
                Some(agent_message::Msg::Event(CommandEvent {
                    command_uid,
                    event: Some(command_event::Event::File(chunk)),
                })) => {
                    let result = gw.on_file_chunk(&device, &command_uid, chunk);
                    let in_flight = gw.inflight(&command_uid).is_some();
                    prop_assert!(result.is_err() || !in_flight);
                }
                Some(agent_message::Msg::Event(ev)) => {
                    let uid = ev.command_uid.clone();
                    let ours_in_flight = gw.inflight(OURS).is_some();
                    if let Some(command_event::Event::Output(chunk)) = &ev.event
                        && uid == OURS
                        && ours_in_flight
                    {
                        received = received.saturating_add(chunk.data.len() as u64);
                    }
                    let completes = matches!(ev.event, Some(command_event::Event::Completed(_)));
                    let result = gw.on_event(&device, ev);
                    if uid == THEIRS {
                        prop_assert!(result.is_err(), "another device's command was reachable");
                        prop_assert!(gw.inflight(THEIRS).is_some());
                    } else {
                        prop_assert!(result.is_ok());
                    }
                    if uid == OURS && completes && ours_in_flight {
                        let report = gw.report(OURS);
                        prop_assert!(report.is_some());
                        if let Some(report) = report {
                            check_report(&report, received)?;
                        }
                    }
                }
                None => {}
            }
        }
        prop_assert!(gw.report(THEIRS).is_none());
    }

    /// The hello as the Device's status shows it, after a reconnect with any facts.
    #[test]
    fn fuzz_hello_is_bounded_in_the_link(h in hello()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let _entered = runtime.enter();
        let Fixture { gw, _rx } = fixture(0);
        let device = key(("ns", "fresh"));
        let (tx, _rx2) = mpsc::channel(1);
        prop_assert!(gw.register(device.clone(), h, tx).is_ok());
        let link = gw.link(&device);
        let hello = link.and_then(|l| l.hello);
        prop_assert!(hello.is_some());
        if let Some(hello) = hello {
            check_hello(&hello)?;
        }
    }

    /// Token patterns against the names agents enroll with, compared with a plain
    /// backtracking matcher.
    #[test]
    fn fuzz_glob_match(
        pattern in vec(select(vec!["*", "a", "b", "-", "é", "**"]), 0..6).prop_map(|p| p.concat()),
        name in vec(select(vec!["a", "b", "-", "é", "ab"]), 0..6).prop_map(|p| p.concat()),
    ) {
        fn reference(p: &[char], n: &[char]) -> bool {
            match p.split_first() {
                None => n.is_empty(),
                Some(('*', rest)) => (0..=n.len()).any(|i| reference(rest, &n[i..])),
                Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
            }
        }
        let p: Vec<char> = pattern.chars().collect();
        let n: Vec<char> = name.chars().collect();
        prop_assert_eq!(glob_match(&pattern, &name), reference(&p, &n), "{:?} vs {:?}", pattern, name);
    }
}
