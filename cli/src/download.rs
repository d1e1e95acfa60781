//! `kubectl liveresponse download COMMAND [-o FILE] [--full-output]`: a getfile's content
//! (or, with `--full-output`, a command's whole output when it outgrew its status) through
//! the file API (`files.liveresponse.io`), with the analyst's own credentials, so the API
//! server authorises (RBAC `get` on `commands/file` or `commands/output`) and audits it. An interrupted download
//! resumes from the partial file; the result is kept only if its sha256 is the one the
//! Command recorded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::client::Ctx;
use crate::error::{Error, Result};

/// The path of a command's file (`sub` = "file") or whole output ("output") in the file API.
pub fn file_path(namespace: &str, command: &str, sub: &str) -> String {
    format!("/apis/files.liveresponse.io/v1alpha1/namespaces/{namespace}/commands/{command}/{sub}")
}

/// Where the download goes: `-o`, else the device file's name in the current folder.
pub fn destination(output: Option<&Path>, device_path: &str) -> PathBuf {
    if let Some(o) = output {
        return o.to_path_buf();
    }
    let base = device_path
        .rsplit(['/', '\\'])
        .find(|s| !s.is_empty() && *s != "." && *s != "..")
        .unwrap_or("download");
    PathBuf::from(base)
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Sends a request to the file API through the API server. A refusal comes back as the
/// server's own message, with `forbidden_hint` (the role that is missing) after a 403.
pub async fn send(
    ctx: &Ctx,
    req: http::Request<Vec<u8>>,
    forbidden_hint: &str,
) -> Result<http::Response<kube::client::Body>> {
    let resp = ctx.client.send(req.map(Into::into)).await?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    let text = body
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or(text);
    let hint = if status == http::StatusCode::FORBIDDEN {
        format!(" ({forbidden_hint})")
    } else {
        String::new()
    };
    Err(Error::Usage(format!(
        "the file API answered {status}: {message}{hint}"
    )))
}

pub async fn run(
    ctx: &Ctx,
    command: &str,
    output: Option<&Path>,
    full_output: bool,
    quiet: bool,
) -> Result<()> {
    let c = ctx
        .commands()
        .get_opt(command)
        .await?
        .ok_or(Error::NotFound {
            kind: "command",
            name: command.to_string(),
        })?;
    let st = c.status.unwrap_or_default();
    // What to fetch: its size, digest, path in the file API, default name and needed role.
    let (size, sha256, sub, dest, hint) = if full_output {
        let out = st.output.filter(|o| o.artifact.is_some()).ok_or_else(|| {
            Error::Usage(format!(
                "command {command} kept no output beyond its status: `kubectl get command {command} -o jsonpath='{{.status.output.content}}'` shows all of it"
            ))
        })?;
        let ext = match out.format {
            liveresponse_api::crd::OutputFormat::Json => "json",
            liveresponse_api::crd::OutputFormat::Table => "txt",
        };
        let dest = output
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(format!("{command}.{ext}")));
        (
            u64::try_from(out.size).unwrap_or(0),
            out.sha256.unwrap_or_default(),
            "output",
            dest,
            "full outputs need get on commands/output in files.liveresponse.io: the liveresponse-viewer, -basic or -advanced role",
        )
    } else {
        let file = st.file.ok_or_else(|| {
            Error::Usage(format!(
                "command {command} has no file to download: only a getfile that succeeded has one (see `kubectl liveresponse log SESSION`); a command's whole output is downloaded with --full-output"
            ))
        })?;
        (
            u64::try_from(file.size).unwrap_or(0),
            file.sha256,
            "file",
            destination(output, &file.path),
            "downloads need get on commands/file in files.liveresponse.io: the liveresponse-advanced role",
        )
    };
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if have > size {
        // Not ours to continue: start again.
        have = 0;
    }
    if have < size {
        let mut req = http::Request::get(file_path(&ctx.namespace, command, sub));
        if have > 0 {
            req = req.header("range", format!("bytes={have}-"));
            if !quiet {
                eprintln!("resuming {} at byte {have} of {size}", part.display());
            }
        }
        let req = req
            .body(Vec::<u8>::new())
            .map_err(|e| Error::Usage(e.to_string()))?;
        let resp = send(ctx, req, hint).await?;
        let status = resp.status();
        let resumed = status == http::StatusCode::PARTIAL_CONTENT;
        if !resumed {
            have = 0;
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&part)
            .map_err(|source| Error::WriteFile {
                path: part.display().to_string(),
                source,
            })?;
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(size)
        };
        bar.set_style(
            ProgressStyle::with_template("{bytes}/{total_bytes} {bar:40} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(have);
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).map_err(|source| Error::WriteFile {
                    path: part.display().to_string(),
                    source,
                })?;
                bar.inc(data.len() as u64);
            }
        }
        out.flush()?;
        bar.finish_and_clear();
    }
    let got = sha256_of(&part)?;
    if got != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Usage(format!(
            "the download's sha256 is {got}, not {sha256} as the command recorded: it was removed; run download again"
        )));
    }
    std::fs::rename(&part, &dest).map_err(|source| Error::WriteFile {
        path: dest.display().to_string(),
        source,
    })?;
    println!(
        "{}  {}  ({size} bytes, sha256 verified)",
        got,
        dest.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_never_leave_the_folder() {
        assert_eq!(
            destination(None, "/var/log/syslog"),
            PathBuf::from("syslog")
        );
        assert_eq!(
            destination(None, "C:\\Windows\\x.dll"),
            PathBuf::from("x.dll")
        );
        assert_eq!(destination(None, "/etc/.."), PathBuf::from("etc"));
        assert_eq!(destination(None, "/"), PathBuf::from("download"));
        assert_eq!(
            destination(Some(Path::new("/tmp/out.bin")), "/a"),
            PathBuf::from("/tmp/out.bin")
        );
    }
}
