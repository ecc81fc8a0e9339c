//! A small YAML writer for JSON values (what `kubectl apply -f -` reads): block maps
//! and sequences, strings plain where YAML cannot misread them, JSON-quoted otherwise,
//! multi-line text as literal blocks.

use serde_json::Value;
use std::fmt::Write;

/// The documents, `---` between them.
pub fn documents(values: &[Value]) -> String {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        node(&mut out, v, 0);
    }
    out
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// A block node at `indent` (maps and sequences; anything else on one line).
fn node(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                pad(out, indent);
                entry(out, k, x, indent);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for x in a {
                pad(out, indent);
                item(out, x, indent);
            }
        }
        _ => {
            scalar(out, v, indent);
            out.push('\n');
        }
    }
}

/// `key: value` with the cursor after the indentation.
fn entry(out: &mut String, k: &str, x: &Value, indent: usize) {
    string(out, k, indent, false);
    out.push(':');
    match x {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            node(out, x, indent + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            node(out, x, indent);
        }
        _ => {
            out.push(' ');
            scalar(out, x, indent + 2);
            out.push('\n');
        }
    }
}

/// `- value` with the cursor after the indentation.
fn item(out: &mut String, x: &Value, indent: usize) {
    out.push_str("- ");
    match x {
        Value::Object(m) if !m.is_empty() => {
            for (i, (k, y)) in m.iter().enumerate() {
                if i > 0 {
                    pad(out, indent + 2);
                }
                entry(out, k, y, indent + 2);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, y) in a.iter().enumerate() {
                if i > 0 {
                    pad(out, indent + 2);
                }
                item(out, y, indent + 2);
            }
        }
        _ => {
            scalar(out, x, indent + 2);
            out.push('\n');
        }
    }
}

fn scalar(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => {
            let _ = write!(out, "{b}");
        }
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => string(out, s, indent, true),
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
    }
}

fn string(out: &mut String, s: &str, indent: usize, block_ok: bool) {
    if block_ok && literal_block_ok(s) {
        out.push_str(if s.ends_with('\n') { "|" } else { "|-" });
        for line in s.trim_end_matches('\n').split('\n') {
            out.push('\n');
            if !line.is_empty() {
                pad(out, indent);
                out.push_str(line);
            }
        }
        return;
    }
    if plain_ok(s) {
        out.push_str(s);
    } else {
        // A JSON string is a valid YAML double-quoted scalar.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

/// Multi-line text a literal block keeps exactly: at most one final newline, no
/// leading space on the first line, no control characters but newlines.
fn literal_block_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.ends_with("\n\n")
        && !s.starts_with([' ', '\n'])
        && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
        && !s.split('\n').any(|l| l.ends_with([' ', '\t']))
}

/// True when `s` reads back as this same string unquoted (conservative: anything a
/// YAML 1.1 or 1.2 reader could take for a number, boolean or null is quoted).
fn plain_ok(s: &str) -> bool {
    let first_ok = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '/');
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+".contains(c));
    let special = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "~" | ".inf" | ".nan"
    );
    first_ok && chars_ok && !special && !s.ends_with(':')
}
