//! Configuration plumbing every workload uses: `--set section.key=value` overrides on
//! a TOML table (values parsed as TOML, or taken as strings).

use crate::{Error, Result};

fn parse_value(raw: &str) -> toml::Value {
    // A bare word that is not valid TOML (e.g. `gru`, a path) is taken as a string.
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Sets `path` (`section.key`) in a TOML table to `raw` (parsed as TOML, or taken as a
/// string).
pub fn set_override(table: &mut toml::Table, path: &str, raw: &str) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!("override '{path}': empty key")));
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| Error::Config(format!("override '{path}': '{p}' is not a section")))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), parse_value(raw));
    Ok(())
}
