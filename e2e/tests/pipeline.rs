//! The command pipeline under stress (issue 8): a stalled agent, a cut network, an offline
//! device, ordering inside a session, large outputs and retention. Each test checks what an
//! analyst would check, against ground truth the test created.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::eventually;
use e2e::fixture::{self, write};
use e2e::lr::{self, Cmd};
use e2e::process::RssSampler;
use e2e::proxy::TcpProxy;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use liveresponse_api::crd::{Command, CommandPhase, LiveResponseSession, SessionPhase};
use sha2::{Digest, Sha256};

use crate::Env;

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

/// A tenant with a connected agent for `device`; returns the analyst's client.
async fn setup(env: &Env, ns: &str, device: &str, root: &Path, settings: &str) -> Result<Client> {
    let s = &env.stack;
    s.tenant(ns, settings)?;
    s.start_agent(ns, device, root, &[])?;
    s.wait_device(ns, device, true, T)?;
    env.cluster.client("analyst-advanced").await
}

async fn session(client: &Client, ns: &str, name: &str, device: &str) -> Result<()> {
    lr::open_session(client, ns, name, device, "analyst-advanced", None).await?;
    lr::wait_session(client, ns, name, SessionPhase::Connected, T).await?;
    Ok(())
}

/// Enrolls `device` (its agent starts once, connects) and leaves it offline.
fn enrolled_but_offline(env: &Env, ns: &str, device: &str, root: &Path) -> Result<()> {
    let s = &env.stack;
    s.start_agent(ns, device, root, &[])?;
    s.wait_device(ns, device, true, T)?;
    s.kill_agent(ns, device);
    s.wait_device(ns, device, false, T)
}

fn phase_or_none(c: &Command) -> String {
    lr::phase(c).map_or("no phase".into(), |p| format!("{p:?}"))
}

