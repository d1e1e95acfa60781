//! The artifact store: file contents (getfile results, full command outputs, library
//! uploads) addressed by their SHA-256, kept through the `object_store` crate in a local
//! directory (the default; a PersistentVolume in a cluster) or an S3-compatible bucket.
//!
//! Nothing here holds a whole file in memory: bytes arrive in a staging file on local
//! disk (hashed as they are written), and move to the store and back out as streams.
//! A key is only ever written with bytes whose digest was computed here, so a key always
//! names its content and writing it twice is harmless.

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Parts sent to the store at once when an upload is multipart (S3 wants at least 5 MiB).
const PART: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    #[error("artifact staging: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a SHA-256 digest: {0:?}")]
    InvalidDigest(String),
    #[error("the content is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the content's SHA-256 is {got}, not {expected}")]
    DigestMismatch { expected: String, got: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where an S3-compatible bucket is.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    /// `http(s)://host:port`; empty for AWS itself.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Whether `s` is a lowercase hex SHA-256, the only thing that becomes a key.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn key(sha256: &str) -> Result<Path> {
    if !is_digest(sha256) {
        return Err(StoreError::InvalidDigest(sha256.chars().take(80).collect()));
    }
    Ok(Path::from(format!("sha256/{sha256}")))
}

/// A stored artifact as listed: its digest and when it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    pub sha256: String,
    pub size: u64,
    pub written: jiff::Timestamp,
}

/// A part of an artifact being read.
pub struct Reading {
    /// Size of the whole artifact.
    pub size: u64,
    /// The bytes served.
    pub range: Range<u64>,
    pub body: BoxStream<'static, Result<Bytes>>,
}

pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
    backend: &'static str,
    /// The local backend's directory, where a staged file can be moved in rather than
    /// copied.
    local: Option<PathBuf>,
}

