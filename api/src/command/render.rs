//! Canonical text of an invocation: the console line stored in `status.commandLine` and
//! the argument list stored in `spec.args`. Both parse back to the same invocation for
//! any values, which is what lets the CLI, the operator and the command log agree.

use super::parser::{ConsoleLine, Invocation};
use super::registry::family;

/// Where a value sits decides what could be misread in it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The first positional of a one-word command: an unquoted value there that equals
    /// a sub-command word (`delete`) would select the sub-command.
    FirstPositional,
    Positional,
    /// After `-name`: always taken as the value.
    Named,
}

impl Invocation {
    /// The canonical line: name, positionals in order, named parameters and flags in spec
    /// order, then `-output`. [`super::parse_line`] gives back an equal invocation.
    pub fn render(&self) -> String {
        let mut line = self.spec.name.to_owned();
        for (value, slot) in self.values() {
            line.push(' ');
            match value {
                Piece::Word(word) => line.push_str(&word),
                Piece::Value(value) => {
                    push_line_value(&mut line, value, self.conflicts(value, slot))
                }
            }
        }
        line
    }

    /// The canonical `spec.args` of a Command resource (everything after the verb):
    /// [`super::parse_command`]`(self.verb(), &self.args())` gives back an equal
    /// invocation. Values are quoted only where a list element could be misread: one
    /// that contains `"`, or a positional that starts with `-`.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = self
            .spec
            .subcommand()
            .map(str::to_owned)
            .into_iter()
            .collect();
        for (value, slot) in self.values() {
            args.push(match value {
                Piece::Word(word) => word,
                Piece::Value(value) => {
                    let misread = value.contains('"')
                        || (slot != Slot::Named && value.starts_with('-'))
                        || self.conflicts(value, slot);
                    if misread {
                        quoted(value)
                    } else {
                        value.to_owned()
                    }
                }
            });
        }
        args
    }

    /// Everything after the command name, in canonical order.
    fn values(&self) -> Vec<(Piece<'_>, Slot)> {
        let mut out = Vec::new();
        for (i, (_, value)) in self.positional.iter().enumerate() {
            let slot = if i == 0 {
                Slot::FirstPositional
            } else {
                Slot::Positional
            };
            out.push((Piece::Value(value), slot));
        }
        for param in self.spec.named {
            if let Some(value) = self.named.get(param.name) {
                out.push((Piece::Word(format!("-{}", param.name)), Slot::Named));
                out.push((Piece::Value(value), Slot::Named));
            }
        }
        for flag in self.spec.flags {
            if self.flags.contains(flag.name) {
                out.push((Piece::Word(format!("-{}", flag.name)), Slot::Named));
            }
        }
        if let Some(format) = self.output {
            out.push((Piece::Word("-output".to_owned()), Slot::Named));
            out.push((Piece::Value(format.as_str()), Slot::Named));
        }
        out
    }

    fn conflicts(&self, value: &str, slot: Slot) -> bool {
        slot == Slot::FirstPositional
            && self.spec.subcommand().is_none()
            && family(self.spec.verb())
                .filter_map(|s| s.subcommand())
                .any(|sub| sub.eq_ignore_ascii_case(value))
    }
}

impl ConsoleLine {
    /// The invocation's line, then ` > file` and ` &` when set.
    pub fn render(&self) -> String {
        let mut line = self.invocation.render();
        if let Some(file) = &self.redirect {
            line.push_str(" > ");
            push_line_value(&mut line, file, false);
        }
        if self.background {
            line.push_str(" &");
        }
        line
    }
}

enum Piece<'a> {
    /// A parameter name with its dash: written as is.
    Word(String),
    /// A value: quoted when it would otherwise be read differently.
    Value(&'a str),
}

/// Whether a value needs quotes on a console line; see [`super::parse_line`] for the rules
/// these mirror.
fn needs_line_quotes(value: &str) -> bool {
    value.is_empty()
        || value.starts_with(['-', '>', '&'])
        || value.ends_with('&')
        || value.chars().any(|c| c == '"' || c.is_whitespace())
}

fn push_line_value(line: &mut String, value: &str, force: bool) {
    if force || needs_line_quotes(value) {
        line.push_str(&quoted(value));
    } else {
        line.push_str(value);
    }
}

/// Inside quotes every character is literal except `"`, which is doubled.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parser::OutputFormat;
    use crate::command::registry::find;

    fn spec(name: &str) -> &'static crate::command::CommandSpec {
        find(name).unwrap_or_else(|| panic!("no command {name}"))
    }

    #[test]
    fn canonical_order_and_quoting() {
        let mut inv = Invocation::new(spec("findfile"));
        inv.positional.push(("name", "*.ps1".into()));
        inv.named.insert("timeout_seconds", "60".into());
        inv.named.insert("root", "C:\\Program Files".into());
        inv.output = Some(OutputFormat::Json);
        assert_eq!(
            inv.render(),
            r#"findfile *.ps1 -root "C:\Program Files" -timeout_seconds 60 -output json"#
        );
        assert_eq!(
            inv.args(),
            vec![
                "*.ps1",
                "-root",
                "C:\\Program Files",
                "-timeout_seconds",
                "60",
                "-output",
                "json"
            ]
        );
    }

    #[test]
    fn values_that_look_like_syntax_are_quoted() {
        let mut inv = Invocation::new(spec("run"));
        inv.positional.push(("name", "-x\"y".into()));
        inv.named
            .insert("parameters", "-Verbose -Path C:\\x".into());
        assert_eq!(
            inv.render(),
            r#"run "-x""y" -parameters "-Verbose -Path C:\x""#
        );
        assert_eq!(
            inv.args(),
            vec!["\"-x\"\"y\"", "-parameters", "-Verbose -Path C:\\x"]
        );
        for v in ["", "&", "a&", ">x", "&x", "a b", "a\u{a0}b", "a\nb"] {
            assert!(needs_line_quotes(v), "{v:?}");
        }
        for v in ["a&b", "a>b", "C:\\x\\", "é", "x-y"] {
            assert!(!needs_line_quotes(v), "{v:?}");
        }
    }

    #[test]
    fn sub_command_words_are_quoted_as_first_positional() {
        // No real command has a first positional that can equal a sub-command word
        // (`remediate`'s type is a choice without "list"), so use a variant whose type is
        // free text: unquoted, `list` would select `remediate list`.
        let mut free = *spec("remediate");
        free.positional = &[crate::command::ParamSpec {
            name: "type",
            kind: crate::command::ValueKind::Text,
            required: true,
            help: "",
        }];
        let free: &'static crate::command::CommandSpec = Box::leak(Box::new(free));
        let mut inv = Invocation::new(free);
        inv.positional.push(("type", "List".into()));
        assert_eq!(inv.render(), r#"remediate "List""#);
        assert_eq!(inv.args(), vec![r#""List""#]);
        let unquoted = crate::command::parse_line("remediate List").map(|l| l.invocation.spec.name);
        assert_eq!(unquoted, Ok("remediate list"));

        // Only the first positional right after the verb is at risk.
        let mut inv = Invocation::new(spec("help"));
        inv.positional.push(("command", "library".into()));
        inv.positional.push(("subcommand", "delete".into()));
        assert_eq!(inv.render(), "help library delete");
    }

    #[test]
    fn console_line_appends_redirect_then_background() {
        let line = ConsoleLine {
            invocation: Invocation::new(spec("processes")),
            background: true,
            redirect: Some("my out.txt".into()),
        };
        assert_eq!(line.render(), r#"processes > "my out.txt" &"#);
    }
}
