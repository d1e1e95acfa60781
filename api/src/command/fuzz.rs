//! Fuzzing of the lexer and parser over raw bytes (issue 10): what a console or a Command
//! resource can hold is any UTF-8, and an unknown byte in a paste arrives as U+FFFD.
//! `proptests.rs` checks round trips of generated invocations and that `String`s never
//! panic; this module feeds raw bytes and checks the lexer's own bookkeeping (token
//! ranges, error columns, one-line messages) and that whatever parses is a fixed point of
//! both canonical forms.
//!
//! Cases per test come from `LR_FUZZ_CASES` (`make fuzz` sets a large number); the
//! default keeps `cargo test` quick. No nightly toolchain or cargo-fuzz is needed.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

use super::lexer::{lex_arg, lex_line};
use super::parser::split_line;
use super::*;

/// Failing inputs are kept next to this file (`fuzz.regressions`) and replayed first.
fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("LR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// Bytes as a terminal or an API client could deliver them: anything, turned into text
/// the way a lossy reader would.
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Bytes biased towards the lexer's special characters, command words and multi-byte
/// sequences, so the interesting states are reached more often than by uniform bytes.
fn biased_bytes() -> impl Strategy<Value = Vec<u8>> {
    let mut words: Vec<Vec<u8>> = [
        "\"", "\"\"", " ", "\t", "\n", "\u{a0}", "\u{2028}", "&", ">", "-", "-output", "json",
        "-pid", "-name", "-auto", "delete", "list", "é", "\u{fffd}", "\0", "\x1b", "\r",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    words.extend(registry().iter().map(|s| s.name.as_bytes().to_vec()));
    // Invalid UTF-8: a lone continuation byte, a cut two-byte sequence, an overlong form.
    words.extend([vec![0x80], vec![0xc3], vec![0xc0, 0xaf], vec![0xff]]);
    vec(
        prop_oneof![
            3 => select(words),
            1 => vec(any::<u8>(), 0..4),
        ],
        0..16,
    )
    .prop_map(|pieces| pieces.concat())
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..64), biased_bytes()]
}

/// A parse error's first line is what the console prints on its own line: whatever was
/// typed (newlines, escape sequences), it must stay one line without control characters.
fn check_error(err: &ParseError, line: &str) -> Result<(), TestCaseError> {
    let first = err.kind.to_string();
    prop_assert!(!first.is_empty());
    prop_assert!(
        !first.chars().any(char::is_control),
        "control character in {:?} for {:?}",
        first,
        line
    );
    if let ParseErrorKind::UnterminatedQuote { position } = err.kind {
        prop_assert_eq!(line.chars().nth(position), Some('"'), "{:?}", line);
    }
    Ok(())
}

/// Whatever parses is a fixed point: its canonical line and its canonical args both parse
/// back to it, and its line's own rendering is stable.
fn check_accepted(line: &ConsoleLine) -> Result<(), TestCaseError> {
    let rendered = line.render();
    let again = parse_line(&rendered);
    prop_assert_eq!(again.as_ref(), Ok(line), "{:?}", rendered);
    let inv = &line.invocation;
    let args = inv.args();
    let again = parse_command(inv.verb(), &args);
    prop_assert_eq!(again.as_ref(), Ok(inv), "{:?}", args);
    if inv.spec.name == "help" {
        // A topic typed by anyone must give a page or a clean error, never a panic.
        if let Err(e) = help_answer(inv) {
            check_error(&e, "")?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2_000))]

    /// Token ranges are in order, on character boundaries, and each range read on its own
    /// as a Command argument is the same token: what lets a typed line become `spec.args`.
    #[test]
    fn fuzz_lexer_tokens_cover_their_source(bytes in any_bytes()) {
        let line = lossy(&bytes);
        match lex_line(&line) {
            Ok(tokens) => {
                let mut end = 0;
                for token in &tokens {
                    prop_assert!(token.raw.start >= end && token.raw.start < token.raw.end);
                    prop_assert!(token.raw.end <= line.len());
                    prop_assert!(line.is_char_boundary(token.raw.start));
                    prop_assert!(line.is_char_boundary(token.raw.end));
                    end = token.raw.end;
                    let raw = &line[token.raw.clone()];
                    let alone = lex_arg(raw, 0).map(|t| (t.text, t.quoted));
                    prop_assert_eq!(alone, Ok((token.text.clone(), token.quoted)), "{:?} in {:?}", raw, line);
                }
                // Outside the tokens there is only whitespace.
                let mut rest = line.clone();
                for token in tokens.iter().rev() {
                    rest.replace_range(token.raw.clone(), " ");
                }
                prop_assert!(rest.chars().all(char::is_whitespace), "{:?} left {:?}", line, rest);
            }
            Err(e) => check_error(&e, &line)?,
        }
    }

    #[test]
    fn fuzz_parse_line_on_raw_bytes(bytes in any_bytes()) {
        let line = lossy(&bytes);
        match parse_line(&line) {
            Ok(parsed) => {
                check_accepted(&parsed)?;
                // The same line cut as the CLI cuts it for a Command resource means the same.
                if let Ok((tokens, _, _)) = split_line(&line) {
                    let args: Vec<String> =
                        tokens[1..].iter().map(|t| line[t.raw.clone()].to_owned()).collect();
                    prop_assert_eq!(parse_command(&tokens[0].text, &args), Ok(parsed.invocation));
                }
            }
            Err(e) => check_error(&e, &line)?,
        }
    }

    /// A Command resource written by hand (or by a hostile client): any verb, any args.
    #[test]
    fn fuzz_parse_command_on_raw_bytes(
        verb in prop_oneof![select(verbs()).prop_map(str::to_owned), any_bytes().prop_map(|b| lossy(&b))],
        args in vec(any_bytes().prop_map(|b| lossy(&b)), 0..5),
    ) {
        match parse_command(&verb, &args) {
            Ok(inv) => {
                let again = parse_command(inv.verb(), &inv.args());
                prop_assert_eq!(again.as_ref(), Ok(&inv));
                prop_assert_eq!(parse_line(&inv.render()).map(|l| l.invocation), Ok(inv));
            }
            Err(e) => {
                prop_assert!(!e.kind.to_string().chars().any(char::is_control), "{}", e.kind);
            }
        }
    }

    /// `help <anything>`: the topic is free text from the analyst.
    #[test]
    fn fuzz_help_topics(topic in any_bytes()) {
        let topic = lossy(&topic);
        if let Err(e) = help_for(&topic) {
            prop_assert!(!e.kind.to_string().chars().any(char::is_control), "{}", e.kind);
        }
    }
}
