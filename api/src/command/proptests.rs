//! Property tests: canonical forms round-trip for any values, and no input panics.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;

use super::parser::split_line;
use super::*;

/// Failing cases are kept next to this file (`proptests.regressions`), where the
/// command module's owner will see them, and replayed first on the next run.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// Strings that stress the quoting: anything Unicode, plus a bias towards the characters
/// and words the lexer treats specially.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        r#"[" \\&>a-zé\-\t\n\u{a0}]{0,12}"#,
        select(vec![
            "",
            "&",
            ">",
            "-",
            "-x",
            "\"",
            "\"\"",
            "a&",
            ">x",
            "&x",
            "delete",
            "list",
            " ",
            "C:\\Program Files\\",
            "\u{a0}",
            "-output",
            "a\"b c\"d",
        ])
        .prop_map(str::to_owned),
    ]
}

fn value(kind: ValueKind, text: &str, number: u64, pick: &Index) -> String {
    match kind {
        ValueKind::Text => text.to_owned(),
        ValueKind::Path if text.is_empty() => "/".to_owned(),
        ValueKind::Path => text.to_owned(),
        ValueKind::UInt => number.to_string(),
        ValueKind::Choice(choices) => (*pick.get(choices)).to_owned(),
    }
}

/// A valid invocation of a random command with random values.
fn invocation() -> impl Strategy<Value = Invocation> {
    let specs: Vec<&'static CommandSpec> = registry().iter().collect();
    (
        select(specs),
        vec(text(), 8),
        vec(any::<u64>(), 8),
        vec(any::<bool>(), 16),
        vec(any::<Index>(), 8),
        prop_oneof![
            Just(None),
            Just(Some(OutputFormat::Table)),
            Just(Some(OutputFormat::Json))
        ],
    )
        .prop_map(|(spec, texts, numbers, coins, picks, output)| {
            let mut inv = Invocation::new(spec);
            for (i, p) in spec.positional.iter().enumerate() {
                // Optional positionals can only be left off at the end.
                if !p.required && !coins[i] {
                    break;
                }
                inv.positional
                    .push((p.name, value(p.kind, &texts[i], numbers[i], &picks[i])));
            }
            for (j, p) in spec.named.iter().enumerate() {
                let i = 4 + j;
                if p.required || coins[i] {
                    inv.named
                        .insert(p.name, value(p.kind, &texts[i], numbers[i], &picks[i]));
                }
            }
            for (k, f) in spec.flags.iter().enumerate() {
                if coins[8 + k] {
                    inv.flags.insert(f.name);
                }
            }
            if spec.accepts_output() {
                inv.output = output;
            }
            inv
        })
}

fn console_line() -> impl Strategy<Value = ConsoleLine> {
    (invocation(), any::<bool>(), proptest::option::of(text())).prop_map(
        |(invocation, background, redirect)| {
            let background = background
                && invocation.spec.tier != Tier::Console
                && invocation.spec.background_allowed;
            ConsoleLine {
                invocation,
                background,
                redirect: redirect.filter(|f| !f.is_empty()),
            }
        },
    )
}

/// Words and characters that steer the parser into its corners.
fn biased_piece() -> impl Strategy<Value = String> {
    let mut pieces: Vec<String> = [
        "\"",
        "\"\"",
        "-",
        "&",
        ">",
        " ",
        "  ",
        "\t",
        "a",
        "x",
        "é",
        "\\",
        "-auto",
        "-output",
        "json",
        "-pid",
        "7",
        "-root",
        "-name",
        "-parameters",
        "delete",
        "list",
        "file",
        "C:\\",
        "/tmp",
        "-full_path",
        "-level",
        "debug",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    pieces.extend(registry().iter().map(|s| s.name.to_owned()));
    prop_oneof![
        4 => select(pieces),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(3_000))]

    #[test]
    fn render_parses_back_to_the_same_invocation(inv in invocation()) {
        let line = inv.render();
        prop_assert_eq!(parse_line(&line).map(|l| l.invocation), Ok(inv), "line {:?}", line);
    }

    #[test]
    fn args_parse_back_to_the_same_invocation(inv in invocation()) {
        let args = inv.args();
        prop_assert_eq!(parse_command(inv.verb(), &args), Ok(inv), "args {:?}", args);
    }

    #[test]
    fn console_line_render_parses_back(line in console_line()) {
        let text = line.render();
        prop_assert_eq!(parse_line(&text), Ok(line), "line {:?}", text);
    }
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn parse_line_never_panics(line in any::<String>()) {
        if let Err(e) = parse_line(&line) {
            let _ = e.to_string();
        }
    }

    /// Whatever parses is stable: its rendering parses to the same thing, and the
    /// Command resource form of the typed line means the same.
    #[test]
    fn biased_lines_never_panic_and_accepted_lines_are_stable(
        pieces in vec(biased_piece(), 0..12),
        spaced in any::<bool>(),
    ) {
        let line = pieces.join(if spaced { " " } else { "" });
        match parse_line(&line) {
            Ok(parsed) => {
                let again = parse_line(&parsed.render());
                prop_assert_eq!(again.as_ref(), Ok(&parsed), "{:?} -> {:?}", line, parsed.render());
                if let Ok((tokens, _, _)) = split_line(&line) {
                    let args: Vec<String> =
                        tokens[1..].iter().map(|t| line[t.raw.clone()].to_owned()).collect();
                    prop_assert_eq!(
                        parse_command(&tokens[0].text, &args),
                        Ok(parsed.invocation),
                        "{:?} as args {:?}", line, args
                    );
                }
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.is_empty());
            }
        }
    }

    #[test]
    fn parse_command_never_panics(
        command in prop_oneof![select(verbs()).prop_map(str::to_owned), any::<String>()],
        args in vec(prop_oneof![biased_piece(), any::<String>()], 0..6),
    ) {
        if let Err(e) = parse_command(&command, &args) {
            let _ = e.to_string();
        }
    }
}
