//! Batches on the real control plane: one `processes` over the devices a label picks (and
//! nothing else), refused for a basic analyst when the verb is advanced, cancelled with
//! every child, and an analyst's own session on a picked device working throughout.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::api::{Api, ListParams};
use liveresponse_api::crd::{
    BATCH_LABEL, BatchCommand, BatchPhase, Command, CommandPhase, LiveResponseSession,
    ON_BEHALF_OF_ANNOTATION, SessionPhase,
};

use crate::Env;
use crate::library::{inline, put, spec};

const T: Duration = Duration::from_secs(90);

async fn wait_batch(
    env: &Env,
    ns: &str,
    name: &str,
    done: impl Fn(&BatchCommand) -> bool,
    what: &str,
) -> Result<BatchCommand> {
    let api: Api<BatchCommand> = Api::namespaced(env.cluster.client("admin").await?, ns);
    e2e::eventually(&format!("batch {name}: {what}"), T, || async {
        let b = api.get(name).await?;
        Ok(done(&b).then_some(b))
    })
    .await
}

fn batch_phase(b: &BatchCommand) -> Option<BatchPhase> {
    b.status.as_ref().and_then(|s| s.phase)
}

/// Pids of processes whose command line is exactly `line`.
fn pids_of(line: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim() == line)
                .unwrap_or(false)
        })
        .collect()
}

