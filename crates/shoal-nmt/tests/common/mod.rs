//! Helpers shared by the training tests: a small slice of Multi30k, a tiny model, the
//! lock around the engine's process-wide generator, and the rule for missing data.
// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use shoal_nmt::NmtTrainConfig;
use std::path::Path;
use std::sync::Mutex;

/// Held while a model is seeded and initialised: the engine's random generator is one
/// per process, and tests run on parallel threads (two initialisations interleaving
/// their draws would give both models other weights).
pub static INIT: Mutex<()> = Mutex::new(());

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `true` when `available`; otherwise a failure under CI (missing data or a missing
/// capability is a defect there), and elsewhere a notice and `false` (skip).
pub fn require(available: bool, what: &str) -> bool {
    if !available {
        assert!(!in_ci(), "{what} is missing, and this is CI: install it");
        eprintln!("notice: {what} is missing; this test is skipped (it fails under CI)");
    }
    available
}

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");

/// Writes the first `n` pairs of Multi30k train/val into `dir`.
pub fn slice(dir: &Path, n: usize) {
    for (from, to) in [
        ("train.en", "train.en"),
        ("train.de", "train.de"),
        ("val.en", "val.en"),
        ("val.de", "val.de"),
    ] {
        let text = std::fs::read_to_string(Path::new(DATA).join(from)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.join(to), lines.join("\n") + "\n").unwrap();
    }
}

pub fn config(dir: &Path, extra: &[(&str, &str)]) -> NmtTrainConfig {
    let mut o: Vec<(String, String)> = vec![
        ("data.train_src", dir.join("train.en").display().to_string()),
        ("data.train_tgt", dir.join("train.de").display().to_string()),
        ("data.valid_src", dir.join("val.en").display().to_string()),
        ("data.valid_tgt", dir.join("val.de").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), format!("{v:?}")))
    .collect();
    for (k, v) in [
        ("data.src_vocab", "300"),
        ("data.tgt_vocab", "300"),
        ("data.max_len", "16"),
        ("model.embed", "16"),
        ("model.hidden", "16"),
        ("model.layers", "2"),
        ("model.dropout", "0.2"),
        ("train.batch_size", "16"),
        ("train.epochs", "2"),
        ("train.warmup_steps", "5"),
        ("train.checkpoint_every", "0"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        o.push((k.to_string(), v.to_string()));
    }
    NmtTrainConfig::load(None, &o).unwrap()
}
