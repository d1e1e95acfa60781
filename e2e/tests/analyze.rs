//! analyze, scan and remediate -auto with the library's rule files, on files and processes
//! the test plants: a YARA rule and a SHA-256 list kept as LibraryFiles reach the agent
//! and decide the verdicts.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::Api;
use kube::api::{Patch, PatchParams};
use liveresponse_api::crd::{AnalysisRules, Command, CommandPhase, LibraryFilePhase};

use crate::Env;
use crate::library::{inline, put, sha, spec, status_where};

const T: Duration = Duration::from_secs(60);

const WEBSHELL_RULE: &str = r#"rule php_eval_post {
  meta:
    description = "PHP that evaluates POST data"
  strings:
    $a = "eval($_POST"
  condition:
    $a
}
"#;

/// Rule files of both kinds, Ready.
async fn rules(env: &Env, ns: &str, listed: &[u8]) -> Result<()> {
    let mut yara = spec("webshells.yar", inline(WEBSHELL_RULE));
    yara.analysis = Some(AnalysisRules::Yara);
    put(env, ns, "webshells", yara).await?;
    let mut list = spec(
        "bad-hashes.txt",
        inline(&format!("# known droppers\n{} dropper.bin\n", sha(listed))),
    );
    list.analysis = Some(AnalysisRules::Sha256List);
    put(env, ns, "bad-hashes", list).await?;
    for name in ["webshells", "bad-hashes"] {
        status_where(env, ns, name, "Ready", |s| {
            s.phase == Some(LibraryFilePhase::Ready)
        })
        .await?;
    }
    Ok(())
}

async fn records(
    client: &kube::Client,
    ns: &str,
    name: &str,
    verb: &str,
    args: &[&str],
) -> Result<(Command, Vec<serde_json::Value>)> {
    let c = Cmd::new("s", verb, args)
        .json()
        .run(client, ns, name)
        .await?;
    lr::succeeded(&c)?;
    let r = lr::records(&c)?;
    Ok((c, r))
}

/// analyze: a file matching the library's YARA rule is malicious with the rule's name, a
/// clean file is clean, a file on the SHA-256 list is malicious, and a process whose
/// executable was deleted is suspicious with that evidence.
pub async fn analyze_gives_verdicts_from_the_library_rules(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-analyze", "web-1");
    let root = host_root("analyze")?;
    std::fs::create_dir_all(root.join("srv/www"))?;
    std::fs::write(
        root.join("srv/www/upload.php"),
        b"<?php if (isset($_POST['c'])) { eval($_POST['c']); } ?>\n",
    )?;
    std::fs::write(root.join("srv/www/index.html"), b"<html>hello</html>\n")?;
    let dropper = b"\x7fELF not really, but listed\n".to_vec();
    std::fs::write(root.join("srv/dropper.bin"), &dropper)?;
    let client = crate::files::setup(env, ns, device, &root, "", &[]).await?;

    // A basic analyst is refused every respond verb, by admission, before anything runs.
    let basic = env.cluster.client("analyst-basic").await?;
    for (i, line) in [
        &["analyze", "file", "/srv/www/index.html"][..],
        &["scan", "/srv"],
        &["collect"],
        &["isolate"],
        &["release"],
        &["remediate", "file", "/srv/www/index.html"],
        &["remediate", "list"],
        &["undo", "file", "/srv/www/index.html"],
        &["remediate", "user", "nobody"],
    ]
    .into_iter()
    .enumerate()
    {
        let refused = Cmd::new("s", line[0], &line[1..])
            .create(&basic, ns, &format!("basic-{i}"))
            .await;
        ensure!(
            refused.is_err_and(|e| format!("{e:#}").contains("liveresponse-advanced")),
            "a basic analyst's {line:?} was not refused by admission"
        );
    }

    // Before any rule file: nothing to tell clean from bad.
    let (_, r) = records(
        &client,
        ns,
        "a0",
        "analyze",
        &["file", "/srv/www/index.html"],
    )
    .await?;
    ensure!(r[0]["verdict"] == "unknown", "no rules, yet: {r:?}");

    rules(env, ns, &dropper).await?;
    let (_, r) = records(
        &client,
        ns,
        "a1",
        "analyze",
        &["file", "/srv/www/upload.php"],
    )
    .await?;
    ensure!(r[0]["verdict"] == "malicious", "the webshell: {r:?}");
    ensure!(
        r.iter()
            .any(|x| x["engine"] == "yara" && x["threat"] == "webshells:php_eval_post"),
        "the rule's name is not in the evidence: {r:?}"
    );
    let (_, r) = records(
        &client,
        ns,
        "a2",
        "analyze",
        &["file", "/srv/www/index.html"],
    )
    .await?;
    ensure!(
        r[0]["verdict"] == "clean" && r.len() == 1,
        "the clean page: {r:?}"
    );
    let (_, r) = records(&client, ns, "a3", "analyze", &["file", "/srv/dropper.bin"]).await?;
    ensure!(
        r[0]["verdict"] == "malicious"
            && r.iter()
                .any(|x| x["engine"] == "sha256" && x["threat"] == "bad-hashes:dropper.bin"),
        "the listed file: {r:?}"
    );

    // A process whose executable is gone from disk.
    let exe_dir = host_root("analyze-exe")?;
    let exe = exe_dir.join("kworker-fake");
    std::fs::copy("/bin/sleep", &exe)?;
    let mut child = std::process::Command::new(&exe).arg("600.5").spawn()?;
    std::fs::remove_file(&exe)?;
    let pid = child.id().to_string();
    let got = records(&client, ns, "a4", "analyze", &["process", &pid]).await;
    let _ = child.kill();
    let _ = child.wait();
    let (_, r) = got?;
    ensure!(
        r[0]["verdict"] == "suspicious"
            && r.iter().any(|x| x["threat"] == "deleted-executable"
                && x["details"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("kworker-fake")),
        "the process running a deleted executable: {r:?}"
    );
    eprintln!(
        "analyze: webshell malicious (yara), page clean, dropper malicious (sha256), deleted executable suspicious"
    );

    // remediate -auto acts on a malicious verdict, and refuses a clean one unless -force.
    let c = Cmd::new("s", "remediate", &["file", "/srv/www/upload.php", "-auto"])
        .json()
        .run(&client, ns, "r1")
        .await?;
    lr::succeeded(&c)?;
    ensure!(
        !root.join("srv/www/upload.php").exists(),
        "remediate -auto left the webshell"
    );
    let steps = c
        .status
        .as_ref()
        .map(|s| s.steps.clone())
        .unwrap_or_default();
    ensure!(
        steps
            .first()
            .is_some_and(|s| s.command_line.starts_with("analyze file")),
        "no analyze step: {steps:?}"
    );
    let c = Cmd::new("s", "remediate", &["file", "/srv/www/index.html", "-auto"])
        .run(&client, ns, "r2")
        .await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Failed)
            && lr::error(&c)
                .is_some_and(|e| e.message.contains("clean") && e.message.contains("-force")),
        "remediate -auto of a clean file: {:?}",
        c.status
    );
    ensure!(
        root.join("srv/www/index.html").exists(),
        "the clean page was remediated"
    );
    let c = Cmd::new(
        "s",
        "remediate",
        &["file", "/srv/www/index.html", "-auto", "-force"],
    )
    .run(&client, ns, "r3")
    .await?;
    lr::succeeded(&c)?;
    ensure!(
        !root.join("srv/www/index.html").exists(),
        "-force did not act"
    );
    eprintln!("remediate -auto: acted on the webshell, refused the clean page until -force");
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&exe_dir);
    Ok(())
}

