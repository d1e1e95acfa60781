//! putfile and run on the real control plane: the agent fetches a library file from the
//! operator, checks its sha256 and signature itself, passes `-parameters` as one literal
//! argument, stops a cancelled script's whole process tree, and keeps the drop folder as
//! `-overwrite` and `-keep` say.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use liveresponse_api::crd::{Command, CommandPhase, LibraryFilePhase, LibrarySource};
use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{HashAlg, LineEnding, PrivateKey};

use crate::Env;
use crate::library::{config_map, from_config_map, inline, put, sha, spec, status_where};

const T: Duration = Duration::from_secs(60);

/// A deterministic Ed25519 key.
fn key(seed: u8, comment: &str) -> Result<PrivateKey> {
    let pair = Ed25519Keypair::from_seed(&[seed; 32]);
    Ok(PrivateKey::new(KeypairData::Ed25519(pair), comment)?)
}

fn signer_line(principal: &str, k: &PrivateKey) -> Result<String> {
    Ok(format!("{principal} {}", k.public_key().to_openssh()?))
}

/// What `ssh-keygen -Y sign -n liveresponse.io` makes.
fn sign(k: &PrivateKey, content: &[u8]) -> Result<String> {
    Ok(k.sign("liveresponse.io", HashAlg::Sha512, content)?
        .to_pem(LineEnding::LF)?)
}

/// A tenant, an agent for `device` over a root of its own, and a Connected session `s`.
async fn setup(env: &Env, ns: &str, device: &str, settings: &str) -> Result<Client> {
    crate::files::setup(env, ns, device, &host_root(ns)?, settings, &[]).await
}

async fn ready(env: &Env, ns: &str, name: &str) -> Result<()> {
    status_where(env, ns, name, "Ready", |st| {
        st.phase == Some(LibraryFilePhase::Ready)
    })
    .await?;
    Ok(())
}

/// The failed command's error, as "Reason: message".
fn refusal(c: &Command) -> String {
    lr::error(c)
        .map(|e| format!("{}: {}", e.reason, e.message))
        .unwrap_or_default()
}

async fn run_json(client: &Client, ns: &str, name: &str, args: &[&str]) -> Result<Command> {
    Cmd::new("s", "run", args)
        .json()
        .run(client, ns, name)
        .await
}

