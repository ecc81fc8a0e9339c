//! Helpers shared by the in-process tests of the binary crate: the lock around the
//! engine's process-wide generator, and the rule for missing data.
// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

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
