//! Where a command's output goes as it streams in from the agent: the first 64 KiB are kept
//! for `status.output.content`, the whole is counted and hashed, and nothing else is held,
//! so the operator's memory does not grow with the size of an output. An output larger than
//! the inline part is also written whole to a staging file, which the command controller
//! puts into the artifact store (`status.output.artifact`).

use liveresponse_api::output::INLINE_LIMIT;
use sha2::{Digest, Sha256};

/// What a finished output amounts to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSummary {
    /// The first bytes of the output, at most [`INLINE_LIMIT`], cut at a character boundary.
    pub inline: String,
    /// Whether `inline` is only part of the output.
    pub truncated: bool,
    /// Bytes received.
    pub size: u64,
    /// SHA-256 of the bytes received, hex.
    pub sha256: String,
    /// The whole output in a staging file, when it did not fit inline and could be kept.
    pub spilled: Option<std::path::PathBuf>,
}

/// Why an output cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputProblem {
    /// The agent sent more than the command may produce.
    TooLarge { limit: u64 },
    /// Fewer (or more) bytes arrived than the agent says it sent: a chunk was lost.
    Lost { expected: u64, received: u64 },
    /// The bytes do not hash to what the agent says it sent.
    Corrupt,
}

impl OutputProblem {
    /// The `status.error.reason` it fails a command with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "OutputTooLarge",
            Self::Lost { .. } | Self::Corrupt => "OutputLost",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::TooLarge { limit } => format!(
                "the agent sent more than the {limit} bytes of output this command may produce (maxOutputSize); narrow the command or raise maxOutputSize"
            ),
            Self::Lost { expected, received } => format!(
                "the agent reported {expected} bytes of output but {received} arrived: part of the output was lost in transit; run the command again"
            ),
            Self::Corrupt => "the output that arrived does not match the sha256 the agent reported: it was corrupted in transit; run the command again".into(),
        }
    }
}

/// Streams an output through: bounded memory whatever its size.
pub struct OutputSink {
    inline: Vec<u8>,
    size: u64,
    hasher: Sha256,
    limit: u64,
    too_large: bool,
    /// Where the whole output goes once it outgrows the inline part.
    spill_path: Option<std::path::PathBuf>,
    spill: Option<std::io::BufWriter<std::fs::File>>,
    /// Writing the spill failed: the output is still summarised, only not kept whole.
    spill_failed: bool,
}

impl Drop for OutputSink {
    fn drop(&mut self) {
        // A sink dropped before `finish` took its file (a replay, a failed command)
        // leaves nothing in staging.
        if self.spill.take().is_some()
            && let Some(p) = &self.spill_path
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl OutputSink {
    /// A sink that refuses more than `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            inline: Vec::new(),
            size: 0,
            hasher: Sha256::new(),
            limit,
            too_large: false,
            spill_path: None,
            spill: None,
            spill_failed: false,
        }
    }

    /// Keeps an output larger than the inline part whole, in `path`.
    pub fn spill_to(mut self, path: std::path::PathBuf) -> Self {
        self.spill_path = Some(path);
        self
    }

    fn write_spill(&mut self, data: &[u8]) {
        use std::io::Write;
        if self.spill_failed {
            return;
        }
        if self.spill.is_none() {
            let Some(path) = &self.spill_path else {
                return;
            };
            match std::fs::File::create(path) {
                Ok(f) => {
                    let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
                    // Everything before this chunk is still in `inline`.
                    if w.write_all(&self.inline).is_err() {
                        self.spill_failed = true;
                    }
                    self.spill = Some(w);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot keep the whole output");
                    self.spill_failed = true;
                    return;
                }
            }
        }
        if let Some(w) = &mut self.spill
            && w.write_all(data).is_err()
        {
            self.spill_failed = true;
        }
    }

    /// Takes the next chunk. Past the limit, chunks are only counted.
    pub fn push(&mut self, data: &[u8]) {
        self.size = self.size.saturating_add(data.len() as u64);
        if self.size > self.limit {
            self.too_large = true;
        }
        if self.too_large {
            return;
        }
        self.hasher.update(data);
        if self.size > INLINE_LIMIT as u64 && self.spill_path.is_some() {
            self.write_spill(data);
        }
        let room = INLINE_LIMIT.saturating_sub(self.inline.len());
        // One byte more than fits tells `finish` that the inline part was cut.
        let take = data.len().min(room + 1);
        if self.inline.len() <= INLINE_LIMIT {
            self.inline.extend_from_slice(&data[..take]);
        }
    }

    /// Bytes held in memory now.
    pub fn held(&self) -> usize {
        self.inline.len()
    }