/// The script receives `-parameters` as exactly one argument, shell characters and all;
/// unsigned and untrusted scripts are refused; bytes that changed after the file was
/// validated are refused by the agent itself.
pub async fn run_checks_signatures_and_passes_parameters_literally(
    env: &'static Env,
) -> Result<()> {
    let (ns, device) = ("lr-run", "runner");
    let trusted = key(11, "ops")?;
    let stranger = key(12, "stranger")?;
    let settings = format!(
        "  trustedSigners:\n  - {}\n",
        serde_json::to_string(&signer_line("ops@example.com", &trusted)?)?
    );
    let client = setup(env, ns, device, &settings).await?;

    // Unsigned, while allowUnsignedScripts is false: the device refuses it.
    let args_sh = "#!/bin/sh\nprintf '%s\\n' \"$#\" \"$1\"\n";
    put(env, ns, "unsigned", spec("unsigned.sh", inline(args_sh))).await?;
    ready(env, ns, "unsigned").await?;
    let c = run_json(&client, ns, "run-unsigned", &["unsigned.sh"]).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && refusal(&c).contains("unsigned and the namespace's allowUnsignedScripts is false"),
        "an unsigned script was not refused: {:?} {}",
        lr::phase(&c),
        refusal(&c)
    );

    // Uploaded by a library admin with `library upload`, signed by a trusted key: it runs,
    // and the parameter arrives as one literal argument.
    let dir = host_root("run-upload")?;
    let file = dir.join("args.sh");
    std::fs::write(&file, args_sh)?;
    let sig = dir.join("args.sh.sig");
    std::fs::write(&sig, sign(&trusted, args_sh.as_bytes())?)?;
    let (ok, out, err) = lr::cli(
        &env.cluster,
        "library-admin",
        &[
            "-n",
            ns,
            "library",
            "upload",
            &file.to_string_lossy(),
            "--signature",
            &sig.to_string_lossy(),
        ],
    )?;
    ensure!(ok, "library upload failed: {out}{err}");
    ready(env, ns, "args.sh").await?;
    let _ = std::fs::remove_dir_all(&dir);
    let param = "a;b & c | d $(e)";
    let c = run_json(&client, ns, "run-args", &["args.sh", "-parameters", param]).await?;
    lr::succeeded(&c)?;
    let rec = lr::records(&c)?;
    let first = rec.first().context("no record")?;
    ensure!(
        first["stdout"] == format!("1\n{param}\n") && first["exitCode"] == 0,
        "the script did not get exactly one literal argument: {first}"
    );
    eprintln!("run: the script saw $# = 1 and $1 = {param:?}");

    // Signed by a key the namespace does not trust: refused.
    let mut other = spec("other.sh", inline(args_sh));
    other.signature = Some(sign(&stranger, args_sh.as_bytes())?);
    put(env, ns, "other", other).await?;
    status_where(env, ns, "other", "Invalid", |st| {
        st.phase == Some(LibraryFilePhase::Invalid)
    })
    .await?;
    let c = run_json(&client, ns, "run-other", &["other.sh"]).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed) && refusal(&c).contains("untrusted"),
        "a script signed by an untrusted key was not refused: {}",
        refusal(&c)
    );

    // The operator serves bytes other than those validated (the artifact store was
    // altered after the file became Ready): the agent refuses them.
    let good = b"#!/bin/sh\necho good\n";
    let digest = sha(good);
    let object = env
        .stack
        .artifact_dir()
        .join("objects/sha256")
        .join(&digest);
    std::fs::create_dir_all(object.parent().context("objects folder")?)?;
    std::fs::write(&object, good)?;
    let mut stored = spec(
        "stored.sh",
        LibrarySource {
            artifact: Some(digest.clone()),
            ..Default::default()
        },
    );
    stored.signature = Some(sign(&trusted, good)?);
    put(env, ns, "stored", stored).await?;
    ready(env, ns, "stored").await?;
    // The controller looks once more after its own status write; the store is altered
    // after that, so only the device can notice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::write(&object, b"#!/bin/sh\necho evil\n")?;
    let c = run_json(&client, ns, "run-altered", &["stored.sh"]).await?;
    let why = refusal(&c);
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && why.contains("PermissionDenied")
            && why.contains("refused library file stored")
            && why.contains(&digest),
        "the agent ran bytes that changed after validation: {:?} {why}",
        lr::phase(&c)
    );
    eprintln!("run: altered bytes refused by the agent: {why}");
    std::fs::remove_file(&object)?;

    // A signed script from a ConfigMap that changes after Ready is refused (by the agent
    // when the operator serves the new bytes first, else by the controller's re-check).
    let v1 = "#!/bin/sh\necho v1\n";
    config_map(env, ns, "scripts", "cm.sh", v1).await?;
    let mut cm = spec("cm.sh", from_config_map("scripts", "cm.sh"));
    cm.signature = Some(sign(&trusted, v1.as_bytes())?);
    put(env, ns, "cm", cm).await?;
    ready(env, ns, "cm").await?;
    let c = run_json(&client, ns, "run-cm", &["cm.sh"]).await?;
    lr::succeeded(&c)?;
    config_map(env, ns, "scripts", "cm.sh", "#!/bin/sh\necho v2\n").await?;
    let c = run_json(&client, ns, "run-cm-changed", &["cm.sh"]).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed),
        "a script whose ConfigMap changed after Ready ran: {:?}",
        c.status
    );
    eprintln!("run: changed ConfigMap refused: {}", refusal(&c));

    // Once unsigned scripts are allowed, the unsigned one runs.
    lr::set_settings(
        &env.cluster.client("admin").await?,
        ns,
        serde_json::json!({ "allowUnsignedScripts": true }),
    )
    .await?;
    let c = run_json(&client, ns, "run-unsigned-allowed", &["unsigned.sh"]).await?;
    lr::succeeded(&c)?;
    Ok(())
}

/// Processes whose command line is `sleep N` for one of `durations`.
fn sleeps(durations: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read_to_string(e.path().join("cmdline")).ok()?;
            durations
                .iter()
                .any(|d| cmd == format!("sleep\0{d}\0"))
                .then_some(pid)
        })
        .collect()
}

