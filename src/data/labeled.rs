//! Labelled texts for classification: JSONL `{"text": …, "label": …}` (label a string or an
//! integer) or CSV with a header naming `text` and `label` columns (RFC 4180 quoting, fields may
//! span lines). Every row keeps its `file:line` for error messages.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Labeled {
    pub text: String,
    pub label: String,
    pub at: String,
}

pub fn read_labeled(path: &Path) -> Result<Vec<Labeled>> {
    let rows = if path.extension().is_some_and(|e| e == "csv") {
        let text = crate::input::read_text(path, crate::input::MAX_FILE_BYTES)?;
        // Spreadsheet exports often start with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        read_csv(text, &path.display().to_string())?
    } else {
        read_jsonl(crate::input::lines(path)?, &path.display().to_string())?
    };
    if rows.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(rows)
}

fn read_jsonl(
    lines: impl Iterator<Item = Result<(usize, String)>>,
    file: &str,
) -> Result<Vec<Labeled>> {
    let mut out = Vec::new();
    for item in lines {
        let (i, line) = item?;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{file}:{i}");
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{at}: invalid JSON"))?;
        let t = match v.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!("{at}: expected a string \"text\""),
        };
        let label = match v.get("label") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => bail!("{at}: expected \"label\" as a string or an integer"),
        };
        out.push(Labeled { text: t, label, at });
    }
    Ok(out)
}

/// Splits CSV text into records of fields, with the line each record starts on.
fn csv_records(text: &str, file: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let mut out = Vec::new();
    let (mut rec, mut field) = (Vec::new(), String::new());
    let (mut line, mut start) = (1, 1);
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => rec.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                rec.push(std::mem::take(&mut field));
                if !(rec.len() == 1 && rec[0].is_empty()) {
                    out.push((start, std::mem::take(&mut rec)));
                }
                rec.clear();
                line += 1;
                start = line;
            }
            (_, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
        }
    }
    if quoted {
        bail!("{file}:{start}: unterminated quoted field");
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        out.push((start, rec));
    }
    Ok(out)
}

fn read_csv(text: &str, file: &str) -> Result<Vec<Labeled>> {
    let recs = csv_records(text, file)?;
    let Some((_, header)) = recs.first() else {
        return Ok(Vec::new());
    };
    let col = |n: &str| {
        header
            .iter()
            .position(|h| h.trim() == n)
            .with_context(|| format!("{file}:1: the header has no {n:?} column (found {header:?})"))
    };
    let (ti, li) = (col("text")?, col("label")?);
    recs[1..]
        .iter()
        .map(|(line, r)| {
            let at = format!("{file}:{line}");
            if r.len() != header.len() {
                bail!("{at}: {} fields, the header has {}", r.len(), header.len());
            }
            Ok(Labeled {
                text: r[ti].clone(),
                label: r[li].trim().to_string(),
                at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> impl Iterator<Item = Result<(usize, String)>> + '_ {
        text.lines()
            .enumerate()
            .map(|(i, l)| Ok((i + 1, l.to_string())))
    }

    #[test]
    fn csv_with_quotes_and_multiline_fields() {
        let t = "label,text\npos,\"good, \"\"very\"\" good\"\nneg,\"bad\nreally\"\n\nneg,meh\n";
        let r = read_csv(t, "f.csv").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].text, "good, \"very\" good");
        assert_eq!(
            (r[1].text.as_str(), r[1].at.as_str()),
            ("bad\nreally", "f.csv:3")
        );
        assert_eq!(r[2].at, "f.csv:6");
        let e = read_csv("text,label\na,b,c\n", "f.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.csv:2") && e.contains("3 fields"), "{e}");
    }

    #[test]
    fn jsonl_labels_as_strings_or_integers() {
        let r = read_jsonl(
            lines("{\"text\": \"a\", \"label\": 2}\n{\"text\": \"b\", \"label\": \"x\"}\n"),
            "f",
        )
        .unwrap();
        assert_eq!((r[0].label.as_str(), r[1].label.as_str()), ("2", "x"));
        assert!(read_jsonl(lines("{\"text\": \"a\", \"label\": 1.5}"), "f")
            .unwrap_err()
            .to_string()
            .contains("f:1"));
    }
}