    /// The summary, checked against what the agent says it sent.
    pub fn finish(
        mut self,
        expected_size: u64,
        expected_sha256: &str,
    ) -> Result<OutputSummary, OutputProblem> {
        if self.too_large {
            return Err(OutputProblem::TooLarge { limit: self.limit });
        }
        if self.size != expected_size {
            return Err(OutputProblem::Lost {
                expected: expected_size,
                received: self.size,
            });
        }
        let sha256 = hex::encode(self.hasher.clone().finalize());
        if !expected_sha256.is_empty() && !expected_sha256.eq_ignore_ascii_case(&sha256) {
            return Err(OutputProblem::Corrupt);
        }
        let spilled = match self.spill.take().map(|mut w| {
            use std::io::Write;
            w.flush()
        }) {
            Some(Ok(())) if !self.spill_failed => self.spill_path.clone(),
            Some(_) => {
                if let Some(p) = &self.spill_path {
                    let _ = std::fs::remove_file(p);
                }
                None
            }
            None => None,
        };
        let mut inline = std::mem::take(&mut self.inline);
        let truncated = inline.len() > INLINE_LIMIT;
        inline.truncate(INLINE_LIMIT);
        // An agent's text is UTF-8, but the cut may split a character, and a hostile agent
        // may send anything: keep the valid prefix of a cut, replace anything else.
        let mut truncated = truncated;
        let mut inline = match String::from_utf8(inline) {
            Ok(s) => s,
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                if truncated && valid + 4 > bytes.len() {
                    String::from_utf8_lossy(&bytes[..valid]).into_owned()
                } else {
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            }
        };
        // Each replaced byte takes three: keep the inline part within its limit all the same
        // (found by the property test below).
        if inline.len() > INLINE_LIMIT {
            inline = crate::status::truncate(&inline, INLINE_LIMIT);
            truncated = true;
        }
        Ok(OutputSummary {
            inline,
            truncated,
            size: self.size,
            sha256,
            spilled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn small_output_is_kept_whole() {
        let mut s = OutputSink::new(1 << 20);
        s.push(b"hello ");
        s.push(b"world");
        let out = s.finish(11, &sha(b"hello world"));
        assert_eq!(
            out,
            Ok(OutputSummary {
                inline: "hello world".into(),
                truncated: false,
                size: 11,
                sha256: sha(b"hello world"),
                spilled: None,
            })
        );
    }

    #[test]
    fn large_output_keeps_64_kib_and_hashes_the_whole() {
        let data: Vec<u8> = "é".repeat(100_000).into_bytes();
        let mut s = OutputSink::new(1 << 30);
        for c in data.chunks(7777) {
            s.push(c);
            assert!(s.held() <= INLINE_LIMIT + 1);
        }
        let out = s.finish(data.len() as u64, &sha(&data));
        let Ok(out) = out else { panic!("{out:?}") };
        assert!(out.truncated);
        assert_eq!(out.size, data.len() as u64);
        assert_eq!(out.sha256, sha(&data));
        // Cut at a character boundary: 64 KiB of two-byte characters.
        assert_eq!(out.inline.len(), INLINE_LIMIT);
        assert!(out.inline.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_large_output_is_kept_whole_in_its_spill_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("uid.out");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut s = OutputSink::new(1 << 30).spill_to(path.clone());
        for c in data.chunks(10_000) {
            s.push(c);
        }
        let out = s.finish(data.len() as u64, &sha(&data)).expect("summary");
        assert_eq!(out.spilled.as_deref(), Some(path.as_path()));
        assert_eq!(std::fs::read(&path).expect("spill"), data);

        // Small outputs write nothing; a sink dropped unfinished removes its file.
        let mut small = OutputSink::new(1 << 30).spill_to(dir.path().join("small.out"));
        small.push(b"tiny");
        assert_eq!(small.finish(4, "").expect("small").spilled, None);
        assert!(!dir.path().join("small.out").exists());
        let mut dropped = OutputSink::new(1 << 30).spill_to(dir.path().join("gone.out"));
        dropped.push(&data);
        assert!(dir.path().join("gone.out").exists());
        drop(dropped);
        assert!(!dir.path().join("gone.out").exists());
    }

    #[test]
    fn exactly_the_inline_limit_is_not_truncated() {
        let data = vec![b'a'; INLINE_LIMIT];
        let mut s = OutputSink::new(1 << 30);
        s.push(&data);
        let out = s.finish(data.len() as u64, "").map(|o| o.truncated);
        assert_eq!(out, Ok(false));
    }

    #[test]
    fn problems_are_typed() {
        let mut s = OutputSink::new(10);
        s.push(b"0123456789abc");
        assert_eq!(s.finish(13, ""), Err(OutputProblem::TooLarge { limit: 10 }));

        let mut s = OutputSink::new(100);
        s.push(b"abc");
        assert_eq!(
            s.finish(6, ""),
            Err(OutputProblem::Lost {
                expected: 6,
                received: 3
            })
        );

        let mut s = OutputSink::new(100);
        s.push(b"abc");
        assert_eq!(s.finish(3, &sha(b"abd")), Err(OutputProblem::Corrupt));
    }

    #[test]
    fn invalid_utf8_from_a_hostile_agent_is_replaced() {
        let mut s = OutputSink::new(100);
        s.push(&[0x66, 0xff, 0x6f]);
        let out = s.finish(3, "").map(|o| o.inline);
        assert_eq!(out, Ok("f\u{fffd}o".into()));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever an agent sends, in whatever chunks: no panic, bounded memory, and a
        /// summary that is the whole's size and hash with a valid prefix inline.
        #[test]
        fn any_chunks_give_a_faithful_bounded_summary(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40_000), 0..8),
            limit in 0u64..400_000,
        ) {
            let whole: Vec<u8> = chunks.concat();
            let mut s = OutputSink::new(limit);
            for c in &chunks {
                s.push(c);
                proptest::prop_assert!(s.held() <= INLINE_LIMIT + 1);
            }
            match s.finish(whole.len() as u64, &sha(&whole)) {
                Ok(out) => {
                    proptest::prop_assert!(whole.len() as u64 <= limit);
                    proptest::prop_assert_eq!(out.size, whole.len() as u64);
                    proptest::prop_assert_eq!(out.sha256, sha(&whole));
                    proptest::prop_assert!(out.inline.len() <= INLINE_LIMIT);
                    if std::str::from_utf8(&whole).is_ok() {
                        proptest::prop_assert_eq!(out.truncated, whole.len() > INLINE_LIMIT);
                    }
                    if std::str::from_utf8(&whole).is_ok() {
                        proptest::prop_assert!(whole.starts_with(out.inline.as_bytes()));
                    }
                }
                Err(OutputProblem::TooLarge { .. }) => proptest::prop_assert!(whole.len() as u64 > limit),
                Err(other) => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}

/// A getfile's copy waiting on the operator's disk (a staging file), verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedFile {
    /// The staging file.
    pub staged: std::path::PathBuf,
    /// The file's path on the device.
    pub device_path: String,
    pub size: u64,
    pub sha256: String,
}

/// Why a transferred file cannot be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileProblem {
    /// The agent sent more than maxFileSize.
    TooLarge { limit: u64 },
    /// The agent said it finished but did not say what it sent.
    NoSummary,
    /// Fewer or more bytes arrived than the agent says it sent.
    Incomplete { expected: u64, received: u64 },
    /// The copy does not hash to what the agent read.
    Corrupt { agent: String, operator: String },
    /// The operator could not write its copy.
    Io(String),
}

impl FileProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "FileTooLarge",
            Self::Io(_) => "ArtifactStoreError",
            _ => "TransferFailed",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::TooLarge { limit } => format!(
                "the agent sent more than this namespace's maxFileSize ({limit} bytes); the copy was dropped"
            ),
            Self::NoSummary => {
                "the agent did not say what it sent; the copy was dropped: run getfile again".into()
            }
            Self::Incomplete { expected, received } => format!(
                "the agent sent a file of {expected} bytes but the operator holds {received}: the transfer was incomplete; run getfile again"
            ),
            Self::Corrupt { agent, operator } => format!(
                "the copy's sha256 ({operator}) differs from the file's as the agent read it ({agent}): it was corrupted in transit; run getfile again"
            ),
            Self::Io(e) => format!("the operator could not keep the file: {e}"),
        }
    }
}

