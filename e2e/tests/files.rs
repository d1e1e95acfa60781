//! Files: getfile moves a file into the artifact store, verified by sha256 end to end,
//! resuming after the agent dies mid-way; what cannot be copied fails fast and says why.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::fixture::host_root;
use e2e::lr::{self, Cmd};
use kube::Client;
use kube::api::Api;
use liveresponse_api::crd::{Command, CommandPhase, LibraryFile, LibraryFileSpec, SessionPhase};
use sha2::{Digest, Sha256};

use crate::Env;

const T: Duration = Duration::from_secs(60);

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A tenant, an agent for `device` (with `agent_args`), and a Connected session `s`.
pub(crate) async fn setup(
    env: &Env,
    ns: &str,
    device: &str,
    root: &Path,
    settings: &str,
    agent_args: &[&str],
) -> Result<Client> {
    env.stack.tenant(ns, settings)?;
    env.stack.start_agent(ns, device, root, agent_args)?;
    env.stack.wait_device(ns, device, true, T)?;
    let client = env.cluster.client("analyst-advanced").await?;
    lr::open_session(&client, ns, "s", device, "analyst-advanced", None).await?;
    lr::wait_session(&client, ns, "s", SessionPhase::Connected, T).await?;
    Ok(client)
}

/// A 1 GiB random file comes over whole (its sha256 matches in the Command's status and in
/// the artifact store), and killing the agent half way resumes from what the operator
/// already held instead of from zero.
pub async fn getfile_resumes_after_the_agent_dies(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-getfile", "evidence");
    let root = host_root("getfile")?;
    let src = root.join("evidence.bin");
    {
        let mut random = std::fs::File::open("/dev/urandom")?.take(1 << 30);
        let mut out = std::fs::File::create(&src)?;
        std::io::copy(&mut random, &mut out)?;
    }
    let want = sha256_of(&src)?;
    // Limited, so that "half way" lasts long enough to be caught.
    let agent = ["--transfer-rate-limit", "150Mi"];
    let client = setup(env, ns, device, &root, "", &agent).await?;
    let result = async {
        // Admission keeps getfile from a basic analyst.
        let basic = env.cluster.client("analyst-basic").await?;
        let refused = Cmd::new("s", "getfile", &["/evidence.bin"])
            .create(&basic, ns, "basic-getfile")
            .await;
        let why = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
        ensure!(
            why.contains("liveresponse-advanced"),
            "a basic analyst's getfile was not refused by admission: {why:?}"
        );

        Cmd::new("s", "getfile", &["/evidence.bin"])
            .create(&client, ns, "pull")
            .await?;
        let api: Api<Command> = Api::namespaced(client.clone(), ns);
        // Kill the agent once the operator holds about a third of the file.
        let deadline = Instant::now() + T;
        let held = loop {
            ensure!(Instant::now() < deadline, "no progress within {T:?}");
            let c = api.get("pull").await?;
            ensure!(
                !lr::phase(&c).is_some_and(CommandPhase::is_final),
                "finished before the agent could be killed: {:?}",
                c.status
            );
            let p = c.status.and_then(|s| s.progress);
            if let Some(p) = p.filter(|p| p.bytes * 3 >= p.total_bytes) {
                ensure!(p.total_bytes == 1 << 30, "total {}", p.total_bytes);
                break p.bytes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        env.stack.kill_agent(ns, device);
        eprintln!("getfile: agent killed with {held} bytes recorded as held");
        env.stack.start_agent(ns, device, &root, &agent)?;
        let c = lr::wait_final(&client, ns, "pull", Duration::from_secs(120)).await?;
        lr::succeeded(&c)?;
        let st = c.status.context("no status")?;
        let file = st.file.context("no status.file")?;
        let progress = st.progress.context("no status.progress")?;
        let resumed = progress.resumed_at.context("the transfer did not resume")?;
        eprintln!(
            "getfile: resumed at offset {resumed} of {} (not 0); sha256 {}",
            file.size, file.sha256
        );
        ensure!(
            resumed >= held && resumed < file.size,
            "resumed at {resumed}, but {held} bytes were already held"
        );
        let log = std::fs::read_to_string(env.stack.log("operator"))?;
        ensure!(
            log.contains(&format!("the operator holds the first {resumed} bytes")),
            "the operator did not log the offset it resumed from"
        );
        ensure!(file.size == 1 << 30, "size {}", file.size);
        ensure!(file.sha256 == want, "sha256 {} != {want}", file.sha256);
        ensure!(file.path == "/evidence.bin", "path {}", file.path);
        let artifact = file.artifact.context("no artifact")?;
        let stored = env
            .stack
            .artifact_dir()
            .join("objects/sha256")
            .join(&artifact);
        ensure!(sha256_of(&stored)? == want, "the stored artifact differs");
        // The staging copy is gone once stored.
        let staged: Vec<_> = std::fs::read_dir(env.stack.artifact_dir().join("staging"))?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let uid = c.metadata.uid.clone().unwrap_or_default();
                e.file_name().to_string_lossy().contains(&uid)
            })
            .collect();
        ensure!(staged.is_empty(), "staging files left: {staged:?}");
        download_through_the_api_server(env, ns, "pull", &src, &want)?;
        let _ = std::fs::remove_file(&stored);
        Ok(())
    }
    .await;
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// `kubectl liveresponse download` through the file API: a user without `commands/file`
/// is refused by the API server; the analyst's download resumes from a partial file, its
/// sha256 is the original's, and the API server's audit log names the analyst.
fn download_through_the_api_server(
    env: &Env,
    ns: &str,
    command: &str,
    src: &Path,
    want: &str,
) -> Result<()> {
    let dir = host_root("download")?;
    let dest = dir.join("evidence.bin");
    let dest_s = dest.to_string_lossy().into_owned();
    let (refused_ok, _, said) = lr::cli(
        &env.cluster,
        "analyst-basic",
        &["-n", ns, "download", command, "-o", &dest_s],
    )?;
    ensure!(
        !refused_ok && said.contains("forbidden"),
        "a basic analyst's download was not refused: {said}"
    );
    // An interrupted earlier download left the first 100 MiB.
    {
        let mut head = std::fs::File::open(src)?.take(100 << 20);
        let mut part = std::fs::File::create(dir.join("evidence.bin.part"))?;
        std::io::copy(&mut head, &mut part)?;
    }
    let (ok, stdout, stderr) = lr::cli(
        &env.cluster,
        "analyst-advanced",
        &["-n", ns, "download", command, "-o", &dest_s],
    )?;
    ensure!(ok, "download failed: {stderr}");
    ensure!(
        stderr.contains(&format!("at byte {} of", 100u64 << 20)),
        "the download did not resume from the partial file: {stderr}"
    );
    ensure!(stdout.contains("sha256 verified"), "{stdout}");
    ensure!(sha256_of(&dest)? == want, "the downloaded file differs");
    eprintln!("download: {}", stdout.trim());
    let audit = std::fs::read_to_string(env.cluster.state.join("audit.log"))?;
    let seen = audit.lines().any(|l| {
        l.contains("\"files.liveresponse.io\"")
            && l.contains(&format!("\"name\":\"{command}\""))
            && l.contains("\"username\":\"analyst-advanced\"")
            && l.contains("\"subresource\":\"file\"")
    });
    ensure!(
        seen,
        "the download is not in the API server's audit log as analyst-advanced's"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A FIFO, a character device and a file over maxFileSize each fail at once, saying why.
pub async fn getfile_refuses_what_it_cannot_copy(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-getfile-refused", "odd-files");
    let root = host_root("getfile-refused")?;
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .map_err(anyhow::Error::from)
            .and_then(|s| {
                ensure!(s.success(), "{args:?}: {s}");
                Ok(())
            })
    };
    let fifo = root.join("pipe");
    run(&["mkfifo", &fifo.to_string_lossy()])?;
    let zero = root.join("zero");
    run(&["mknod", &zero.to_string_lossy(), "c", "1", "5"])?;
    std::fs::File::create(root.join("big.img"))?.set_len(3 << 20)?;
    std::fs::write(root.join("small.txt"), "small evidence\n")?;
    let client = setup(env, ns, device, &root, "  maxFileSize: 2Mi\n", &[]).await?;
    let result = async {
        for (name, path, says) in [
            ("fifo", "/pipe", "FIFO"),
            ("zero", "/zero", "character device"),
            ("big", "/big.img", "maxFileSize"),
        ] {
            let started = Instant::now();
            let c = Cmd::new("s", "getfile", &[path])
                .run(&client, ns, name)
                .await?;
            let err = lr::error(&c).with_context(|| format!("{path}: no error: {:?}", c.status))?;
            ensure!(
                lr::phase(&c) == Some(CommandPhase::Failed) && err.message.contains(says),
                "{path}: {:?} {err:?}",
                lr::phase(&c)
            );
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "{path} took {:?} to fail",
                started.elapsed()
            );
            eprintln!("getfile {path}: {}", err.message);
        }
        // The operator answers `library` from the namespace's LibraryFiles, and refuses
        // `library delete` to an analyst who may not delete them.
        let lib: Api<LibraryFile> = Api::namespaced(env.cluster.client("library-admin").await?, ns);
        let spec: LibraryFileSpec = serde_json::from_value(serde_json::json!({
            "fileName": "triage.sh", "description": "first look",
            "source": { "inline": "#!/bin/sh\necho hi\n" },
        }))?;
        lib.create(&Default::default(), &LibraryFile::new("triage", spec))
            .await?;
        let listed = Cmd::new("s", "library", &[])
            .run(&client, ns, "lib")
            .await?;
        lr::succeeded(&listed)?;
        let text = lr::content(&listed);
        ensure!(
            text.contains("triage.sh") && text.contains("first look"),
            "{text}"
        );
        let del = Cmd::new("s", "library", &["delete", "triage.sh"])
            .run(&client, ns, "lib-del")
            .await?;
        let err = lr::error(&del).context("library delete by an analyst did not fail")?;
        ensure!(
            err.reason == "Forbidden" && err.message.contains("library-admin"),
            "{err:?}"
        );
        ensure!(lib.get_opt("triage").await?.is_some(), "deleted anyway");

        // A getfile's artifact lives as long as its Command: deleting the Command frees it.
        let c = Cmd::new("s", "getfile", &["/small.txt"])
            .run(&client, ns, "small")
            .await?;
        lr::succeeded(&c)?;
        let sha = c.status.and_then(|s| s.file).context("no file")?.sha256;
        ensure!(
            sha == hex::encode(Sha256::digest(b"small evidence\n")),
            "{sha}"
        );
        let stored = env.stack.artifact_dir().join("objects/sha256").join(&sha);
        ensure!(stored.exists(), "{} is not stored", stored.display());
        // Analysts cannot delete Commands (the command log is evidence); an admin can.
        Api::<Command>::namespaced(env.cluster.client("admin").await?, ns)
            .delete("small", &Default::default())
            .await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while stored.exists() {
            ensure!(
                Instant::now() < deadline,
                "the artifact of a deleted Command was not collected"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
    .await;
    env.stack.kill_agent(ns, device);
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// The s3s-fs binary `make e2e` builds (LR_S3S_FS), or its cached build.
fn s3s_fs() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LR_S3S_FS") {
        return Ok(p.into());
    }
    let cache = std::env::var_os("LR_CACHE_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| Path::new(&d).join("liveresponse-e2e"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/liveresponse-e2e")))
        .context("no cache folder: set LR_S3S_FS")?;
    let bin = cache.join("s3s-fs-0.14.1/bin/s3s-fs");
    ensure!(
        bin.exists(),
        "no s3s-fs at {}: run `make s3s-fs` (make e2e does), or set LR_S3S_FS",
        bin.display()
    );
    Ok(bin)
}

/// The operator with its artifact store in a real S3-compatible server (s3s-fs): a getfile
/// lands there as an object whose sha256 is the file's, and downloads through the file API.
/// Serial: it restarts the operator with the S3 backend and back.
pub async fn getfile_with_the_s3_backend(env: &'static Env) -> Result<()> {
    let (ns, device) = ("lr-getfile-s3", "s3-evidence");
    let s3_root = env.stack.dir.join("s3");
    let _ = std::fs::remove_dir_all(&s3_root);
    std::fs::create_dir_all(s3_root.join("evidence"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = std::process::Command::new(s3s_fs()?)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "AKE2E", "--secret-key", "SKE2E"])
        .arg(&s3_root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting s3s-fs")?;
    let result = async {
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(up.elapsed() < T, "s3s-fs did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        env.stack.kill_operator();
        let flags: Vec<String> = [
            "--artifact-s3-bucket",
            "evidence",
            "--artifact-s3-endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--artifact-s3-region",
            "us-east-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let creds = [
            ("AWS_ACCESS_KEY_ID".to_string(), "AKE2E".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "SKE2E".to_string()),
        ];
        env.stack.start_operator_env(&flags, &creds)?;
        let root = host_root("getfile-s3")?;
        let src = root.join("disk.img");
        {
            let mut random = std::fs::File::open("/dev/urandom")?.take(48 << 20);
            let mut out = std::fs::File::create(&src)?;
            std::io::copy(&mut random, &mut out)?;
        }
        let want = sha256_of(&src)?;
        let client = setup(env, ns, device, &root, "", &[]).await?;
        Cmd::new("s", "getfile", &["/disk.img"])
            .create(&client, ns, "pull-s3")
            .await?;
        let c = lr::wait_final(&client, ns, "pull-s3", Duration::from_secs(120)).await?;
        lr::succeeded(&c)?;
        let file = c.status.and_then(|s| s.file).context("no status.file")?;
        ensure!(file.sha256 == want, "sha256 {} != {want}", file.sha256);
        let object = s3_root.join("evidence/sha256").join(&want);
        ensure!(
            object.exists() && sha256_of(&object)? == want,
            "the S3 server holds no object sha256/{want} with the file's content"
        );
        ensure!(
            !env.stack
                .artifact_dir()
                .join("objects/sha256")
                .join(&want)
                .exists(),
            "the file went to the local store instead of S3"
        );
        let dir = host_root("download-s3")?;
        let dest = dir.join("disk.img");
        let dest_s = dest.to_string_lossy().into_owned();
        let (ok, stdout, stderr) = lr::cli(
            &env.cluster,
            "analyst-advanced",
            &["-n", ns, "download", "pull-s3", "-o", &dest_s],
        )?;
        ensure!(ok, "download from the S3 backend failed: {stderr}");
        ensure!(sha256_of(&dest)? == want, "the download differs");
        eprintln!(
            "s3: getfile stored as s3://evidence/sha256/{want}; {}",
            stdout.trim()
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }
    .await;
    env.stack.kill_agent(ns, device);
    // Back to the local store for whatever runs next.
    env.stack.kill_operator();
    let restored = env.stack.start_operator();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&s3_root);
    result.and(restored)
}
