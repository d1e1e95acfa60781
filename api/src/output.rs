//! Rendering a command's structured records as the text that lands in
//! `Command.status.output.content`: a table of the registry's columns, or JSON with every field.

use crate::command::{CommandSpec, OutputFormat};

/// Most bytes of output kept inline in status; the rest is counted and hashed, not stored.
pub const INLINE_LIMIT: usize = 64 * 1024;

/// Renders records in the requested format.
pub fn render(spec: &CommandSpec, records: &[serde_json::Value], format: OutputFormat) -> String {
    match format {
        OutputFormat::Json => serde_json::to_string_pretty(records).unwrap_or_else(|_| "[]".into()),
        OutputFormat::Table => table(spec, records),
    }
}

/// One value as a table cell: arrays joined with commas, on one line.
pub fn cell(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| cell(Some(i)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
    // A table row is one line: a newline inside a value (a command line, a file name)
    // would break the columns.
    .replace(['\n', '\r', '\t'], " ")
}

fn table(spec: &CommandSpec, records: &[serde_json::Value]) -> String {
    if records.is_empty() {
        return "(no results)\n".into();
    }
    let headers: Vec<&str> = spec.columns.iter().map(|c| c.header).collect();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| spec.columns.iter().map(|c| cell(r.get(c.key))).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(w - c.chars().count() + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The first `limit` bytes of `text`, cut at a character boundary, and whether it was cut.
pub fn truncate(text: &str, limit: usize) -> (&str, bool) {
    if text.len() <= limit {
        return (text, false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::find;
    use serde_json::json;

    #[test]
    fn table_shows_the_registry_columns_aligned() {
        let spec = find("processes").expect("processes");
        let records = vec![
            json!({"pid": 1, "ppid": 0, "name": "init", "user": "root", "memory": 1024, "commandLine": "/sbin/init splash"}),
            json!({"pid": 4242, "ppid": 1, "name": "sleep", "user": "alice", "memory": 2, "commandLine": "sleep\n30"}),
        ];
        let t = render(spec, &records, OutputFormat::Table);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        for c in spec.columns {
            assert!(
                lines[0].contains(c.header),
                "header {} missing: {t}",
                c.header
            );
        }
        assert!(
            lines[2].contains("4242") && lines[2].contains("sleep 30"),
            "{t}"
        );
        // Columns line up: the pid column's width is the same in every row.
        let name_at = lines[0].find("NAME").or_else(|| lines[0].find("Name"));
        if let Some(at) = name_at {
            assert_eq!(&lines[2][at..at + 5], "sleep");
        }
    }

    #[test]
    fn json_keeps_every_field() {
        let spec = find("processes").expect("processes");
        let records = vec![json!({"pid": 7, "extra": {"deep": true}})];
        let j = render(spec, &records, OutputFormat::Json);
        let back: Vec<serde_json::Value> = serde_json::from_str(&j).expect("json");
        assert_eq!(back, records);
    }

    #[test]
    fn empty_table_says_so() {
        let spec = find("dir").expect("dir");
        assert_eq!(render(spec, &[], OutputFormat::Table), "(no results)\n");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let s = "aé".repeat(10);
        let (t, cut) = truncate(&s, 4);
        assert!(cut);
        assert_eq!(t, "aéa");
        assert_eq!(truncate("abc", 3), ("abc", false));
    }
}
