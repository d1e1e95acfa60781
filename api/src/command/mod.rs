//! The command language of the live response console.
//!
//! One static [`registry`] describes every command: tier, where it is handled
//! ([`Handler`]), its default timeout ([`TimeoutClass`]), aliases, platforms, parameters,
//! flags, prerequisites, output columns, help and examples. The parser, `help`
//! ([`help_answer`]), the CLI's completion and dispatch, the admission policy
//! ([`advanced_verbs`], [`command_verbs`]), the operator's timeouts ([`timeout_class`])
//! and the agent's dispatcher ([`agent_commands`]) all read it.
//!
//! Two ways in, one meaning:
//! - [`parse_line`]: what an analyst types, with ` &` (background) and `> file`
//!   (redirect) at the end of the line;
//! - [`parse_command`]: a Command resource's `spec.command` (the first word) and
//!   `spec.args` (the rest, one list element per token).
//!
//! Both give an [`Invocation`]; [`Invocation::render`] and [`Invocation::args`] turn it
//! back into text that parses to the same invocation, for any values.
//!
//! # Syntax
//!
//! Defender's conventions:
//! - Whitespace (any Unicode white space) separates tokens. Double quotes group, and may
//!   start mid-token (`a"b c"d` is `ab cd`). Backslashes are ordinary characters, so
//!   `"C:\Program Files\x.exe"` needs nothing more; inside quotes `""` is a literal `"`.
//!   A quote left open is an error that gives its column.
//! - `-name` (unquoted) is a flag, or a named parameter whose value is the next token,
//!   whatever it looks like. A token with any quoted part is always a value, so
//!   `findfile "-weird"` searches for `-weird`. Names and command words are
//!   case-insensitive; choices are too and are stored in their canonical spelling.
//! - Every device command accepts `-output table|json`.
//! - `library delete` and `remediate list` are sub-commands: an unquoted second word
//!   selects them.
//! - At the end of a console line: `> file` or `>file` writes the output to a local file,
//!   and `&` (alone or glued to the last word, `dir&`) runs the command in the
//!   background; both may be combined in either order. Operator characters count only
//!   outside quotes: `"&"` is a value and `"out file.txt"&` is backgrounded. A word that
//!   starts with an unquoted `&` or `>` elsewhere on the line is an error; `a&b` and
//!   `a>b` are plain values.

mod error;
mod help;
mod lexer;
mod parser;
mod registry;
mod render;

pub use error::{ParseError, ParseErrorKind};
pub use help::{help_answer, help_for, help_overview, usage};
pub use parser::{ConsoleLine, Invocation, OutputFormat, parse_command, parse_line};
pub use registry::{
    ACCOUNT_VERBS, Column, CommandSpec, ENTITY_TYPES, FlagSpec, Handler, ISOLATION_VERBS,
    ParamSpec, Platform, Tier, TimeoutClass, ValueKind, advanced_verbs, agent_commands, alias_of,
    command_verbs, console_verbs, find, handled_by, hinted_by, moves_a_file, registry,
    timeout_class, verbs,
};

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