/// Writes a transfer's chunks to a staging file, in order, hashing as it goes. Opened on a
/// staging file left by an interrupted transfer, it goes on from that file's end.
pub struct FileSink {
    path: std::path::PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    written: u64,
    resumed_at: Option<u64>,
    total: Option<u64>,
    limit: u64,
    problem: Option<FileProblem>,
}

impl FileSink {
    /// Opens (or continues) the staging file at `path`; `limit` bounds the file's size.
    pub fn open(path: &std::path::Path, limit: u64) -> std::io::Result<Self> {
        use std::io::Read;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        // What is already there was verified in order when it was written; it is hashed
        // again because a hasher's state does not survive a restart.
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            written += n as u64;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            hasher,
            written,
            resumed_at: (written > 0).then_some(written),
            total: None,
            limit,
            problem: None,
        })
    }

    /// Bytes held, in order from the file's start.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Where this transfer resumed, if it did.
    pub fn resumed_at(&self) -> Option<u64> {
        self.resumed_at
    }

    /// The file's size as the agent announced it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Takes a chunk. Only the chunk that starts where the copy ends is written: one the
    /// copy already has (a replay after a reconnect) or one past a gap is dropped, and the
    /// final check says whether everything arrived.
    pub fn push(&mut self, offset: u64, data: &[u8], total: u64) {
        use std::io::Write;
        if self.problem.is_some() {
            return;
        }
        if total > self.limit {
            self.problem = Some(FileProblem::TooLarge { limit: self.limit });
            return;
        }
        self.total = Some(total);
        if offset != self.written {
            return;
        }
        let end = self.written + data.len() as u64;
        if end > total {
            self.problem = Some(FileProblem::Incomplete {
                expected: total,
                received: end,
            });
            return;
        }
        if let Err(e) = self.file.write_all(data) {
            self.problem = Some(FileProblem::Io(e.to_string()));
            return;
        }
        self.hasher.update(data);
        self.written = end;
    }

    /// Checks the copy against what the agent says it sent.
    pub fn finish(
        &mut self,
        summary: Option<&liveresponse_api::proto::FileSummary>,
    ) -> Result<StagedFile, FileProblem> {
        if let Some(p) = &self.problem {
            return Err(p.clone());
        }
        let Some(s) = summary else {
            return Err(FileProblem::NoSummary);
        };
        if s.size != self.written {
            return Err(FileProblem::Incomplete {
                expected: s.size,
                received: self.written,
            });
        }
        let ours = hex::encode(self.hasher.clone().finalize());
        if !s.sha256.eq_ignore_ascii_case(&ours) {
            return Err(FileProblem::Corrupt {
                agent: s.sha256.chars().take(64).collect(),
                operator: ours,
            });
        }
        Ok(StagedFile {
            staged: self.path.clone(),
            device_path: s.path.chars().take(4096).collect(),
            size: self.written,
            sha256: ours,
        })
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;
    use liveresponse_api::proto::FileSummary;

    fn summary(data: &[u8]) -> FileSummary {
        FileSummary {
            path: "/var/log/x".into(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
        }
    }

    #[test]
    fn chunks_in_order_make_a_verified_copy_and_replays_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.part");
        let data = b"0123456789abcdef";
        let mut s = FileSink::open(&path, 100).unwrap();
        s.push(0, &data[..6], 16);
        s.push(0, &data[..6], 16); // a replay after a reconnect
        s.push(10, &data[10..], 16); // past a gap
        s.push(6, &data[6..], 16);
        let staged = s.finish(Some(&summary(data))).unwrap();
        assert_eq!(std::fs::read(&staged.staged).unwrap(), data);
        assert_eq!(staged.size, 16);
        assert_eq!(staged.device_path, "/var/log/x");
    }

    #[test]
    fn a_staging_file_left_behind_is_continued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.part");
        let data = b"hello, world";
        let mut s = FileSink::open(&path, 100).unwrap();
        s.push(0, &data[..5], 12);
        drop(s); // the operator restarted
        let mut s = FileSink::open(&path, 100).unwrap();
        assert_eq!((s.written(), s.resumed_at()), (5, Some(5)));
        s.push(5, &data[5..], 12);
        assert!(s.finish(Some(&summary(data))).is_ok());
    }

    #[test]
    fn lies_and_losses_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"abcdef";
        let mut s = FileSink::open(&dir.path().join("1"), 100).unwrap();
        s.push(0, &data[..3], 6);
        assert!(matches!(
            s.finish(Some(&summary(data))),
            Err(FileProblem::Incomplete {
                expected: 6,
                received: 3
            })
        ));
        let mut s = FileSink::open(&dir.path().join("2"), 100).unwrap();
        s.push(0, b"abcxyz", 6);
        assert!(matches!(
            s.finish(Some(&summary(data))),
            Err(FileProblem::Corrupt { .. })
        ));
        let mut s = FileSink::open(&dir.path().join("3"), 4).unwrap();
        s.push(0, b"ab", 6);
        assert_eq!(
            s.finish(Some(&summary(data))),
            Err(FileProblem::TooLarge { limit: 4 })
        );
        let mut s = FileSink::open(&dir.path().join("4"), 100).unwrap();
        s.push(0, b"abcdefgh", 6); // more than it announced
        assert!(matches!(
            s.finish(Some(&summary(data))),
            Err(FileProblem::Incomplete { .. })
        ));
        let mut s = FileSink::open(&dir.path().join("5"), 100).unwrap();
        assert_eq!(s.finish(None), Err(FileProblem::NoSummary));
    }
}