/// scan of a tree of 50,000 files reports the planted matches, stops at max_files, and a
/// cancel stops it.
pub async fn scan_finds_planted_files_within_bounds_and_cancels(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-scan", "fileserver");
    let root = host_root("scan")?;
    let tree = root.join("data");
    let files = 50_000;
    for i in 0..files {
        let dir = tree.join(format!("d{:03}/e{:02}", i % 500, (i / 500) % 20));
        if i < 10_000 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(
            dir.join(format!("f{i}.txt")),
            format!("ordinary file {i}\n"),
        )?;
    }
    let shell = "data/d123/e07/cache.php";
    std::fs::write(root.join(shell), b"<?php eval($_POST['x']);\n")?;
    let dropper = b"listed dropper bytes\n".to_vec();
    let listed = "data/d400/e19/update.bin";
    std::fs::write(root.join(listed), &dropper)?;
    let client = crate::files::setup(env, ns, device, &root, "", &[]).await?;
    rules(env, ns, &dropper).await?;

    let started = Instant::now();
    Cmd::new("s", "scan", &["/data"])
        .json()
        .create(&client, ns, "full")
        .await?;
    let c = lr::wait_final(&client, ns, "full", Duration::from_secs(600)).await?;
    lr::succeeded(&c)?;
    let took = started.elapsed();
    let r = lr::records(&c)?;
    let paths: Vec<&str> = r.iter().filter_map(|x| x["path"].as_str()).collect();
    ensure!(
        paths.contains(&format!("/{shell}").as_str())
            && paths.contains(&format!("/{listed}").as_str()),
        "the planted files were not reported: {r:?}"
    );
    ensure!(
        r.len() == 2,
        "only the two planted files should be reported: {r:?}"
    );
    let warnings = lr::warnings(&c);
    ensure!(
        warnings
            .iter()
            .any(|w| w.starts_with(&format!("scanned {} files", files + 2))),
        "the scan did not cover the whole tree: {warnings:?}"
    );
    eprintln!(
        "scan: {} files in {took:?}, both planted files found",
        files + 2
    );

    // Bounded by max_files.
    let c = Cmd::new("s", "scan", &["/data", "-max_files", "1000"])
        .json()
        .run(&client, ns, "bounded")
        .await?;
    lr::succeeded(&c)?;
    let warnings = lr::warnings(&c);
    ensure!(
        warnings
            .iter()
            .any(|w| w.contains("stopped after 1000 files")),
        "max_files did not bound the scan: {warnings:?}"
    );

    // A running scan shows its progress in files, and cancel stops it. Large (sparse)
    // files keep it busy for seconds, so the cancel lands while it reads.
    std::fs::create_dir_all(root.join("big"))?;
    for i in 0..40 {
        std::fs::File::create(root.join(format!("big/disk{i}.img")))?.set_len(60 << 20)?;
    }
    Cmd::new("s", "scan", &["/"])
        .create(&client, ns, "cancelled")
        .await?;
    let api: Api<Command> = Api::namespaced(client.clone(), ns);
    let progress = e2e::eventually("the scan's progress in files", T, || async {
        let c = api.get("cancelled").await?;
        Ok(c.status
            .and_then(|s| s.progress)
            .filter(|p| p.unit.as_deref() == Some("files") && p.total_bytes > 0))
    })
    .await?;
    eprintln!(
        "scan: progress {}/{} files while it runs",
        progress.bytes, progress.total_bytes
    );
    api.patch(
        "cancelled",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
    )
    .await?;
    let c = lr::wait_final(&client, ns, "cancelled", T).await?;
    ensure!(
        lr::phase(&c) == Some(CommandPhase::Cancelled),
        "the scan was not cancelled: {:?}",
        c.status
    );
    eprintln!("scan: cancelled while it ran");
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
