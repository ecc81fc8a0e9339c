//! What `shoal info` says of a saved thing (a run, a checkpoint, a model file): what it
//! is, how it was made, its metrics and how to use it, as text or JSON; and the
//! `metrics.json` a trained model keeps beside its tensors (its final scores).

use crate::error::io_err;
use crate::store::write_file_atomically;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file beside a saved model that holds its final scores by name.
pub const METRICS_FILE: &str = "metrics.json";

/// A description of one saved thing; the workload crates fill it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub path: PathBuf,
    /// What it is, in a phrase ("an NMT checkpoint (from `shoal train nmt`)").
    pub what: String,
    /// The machine-readable kind (`nmt-checkpoint`, `nmt-run`, `ctr-model`, ...).
    pub kind: &'static str,
    /// How it was made, in order: a name and its value.
    pub made: Vec<(String, String)>,
    /// Its scores by name (what training or compression measured).
    pub metrics: BTreeMap<String, f64>,
    /// Commands that use it.
    pub usage: Vec<String>,
}

impl Info {
    pub fn new(path: &Path, kind: &'static str, what: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            what: what.into(),
            kind,
            made: Vec::new(),
            metrics: BTreeMap::new(),
            usage: Vec::new(),
        }
    }

    /// Adds a line of how it was made.
    pub fn made(&mut self, name: &str, value: impl std::fmt::Display) -> &mut Self {
        self.made.push((name.to_string(), value.to_string()));
        self
    }

    /// The description as a person reads it.
    pub fn text(&self) -> String {
        let mut s = format!("{}: {}\n", self.path.display(), self.what);
        let width = self
            .made
            .iter()
            .map(|(k, _)| k.len())
            .chain(["metrics".len(), "use".len()])
            .max()
            .unwrap_or(0);
        for (k, v) in &self.made {
            s += &format!("  {k:<width$}  {v}\n");
        }
        let metrics = match self.metrics_text() {
            m if m.is_empty() => "none recorded".to_string(),
            m => m,
        };
        s += &format!("  {:<width$}  {metrics}\n", "metrics");
        for (i, u) in self.usage.iter().enumerate() {
            let label = if i == 0 { "use" } else { "" };
            s += &format!("  {label:<width$}  {u}\n");
        }
        s
    }

    /// The scores in a line (`name value, ...`; empty when there are none).
    pub fn metrics_text(&self) -> String {
        self.metrics
            .iter()
            .map(|(k, v)| format!("{k} {}", number(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The description as one JSON object (`made` as an object in its order's keys).
    pub fn json(&self) -> serde_json::Value {
        let made: serde_json::Map<String, serde_json::Value> = self
            .made
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        serde_json::json!({
            "path": self.path,
            "kind": self.kind,
            "what": self.what,
            "made": made,
            "metrics": self.metrics,
            "usage": self.usage,
        })
    }
}

/// A configuration value's name as the configuration spells it: a unit enum's string,
/// or a tagged table's `kind` (`"?"` for anything else).
pub fn config_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| {
            v.as_str()
                .or_else(|| v.get("kind").and_then(|k| k.as_str()))
                .map(String::from)
        })
        .unwrap_or_else(|| "?".into())
}

/// A score as a person reads it: 4 significant decimals, no trailing noise.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Records `metrics` in `dir`'s `metrics.json` (merged with what is there; atomic).
pub fn record_metrics(dir: &Path, metrics: &[(&str, f64)]) -> Result<()> {
    let mut all = read_metrics(dir)?;
    for (k, v) in metrics {
        if v.is_finite() {
            all.insert(k.to_string(), *v);
        }
    }
    let bytes = serde_json::to_vec_pretty(&all)
        .map_err(|e| Error::Config(format!("writing {METRICS_FILE}: {e}")))?;
    write_file_atomically(&dir.join(METRICS_FILE), &bytes)
}

/// The scores in `dir`'s `metrics.json` (none when it has no such file).
pub fn read_metrics(dir: &Path) -> Result<BTreeMap<String, f64>> {
    let path = dir.join(METRICS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Checkpoint {
            path,
            why: format!("not a table of scores by name: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_merge_and_survive_a_reread() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_metrics(d.path()).unwrap().is_empty());
        record_metrics(d.path(), &[("valid_loss", 3.5), ("bleu", f64::NAN)]).unwrap();
        record_metrics(d.path(), &[("bleu", 15.25)]).unwrap();
        let m = read_metrics(d.path()).unwrap();
        assert_eq!(
            m,
            BTreeMap::from([("bleu".into(), 15.25), ("valid_loss".into(), 3.5)])
        );
        std::fs::write(d.path().join(METRICS_FILE), b"[1, 2").unwrap();
        let e = read_metrics(d.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.json") && e.contains("scores"), "{e}");
    }

    /// Unit enums by their string, tagged tables by their `kind`.
    #[test]
    fn configuration_names_are_the_files_spelling() {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "kebab-case")]
        enum Unit {
            PsSync,
        }
        #[derive(serde::Serialize)]
        #[serde(tag = "kind", rename_all = "kebab-case")]
        enum Tagged {
            LazyAdam { beta1: f32 },
        }
        assert_eq!(config_name(&Unit::PsSync), "ps-sync");
        assert_eq!(config_name(&Tagged::LazyAdam { beta1: 0.9 }), "lazy-adam");
        assert_eq!(config_name(&3), "?");
    }

    #[test]
    fn text_and_json_say_the_same() {
        let mut i = Info::new(Path::new("runs/x"), "cnn-model", "a CNN model");
        i.made("blocks", "8/16").made("trained", "3 epochs");
        i.metrics.insert("top1".into(), 0.8682);
        i.usage
            .push("shoal compress --model runs/x --quant int8".into());
        let t = i.text();
        assert!(t.starts_with("runs/x: a CNN model\n"), "{t}");
        assert!(t.contains("  blocks   8/16\n"), "{t}");
        assert!(t.contains("  metrics  top1 0.8682\n"), "{t}");
        assert!(t.contains("  use      shoal compress"), "{t}");
        let j = i.json();
        assert_eq!(j["made"]["blocks"], "8/16");
        assert_eq!(j["metrics"]["top1"], 0.8682);
        assert_eq!(j["kind"], "cnn-model");
    }
}