impl ArtifactStore {
    /// A store in `dir/objects`, staging in `dir/staging`.
    pub fn local(dir: &FsPath) -> Result<Self> {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        let staging = dir.join("staging");
        std::fs::create_dir_all(&staging)?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new_with_prefix(&objects)?),
            staging,
            backend: "local",
            local: Some(objects),
        })
    }

    /// A store in an S3-compatible bucket, staging in a local directory.
    pub fn s3(cfg: &S3Config, staging: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(staging)?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(if cfg.region.is_empty() {
                "us-east-1"
            } else {
                &cfg.region
            })
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key);
        if !cfg.endpoint.is_empty() {
            b = b
                .with_endpoint(&cfg.endpoint)
                .with_allow_http(cfg.endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        Ok(Self {
            store: Arc::new(b.build()?),
            staging: staging.to_path_buf(),
            backend: "s3",
            local: None,
        })
    }

    /// `local` or `s3`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The local directory where bytes wait before they are stored.
    pub fn staging_dir(&self) -> &FsPath {
        &self.staging
    }

    /// The artifact's size, if it is stored.
    pub async fn size_of(&self, sha256: &str) -> Result<Option<u64>> {
        match self.store.head(&key(sha256)?).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a staged file whose digest the caller computed while writing it. A key that
    /// exists already holds the same bytes, so it is not written again. The local backend
    /// moves the file in (it is gone from staging afterwards); storing it again after that
    /// finds the key and succeeds, so a caller may retry.
    pub async fn put_staged(&self, file: &FsPath, sha256: &str) -> Result<u64> {
        let location = key(sha256)?;
        let size = match tokio::fs::metadata(file).await {
            Ok(m) => m.len(),
            // Moved in by an earlier call whose caller failed afterwards.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.local.is_some() => {
                return self.size_of(sha256).await?.ok_or(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if self.size_of(sha256).await? == Some(size) {
            return Ok(size);
        }
        // Staging and objects share a directory, so a rename moves the bytes without
        // reading and writing them again (for a large getfile, seconds). A rename is atomic:
        // readers see the whole file or none, as with the store's own writes.
        if let Some(objects) = &self.local {
            let dest = objects.join(location.as_ref());
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            match tokio::fs::rename(file, &dest).await {
                Ok(()) => return Ok(size),
                // Another file system after all (a bind mount): copy as for a bucket.
                Err(e) => tracing::debug!(error = %e, "cannot move the staged file; copying it"),
            }
        }
        let upload = self.store.put_multipart(&location).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut f = tokio::fs::File::open(file).await?;
        let mut buf = vec![0u8; PART];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // Bounded memory: at most a few parts in flight.
            w.wait_for_capacity(2).await?;
            w.write(&buf[..n]);
        }
        w.finish().await?;
        Ok(size)
    }

    /// Stores a stream (an upload), at most `limit` bytes, through a staging file; when
    /// `expected` is set the content must have that digest. Returns its digest and size.
    pub async fn put_stream<E>(
        &self,
        mut body: BoxStream<'_, std::result::Result<Bytes, E>>,
        limit: u64,
        expected: Option<&str>,
    ) -> Result<(String, u64)>
    where
        E: std::fmt::Display,
    {
        let tmp = self
            .staging
            .join(format!("upload-{}.part", rand::random::<u64>()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp).await?;
            let mut h = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(StoreError::TooLarge { limit });
                }
                h.update(&chunk);
                f.write_all(&chunk).await?;
            }
            f.flush().await?;
            drop(f);
            let sha = hex::encode(h.finalize());
            if let Some(e) = expected
                && e != sha
            {
                return Err(StoreError::DigestMismatch {
                    expected: e.to_string(),
                    got: sha,
                });
            }
            self.put_staged(&tmp, &sha).await?;
            Ok((sha, size))
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// Reads an artifact, or the part of it in `range` (clamped to its size).
    pub async fn get(&self, sha256: &str, range: Option<Range<u64>>) -> Result<Option<Reading>> {
        let location = key(sha256)?;
        let opts = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        match self.store.get_opts(&location, opts).await {
            Ok(r) => {
                let size = r.meta.size;
                let range = r.range.clone();
                let body = r.into_stream().map_err(StoreError::from).boxed();
                Ok(Some(Reading { size, range, body }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The whole content of a small artifact (a library file), refused above `max` bytes.
    pub async fn read_bounded(&self, sha256: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(size) = self.size_of(sha256).await? else {
            return Ok(None);
        };
        if size > max {
            return Err(StoreError::TooLarge { limit: max });
        }
        let Some(mut r) = self.get(sha256, None).await? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = r.body.next().await {
            let chunk = chunk?;
            if (out.len() + chunk.len()) as u64 > max {
                return Err(StoreError::TooLarge { limit: max });
            }
            out.extend_from_slice(&chunk);
        }
        let got = hex::encode(Sha256::digest(&out));
        if got != sha256 {
            // A store is a disk or a bucket someone else may write to.
            return Err(StoreError::DigestMismatch {
                expected: sha256.to_string(),
                got,
            });
        }
        Ok(Some(out))
    }

    pub async fn delete(&self, sha256: &str) -> Result<()> {
        match self.store.delete(&key(sha256)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored artifact.
    pub async fn list(&self) -> Result<Vec<Listed>> {
        let prefix = Path::from("sha256");
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let sha = m.location.filename()?.to_string();
                is_digest(&sha).then(|| Listed {
                    sha256: sha,
                    size: m.size,
                    written: jiff::Timestamp::from_millisecond(m.last_modified.timestamp_millis())
                        .unwrap_or_default(),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn stream(parts: Vec<&'static [u8]>) -> BoxStream<'static, Result<Bytes, std::io::Error>> {
        futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from_static(p)))).boxed()
    }

    #[tokio::test]
    async fn a_stream_is_stored_under_its_digest_and_read_back_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::local(dir.path()).unwrap();
        let (digest, size) = store
            .put_stream(stream(vec![b"hello ", b"world"]), 1 << 20, None)
            .await
            .unwrap();
        assert_eq!(digest, sha(b"hello world"));
        assert_eq!(size, 11);
        assert_eq!(store.size_of(&digest).await.unwrap(), Some(11));
        let r = store.get(&digest, Some(6..11)).await.unwrap().unwrap();
        assert_eq!((r.size, r.range.clone()), (11, 6..11));
        let body: Vec<Bytes> = r.body.try_collect().await.unwrap();
        assert_eq!(body.concat(), b"world");
        assert_eq!(
            store.read_bounded(&digest, 11).await.unwrap().unwrap(),
            b"hello world"
        );
        assert!(matches!(
            store.read_bounded(&digest, 10).await,
            Err(StoreError::TooLarge { limit: 10 })
        ));
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].sha256, digest);
        store.delete(&digest).await.unwrap();
        assert_eq!(store.size_of(&digest).await.unwrap(), None);
        // Deleting twice is fine: garbage collection may race with a Command's deletion.
        store.delete(&digest).await.unwrap();
        // Nothing is left in staging.
        assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_staged_file_is_moved_in_and_storing_it_again_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::local(dir.path()).unwrap();
        let staged = store.staging_dir().join("uid.part");
        std::fs::write(&staged, b"evidence").unwrap();
        let digest = sha(b"evidence");
        assert_eq!(store.put_staged(&staged, &digest).await.unwrap(), 8);
        assert!(!staged.exists(), "the staged file was copied, not moved");
        // The caller failed after storing (a status write) and tries again.
        assert_eq!(store.put_staged(&staged, &digest).await.unwrap(), 8);
        assert_eq!(
            store.read_bounded(&digest, 8).await.unwrap().unwrap(),
            b"evidence"
        );
        // A staged file that is neither there nor stored is an error, not a success.
        let missing = store.put_staged(&staged, &sha(b"other")).await;
        assert!(
            matches!(missing, Err(StoreError::Io(_))),
            "{:?}",
            missing.err()
        );
        // Content already stored: the key is kept, the staged copy is left to its caller.
        std::fs::write(&staged, b"evidence").unwrap();
        assert_eq!(store.put_staged(&staged, &digest).await.unwrap(), 8);
        assert!(staged.exists());
    }

    #[tokio::test]
    async fn oversized_or_mismatched_uploads_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::local(dir.path()).unwrap();
        let too_big = store
            .put_stream(stream(vec![b"12345", b"67890"]), 8, None)
            .await;
        assert!(matches!(too_big, Err(StoreError::TooLarge { limit: 8 })));
        let wrong = store
            .put_stream(stream(vec![b"abc"]), 8, Some(&sha(b"abd")))
            .await;
        assert!(matches!(wrong, Err(StoreError::DigestMismatch { .. })));
        assert!(store.list().await.unwrap().is_empty());
        assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn keys_are_only_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::local(dir.path()).unwrap();
        for bad in ["../../etc/passwd", "ABC", &"a".repeat(63), &"g".repeat(64)] {
            assert!(matches!(
                store.size_of(bad).await,
                Err(StoreError::InvalidDigest(_))
            ));
        }
    }

    /// The S3 backend against a real S3-compatible server: `s3s-fs`, which `make test`
    /// builds (cached) and names in LR_S3S_FS. Multipart upload, ranges, list, delete.
    #[tokio::test]
    async fn the_s3_backend_works_against_a_real_server() {
        let Some(bin) = std::env::var_os("LR_S3S_FS") else {
            eprintln!("skipped: LR_S3S_FS does not name an s3s-fs binary (make test builds one)");
            return;
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s3");
        std::fs::create_dir_all(root.join("evidence")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "AKTEST", "--secret-key", "SKTEST"])
            .arg(&root)
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let store = ArtifactStore::s3(
            &S3Config {
                endpoint: format!("http://127.0.0.1:{port}"),
                bucket: "evidence".into(),
                region: "us-east-1".into(),
                access_key_id: "AKTEST".into(),
                secret_access_key: "SKTEST".into(),
            },
            &dir.path().join("staging"),
        )
        .unwrap();
        // Three parts: multipart upload for real.
        let content: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
        let want = sha(&content);
        let parts: Vec<Result<Bytes, std::io::Error>> = content
            .chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let result = async {
            let (digest, size) = store
                .put_stream(futures::stream::iter(parts).boxed(), 64 << 20, None)
                .await?;
            assert_eq!((digest.as_str(), size), (want.as_str(), 20 << 20));
            assert_eq!(store.size_of(&digest).await?, Some(20 << 20));
            let r = store.get(&digest, Some(100..200)).await?.unwrap();
            let body: Vec<Bytes> = r.body.try_collect().await?;
            assert_eq!(body.concat(), &content[100..200]);
            assert_eq!(
                store.read_bounded(&digest, 64 << 20).await?.unwrap(),
                content
            );
            assert_eq!(store.list().await?.len(), 1);
            store.delete(&digest).await?;
            assert_eq!(store.size_of(&digest).await?, None);
            Ok::<(), StoreError>(())
        }
        .await;
        let _ = server.kill();
        let _ = server.wait();
        result.unwrap();
    }
}
