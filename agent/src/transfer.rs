//! getfile's sending side: a file streamed to the operator in chunks, from the offset the
//! operator already holds, hashed whole on the way so the operator can verify its copy.
//!
//! The stream may break and come back while this runs (the agent reconnects, or the
//! operator restarts): chunks wait until there is a stream again, and the operator's next
//! Execute for the same command says where its copy ends, which moves the sending back
//! (or forward) to there. The hash always covers the file from its first byte, in order,
//! whatever was sent twice.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;
use std::time::Duration;

use liveresponse_api::proto::{FileChunk, FileSummary};
use sha2::{Digest, Sha256};

use crate::provider::{ExecContext, ExecError, OpenedFile, human_size};

/// Bytes per chunk: large enough for throughput, far below the gateway's message limit.
pub const CHUNK: usize = 1 << 20;
/// How long to wait for a stream before trying a chunk again.
const NO_STREAM_WAIT: Duration = Duration::from_millis(200);

/// Sends `opened` from `start`; `resume` is set by a new Execute while this runs; `send`
/// hands a chunk to the current stream and says whether there was one.
pub fn send_file(
    mut opened: OpenedFile,
    start: u64,
    max: u64,
    rate: Option<u64>,
    ctx: &ExecContext,
    resume: &Mutex<Option<u64>>,
    send: &dyn Fn(FileChunk) -> bool,
) -> Result<FileSummary, ExecError> {
    let size = opened.size;
    let path = opened.path.clone();
    if max > 0 && size > max {
        return Err(ExecError::Failed(format!(
            "{path} is {} ({size} bytes), more than this namespace's maxFileSize ({}): ask a settings admin to raise maxFileSize, or collect a part of it",
            human_size(size),
            human_size(max)
        )));
    }
    let changed = || {
        ExecError::Failed(format!(
            "{path} changed while it was read (its size or modification time moved): the copy would not be the file; run getfile again once it is quiet, or copy it aside first"
        ))
    };
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    let mut pos = start.min(size);
    let mut buf = vec![0u8; CHUNK];
    let began = std::time::Instant::now();
    let mut sent = 0u64;
    // The file is read where it is needed; seeking is cheap, reading twice is not.
    let read_at = |file: &mut std::fs::File, at: u64, n: usize, buf: &mut [u8]| {
        file.seek(SeekFrom::Start(at))
            .and_then(|_| file.read_exact(&mut buf[..n]))
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    changed()
                } else {
                    ExecError::Failed(format!("reading {path}: {e}"))
                }
            })
    };
    loop {
        ctx.check()?;
        if let Some(r) = resume.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tracing::info!(from = pos, to = r, "the operator asked to resume elsewhere");
            pos = r.min(size);
        }
        // The operator holds bytes this run never read (it resumed): hash them first.
        if hashed < pos {
            let n = usize::try_from((pos - hashed).min(CHUNK as u64)).unwrap_or(CHUNK);
            read_at(&mut opened.file, hashed, n, &mut buf)?;
            hasher.update(&buf[..n]);
            hashed += n as u64;
            continue;
        }
        if pos >= size {
            break;
        }
        let n = usize::try_from((size - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
        read_at(&mut opened.file, pos, n, &mut buf)?;
        if pos == hashed {
            hasher.update(&buf[..n]);
            hashed += n as u64;
        }
        let chunk = FileChunk {
            offset: pos,
            data: buf[..n].to_vec(),
            total_size: size,
        };
        while !send(chunk.clone()) {
            ctx.check()?;
            std::thread::sleep(NO_STREAM_WAIT);
            // A new stream comes with a new Execute saying where to go on from.
            if resume.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                break;
            }
        }
        pos += n as u64;
        sent += n as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let now = opened
        .file
        .metadata()
        .map_err(|e| ExecError::Failed(e.to_string()))?;
    if now.len() != size || now.modified().ok() != opened.modified {
        return Err(changed());
    }
    Ok(FileSummary {
        path,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    fn opened(path: &std::path::Path) -> OpenedFile {
        let file = std::fs::File::open(path).unwrap();
        let meta = file.metadata().unwrap();
        OpenedFile {
            path: path.display().to_string(),
            size: meta.len(),
            modified: meta.modified().ok(),
            file,
        }
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn temp_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn a_file_arrives_whole_in_order_with_its_digest() {
        let bytes = content(2 * CHUNK + 123);
        let f = temp_with(&bytes);
        let got = Mutex::new(Vec::new());
        let summary = send_file(
            opened(f.path()),
            0,
            0,
            None,
            &ExecContext::new("/"),
            &Mutex::new(None),
            &|c| {
                let mut g = got.lock().unwrap();
                assert_eq!(c.offset as usize, g.len());
                assert_eq!(c.total_size as usize, bytes.len());
                g.extend_from_slice(&c.data);
                true
            },
        )
        .unwrap();
        assert_eq!(got.into_inner().unwrap(), bytes);
        assert_eq!(summary.size as usize, bytes.len());
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(&bytes)));
    }

    #[test]
    fn a_resumed_transfer_sends_only_the_rest_and_hashes_the_whole() {
        let bytes = content(3 * CHUNK + 5);
        let f = temp_with(&bytes);
        let offsets = Mutex::new(Vec::new());
        let summary = send_file(
            opened(f.path()),
            CHUNK as u64 + 10,
            0,
            None,
            &ExecContext::new("/"),
            &Mutex::new(None),
            &|c| {
                offsets.lock().unwrap().push(c.offset);
                true
            },
        )
        .unwrap();
        let offsets = offsets.into_inner().unwrap();
        assert_eq!(offsets[0], CHUNK as u64 + 10);
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(&bytes)));
    }

    #[test]
    fn a_resume_request_mid_way_sends_again_from_there() {
        let bytes = content(4 * CHUNK);
        let f = temp_with(&bytes);
        let resume = Arc::new(Mutex::new(None));
        let offsets = Mutex::new(Vec::new());
        let summary = send_file(
            opened(f.path()),
            0,
            0,
            None,
            &ExecContext::new("/"),
            &resume,
            &|c| {
                let mut o = offsets.lock().unwrap();
                o.push(c.offset);
                // The stream broke after the third chunk; the operator kept one.
                if o.len() == 3 {
                    *resume.lock().unwrap() = Some(CHUNK as u64);
                }
                true
            },
        )
        .unwrap();
        let c = CHUNK as u64;
        assert_eq!(
            offsets.into_inner().unwrap(),
            vec![0, c, 2 * c, c, 2 * c, 3 * c]
        );
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(&bytes)));
    }

    #[test]
    fn too_large_and_changing_files_fail_with_what_to_do() {
        let f = temp_with(&content(1000));
        let err = send_file(
            opened(f.path()),
            0,
            999,
            None,
            &ExecContext::new("/"),
            &Mutex::new(None),
            &|_| true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("maxFileSize"), "{err}");

        let f = temp_with(&content(2 * CHUNK));
        let path = f.path().to_path_buf();
        let err = send_file(
            opened(f.path()),
            0,
            0,
            None,
            &ExecContext::new("/"),
            &Mutex::new(None),
            &|_| {
                // Something appends to the file while it is sent.
                let mut w = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                w.write_all(b"more").unwrap();
                true
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("changed while it was read"),
            "{err}"
        );
    }

    #[test]
    fn a_cancel_stops_a_transfer_waiting_for_a_stream() {
        let f = temp_with(&content(10));
        let ctx = ExecContext::new("/");
        ctx.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let err = send_file(
            opened(f.path()),
            0,
            0,
            None,
            &ctx,
            &Mutex::new(None),
            &|_| false,
        )
        .unwrap_err();
        assert!(matches!(err, ExecError::Cancelled));
    }
}
