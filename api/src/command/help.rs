//! Usage lines and help pages, generated from the registry only, so they cannot drift
//! from what the parser accepts.

use std::fmt::Write as _;

use super::error::{ParseError, ParseErrorKind};
use super::parser::{Invocation, suggest};
use super::registry::{CommandSpec, ParamSpec, Tier, ValueKind, alias_of, family, registry};

/// One-line synopsis, e.g. `getfile <path> [-auto] [-output table|json]`.
pub fn usage(spec: &CommandSpec) -> String {
    let mut line = spec.name.to_owned();
    for param in spec.positional {
        let shape = match param.kind {
            ValueKind::Choice(choices) => choices.join("|"),
            _ => param.name.to_owned(),
        };
        if param.required {
            let _ = write!(line, " <{shape}>");
        } else {
            let _ = write!(line, " [<{shape}>]");
        }
    }
    for param in spec.named {
        let shape = format!("-{} {}", param.name, value_shape(param));
        if param.required {
            let _ = write!(line, " {shape}");
        } else {
            let _ = write!(line, " [{shape}]");
        }
    }
    for flag in spec.flags {
        let _ = write!(line, " [-{}]", flag.name);
    }
    if spec.accepts_output() {
        line.push_str(" [-output table|json]");
    }
    line
}

/// What to write after `-name`.
fn value_shape(param: &ParamSpec) -> String {
    match param.kind {
        ValueKind::Choice(choices) => choices.join("|"),
        ValueKind::UInt => "<number>".to_owned(),
        ValueKind::Path => "<path>".to_owned(),
        ValueKind::Text => format!("<{}>", param.name),
    }
}

