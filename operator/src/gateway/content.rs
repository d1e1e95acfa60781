//! Serving library files to the devices that run `putfile` and `run` (the `Fetch` call).
//!
//! The gateway serves the source as it is at the moment of the call: an uploaded artifact
//! straight from the store (streamed, never whole in memory), a ConfigMap, Secret or inline
//! text as the API server has it now. It does not check the bytes against the digest
//! pinned when the file became Ready: the device does that, with the digest and signature
//! it got in `Execute.content`, so neither a changed source nor an altered store can make a
//! device write or run what was not validated.

use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use liveresponse_api::crd::LibraryFile;
use liveresponse_api::proto::ContentChunk;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{DeviceKey, Gateway};
use crate::controllers::library::{FetchProblem, read_source};

/// Chunks a device receives: small enough to interleave with other streams.
const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the device: the channel is the back-pressure.
const AHEAD: usize = 4;

/// Which library file an in-flight command may fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentSource {
    pub namespace: String,
    /// The LibraryFile's name.
    pub library: String,
    /// Its size when the command was sent: never serve more.
    pub size: u64,
}

impl Gateway {
    /// The library file `uid` may fetch, if it is a putfile or run in flight on `device`
    /// (`name` empty), or the rule file `name` of an analyze or scan in flight there.
    /// Anything else is refused alike, so a device learns nothing of other commands.
    pub(super) fn content_source(
        &self,
        device: &DeviceKey,
        uid: &str,
        name: &str,
    ) -> Result<ContentSource, Status> {
        let st = self.state();
        st.inflight
            .get(uid)
            .filter(|f| &f.target.device == device)
            .and_then(|f| {
                if name.is_empty() {
                    f.content.clone()
                } else {
                    f.rules.iter().find(|r| r.library == name).cloned()
                }
            })
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no command {uid} in flight for device {} may fetch that file",
                    device.1
                ))
            })
    }

    /// Counts bytes served to a putfile or run, waking its command now and then so its
    /// status shows the progress.
    pub(super) fn content_served(&self, uid: &str, n: u64) {
        let wake = {
            let mut st = self.state();
            let Some(f) = st.inflight.get_mut(uid) else {
                return;
            };
            f.content_sent = f.content_sent.saturating_add(n);
            let wake = f
                .progress_woken
                .is_none_or(|t| t.elapsed() >= super::PROGRESS_EVERY);
            if wake {
                f.progress_woken = Some(std::time::Instant::now());
            }
            wake.then(|| f.target.object_ref())
        };
        if let Some(r) = wake {
            self.command_wakes.wake(r);
        }
    }
}

