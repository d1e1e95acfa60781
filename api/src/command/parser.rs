//! From tokens to a typed, validated [`Invocation`]. The console line and a Command
//! resource's `command` + `args` go through the same [`parse_tokens`], so the two can
//! never disagree about what a command means.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{ParseError, ParseErrorKind};
use super::help::usage_of_verb;
use super::lexer::{Token, lex_arg, lex_line};
use super::registry::{
    CommandSpec, ParamSpec, Tier, ValueKind, alias_of, family, find, hinted_by, verbs,
};

/// Output format of a command.
///
/// One type for the console's `-output table|json`, a Command's `spec.output` and
/// `status.output.format` (the CRD schema comes from here), so the two can never disagree
/// about the spellings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "k8s", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// The main columns as a text table.
    #[default]
    Table,
    /// Every field of every record as JSON.
    Json,
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Table => "table",
            OutputFormat::Json => "json",
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed, validated command. Values are canonical: choices in their listed spelling,
/// numbers in plain decimal.
#[derive(Clone, PartialEq, Eq)]
pub struct Invocation {
    pub spec: &'static CommandSpec,
    /// In spec order, only those given (optional positionals can only be left off at the
    /// end).
    pub positional: Vec<(&'static str, String)>,
    pub named: BTreeMap<&'static str, String>,
    pub flags: BTreeSet<&'static str>,
    pub output: Option<OutputFormat>,
}

// The whole spec would bury the values in every assertion failure; its name identifies it.
impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invocation")
            .field("spec", &self.spec.name)
            .field("positional", &self.positional)
            .field("named", &self.named)
            .field("flags", &self.flags)
            .field("output", &self.output)
            .finish()
    }
}

impl Invocation {
    /// A command with no values given yet.
    pub fn new(spec: &'static CommandSpec) -> Self {
        Invocation {
            spec,
            positional: Vec::new(),
            named: BTreeMap::new(),
            flags: BTreeSet::new(),
            output: None,
        }
    }

    /// First word of the command's name: `Command.spec.command`.
    pub fn verb(&self) -> &'static str {
        self.spec.verb()
    }

    /// A positional or named value by parameter name.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.positional
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .or_else(|| {
                self.named
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
            })
    }

    pub fn has_flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f.eq_ignore_ascii_case(name))
    }

    /// The further virtual permission, a subresource of `commands` only the
    /// liveresponse-responder role grants, that this command needs besides its tier:
    /// `isolate` to cut a device off its network, `accounts` to act on a user account.
    pub fn responder_subresource(&self) -> Option<&'static str> {
        let verb = self.verb();
        if super::registry::ISOLATION_VERBS.contains(&verb) {
            return Some("isolate");
        }
        (super::registry::ACCOUNT_VERBS.contains(&verb)
            && self.spec.subcommand().is_none()
            && self.get("type") == Some("user"))
        .then_some("accounts")
    }
}

/// What an analyst typed: a command, and what the console does around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleLine {
    pub invocation: Invocation,
    /// Trailing `&`: do not wait for the result.
    pub background: bool,
    /// `> file`: write the output to this local file.
    pub redirect: Option<String>,
}

/// Parses a console line.
///
/// After quote removal, the end of the line may hold, in this order, a redirect (`> file`
/// or `>file`) and a background marker (`&`); an `&` just before the redirect is accepted
/// too. Operators count only when they are outside quotes, so `"&"` and `">x"` are
/// values, while `"my file.txt"&` runs in the background. An `&` glued to the end of the
/// last word (`dir&`) is a background marker; anywhere else `&` inside a word is an
/// ordinary character (`a&b`). A word that starts with an unquoted `&` or `>` anywhere
/// but at the end is an error rather than a silent value.
pub fn parse_line(line: &str) -> Result<ConsoleLine, ParseError> {
    let (tokens, background, redirect) = split_line(line)?;
    let invocation = parse_tokens(&tokens)?;
    if background && (invocation.spec.tier == Tier::Console || !invocation.spec.background_allowed)
    {
        return Err(ParseError::new(
            ParseErrorKind::BackgroundNotAllowed {
                command: invocation.spec.name.to_owned(),
            },
            usage_of_verb(invocation.verb()),
        ));
    }
    Ok(ConsoleLine {
        invocation,
        background,
        redirect,
    })
}