/// Five devices in two namespaces; a label picks four in one. The batch's `processes
/// -name` finds the process the test started, with its pid, on each of the four; the fifth
/// and the other namespace get no session; the analyst's session on a picked device keeps
/// answering during the batch; a basic analyst's advanced batch is refused.
pub async fn batch_runs_on_the_devices_its_selector_picks(env: &'static Env) -> Result<()> {
    let (ns, other) = ("lr-batch", "lr-batch-other");
    let s = &env.stack;
    s.tenant(ns, "")?;
    s.tenant(other, "")?;
    let root = host_root(ns)?;
    let picked = ["hunt-1", "hunt-2", "hunt-3", "hunt-4"];
    for d in picked.iter().chain(&["bystander"]) {
        s.start_agent(ns, d, &root, &[])?;
    }
    s.start_agent(other, "elsewhere", &root, &[])?;
    for d in picked.iter().chain(&["bystander"]) {
        s.wait_device(ns, d, true, T)?;
    }
    s.wait_device(other, "elsewhere", true, T)?;
    for d in picked {
        env.cluster.kubectl_ok(
            "admin",
            &["-n", ns, "label", "device", d, "team=hunt"],
            None,
        )?;
    }
    // The same label in another namespace: a batch never leaves its own.
    env.cluster.kubectl_ok(
        "admin",
        &["-n", other, "label", "device", "elsewhere", "team=hunt"],
        None,
    )?;

    // A process with a name of its own, so each device's answer can be checked by pid.
    let dir = host_root("lr-batch-bin")?;
    let exe = dir.join("lrbatch4242");
    std::fs::copy("/bin/sleep", &exe)?;
    let mut child = std::process::Command::new(&exe).arg("4242.75").spawn()?;
    let pid = u64::from(child.id());

    // The analyst's own session on a picked device, open before and during the batch.
    let analyst = env.cluster.client("analyst-basic").await?;
    lr::open_session(&analyst, ns, "mine", "hunt-1", "analyst-basic", None).await?;
    lr::wait_session(&analyst, ns, "mine", SessionPhase::Connected, T).await?;

    let (ok, out, err) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &[
            "-n",
            ns,
            "batch",
            "create",
            "--name",
            "hunt",
            "-l",
            "team=hunt",
            "--max-concurrency",
            "2",
            "--reason",
            "INC-42",
            "--",
            "processes",
            "-name",
            "lrbatch4242",
        ],
    )?;
    ensure!(ok, "batch create failed: {out}\n{err}");
    ensure!(err.contains("4 device(s) picked"), "{out}\n{err}");

    // The analyst types while the batch runs: the session answers, and is not refused.
    let c = Cmd::new("mine", "processes", &["-pid", &pid.to_string()])
        .json()
        .run(&analyst, ns, "mine-during")
        .await?;
    lr::succeeded(&c)?;
    ensure!(
        lr::records(&c)?.first().and_then(|r| r["pid"].as_u64()) == Some(pid),
        "the analyst's processes -pid {pid}: {}",
        lr::content(&c)
    );

    let b = wait_batch(
        env,
        ns,
        "hunt",
        |b| batch_phase(b).is_some_and(BatchPhase::is_final),
        "final",
    )
    .await?;
    let st = b.status.clone().unwrap_or_default();
    ensure!(
        batch_phase(&b) == Some(BatchPhase::Succeeded),
        "batch ended {:?}: {:?} {:?}",
        st.phase,
        st.message,
        st.results
    );
    ensure!(st.total == 4 && st.counts.succeeded == 4, "{st:?}");
    let devices: Vec<&str> = st.results.iter().map(|r| r.device.as_str()).collect();
    ensure!(devices == picked, "results for {devices:?}");

    // Each device's own Command found the process, with its pid.
    let commands: Api<Command> = Api::namespaced(analyst.clone(), ns);
    for r in &st.results {
        let name = r.command.clone().context("a result without its Command")?;
        let c = commands.get(&name).await?;
        let recs = lr::records(&c)?;
        ensure!(
            recs.len() == 1 && recs[0]["pid"].as_u64() == Some(pid),
            "{}: processes -name lrbatch4242 gave {recs:?}, not pid {pid}",
            r.device
        );
    }

    // The results, merged, as the analyst reads them.
    let (ok, out, err) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &["-n", ns, "batch", "results", "hunt"],
    )?;
    ensure!(ok, "batch results: {out}\n{err}");
    ensure!(
        out.lines().next().is_some_and(|l| l.starts_with("DEVICE")),
        "{out}"
    );
    for d in picked {
        ensure!(
            out.lines()
                .any(|l| l.starts_with(d) && l.contains(&pid.to_string())),
            "no row of {d} with pid {pid}:\n{out}"
        );
    }
    let (ok, out, _) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &["-n", ns, "batch", "results", "hunt", "-o", "json"],
    )?;
    ensure!(ok, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("batch results -o json prints JSON lines")?;
    ensure!(
        lines.len() == 4 && lines.iter().all(|l| l["pid"].as_u64() == Some(pid)),
        "{out}"
    );

    // The children: sessions opened by the operator for the analyst, ended once done; none
    // for the bystander, none in the other namespace.
    let sessions: Api<LiveResponseSession> = Api::namespaced(analyst.clone(), ns);
    let children = sessions
        .list(&ListParams::default().labels(&format!("{BATCH_LABEL}=hunt")))
        .await?
        .items;
    ensure!(children.len() == 4, "{} child sessions", children.len());
    for c in &children {
        ensure!(
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ON_BEHALF_OF_ANNOTATION))
                .map(String::as_str)
                == Some("analyst-basic"),
            "child session {:?} does not say whom it serves",
            c.metadata.name
        );
    }
    e2e::eventually("the child sessions to end", T, || async {
        let all = sessions
            .list(&ListParams::default().labels(&format!("{BATCH_LABEL}=hunt")))
            .await?
            .items;
        Ok(all
            .iter()
            .all(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Disconnected))
            .then_some(()))
    })
    .await?;
    let all = sessions.list(&ListParams::default()).await?.items;
    ensure!(
        !all.iter().any(|s| s.spec.device == "bystander"),
        "the unlabelled device got a session"
    );
    let elsewhere: Api<LiveResponseSession> =
        Api::namespaced(env.cluster.client("admin").await?, other);
    ensure!(
        elsewhere
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "a session was opened in the other namespace"
    );
    let mine = sessions.get("mine").await?;
    ensure!(
        mine.status.as_ref().and_then(|s| s.phase) == Some(SessionPhase::Connected),
        "the analyst's session did not survive the batch: {:?}",
        mine.status
    );

    // A basic analyst cannot run an advanced verb on many devices either.
    let (ok, out, err) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &[
            "-n",
            ns,
            "batch",
            "create",
            "--name",
            "grab",
            "-l",
            "team=hunt",
            "--",
            "getfile",
            "/etc/hostname",
        ],
    )?;
    ensure!(!ok, "a basic analyst's getfile batch was accepted: {out}");
    ensure!(err.contains("advanced"), "refusal: {err}");
    let batches: Api<BatchCommand> = Api::namespaced(analyst.clone(), ns);
    ensure!(
        batches.get_opt("grab").await?.is_none(),
        "the refused batch exists"
    );
    // Nor cancel someone else's batch.
    let (ok, _, err) = lr::cli(
        &env.cluster,
        "analyst-advanced",
        &["-n", ns, "batch", "cancel", "hunt"],
    )?;
    ensure!(!ok && err.contains("belongs to analyst-basic"), "{err}");

    let _ = child.kill();
    let _ = child.wait();
    lr::disconnect(&analyst, ns, "mine").await?;
    Ok(())
}

