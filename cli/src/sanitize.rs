//! Text written by a device or by another user (file names, command lines, hostnames, error
//! messages, session reasons...) is shown, never obeyed: a terminal must not receive a raw
//! control or invisible reordering character from it, or an attacker on the host could
//! retitle the analyst's window, clear the screen, fake output or reorder what they read.
//!
//! Such characters are shown as escapes (`\x1b`, `\u202e`); everything else, including
//! non-ASCII letters and CJK, passes unchanged. Only what reaches a terminal goes through
//! here: `-o json` values and `> file` keep the exact bytes.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` may change what a terminal does or how the text around it reads.
pub fn is_dangerous(c: char) -> bool {
    // `is_control` covers C0 (ESC, BEL, CR, backspace...), DEL and C1 (0x80-0x9f, where
    // 0x9b is a one-byte CSI for some terminals).
    c.is_control()
        || matches!(c,
            // Soft hyphen, Arabic letter mark, Mongolian vowel separator: invisible.
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            // Zero-width spaces and joiners, LRM/RLM.
            | '\u{200B}'..='\u{200F}'
            // Line and paragraph separators: line breaks a terminal may honour.
            | '\u{2028}' | '\u{2029}'
            // Bidi embeddings and overrides (LRE, RLE, PDF, LRO, RLO).
            | '\u{202A}'..='\u{202E}'
            // Word joiner, invisible operators, bidi isolates, deprecated format chars.
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            // Interlinear annotation marks.
            | '\u{FFF9}'..='\u{FFFB}'
            // Tag characters hide text inside what looks like one emoji.
            | '\u{E0000}'..='\u{E007F}')
}

fn escape(out: &mut String, c: char) {
    let code = u32::from(c);
    // Writing into a String cannot fail.
    let _ = if code <= 0xff {
        write!(out, "\\x{code:02x}")
    } else if code <= 0xffff {
        write!(out, "\\u{code:04x}")
    } else {
        write!(out, "\\U{code:08x}")
    };
}

fn escape_where(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_dangerous(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_dangerous(c) && !keep(c) {
            escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Multi-line text (a command's rendered output, an error message): line breaks and tabs
/// keep their meaning, a `\r\n` line end reads as `\n`; every other dangerous character is
/// escaped. A lone `\r` is escaped, since it moves the cursor back over what was printed.
pub fn text(text: &str) -> Cow<'_, str> {
    if text.contains("\r\n") {
        return Cow::Owned(
            escape_where(&text.replace("\r\n", "\n"), |c| c == '\n' || c == '\t').into_owned(),
        );
    }
    escape_where(text, |c| c == '\n' || c == '\t')
}

/// One line (the prompt, a table cell, a name in a sentence): line breaks are escaped too,
/// so a value can never start a line of its own that looks like the CLI's.
pub fn line(text: &str) -> Cow<'_, str> {
    escape_where(text, |_| false)
}

/// JSON text for a terminal. JSON already escapes C0, but DEL, C1 and the invisible and
/// bidi characters are valid raw in a JSON string; they are written as `\uXXXX` escapes,
/// which JSON reads back as the same character, so the document's values stay exact.
pub fn json(text: &str) -> Cow<'_, str> {
    let keep = |c: char| c == '\n' || c == '\t' || c == ' ';
    if !text.chars().any(|c| is_dangerous(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut units = [0u16; 2];
    for c in text.chars() {
        if is_dangerous(c) && !keep(c) {
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "evil\x1b]0;pwned\x07\x1b[2Jname.txt";

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        let shown = line(EVIL);
        assert_eq!(shown, "evil\\x1b]0;pwned\\x07\\x1b[2Jname.txt");
        assert!(!shown.contains('\x1b') && !shown.contains('\x07'));
        assert_eq!(text("\x1b[2J\x1b[H"), "\\x1b[2J\\x1b[H");
        assert_eq!(line("a\x1b]2;title\x1b\\b"), "a\\x1b]2;title\\x1b\\b");
    }

    #[test]
    fn del_and_c1_are_escaped() {
        assert_eq!(line("a\x7fb"), "a\\x7fb");
        assert_eq!(line("a\u{9b}31mb\u{85}"), "a\\x9b31mb\\x85");
        assert_eq!(line("\0\x08"), "\\x00\\x08");
    }

    #[test]
    fn bidi_and_invisible_characters_are_escaped() {
        assert_eq!(line("file\u{202e}txt.exe"), "file\\u202etxt.exe");
        assert_eq!(line("\u{2066}a\u{2069}"), "\\u2066a\\u2069");
        assert_eq!(line("zero\u{200b}width\u{feff}"), "zero\\u200bwidth\\ufeff");
        assert_eq!(line("tag\u{E0041}"), "tag\\U000e0041");
    }

    #[test]
    fn printable_unicode_passes_unchanged() {
        for s in [
            "café résumé",
            "日本語のファイル",
            "Ελληνικά",
            "emoji 🦀",
            "plain ascii ~!@#$%^&*()",
        ] {
            assert!(matches!(line(s), Cow::Borrowed(_)), "{s}");
            assert_eq!(text(s), s);
        }
    }

    #[test]
    fn text_keeps_its_lines_and_escapes_within_them() {
        let out = "NAME\nevil\x1b[2J.txt\tx\nok\n";
        assert_eq!(text(out), "NAME\nevil\\x1b[2J.txt\tx\nok\n");
        assert_eq!(text("a\r\nb\r\n"), "a\nb\n");
        assert_eq!(text("fake\roverwrite"), "fake\\x0doverwrite");
    }

    #[test]
    fn line_escapes_line_breaks() {
        assert_eq!(line("a\nb\tc\r"), "a\\x0ab\\x09c\\x0d");
        assert_eq!(line("a\u{2028}b"), "a\\u2028b");
    }

    #[test]
    fn json_stays_exact_when_parsed() {
        let value = serde_json::json!({
            "name": EVIL,
            "cmd": "x\u{202e}y\u{9b}z\x7f",
            "tag": "t\u{E0041}",
            "ok": "日本 é",
        });
        let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
        let shown = json(&pretty);
        assert!(
            !shown.chars().any(|c| is_dangerous(c) && c != '\n'),
            "{shown}"
        );
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap_or_default();
        assert_eq!(back, value);
        assert!(shown.contains("日本 é"));
    }
}
