//! Splitting a console line into tokens, with Defender's quoting: double quotes group,
//! `""` inside quotes is one literal `"`, and backslashes are ordinary characters so
//! Windows paths survive untouched.

use std::ops::Range;

use super::error::{ParseError, ParseErrorKind};

/// One word of a command line after quote removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub text: String,
    /// Some part of the token was inside quotes. Such a token is always a value: never a
    /// `-name`, a flag or a sub-command word.
    pub quoted: bool,
    /// The first character came from outside quotes: only then can it be the `>` of a
    /// glued redirect (`>out.txt`).
    pub first_unquoted: bool,
    /// The last character came from outside quotes: only then can it be the `&` of a
    /// glued background marker (`dir&`).
    pub last_unquoted: bool,
    /// Where the token was in its source, in bytes; lets the line be cut into the
    /// argument list a Command resource stores.
    pub raw: Range<usize>,
}

impl Token {
    /// A token made by the program rather than typed: unquoted, as is.
    pub fn bare(text: &str) -> Token {
        Token {
            text: text.to_owned(),
            quoted: false,
            first_unquoted: true,
            last_unquoted: true,
            raw: 0..text.len(),
        }
    }

    /// `-name` written without quotes; a lone `-` is a value (it names nothing).
    pub fn param_name(&self) -> Option<&str> {
        if self.quoted {
            return None;
        }
        self.text.strip_prefix('-').filter(|name| !name.is_empty())
    }

    /// The token is exactly this operator, unquoted.
    pub fn is_operator(&self, op: char) -> bool {
        !self.quoted && self.text.len() == op.len_utf8() && self.text.starts_with(op)
    }

    /// Starts with an unquoted `op` (`>file`, `&x`).
    pub fn starts_with_operator(&self, op: char) -> bool {
        self.first_unquoted && self.text.starts_with(op)
    }

    /// Ends with an unquoted `op` glued to something before it (`dir&`).
    pub fn ends_with_glued_operator(&self, op: char) -> bool {
        self.last_unquoted && self.text.len() > op.len_utf8() && self.text.ends_with(op)
    }
}

/// Splits a whole console line at unquoted whitespace (any Unicode white space).
pub(crate) fn lex_line(line: &str) -> Result<Vec<Token>, ParseError> {
    Scanner::new(line, 0, true).run()
}

/// Reads one element of a Command resource's `args` as a single token: the list already
/// separates the arguments, so whitespace is literal, but quotes work as on the console so
/// that `"-weird"` is still a value. `column` is where the argument would start on the
/// console line, for error positions.
pub(crate) fn lex_arg(arg: &str, column: usize) -> Result<Token, ParseError> {
    let mut tokens = Scanner::new(arg, column, false).run()?;
    Ok(tokens.pop().unwrap_or(Token {
        // An empty argument is an empty value, written without quotes.
        text: String::new(),
        quoted: false,
        first_unquoted: false,
        last_unquoted: false,
        raw: 0..0,
    }))
}

struct Scanner<'a> {
    source: &'a str,
    /// Characters before `source` on the line, so positions are columns of the line.
    column_base: usize,
    split_on_whitespace: bool,
    tokens: Vec<Token>,
    current: Option<Token>,
}

impl<'a> Scanner<'a> {
    fn new(source: &'a str, column_base: usize, split_on_whitespace: bool) -> Self {
        Scanner {
            source,
            column_base,
            split_on_whitespace,
            tokens: Vec::new(),
            current: None,
        }
    }

    fn token_at(&mut self, byte: usize) -> &mut Token {
        self.current.get_or_insert_with(|| Token {
            text: String::new(),
            quoted: false,
            first_unquoted: false,
            last_unquoted: false,
            raw: byte..byte,
        })
    }

    fn push_char(&mut self, byte: usize, c: char, unquoted: bool) {
        let token = self.token_at(byte);
        if token.text.is_empty() {
            token.first_unquoted = unquoted;
        }
        token.text.push(c);
        token.last_unquoted = unquoted;
    }

    fn finish(&mut self, end: usize) {
        if let Some(mut token) = self.current.take() {
            token.raw.end = end;
            self.tokens.push(token);
        }
    }

