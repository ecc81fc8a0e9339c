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

/// Sets `path` (`section.key`) in a TOML table to a typed value (a flag's).
pub fn set_value(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    set_override(table, path, "0")?;
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .get_mut(*p)
            .and_then(|v| v.as_table_mut())
            .expect("set_override made the sections");
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// `over` laid over `base`: tables merged key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A configuration in layers, as every workload takes one: `T`'s defaults, then the
/// TOML file `file`, then the command line's flags (`flags`: `section.key` and a typed
/// value), then its `--set section.key=value` overrides. Keys `T` does not have are
/// errors that name the key (and the file).
pub fn layered<T>(
    file: Option<&std::path::Path>,
    flags: &[(&str, toml::Value)],
    set: &[(String, String)],
) -> Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let mut table = toml::Table::try_from(T::default())
        .map_err(|e| Error::Config(format!("the defaults: {e}")))?;
    if let Some(p) = file {
        let text = std::fs::read_to_string(p).map_err(crate::io_err(p))?;
        let t: toml::Table =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        // Unknown keys of the file are named with the file.
        toml::Value::Table(t.clone())
            .try_into::<T>()
            .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        merge(&mut table, t);
    }
    over(table, flags, set)
}

/// The command line's layers (flags, then `--set`) laid over a configuration already
/// made (a resumed run's saved one).
pub fn layered_on<T>(base: &T, flags: &[(&str, toml::Value)], set: &[(String, String)]) -> Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let table = toml::Table::try_from(base)
        .map_err(|e| Error::Config(format!("the configuration: {e}")))?;
    over(table, flags, set)
}

/// `flags` then `set` on `table`, read back as a `T`.
fn over<T: serde::de::DeserializeOwned>(
    mut table: toml::Table,
    flags: &[(&str, toml::Value)],
    set: &[(String, String)],
) -> Result<T> {
    for (k, v) in flags {
        set_value(&mut table, k, v.clone())?;
    }
    for (k, v) in set {
        set_override(&mut table, k, v)?;
    }
    toml::Value::Table(table)
        .try_into::<T>()
        .map_err(|e| Error::Config(format!("command line: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: u32,
        b: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        x: f64,
        inner: Inner,
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                a: 1,
                b: "one".into(),
            }
        }
    }

    impl Default for Cfg {
        fn default() -> Self {
            Self {
                x: 0.5,
                inner: Inner::default(),
            }
        }
    }

    /// Each layer overrides the one below, key by key; unknown keys are named.
    #[test]
    fn layers_override_in_order_and_unknown_keys_are_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.toml");
        std::fs::write(&f, "x = 2.0\n[inner]\nb = \"file\"\n").unwrap();
        let c: Cfg = layered(Some(&f), &[], &[]).unwrap();
        assert_eq!((c.x, c.inner.a, c.inner.b.as_str()), (2.0, 1, "file"));
        let c: Cfg = layered(
            Some(&f),
            &[("inner.a", toml::Value::Integer(7))],
            &[("inner.b".into(), "cli".into())],
        )
        .unwrap();
        assert_eq!((c.x, c.inner.a, c.inner.b.as_str()), (2.0, 7, "cli"));
        std::fs::write(&f, "[inner]\nc = 3\n").unwrap();
        let e = layered::<Cfg>(Some(&f), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains('c'), "{e}");
        let e = layered::<Cfg>(None, &[], &[("inner.zz".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("zz"), "{e}");
    }
}