/// Streams the source of `src` from `offset`.
pub(super) async fn serve(
    gw: Arc<Gateway>,
    uid: String,
    src: ContentSource,
    offset: u64,
) -> Result<ReceiverStream<Result<ContentChunk, Status>>, Status> {
    let store = gw
        .artifacts
        .get()
        .cloned()
        .ok_or_else(|| Status::unavailable("the operator has no artifact store"))?;
    let api: Api<LibraryFile> = Api::namespaced(gw.client.clone(), &src.namespace);
    let lf = api
        .get_opt(&src.library)
        .await
        .map_err(|e| Status::unavailable(format!("cannot read the library file: {e}")))?
        .ok_or_else(|| {
            Status::not_found(format!(
                "library file {} was deleted while the command ran",
                src.library
            ))
        })?;
    let (tx, rx) = mpsc::channel(AHEAD);
    if offset > src.size {
        return Err(Status::out_of_range(format!(
            "offset {offset} is past the file's {} bytes",
            src.size
        )));
    }
    if offset == src.size {
        // All of it arrived before the stream broke: nothing more to send.
        drop(tx);
        return Ok(ReceiverStream::new(rx));
    }
    if let Some(sha) = lf.spec.source.artifact.clone() {
        // One byte more than validated, so a longer object shows as such on the device.
        let end = src.size.saturating_add(1);
        let reading = store
            .get(&sha, Some(offset..end))
            .await
            .map_err(|e| Status::unavailable(format!("the artifact store failed: {e}")))?
            .ok_or_else(|| Status::not_found(format!("artifact {sha} is gone from the store")))?;
        tokio::spawn(async move {
            let mut body = reading.body;
            while let Some(part) = body.next().await {
                let msg = match part {
                    Ok(bytes) => {
                        let mut ok = true;
                        for piece in bytes.chunks(CHUNK) {
                            if tx
                                .send(Ok(ContentChunk {
                                    data: piece.to_vec(),
                                }))
                                .await
                                .is_err()
                            {
                                ok = false;
                                break;
                            }
                            gw.content_served(&uid, piece.len() as u64);
                        }
                        if ok {
                            continue;
                        }
                        return;
                    }
                    Err(e) => Err(Status::unavailable(format!(
                        "the artifact store failed while reading: {e}"
                    ))),
                };
                let _ = tx.send(msg).await;
                return;
            }
        });
        return Ok(ReceiverStream::new(rx));
    }
    // A ConfigMap, Secret or inline text: at most about 1 MiB, as the API server has it.
    let bytes = match read_source(
        &gw.client,
        &store,
        &src.namespace,
        &lf.spec.source,
        src.size.saturating_add(1),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(FetchProblem::TooLarge { .. })) => {
            return Err(Status::failed_precondition(
                "the library file grew past the size it was validated at",
            ));
        }
        Ok(Err(FetchProblem::Missing(m) | FetchProblem::Unusable(m))) => {
            return Err(Status::not_found(m));
        }
        Err(e) => return Err(Status::unavailable(e.to_string())),
    };
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    tokio::spawn(async move {
        for piece in bytes[start..].chunks(CHUNK) {
            if tx
                .send(Ok(ContentChunk {
                    data: piece.to_vec(),
                }))
                .await
                .is_err()
            {
                return;
            }
            gw.content_served(&uid, piece.len() as u64);
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use liveresponse_api::proto::{Content, Execute, Hello};

    use super::super::{AGENT_QUEUE, CommandTarget};
    use super::*;

    /// A device may fetch only the library file of a putfile or run sent to it, and only
    /// while it is in flight: a malicious agent cannot read another device's files, nor a
    /// file no command of its own names.
    #[tokio::test]
    async fn only_the_commands_own_device_may_fetch_its_file() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("static url"));
        let client = kube::Client::try_from(config).expect("client without a server");
        let ca = Arc::new(crate::pki::Ca::generate().expect("ca"));
        let gw = Gateway::new(
            client,
            ca,
            "test".into(),
            Duration::from_secs(5),
            crate::metrics::Metrics::new(),
            crate::pki::DEFAULT_DEVICE_LIFETIME,
        );
        let key = |d: &str| ("ns".to_string(), d.to_string());
        let mut keep = Vec::new();
        for d in ["ours", "theirs"] {
            let (tx, rx) = mpsc::channel(AGENT_QUEUE);
            keep.push(rx);
            gw.register(key(d), Hello::default(), tx)
                .expect("connected");
        }
        let send = |uid: &str, device: &str, content: Option<Content>, rules: Vec<Content>| {
            let target = CommandTarget {
                namespace: "ns".into(),
                name: uid.into(),
                device: key(device),
                step: None,
            };
            let exec = Execute {
                command_uid: uid.into(),
                command: if content.is_some() { "run" } else { "dir" }.into(),
                content,
                rules,
                ..Default::default()
            };
            gw.execute(target, exec).expect("sent");
        };
        let script = Content {
            name: "collect".into(),
            file_name: "collect.sh".into(),
            size: 10,
            ..Default::default()
        };
        let rule = Content {
            name: "webshells".into(),
            file_name: "webshells.yar".into(),
            size: 7,
            analysis: "yara".into(),
            ..Default::default()
        };
        send("run-1", "ours", Some(script), Vec::new());
        send("dir-1", "ours", None, Vec::new());
        send("scan-1", "ours", None, vec![rule]);

        let allowed = gw
            .content_source(&key("ours"), "run-1", "")
            .expect("its own");
        assert_eq!(
            allowed,
            ContentSource {
                namespace: "ns".into(),
                library: "collect".into(),
                size: 10,
            }
        );
        let rules = gw
            .content_source(&key("ours"), "scan-1", "webshells")
            .expect("its rule file");
        assert_eq!(rules.library, "webshells");
        for (device, uid, name) in [
            ("theirs", "run-1", ""),
            ("ours", "dir-1", ""),
            ("ours", "nope", ""),
            // A name the command does not carry: not even another LibraryFile of the
            // same namespace.
            ("ours", "run-1", "collect"),
            ("ours", "scan-1", "collect"),
            ("theirs", "scan-1", "webshells"),
        ] {
            let e = gw
                .content_source(&key(device), uid, name)
                .expect_err("refused");
            assert_eq!(
                e.code(),
                tonic::Code::PermissionDenied,
                "{device} {uid} {name}"
            );
        }
        // Finished: nothing more to fetch.
        gw.forget("run-1");
        assert!(gw.content_source(&key("ours"), "run-1", "").is_err());
    }
}