    fn run(mut self) -> Result<Vec<Token>, ParseError> {
        let mut chars = self.source.char_indices().enumerate().peekable();
        // (column, byte) of the quote that opened the quoted run we are in.
        let mut open_quote: Option<usize> = None;
        while let Some((column, (byte, c))) = chars.next() {
            if open_quote.is_some() {
                if c != '"' {
                    self.push_char(byte, c, false);
                } else if chars.next_if(|&(_, (_, next))| next == '"').is_some() {
                    self.push_char(byte, '"', false);
                } else {
                    open_quote = None;
                }
            } else if c == '"' {
                self.token_at(byte).quoted = true;
                open_quote = Some(column);
            } else if self.split_on_whitespace && c.is_whitespace() {
                self.finish(byte);
            } else {
                self.push_char(byte, c, true);
            }
        }
        if let Some(column) = open_quote {
            return Err(ParseError::new(
                ParseErrorKind::UnterminatedQuote {
                    position: self.column_base + column,
                },
                None,
            ));
        }
        self.finish(self.source.len());
        Ok(self.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(line: &str) -> Vec<(String, bool)> {
        match lex_line(line) {
            Ok(tokens) => tokens.into_iter().map(|t| (t.text, t.quoted)).collect(),
            Err(e) => panic!("lexing {line:?} failed: {e}"),
        }
    }

    fn t(text: &str, quoted: bool) -> (String, bool) {
        (text.to_owned(), quoted)
    }

    #[test]
    fn whitespace_separates_and_quotes_group() {
        assert_eq!(
            texts("  getfile\t\"C:\\Program Files\\a b.txt\"   -auto "),
            vec![
                t("getfile", false),
                t("C:\\Program Files\\a b.txt", true),
                t("-auto", false)
            ]
        );
    }

    #[test]
    fn backslashes_are_literal() {
        assert_eq!(
            texts(r#"cd C:\Windows\ "C:\x\""#),
            vec![
                t("cd", false),
                t("C:\\Windows\\", false),
                t("C:\\x\\", true)
            ]
        );
    }

    #[test]
    fn doubled_quote_inside_quotes_is_a_literal_quote() {
        assert_eq!(texts(r#""a""b""#), vec![t("a\"b", true)]);
        assert_eq!(texts("\"\"\"\"\"\""), vec![t("\"\"", true)]);
        assert_eq!(texts("\"\"\"\""), vec![t("\"", true)]);
        assert_eq!(texts(r#""""#), vec![t("", true)]);
    }

    #[test]
    fn quote_may_start_mid_token() {
        assert_eq!(texts(r#"a"b c"d e"#), vec![t("ab cd", true), t("e", false)]);
    }

    #[test]
    fn non_breaking_space_separates_and_newline_inside_quotes_is_kept() {
        assert_eq!(
            texts("a\u{a0}b \"x\ny\""),
            vec![t("a", false), t("b", false), t("x\ny", true)]
        );
    }

    #[test]
    fn unterminated_quote_reports_the_column_of_the_opening_quote() {
        let err = lex_line("getfile \"C:\\a").err();
        assert_eq!(
            err.map(|e| e.kind),
            Some(ParseErrorKind::UnterminatedQuote { position: 8 })
        );
        // Columns count characters, not bytes.
        let err = lex_line("é \"x").err();
        assert_eq!(
            err.map(|e| e.kind),
            Some(ParseErrorKind::UnterminatedQuote { position: 2 })
        );
    }

    #[test]
    fn operator_positions_track_quoting() {
        let tokens = lex_line(r#"a& "b&" >c ">d" "e"&"#).unwrap_or_default();
        assert_eq!(tokens.len(), 5);
        assert!(tokens[0].ends_with_glued_operator('&'));
        assert!(!tokens[1].ends_with_glued_operator('&'));
        assert!(tokens[2].starts_with_operator('>'));
        assert!(!tokens[3].starts_with_operator('>'));
        assert!(tokens[4].ends_with_glued_operator('&'));
    }

    #[test]
    fn raw_ranges_cover_the_source_of_each_token() {
        let line = r#"run  x.ps1 -parameters "-Verbose -Path C:\x""#;
        let tokens = lex_line(line).unwrap_or_default();
        let raw: Vec<&str> = tokens.iter().map(|t| &line[t.raw.clone()]).collect();
        assert_eq!(
            raw,
            vec!["run", "x.ps1", "-parameters", r#""-Verbose -Path C:\x""#]
        );
    }

    #[test]
    fn args_keep_whitespace_but_honour_quotes() {
        let tok = lex_arg("-Verbose -Path C:\\x", 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tok.text, "-Verbose -Path C:\\x");
        assert!(!tok.quoted);
        let tok = lex_arg("\"-weird\"", 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((tok.text.as_str(), tok.quoted), ("-weird", true));
        let err = lex_arg("a \"b", 10).err().map(|e| e.kind);
        assert_eq!(
            err,
            Some(ParseErrorKind::UnterminatedQuote { position: 12 })
        );
    }
}