/// Usage of every command that starts with this word, one per line; `None` for an
/// unknown word.
pub(crate) fn usage_of_verb(verb: &str) -> Option<String> {
    let lines: Vec<String> = family(verb).map(usage).collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

const NAME_WIDTH: usize = 16;

/// All commands with their one-line summaries, grouped by tier.
pub fn help_overview() -> String {
    let mut out = String::from("Live response commands\n");
    for (tier, title) in [
        (Tier::Basic, "Basic (any live response role)"),
        (
            Tier::Advanced,
            "Advanced (need the advanced live response role)",
        ),
        (Tier::Console, "Console (handled by kubectl liveresponse)"),
    ] {
        let _ = write!(out, "\n{title}:\n");
        for spec in registry().iter().filter(|s| s.tier == tier) {
            let _ = writeln!(
                out,
                "  {:<width$}{}",
                spec.name,
                spec.summary,
                width = NAME_WIDTH
            );
        }
    }
    out.push_str(
        "\nType 'help <command>' for its parameters and examples.\n\
         Device commands accept -output table|json. End a line with '> file' to write the\n\
         output to a local file, and with '&' to run the command in the background.\n\
         Quote values that contain spaces: \"C:\\Program Files\\x.exe\"; inside quotes, \"\" is a \".\n",
    );
    out
}

/// What `help` answers, wherever it is asked (the console, `exec`, a Command the agent
/// receives): the overview without a topic, else the pages of the command it names.
pub fn help_answer(inv: &Invocation) -> Result<String, ParseError> {
    let topic: Vec<&str> = ["command", "subcommand"]
        .into_iter()
        .filter_map(|p| inv.get(p))
        .collect();
    if topic.is_empty() {
        Ok(help_overview())
    } else {
        help_for(&topic.join(" "))
    }
}

/// Full help for a command (`"getfile"`, `"library delete"`, or an alias such as
/// `"disconnect"`); a word with sub-commands (`"library"`) describes all of them.
pub fn help_for(name: &str) -> Result<String, ParseError> {
    let wanted = name.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut specs: Vec<&CommandSpec> = registry()
        .iter()
        .filter(|s| s.name.eq_ignore_ascii_case(&wanted) || s.verb().eq_ignore_ascii_case(&wanted))
        .collect();
    if specs.is_empty() {
        specs.extend(alias_of(&wanted));
    }
    if specs.is_empty() {
        let suggestion = suggest(&wanted);
        return Err(ParseError::new(
            ParseErrorKind::UnknownCommand {
                name: wanted,
                suggestion,
            },
            None,
        ));
    }
    Ok(specs.into_iter().map(page).collect::<Vec<_>>().join("\n"))
}

fn page(spec: &CommandSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} - {}", spec.name, spec.summary);
    let _ = writeln!(out, "\nusage: {}\n", usage(spec));
    if !spec.aliases.is_empty() {
        let _ = writeln!(out, "Also typed as: {}\n", spec.aliases.join(", "));
    }
    let _ = writeln!(out, "{}", spec.help);

    let mut rows: Vec<(String, String)> = Vec::new();
    for param in spec.positional {
        let mut help = param.help.to_owned();
        if let ValueKind::Choice(choices) = param.kind {
            let _ = write!(help, " One of: {}.", choices.join(", "));
        }
        if !param.required {
            help.push_str(" Optional.");
        }
        rows.push((format!("<{}>", param.name), help));
    }
    for param in spec.named {
        rows.push((
            format!("-{} {}", param.name, value_shape(param)),
            param.help.to_owned(),
        ));
    }
    for flag in spec.flags {
        let mut help = flag.help.to_owned();
        if flag.name == "auto" && !spec.prerequisites.is_empty() {
            let _ = write!(help, " (runs: {})", spec.prerequisites.join(", "));
        }
        rows.push((format!("-{}", flag.name), help));
    }
    if spec.accepts_output() {
        rows.push((
            "-output table|json".to_owned(),
            "Output format; table shows the main columns, json every field.".to_owned(),
        ));
    }
    if !rows.is_empty() {
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0)
            + 2;
        out.push_str("\nParameters:\n");
        for (key, help) in rows {
            let _ = writeln!(out, "  {key:<width$}{help}");
        }
    }
    if !spec.columns.is_empty() {
        let columns: Vec<&str> = spec.columns.iter().map(|c| c.key).collect();
        let _ = writeln!(out, "\nColumns: {}", columns.join(", "));
    }
    out.push_str("\nExamples:\n");
    for example in spec.examples {
        let _ = writeln!(out, "  {example}");
    }
    let platforms: Vec<&str> = spec.platforms.iter().map(|p| p.as_str()).collect();
    let _ = writeln!(out, "\nPlatforms: {}", platforms.join(", "));
    let tier = match spec.tier {
        Tier::Basic => "basic (any live response role)",
        Tier::Advanced => "advanced (needs the advanced live response role)",
        Tier::Console => "console (runs in kubectl liveresponse, never on the device)",
    };
    let _ = writeln!(out, "Tier: {tier}");
    if spec.tier != Tier::Console {
        let background = if spec.background_allowed {
            "yes, end the line with &"
        } else {
            "no"
        };
        let _ = writeln!(out, "Background: {background}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::registry::find;

    fn spec(name: &str) -> &'static CommandSpec {
        find(name).unwrap_or_else(|| panic!("no command {name}"))
    }

    #[test]
    fn usage_lines() {
        assert_eq!(
            usage(spec("getfile")),
            "getfile <path> [-auto] [-output table|json]"
        );
        assert_eq!(
            usage(spec("findfile")),
            "findfile <name> [-root <path>] [-max_results <number>] [-timeout_seconds <number>] [-output table|json]"
        );
        assert_eq!(
            usage(spec("remediate")),
            "remediate <file|process|service|registry|scheduledtask|startupitem|user> <entity> [-auto] [-force] [-quarantine] [-output table|json]"
        );
        assert_eq!(
            usage(spec("dir")),
            "dir [<path>] [-full_path] [-output table|json]"
        );
        assert_eq!(usage(spec("fg")), "fg <id>");
        assert_eq!(
            usage(spec("trace")),
            "trace [-level debug|info|warn|error] [-output table|json]"
        );
    }

    #[test]
    fn usage_of_verb_lists_sub_commands() {
        assert_eq!(
            usage_of_verb("Library").as_deref(),
            Some(
                "library [-output table|json]\nlibrary delete <name> [-output table|json]\nlibrary upload <file> [-signature <path>] [-description <description>] [-name <name>] [-analysis yara|sha256]"
            )
        );
        assert_eq!(usage_of_verb("nope"), None);
    }

    #[test]
    fn overview_lists_every_command_once_under_its_tier() {
        let text = help_overview();
        let basic = text.find("Basic").unwrap_or(usize::MAX);
        let advanced = text.find("Advanced").unwrap_or(usize::MAX);
        let console = text.find("Console").unwrap_or(usize::MAX);
        assert!(basic < advanced && advanced < console, "{text}");
        for spec in registry() {
            let line = format!(
                "  {:<width$}{}",
                spec.name,
                spec.summary,
                width = NAME_WIDTH
            );
            let at = text
                .find(&line)
                .unwrap_or_else(|| panic!("{} missing", spec.name));
            let section = match spec.tier {
                Tier::Basic => basic..advanced,
                Tier::Advanced => advanced..console,
                Tier::Console => console..text.len(),
            };
            assert!(section.contains(&at), "{} in the wrong section", spec.name);
        }
    }

    #[test]
    fn help_for_a_command_shows_everything() {
        let text = help_for("GetFile").unwrap_or_default();
        for part in [
            "usage: getfile <path> [-auto] [-output table|json]",
            "-auto",
            "(runs: fileinfo)",
            "getfile \"C:\\Program Files\\Vendor\\agent.log\" -auto",
            "Platforms: windows, linux, macos",
            "Tier: advanced",
            "Columns: path, size, sha256, artifact",
        ] {
            assert!(text.contains(part), "missing {part:?} in\n{text}");
        }
        let registry_help = help_for("registry").unwrap_or_default();
        assert!(
            registry_help.contains("Platforms: windows\n"),
            "{registry_help}"
        );
    }

    #[test]
    fn help_for_a_verb_covers_its_sub_commands() {
        let text = help_for("library").unwrap_or_default();
        assert!(
            text.contains("usage: library [-output table|json]"),
            "{text}"
        );
        assert!(text.contains("usage: library delete <name>"), "{text}");
        let one = help_for("library   delete").unwrap_or_default();
        assert!(!one.contains("usage: library [-output"), "{one}");
        assert!(one.contains("usage: library delete <name>"), "{one}");
    }

    #[test]
    fn help_for_unknown_command_suggests() {
        let err = help_for("getfiel").err().map(|e| e.kind);
        assert_eq!(
            err,
            Some(ParseErrorKind::UnknownCommand {
                name: "getfiel".into(),
                suggestion: Some("getfile".into())
            })
        );
    }
}