/// Lexes a console line and takes the operators off its end: the command's tokens, the
/// background marker and the redirect file.
pub(crate) fn split_line(line: &str) -> Result<(Vec<Token>, bool, Option<String>), ParseError> {
    let mut tokens = lex_line(line)?;
    if tokens.is_empty() {
        return Err(ParseError::new(ParseErrorKind::Empty, None));
    }
    let usage = usage_of_verb(&tokens[0].text);
    let misplaced = |operator: &str, problem: &str| {
        ParseError::new(
            ParseErrorKind::MisplacedOperator {
                operator: operator.to_owned(),
                problem: problem.to_owned(),
            },
            usage.clone(),
        )
    };

    let mut background = take_background(&mut tokens);
    let redirect = take_redirect(&mut tokens).map_err(|p| misplaced(">", p))?;
    if redirect.is_some() && !background {
        background = take_background(&mut tokens);
    }
    for token in &tokens {
        if token.starts_with_operator('>') {
            return Err(misplaced(
                ">",
                "a redirect must be the last thing on the line: > file (quote a value that starts with >)",
            ));
        }
        if token.starts_with_operator('&') {
            return Err(misplaced(
                "&",
                "& goes at the end of the line, once (quote a value that starts with &)",
            ));
        }
    }
    if tokens.is_empty() {
        let op = if redirect.is_some() { ">" } else { "&" };
        return Err(misplaced(op, "there is no command before it"));
    }
    Ok((tokens, background, redirect))
}

/// Parses a Command resource: `command` is the first word (`library`), `args` the rest as
/// typed (`["delete", "x.ps1"]`).
///
/// Each element of `args` is one token, so whitespace in it is literal and needs no
/// quotes; quotes still work as on the console (`"-weird"` is a value, not a parameter).
/// `&` and `>` mean nothing here: background and output have their own fields.
pub fn parse_command(command: &str, args: &[String]) -> Result<Invocation, ParseError> {
    let words: Vec<&str> = command.split_whitespace().collect();
    if words.is_empty() {
        return Err(ParseError::new(ParseErrorKind::Empty, None));
    }
    // Columns as if the command had been typed on one line, for error positions.
    let mut column = command.chars().count() + 1;
    let mut tokens: Vec<Token> = words.into_iter().map(Token::bare).collect();
    for arg in args {
        tokens.push(lex_arg(arg, column)?);
        column += arg.chars().count() + 1;
    }
    parse_tokens(&tokens)
}

/// Resolves the command (one word or two) and types its parameters.
pub(crate) fn parse_tokens(tokens: &[Token]) -> Result<Invocation, ParseError> {
    let (spec, consumed) = resolve(tokens)?;
    let usage = usage_of_verb(spec.verb());
    let command = spec.name.to_owned();
    let err = |kind: ParseErrorKind| ParseError::new(kind, usage.clone());

    let mut inv = Invocation::new(spec);
    let mut rest = tokens[consumed..].iter();
    while let Some(token) = rest.next() {
        if let Some(raw_name) = token.param_name() {
            let name = raw_name.to_lowercase();
            if let Some(flag) = spec.flags.iter().find(|f| f.name == name) {
                if !inv.flags.insert(flag.name) {
                    return Err(err(ParseErrorKind::DuplicateParameter {
                        command,
                        name: flag.name.to_owned(),
                    }));
                }
                continue;
            }
            let param = spec.named.iter().find(|p| p.name == name);
            if param.is_none() && !(name == "output" && spec.accepts_output()) {
                return Err(err(ParseErrorKind::UnknownParameter { command, name }));
            }
            // Whatever follows a `-name` is its value, even `-something`: that is how
            // `run x -parameters -Verbose` and Command args written by hand behave.
            let Some(value) = rest.next() else {
                return Err(err(ParseErrorKind::MissingValue { command, name }));
            };
            match param {
                Some(param) => {
                    let value = check_value(spec, param, &value.text).map_err(err)?;
                    if inv.named.insert(param.name, value).is_some() {
                        return Err(err(ParseErrorKind::DuplicateParameter {
                            command,
                            name: param.name.to_owned(),
                        }));
                    }
                }
                None => {
                    let format = parse_output(spec, &value.text).map_err(err)?;
                    if inv.output.replace(format).is_some() {
                        return Err(err(ParseErrorKind::DuplicateParameter {
                            command,
                            name: "output".to_owned(),
                        }));
                    }
                }
            }
        } else {
            let Some(param) = spec.positional.get(inv.positional.len()) else {
                return Err(err(ParseErrorKind::UnexpectedArgument {
                    command,
                    value: token.text.clone(),
                }));
            };
            let value = check_value(spec, param, &token.text).map_err(err)?;
            inv.positional.push((param.name, value));
        }
    }

    let missing = spec.positional[inv.positional.len()..]
        .iter()
        .chain(
            spec.named
                .iter()
                .filter(|p| !inv.named.contains_key(p.name)),
        )
        .find(|p| p.required);
    if let Some(param) = missing {
        return Err(err(ParseErrorKind::MissingParameter {
            command,
            parameter: param.name.to_owned(),
        }));
    }
    Ok(inv)
}