/// Creates a command and polls it tightly to its final phase (the shared helper's 200 ms
/// poll would hide the latency); it must succeed within `limit`. Returns creation->final.
async fn run_timed(
    client: &Client,
    ns: &str,
    name: &str,
    cmd: Cmd<'_>,
    limit: Duration,
) -> Result<Duration> {
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let t = Instant::now();
    cmd.create(client, ns, name).await?;
    loop {
        let c = api.get(name).await?;
        if lr::phase(&c).is_some_and(CommandPhase::is_final) {
            lr::succeeded(&c)?;
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < limit,
            "command {name} in {ns} is still {} after {limit:?}",
            phase_or_none(&c)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn p50(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// `n` sequential `processes` in `session`, each waited to Succeeded within 30 s.
async fn processes_one_by_one(
    client: &Client,
    ns: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("{prefix}-{i:02}");
        out.push(
            run_timed(
                client,
                ns,
                &name,
                Cmd::new("s", "processes", &[]),
                Duration::from_secs(30),
            )
            .await?,
        );
    }
    Ok(out)
}

/// One tenant's agent stops reading (SIGSTOP) while 100 commands pile up for it; another
/// tenant's commands keep completing. After SIGCONT every piled-up command ends.
pub async fn stalled_agent_does_not_stall_other_tenants(env: &'static Env) -> Result<()> {
    let (ns_a, ns_b) = ("lr-stall-a", "lr-stall-b");
    let client = setup(env, ns_a, "frozen", &fixture::host_root("stall-a")?, "").await?;
    setup(env, ns_b, "steady", &fixture::host_root("stall-b")?, "").await?;
    session(&client, ns_a, "s", "frozen").await?;
    session(&client, ns_b, "s", "steady").await?;

    let before = processes_one_by_one(&client, ns_b, "before", 15).await?;
    let stopped = env.stack.stop_agent(ns_a, "frozen")?;
    // Each Execute carries a 4000-character pattern: 100 of them (400 KB) overflow the
    // HTTP/2 window and socket buffers of a stream nobody reads, so anything that waits for
    // room to send to this agent waits until the agent is dropped.
    let pattern = "x".repeat(4000);
    let args = ["-name", pattern.as_str()];
    let names: Vec<String> = (0..100).map(|i| format!("piled-{i:03}")).collect();
    let pile = async {
        for n in &names {
            Cmd::new("s", "processes", &args)
                .background()
                .create(&client, ns_a, n)
                .await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let (piled, during) = tokio::join!(pile, processes_one_by_one(&client, ns_b, "during", 15));
    let during = during.context("tenant B while tenant A's agent is stopped")?;
    piled.context("creating the 100 commands for the stopped agent")?;
    eprintln!(
        "stalled agent: tenant B `processes` p50 {:?} before, {:?} while A is stopped (max {:?} / {:?})",
        p50(&before),
        p50(&during),
        before.iter().max().copied().unwrap_or_default(),
        during.iter().max().copied().unwrap_or_default(),
    );
    stopped.resume()?;

    let api: Api<Command> = Api::namespaced(client.clone(), ns_a);
    let resumed = Instant::now();
    let wait = eventually(
        "all 100 commands of the resumed agent to end",
        Duration::from_secs(180),
        || async {
            let all = api.list(&Default::default()).await?;
            let open = all
                .items
                .iter()
                .filter(|c| c.name_any().starts_with("piled-"))
                .filter(|c| !lr::phase(c).is_some_and(CommandPhase::is_final))
                .count();
            Ok((open == 0).then_some(all.items))
        },
    )
    .await;
    let all = match wait {
        Ok(all) => all,
        Err(e) => {
            let all = api.list(&Default::default()).await?;
            let mut open: BTreeMap<String, usize> = BTreeMap::new();
            for c in all
                .items
                .iter()
                .filter(|c| c.name_any().starts_with("piled-"))
            {
                if !lr::phase(c).is_some_and(CommandPhase::is_final) {
                    *open.entry(phase_or_none(c)).or_default() += 1;
                }
            }
            bail!("{e:#}; still open by phase: {open:?}");
        }
    };
    eprintln!(
        "stalled agent: the 100 piled-up commands all ended {:?} after SIGCONT",
        resumed.elapsed()
    );
    let piled: Vec<&Command> = all
        .iter()
        .filter(|c| c.name_any().starts_with("piled-"))
        .collect();
    ensure!(
        piled.len() == 100,
        "{} of the 100 commands exist",
        piled.len()
    );
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for c in &piled {
        let ok = match lr::phase(c) {
            Some(CommandPhase::Succeeded) => true,
            Some(CommandPhase::Failed) => {
                lr::error(c).is_some_and(|e| e.reason == "DeviceDisconnected")
            }
            _ => false,
        };
        let key = format!(
            "{} {}",
            phase_or_none(c),
            lr::error(c).map(|e| e.reason).unwrap_or_default()
        );
        *outcomes.entry(key).or_default() += 1;
        ensure!(
            ok,
            "{} ended {} {:?}; want Succeeded, or Failed with DeviceDisconnected",
            c.name_any(),
            phase_or_none(c),
            lr::error(c)
        );
    }
    eprintln!("stalled agent: outcomes {outcomes:?}");
    // The resumed agent serves its session again.
    lr::succeeded(
        &Cmd::new("s", "processes", &["-pid", "1"])
            .run(&client, ns_a, "after")
            .await?,
    )?;
    env.stack.kill_agent(ns_a, "frozen");
    env.stack.kill_agent(ns_b, "steady");
    Ok(())
}

/// Files matched by the blip test's findfile, among many that are not.
const NEEDLES: usize = 150;

/// A 5 s network cut while a findfile runs does not fail it: the agent reconnects and the
/// command Succeeds with its full output.
pub async fn brief_disconnect_keeps_running_commands(env: &'static Env) -> Result<()> {
    let ns = "lr-blip";
    // Walking 160,000 folders takes the agent a couple of seconds, long enough for the cut
    // to land while it runs; a few files among them match.
    let needles: BTreeMap<String, u64> = (0..NEEDLES)
        .map(|i| {
            let path = format!(
                "/tree/a{:03}/b{:03}/needle-{i:03}.txt",
                i * 7 % BLIP_FANOUT,
                i * 13 % BLIP_FANOUT
            );
            (path, i as u64 + 1)
        })
        .collect();
    let wanted = needles.clone();
    let root = tokio::task::spawn_blocking(move || {
        fixture::cached_tree("blip-tree-v1", |root| {
            for a in 0..BLIP_FANOUT {
                for b in 0..BLIP_FANOUT {
                    std::fs::create_dir_all(root.join(format!("tree/a{a:03}/b{b:03}")))?;
                }
            }
            for (path, size) in &wanted {
                write(root, path, &"n".repeat(*size as usize))?;
            }
            Ok(())
        })
    })
    .await??;

    let s = &env.stack;
    s.tenant(ns, "")?;
    let proxy = TcpProxy::to_url(&s.gateway()?).await?;
    s.start_agent_via(ns, "blip", &root, &proxy.url(), &[])?;
    s.wait_device(ns, "blip", true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    session(&client, ns, "s", "blip").await?;

    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    Cmd::new(
        "s",
        "findfile",
        &["needle-*.txt", "-root", "/tree", "-max_results", "100000"],
    )
    .json()
    .timeout(600)
    .create(&client, ns, "find")
    .await?;
    let created = Instant::now();
    loop {
        let c = api.get("find").await?;
        match lr::phase(&c) {
            Some(CommandPhase::Running) => break,
            Some(p) if p.is_final() => bail!(
                "findfile ended {p:?} before the cut, so the cut proves nothing: {:?}",
                lr::error(&c)
            ),
            _ => {}
        }
        ensure!(
            created.elapsed() < T,
            "findfile never started: {}",
            phase_or_none(&c)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let accepted = proxy.accepted();
    let cut_at = Instant::now();
    let probe = async {
        // Right after the cut begins: a result delivered before it would make the test moot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.get("find").await
    };
    let ((), at_cut) = tokio::join!(proxy.cut(Duration::from_secs(5)), probe);
    let at_cut = at_cut?;
    ensure!(
        lr::phase(&at_cut) != Some(CommandPhase::Succeeded),
        "findfile had already Succeeded when the network was cut ({:?} after creation), so the cut proves nothing: grow the tree so the cut lands while it runs",
        cut_at.duration_since(created)
    );
    let c = lr::wait_final(&client, ns, "find", Duration::from_secs(120)).await?;
    eprintln!(
        "brief disconnect: findfile ended {} {:?} after the 5 s cut began ({:?} after creation)",
        phase_or_none(&c),
        cut_at.elapsed(),
        created.elapsed()
    );
    lr::succeeded(&c)?;
    ensure!(
        proxy.accepted() > accepted,
        "the agent never reconnected through the proxy"
    );
    let out = c
        .status
        .as_ref()
        .and_then(|s| s.output.clone())
        .context("no output")?;
    ensure!(
        !out.truncated,
        "the output of {NEEDLES} matches should fit inline (size {})",
        out.size
    );
    let recs = lr::records(&c)?;
    let got: BTreeMap<String, u64> = recs
        .iter()
        .filter_map(|r| Some((r["path"].as_str()?.to_string(), r["size"].as_u64()?)))
        .collect();
    ensure!(
        recs.len() == got.len(),
        "records without a path or size: {recs:?}"
    );
    let missing: Vec<&String> = needles.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !needles.contains_key(*k)).collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "findfile after the cut: {} of {NEEDLES} matches, missing {missing:?}, unexpected {extra:?}",
        got.len()
    );
    ensure!(got == needles, "sizes differ: got {got:?}");
    s.wait_device(ns, "blip", true, T)?;
    s.kill_agent(ns, "blip");
    Ok(())
}

/// The blip test's tree: this many folders of this many folders.
const BLIP_FANOUT: usize = 400;

/// A session to a device whose agent is not running waits for it, and so do its commands;
/// when the agent comes back they run, in the order of their ids.
pub async fn offline_device_commands_wait_and_run_in_order(env: &'static Env) -> Result<()> {
    let ns = "lr-offline";
    let root = fixture::host_root("offline")?;
    write(&root, "/x/marker.txt", "found me\n")?;
    env.stack.tenant(ns, "")?;
    enrolled_but_offline(env, ns, "sleeper", &root)?;
    let client = env.cluster.client("analyst-advanced").await?;

    lr::open_session(&client, ns, "s", "sleeper", "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, "s", SessionPhase::Connecting, T).await?;
    let cmds: [(&str, Cmd); 3] = [
        ("q-cd", Cmd::new("s", "cd", &["/x"])),
        ("q-dir", Cmd::new("s", "dir", &[])),
        ("q-info", Cmd::new("s", "fileinfo", &["marker.txt"]).json()),
    ];
    for (name, cmd) in &cmds {
        cmd.create(&client, ns, name).await?;
        lr::wait_phase(&client, ns, name, T, |p| p == CommandPhase::Queued)
            .await
            .with_context(|| format!("{name} should wait Queued for the offline device"))?;
    }
    // Waiting means staying put, not failing a moment later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    for (name, _) in &cmds {
        let c = api.get(name).await?;
        ensure!(
            lr::phase(&c) == Some(CommandPhase::Queued),
            "{name} is {} {:?} while the device is offline; want Queued",
            phase_or_none(&c),
            lr::error(&c)
        );
    }
    let sessions: Api<LiveResponseSession> = Api::namespaced(client.clone(), ns);
    let sp = sessions.get("s").await?.status.and_then(|s| s.phase);
    ensure!(
        sp == Some(SessionPhase::Connecting),
        "the session to the offline device is {sp:?}; want Connecting"
    );

    env.stack.start_agent(ns, "sleeper", &root, &[])?;
    lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
    let mut done = Vec::new();
    for (name, _) in &cmds {
        let c = lr::wait_final(&client, ns, name, T).await?;
        lr::succeeded(&c)?;
        done.push(c);
    }
    done.sort_by_key(|c| lr::id(c).unwrap_or(i64::MAX));
    let order: Vec<String> = done.iter().map(|c| c.name_any()).collect();
    ensure!(
        order == ["q-cd", "q-dir", "q-info"],
        "ids do not follow creation order: {order:?}"
    );
    let times: Vec<_> = done
        .iter()
        .map(|c| {
            c.status
                .as_ref()
                .and_then(|s| s.completion_time.clone())
                .map(|t| t.0)
        })
        .collect();
    ensure!(
        times.iter().all(Option::is_some) && times.windows(2).all(|w| w[0] <= w[1]),
        "completion times out of id order: {:?}",
        order.iter().zip(&times).collect::<Vec<_>>()
    );
    ensure!(
        lr::content(&done[1]).contains("marker.txt"),
        "dir after cd /x should list /x:\n{}",
        lr::content(&done[1])
    );
    let info = lr::records(&done[2])?;
    ensure!(
        info.first().is_some_and(|r| r["path"] == "/x/marker.txt"),
        "fileinfo marker.txt after cd /x: {info:?}"
    );
    env.stack.kill_agent(ns, "sleeper");
    Ok(())
}

/// With `offlineQueueTimeout: 5s` and no agent, the commands end TimedOut and the session
/// Expired, each saying why; the analyst can then open a new session to the device.
pub async fn offline_queue_timeout_ends_commands_and_session(env: &'static Env) -> Result<()> {
    let ns = "lr-offline-expiry";
    let root = fixture::host_root("offline-expiry")?;
    env.stack.tenant(ns, "  offlineQueueTimeout: 5s\n")?;
    enrolled_but_offline(env, ns, "absent", &root)?;
    let client = env.cluster.client("analyst-advanced").await?;

    lr::open_session(&client, ns, "s1", "absent", "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, "s1", SessionPhase::Connecting, T).await?;
    Cmd::new("s1", "processes", &[])
        .create(&client, ns, "w-1")
        .await?;
    Cmd::new("s1", "dir", &["/"])
        .create(&client, ns, "w-2")
        .await?;
    for name in ["w-1", "w-2"] {
        let c = lr::wait_final(&client, ns, name, T).await?;
        let err = lr::error(&c);
        ensure!(
            lr::phase(&c) == Some(CommandPhase::TimedOut)
                && err.as_ref().is_some_and(|e| {
                    e.reason == "OfflineQueueTimeout" && !e.message.trim().is_empty()
                }),
            "{name} ended {} {err:?}; want TimedOut with reason OfflineQueueTimeout and a message",
            phase_or_none(&c)
        );
    }
    let s = lr::wait_session(&client, ns, "s1", SessionPhase::Expired, T).await?;
    let msg = s.status.and_then(|st| st.message).unwrap_or_default();
    ensure!(
        msg.contains("offlineQueueTimeout"),
        "the expired session should say offlineQueueTimeout ended it: {msg:?}"
    );

    // The expired session freed its slots: a new one to the same device is admitted.
    lr::open_session(&client, ns, "s2", "absent", "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, "s2", SessionPhase::Connecting, T)
        .await
        .context("a new session after the expired one")?;
    env.stack.start_agent(ns, "absent", &root, &[])?;
    lr::wait_session(&client, ns, "s2", SessionPhase::Connected, T).await?;
    lr::succeeded(
        &Cmd::new("s2", "processes", &["-pid", "1"])
            .run(&client, ns, "w-3")
            .await?,
    )?;
    env.stack.kill_agent(ns, "absent");
    Ok(())
}

/// 50 `cd DIR_i` / `dir` pairs created back to back in one session: every `dir` lists the
/// folder of the `cd` just before it.
pub async fn cd_then_dir_always_sees_the_new_folder(env: &'static Env) -> Result<()> {
    const PAIRS: usize = 50;
    let ns = "lr-cd-order";
    let root = fixture::host_root("cd-order")?;
    for i in 0..PAIRS {
        write(&root, &format!("/d/dir-{i:02}/marker-{i:02}.txt"), "m")?;
    }
    let client = setup(env, ns, "walker", &root, "").await?;
    session(&client, ns, "s", "walker").await?;

    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..PAIRS {
        let folder = format!("/d/dir-{i:02}");
        let (cd, dir) = (format!("cd-{i:02}"), format!("dir-{i:02}"));
        Cmd::new("s", "cd", &[&folder])
            .create(&client, ns, &cd)
            .await?;
        // Only the id is awaited: it fixes the order without waiting for the work.
        ids.push((cd.clone(), lr::wait_id(&client, ns, &cd, T).await?));
        Cmd::new("s", "dir", &[]).create(&client, ns, &dir).await?;
        ids.push((dir.clone(), lr::wait_id(&client, ns, &dir, T).await?));
    }
    ensure!(
        ids.windows(2).all(|w| w[0].1 < w[1].1),
        "ids do not follow creation order: {ids:?}"
    );
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let all = eventually(
        "the 100 cd/dir commands to finish",
        Duration::from_secs(300),
        || async {
            let all = api.list(&Default::default()).await?;
            let finished = all
                .items
                .iter()
                .filter(|c| lr::phase(c).is_some_and(CommandPhase::is_final))
                .count();
            Ok((finished >= 2 * PAIRS).then_some(all.items))
        },
    )
    .await?;
    eprintln!(
        "cd/dir: {} commands created and finished in {:?}",
        2 * PAIRS,
        started.elapsed()
    );
    let by_id: BTreeMap<i64, &Command> = all.iter().filter_map(|c| Some((lr::id(c)?, c))).collect();
    for c in by_id.values() {
        lr::succeeded(c)?;
    }
    for i in 0..PAIRS {
        let dir = all
            .iter()
            .find(|c| c.name_any() == format!("dir-{i:02}"))
            .context("a dir command is gone")?;
        let id = lr::id(dir).context("dir without id")?;
        let before = by_id
            .get(&(id - 1))
            .context("no command right before the dir")?;
        ensure!(
            before.name_any() == format!("cd-{i:02}"),
            "the command before dir-{i:02} (id {id}) is {}",
            before.name_any()
        );
        let listing = lr::content(dir);
        let seen: BTreeSet<usize> = (0..PAIRS)
            .filter(|j| listing.contains(&format!("marker-{j:02}.txt")))
            .collect();
        ensure!(
            seen == BTreeSet::from([i]),
            "dir-{i:02} (after cd /d/dir-{i:02}) listed the markers of folders {seen:?}:\n{listing}"
        );
    }
    env.stack.kill_agent(ns, "walker");
    Ok(())
}

/// Files in the large-output test's folder, and the length of their names: with
/// `dir -full_path` each row is about 290 bytes, so the listing is about 20 MiB.
const BIG_FILES: usize = 72_000;
const BIG_NAME_LEN: usize = 240;

/// The output the operator must summarize, computed as it does: the agent's Linux provider
/// lists the host root and the API crate renders the records (operator/src/controllers/
/// command.rs `render_output`).
fn expected_listing(root: &Path, verb: &str, args: &[&str]) -> Result<String> {
    use liveresponse_agent::provider::linux::LinuxProvider;
    use liveresponse_agent::provider::{ExecContext, Provider};
    use liveresponse_api::command::{OutputFormat, parse_command};
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let inv = parse_command(verb, &args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = LinuxProvider::new()
        .execute(&ExecContext::new(root), &inv)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(liveresponse_api::output::render(
        inv.spec,
        &result.records,
        inv.output.unwrap_or(OutputFormat::Table),
    ))
}

/// 20 background commands of ~20 MiB output each: every one ends with the first 64 KiB
/// inline and the size and sha256 of the whole, and the operator's memory stays bounded.
pub async fn large_outputs_are_summarized_in_bounded_memory(env: &'static Env) -> Result<()> {
    const BURST: usize = 20;
    let ns = "lr-large";
    let full = tokio::task::spawn_blocking(move || -> Result<(PathBuf, String)> {
        let root = fixture::cached_tree("big-listing-v1", |root| {
            fixture::empty_files(root, "/big", BIG_FILES, |i| {
                format!("{i:06}-{}", "n".repeat(BIG_NAME_LEN - 7))
            })
        })?;
        let full = expected_listing(&root, "dir", &["/big", "-full_path"])?;
        Ok((root, full))
    })
    .await??;
    let (root, full) = full;
    let size = full.len() as u64;
    ensure!(
        (16 * MIB..=26 * MIB).contains(&size),
        "the fixture's listing is {size} bytes; adjust BIG_FILES so it is about 20 MiB"
    );
    let sha = hex::encode(Sha256::digest(full.as_bytes()));
    eprintln!(
        "large outputs: each listing is {:.1} MiB, sha256 {sha}",
        size as f64 / MIB as f64
    );

    let client = setup(env, ns, "bulky", &root, "").await?;
    session(&client, ns, "s", "bulky").await?;
    let operator = env
        .stack
        .operator_pid()
        .context("the operator is not running")?;
    let agent_log = env.stack.log(&format!("agent-{ns}-bulky"));
    let drops = || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .matches("disconnected from the gateway")
            .count()
    };
    let drops_before = drops();
    let sampler = RssSampler::start(operator, Duration::from_millis(100), Duration::from_secs(1))?;
    let started = Instant::now();
    let names: Vec<String> = (0..BURST).map(|i| format!("big-{i:02}")).collect();
    for n in &names {
        Cmd::new("s", "dir", &["/big", "-full_path"])
            .background()
            .create(&client, ns, n)
            .await?;
    }
    let mut done = Vec::new();
    let mut waited = Ok(());
    for n in &names {
        match lr::wait_final(&client, ns, n, Duration::from_secs(300)).await {
            Ok(c) => done.push(c),
            Err(e) => {
                waited = Err(e);
                break;
            }
        }
    }
    // A second more: memory freed late (or not at all) belongs to the burst too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = sampler.stop();
    // Reported, not asserted: a healthy agent busy sending outputs should keep its stream.
    let line = format!(
        "large outputs: {BURST} x {:.1} MiB in {:?}; operator RSS {rss}; the agent lost its stream {} times\n",
        size as f64 / MIB as f64,
        started.elapsed(),
        drops().saturating_sub(drops_before)
    );
    eprint!("{line}");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(e2e::repo_root().join("e2e/.state/latency.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    waited?;

    for c in &done {
        lr::succeeded(c)?;
        let out = c
            .status
            .as_ref()
            .and_then(|s| s.output.clone())
            .with_context(|| format!("{} has no output", c.name_any()))?;
        ensure!(
            out.truncated,
            "{}: a {size}-byte output must be truncated inline",
            c.name_any()
        );
        ensure!(
            out.content.len() <= liveresponse_api::output::INLINE_LIMIT,
            "{}: {} bytes inline, more than 64 KiB",
            c.name_any(),
            out.content.len()
        );
        ensure!(
            !out.content.is_empty() && full.starts_with(&out.content),
            "{}: the inline content is not the start of the output; first differing line: {:?}",
            c.name_any(),
            out.content.lines().zip(full.lines()).find(|(a, b)| a != b)
        );
        ensure!(
            out.size == size as i64,
            "{}: status.output.size {} but the whole output is {size} bytes",
            c.name_any(),
            out.size
        );
        ensure!(
            out.sha256.as_deref() == Some(sha.as_str()),
            "{}: sha256 {:?}, want {sha}",
            c.name_any(),
            out.sha256
        );
    }
    ensure!(
        rss.growth() < 64 * MIB,
        "the operator grew by {} MiB during the burst ({rss}); it must stay under 64 MiB",
        rss.growth() / MIB
    );
    env.stack.kill_agent(ns, "bulky");
    Ok(())
}

/// With `commandRetention: 10s`, a finished Command is deleted after 10 s; a running one is
/// kept however old it is.
pub async fn finished_commands_expire_after_retention(env: &'static Env) -> Result<()> {
    let ns = "lr-retention";
    let root = fixture::host_root("retention")?;
    fixture::sparse(&root, "/huge.img", 400 << 30)?;
    let client = setup(env, ns, "keeper", &root, "").await?;
    let admin = env.cluster.client("settings-admin").await?;
    lr::set_settings(&admin, ns, serde_json::json!({ "commandRetention": "10s" })).await?;
    session(&client, ns, "s", "keeper").await?;
    let api: Api<Command> = Api::namespaced(client.clone(), ns);

    lr::succeeded(
        &Cmd::new("s", "processes", &["-pid", "1"])
            .run(&client, ns, "done")
            .await?,
    )?;
    let finished = Instant::now();
    Cmd::new("s", "fileinfo", &["/huge.img"])
        .timeout(900)
        .create(&client, ns, "long")
        .await?;
    let long_created = Instant::now();
    lr::wait_phase(&client, ns, "long", T, |p| p == CommandPhase::Running).await?;

    // Not before its time: 3 s after it finished it is still there.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(finished.elapsed())).await;
    ensure!(
        api.get_opt("done").await?.is_some(),
        "the finished command was deleted {:?} after it finished, before its 10 s retention",
        finished.elapsed()
    );
    eventually(
        "the finished command to be deleted after its 10 s retention",
        Duration::from_secs(45),
        || async { Ok(api.get_opt("done").await?.is_none().then_some(())) },
    )
    .await?;
    eprintln!(
        "retention: the finished command was deleted {:?} after it finished (retention 10 s)",
        finished.elapsed()
    );

    // The running one is older than the retention by now, and stays.
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(long_created.elapsed())).await;
    let long = api
        .get_opt("long")
        .await?
        .context("the running command was deleted; retention applies to finished commands only")?;
    ensure!(
        lr::phase(&long) == Some(CommandPhase::Running),
        "the long command is {} {:?}; want still Running",
        phase_or_none(&long),
        lr::error(&long)
    );
    api.patch(
        "long",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let cancelled = Instant::now();
    // Once cancelled it is finished, and goes the same way.
    let mut seen: Vec<CommandPhase> = Vec::new();
    loop {
        let Some(c) = api.get_opt("long").await? else {
            break;
        };
        if let Some(p) = lr::phase(&c)
            && !seen.contains(&p)
        {
            seen.push(p);
        }
        ensure!(
            cancelled.elapsed() < Duration::from_secs(45),
            "the cancelled command is still there {:?} after the cancel ({}); its retention is 10 s",
            cancelled.elapsed(),
            phase_or_none(&c)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        seen.iter()
            .all(|p| matches!(p, CommandPhase::Running | CommandPhase::Cancelled)),
        "the long command went through {seen:?} after the cancel"
    );
    eprintln!(
        "retention: the cancelled command was deleted {:?} after the cancel",
        cancelled.elapsed()
    );
    env.stack.kill_agent(ns, "keeper");
    Ok(())
}
