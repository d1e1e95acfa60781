//! Where a command's output goes as it streams in from the agent: the first 64 KiB are kept
//! for `status.output.content`, the whole is counted and hashed, and nothing else is held,
//! so the operator's memory does not grow with the size of an output. (The artifact store
//! plugs in here to keep the whole.)

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
        self,
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
        let sha256 = hex::encode(self.hasher.finalize());
        if !expected_sha256.is_empty() && !expected_sha256.eq_ignore_ascii_case(&sha256) {
            return Err(OutputProblem::Corrupt);
        }
        let mut inline = self.inline;
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