/// Picks the spec: `library delete` when the second word is an unquoted sub-command of
/// the first, otherwise the one-word command.
fn resolve(tokens: &[Token]) -> Result<(&'static CommandSpec, usize), ParseError> {
    let Some(first) = tokens.first() else {
        return Err(ParseError::new(ParseErrorKind::Empty, None));
    };
    let verb = first.text.as_str();
    if let Some(second) = tokens.get(1).filter(|t| !t.quoted) {
        let sub = family(verb).find(|s| {
            s.subcommand()
                .is_some_and(|sub| sub.eq_ignore_ascii_case(&second.text))
        });
        if let Some(spec) = sub {
            return Ok((spec, 2));
        }
    }
    if let Some(spec) = find(verb)
        .or_else(|| alias_of(verb))
        .filter(|s| s.subcommand().is_none())
    {
        return Ok((spec, 1));
    }
    if family(verb).next().is_some() {
        // Only sub-commands exist under this word: say which ones.
        return Err(ParseError::new(
            ParseErrorKind::MissingParameter {
                command: verb.to_lowercase(),
                parameter: "subcommand".to_owned(),
            },
            usage_of_verb(verb),
        ));
    }
    Err(ParseError::new(
        ParseErrorKind::UnknownCommand {
            name: verb.to_owned(),
            suggestion: suggest(verb),
        },
        None,
    ))
}

fn check_value(
    spec: &CommandSpec,
    param: &ParamSpec,
    value: &str,
) -> Result<String, ParseErrorKind> {
    let invalid = |expected: String| ParseErrorKind::InvalidValue {
        command: spec.name.to_owned(),
        name: param.name.to_owned(),
        value: value.to_owned(),
        expected,
    };
    match param.kind {
        ValueKind::Text => Ok(value.to_owned()),
        ValueKind::Path if value.is_empty() => Err(invalid("a non-empty path".to_owned())),
        ValueKind::Path => Ok(value.to_owned()),
        ValueKind::UInt => value
            .parse::<u64>()
            .map(|n| n.to_string())
            .map_err(|_| invalid(format!("a whole number from 0 to {}", u64::MAX))),
        ValueKind::Choice(choices) => choices
            .iter()
            .find(|c| c.eq_ignore_ascii_case(value))
            .map(|c| (*c).to_owned())
            .ok_or_else(|| invalid(format!("one of {}", choices.join(", ")))),
    }
}

fn parse_output(spec: &CommandSpec, value: &str) -> Result<OutputFormat, ParseErrorKind> {
    [OutputFormat::Table, OutputFormat::Json]
        .into_iter()
        .find(|f| f.as_str().eq_ignore_ascii_case(value))
        .ok_or_else(|| ParseErrorKind::InvalidValue {
            command: spec.name.to_owned(),
            name: "output".to_owned(),
            value: value.to_owned(),
            expected: "table or json".to_owned(),
        })
}

/// Removes a trailing background marker: a last token that is an unquoted `&`, or ends
/// with one.
fn take_background(tokens: &mut Vec<Token>) -> bool {
    let Some(last) = tokens.last_mut() else {
        return false;
    };
    if last.is_operator('&') {
        tokens.pop();
        true
    } else if last.ends_with_glued_operator('&') {
        last.text.pop();
        last.raw.end -= 1;
        true
    } else {
        false
    }
}

/// Removes a trailing `> file` or `>file` and returns the file.
fn take_redirect(tokens: &mut Vec<Token>) -> Result<Option<String>, &'static str> {
    let Some(last) = tokens.last() else {
        return Ok(None);
    };
    let file = if last.is_operator('>') {
        return Err("> needs a file name after it");
    } else if last.starts_with_operator('>') {
        let file = last.text['>'.len_utf8()..].to_owned();
        tokens.pop();
        file
    } else if tokens.len() >= 2 && tokens[tokens.len() - 2].is_operator('>') {
        let file = last.text.clone();
        tokens.truncate(tokens.len() - 2);
        file
    } else {
        return Ok(None);
    };
    if file.is_empty() {
        return Err("> needs a file name after it");
    }
    Ok(Some(file))
}

/// The closest command word within two edits (never a full rewrite of a short word).
pub(crate) fn suggest(typed: &str) -> Option<String> {
    let typed = typed.to_lowercase();
    if let Some(spec) = hinted_by(&typed) {
        return Some(spec.verb().to_owned());
    }
    let len = typed.chars().count();
    verbs()
        .into_iter()
        .map(|verb| (edit_distance(&typed, verb), verb))
        .filter(|&(d, _)| d <= 2 && d < len)
        .min_by_key(|&(d, _)| d)
        .map(|(_, verb)| verb.to_owned())
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("proceses", "processes"), 1);
        assert_eq!(edit_distance("getfiel", "getfile"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("é", "e"), 1);
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("procesess").as_deref(), Some("processes"));
        assert_eq!(suggest("GETFIEL").as_deref(), Some("getfile"));
        assert_eq!(suggest("ls").as_deref(), Some("dir"));
        assert_eq!(suggest("xyzzy"), None);
        // Two edits would turn any two-letter word into `cd` or `fg`.
        assert_eq!(suggest("zz"), None);
    }
}