/// Cancelling a batch stops the script running on each started device (its process is
/// gone) and the devices still waiting never start.
pub async fn cancelling_a_batch_stops_every_child(env: &'static Env) -> Result<()> {
    let ns = "lr-batch-cancel";
    let s = &env.stack;
    s.tenant(ns, "  allowUnsignedScripts: true\n")?;
    let root = host_root(ns)?;
    let devices = ["c-1", "c-2", "c-3"];
    for d in devices {
        s.start_agent(ns, d, &root, &[])?;
    }
    for d in devices {
        s.wait_device(ns, d, true, T)?;
    }
    put(
        env,
        ns,
        "nap",
        spec("nap.sh", inline("#!/bin/sh\nexec sleep 3131.25\n")),
    )
    .await?;
    crate::library::status_where(env, ns, "nap", "Ready", |st| {
        st.phase == Some(liveresponse_api::crd::LibraryFilePhase::Ready)
    })
    .await?;

    let (ok, out, err) = lr::cli(
        &env.cluster,
        "analyst-advanced",
        &[
            "-n",
            ns,
            "batch",
            "create",
            "--name",
            "naps",
            "--device",
            "c-1",
            "--device",
            "c-2",
            "--device",
            "c-3",
            "--max-concurrency",
            "2",
            "--",
            "run",
            "nap.sh",
        ],
    )?;
    ensure!(ok, "{out}\n{err}");
    let started = Instant::now();
    while pids_of("sleep 3131.25").len() < 2 {
        if started.elapsed() > T {
            bail!(
                "the scripts did not start on two devices: {:?}",
                pids_of("sleep 3131.25")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = wait_batch(
        env,
        ns,
        "naps",
        |b| b.status.as_ref().is_some_and(|s| s.counts.running == 2),
        "two running",
    )
    .await?;
    ensure!(
        b.status.as_ref().is_some_and(|s| s.counts.pending == 1),
        "{:?}",
        b.status
    );

    let (ok, out, err) = lr::cli(
        &env.cluster,
        "analyst-advanced",
        &["-n", ns, "batch", "cancel", "naps"],
    )?;
    ensure!(ok, "{out}\n{err}");
    let b = wait_batch(
        env,
        ns,
        "naps",
        |b| batch_phase(b).is_some_and(BatchPhase::is_final),
        "final",
    )
    .await?;
    let st = b.status.unwrap_or_default();
    ensure!(
        st.phase == Some(BatchPhase::Cancelled) && st.counts.cancelled == 3,
        "{:?} {:?}",
        st.phase,
        st.counts
    );
    let commands: Api<Command> = Api::namespaced(env.cluster.client("analyst-advanced").await?, ns);
    let children = commands
        .list(&ListParams::default().labels(&format!("{BATCH_LABEL}=naps")))
        .await?
        .items;
    ensure!(
        children.len() == 2
            && children
                .iter()
                .all(|c| lr::phase(c) == Some(CommandPhase::Cancelled)),
        "the started children: {:?}",
        children.iter().map(lr::phase).collect::<Vec<_>>()
    );
    e2e::eventually("the scripts to be killed", T, || async {
        Ok(pids_of("sleep 3131.25").is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
