//! Parse errors: one line that says what is wrong, then the usage of the command when the
//! command is known, because the analyst's next step is almost always to retype the line.

use std::fmt;

/// Why a line or a Command resource's arguments were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("empty command line; type 'help' for a list of commands")]
    Empty,
    #[error("unknown command {}{}", Shown(.name), DidYouMean(.suggestion.as_deref()))]
    UnknownCommand {
        name: String,
        suggestion: Option<String>,
    },
    #[error("{command}: missing required parameter <{parameter}>")]
    MissingParameter { command: String, parameter: String },
    #[error("{command}: unexpected argument {}", Shown(.value))]
    UnexpectedArgument { command: String, value: String },
    #[error("{command}: unknown parameter -{}", Clean(.name))]
    UnknownParameter { command: String, name: String },
    #[error("{command}: -{name} needs a value")]
    MissingValue { command: String, name: String },
    #[error("{command}: invalid value {} for {name}: expected {expected}", Shown(.value))]
    InvalidValue {
        command: String,
        name: String,
        value: String,
        expected: String,
    },
    #[error("{command}: -{name} is given more than once")]
    DuplicateParameter { command: String, name: String },
    #[error(
        "unterminated quote: the \" at column {} is never closed (inside quotes, write \"\" for a literal \")",
        .position + 1
    )]
    UnterminatedQuote {
        /// Zero-based character offset of the opening quote on the line.
        position: usize,
    },
    #[error("misplaced '{operator}': {problem}")]
    MisplacedOperator { operator: String, problem: String },
    #[error("{command} cannot run in the background; remove the '&'")]
    BackgroundNotAllowed { command: String },
}

/// A rejected line: what is wrong, and the usage of the command when it is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}{}", UsageLines(.usage.as_deref()))]
pub struct ParseError {
    pub kind: ParseErrorKind,
    /// Usage of the command (one line per sub-command of its verb), without the
    /// `usage: ` prefix.
    pub usage: Option<String>,
}

impl ParseError {
    pub(crate) fn new(kind: ParseErrorKind, usage: Option<String>) -> Self {
        ParseError { kind, usage }
    }
}

/// A user-typed value in single quotes with control characters escaped, so the message
/// stays on one line whatever was typed.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", Clean(self.0))
    }
}

/// A user-typed value with control characters escaped.
struct Clean<'a>(&'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

struct DidYouMean<'a>(Option<&'a str>);

impl fmt::Display for DidYouMean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "; did you mean '{s}'?"),
            None => write!(f, "; type 'help' for a list of commands"),
        }
    }
}

struct UsageLines<'a>(Option<&'a str>);

impl fmt::Display for UsageLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(usage) = self.0 else {
            return Ok(());
        };
        for (i, line) in usage.lines().enumerate() {
            let prefix = if i == 0 { "usage: " } else { "       " };
            write!(f, "\n{prefix}{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_then_usage_lines() {
        let err = ParseError::new(
            ParseErrorKind::UnexpectedArgument {
                command: "library".into(),
                value: "a\nb".into(),
            },
            Some("library [-output table|json]\nlibrary delete <name>".into()),
        );
        assert_eq!(
            err.to_string(),
            "library: unexpected argument 'a\\nb'\n\
             usage: library [-output table|json]\n       library delete <name>"
        );
    }

    #[test]
    fn unknown_command_suggests_or_points_to_help() {
        let with = ParseErrorKind::UnknownCommand {
            name: "procesess".into(),
            suggestion: Some("processes".into()),
        };
        assert_eq!(
            with.to_string(),
            "unknown command 'procesess'; did you mean 'processes'?"
        );
        let without = ParseErrorKind::UnknownCommand {
            name: "xyzzy".into(),
            suggestion: None,
        };
        assert!(
            without
                .to_string()
                .ends_with("type 'help' for a list of commands")
        );
    }

    #[test]
    fn unterminated_quote_column_is_one_based() {
        let kind = ParseErrorKind::UnterminatedQuote { position: 8 };
        assert!(kind.to_string().contains("column 9"), "{kind}");
    }
}