/// Cancelling a run whose script started `sleep` children leaves none of them running.
pub async fn cancel_stops_the_scripts_process_tree(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-run-cancel", "sleeper");
    let client = setup(env, ns, device, "  allowUnsignedScripts: true\n").await?;
    let durations = ["30031", "30032", "30033"];
    let body = format!(
        "#!/bin/sh\nsleep {} &\nsetsid sleep {} &\nsleep {}\n",
        durations[0], durations[1], durations[2]
    );
    put(env, ns, "tree", spec("tree.sh", inline(&body))).await?;
    ready(env, ns, "tree").await?;
    Cmd::new("s", "run", &["tree.sh"])
        .create(&client, ns, "tree")
        .await?;
    let started = Instant::now();
    while sleeps(&durations).len() < 3 {
        ensure!(
            started.elapsed() < T,
            "the script's three sleeps did not start: {:?}",
            sleeps(&durations)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = sleeps(&durations);
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    api.patch(
        "tree",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let c = lr::wait_final(&client, ns, "tree", T).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Cancelled),
        "{:?}",
        c.status
    );
    // Killed processes may linger a moment as zombies, which have no command line.
    let gone = Instant::now();
    while !sleeps(&durations).is_empty() && gone.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = sleeps(&durations);
    ensure!(
        left.is_empty(),
        "processes of the cancelled script are still running: {left:?} (of {before:?})"
    );
    eprintln!("run: cancel stopped pids {before:?}; none is left");

    // An output larger than status.output keeps (64 KiB) is kept whole as an artifact,
    // and a viewer of the command downloads all of it through the file API.
    let lines = 20_000;
    let big = format!("#!/bin/sh\nseq 1 {lines}\n");
    put(env, ns, "big", spec("big.sh", inline(&big))).await?;
    ready(env, ns, "big").await?;
    let c = Cmd::new("s", "run", &["big.sh"])
        .json()
        .run(&client, ns, "big")
        .await?;
    lr::succeeded(&c)?;
    let out = c
        .status
        .as_ref()
        .and_then(|s| s.output.clone())
        .context("no output")?;
    ensure!(
        out.truncated,
        "a {} byte output was not cut inline",
        out.size
    );
    ensure!(
        out.artifact.is_some() && out.artifact == out.sha256,
        "the whole output is not in the artifact store: {:?}",
        out.artifact
    );
    let dir = host_root("run-big-output")?;
    let dest = dir.join("big.json");
    let dest_s = dest.to_string_lossy().into_owned();
    let (ok, _, said) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &["-n", ns, "download", "big", "--full-output", "-o", &dest_s],
    )?;
    ensure!(
        ok,
        "a basic analyst could not download a full output: {said}"
    );
    let whole = std::fs::read(&dest)?;
    ensure!(
        whole.len() as i64 == out.size && Some(sha(&whole)) == out.sha256,
        "the downloaded output is not the one the command recorded"
    );
    let records: Vec<serde_json::Value> = serde_json::from_slice(&whole)?;
    let stdout = records
        .first()
        .and_then(|r| r["stdout"].as_str())
        .context("no stdout in the full output")?;
    ensure!(
        stdout.lines().count() == lines && stdout.ends_with(&format!("{lines}\n")),
        "the full output lacks lines of the script's stdout"
    );
    eprintln!(
        "run: a {} byte output kept whole as artifact {}",
        out.size,
        out.artifact.unwrap_or_default()
    );
    Ok(())
}

/// putfile writes into the agent's drop folder, refuses to replace a file without
/// `-overwrite`, and a file put without `-keep` is gone after the agent restarts.
pub async fn putfile_overwrites_only_when_asked_and_keeps_only_when_asked(
    env: &'static Env,
) -> Result<()> {
    let (ns, device) = ("lr-putfile", "dropper");
    let client = setup(env, ns, device, "  allowUnsignedScripts: true\n").await?;
    let drop = env.stack.agent_dir(ns, device).join("drop");
    put(env, ns, "notes", spec("notes.txt", inline("first\n"))).await?;
    ready(env, ns, "notes").await?;
    let c = Cmd::new("s", "putfile", &["notes.txt"])
        .json()
        .run(&client, ns, "put-1")
        .await?;
    lr::succeeded(&c)?;
    let rec = lr::records(&c)?;
    let path = drop.join("notes.txt");
    ensure!(
        rec.first().and_then(|r| r["path"].as_str()) == Some(&*path.to_string_lossy()),
        "putfile reported {rec:?}, expected {}",
        path.display()
    );
    ensure!(std::fs::read_to_string(&path)? == "first\n", "content");

    // A new version of the library file: refused without -overwrite, written with it.
    put(env, ns, "notes", spec("notes.txt", inline("second\n"))).await?;
    status_where(env, ns, "notes", "Ready with the new content", |st| {
        st.sha256.as_deref() == Some(sha(b"second\n").as_str())
    })
    .await?;
    let c = Cmd::new("s", "putfile", &["notes.txt"])
        .run(&client, ns, "put-2")
        .await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed) && refusal(&c).contains("-overwrite"),
        "putfile replaced a file without -overwrite: {}",
        refusal(&c)
    );
    ensure!(
        std::fs::read_to_string(&path)? == "first\n",
        "the refused putfile changed the file"
    );
    let c = Cmd::new("s", "putfile", &["notes.txt", "-overwrite"])
        .run(&client, ns, "put-3")
        .await?;
    lr::succeeded(&c)?;
    ensure!(std::fs::read_to_string(&path)? == "second\n", "overwritten");

    put(env, ns, "kept", spec("kept.txt", inline("kept\n"))).await?;
    ready(env, ns, "kept").await?;
    let c = Cmd::new("s", "putfile", &["kept.txt", "-keep"])
        .run(&client, ns, "put-kept")
        .await?;
    lr::succeeded(&c)?;

    // The agent restarts: what was put without -keep is removed, the kept file stays.
    env.stack.kill_agent(ns, device);
    env.stack.start_agent(ns, device, &host_root(ns)?, &[])?;
    // The agent cleans its drop folder as it starts, before it connects.
    let restarted = Instant::now();
    while path.exists() {
        ensure!(
            restarted.elapsed() < T,
            "{} survived the agent's restart without -keep",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.stack.wait_device(ns, device, true, T)?;
    ensure!(
        std::fs::read_to_string(drop.join("kept.txt"))? == "kept\n",
        "the -keep file did not survive the restart"
    );
    Ok(())
}
