//! Saved CTR models (one `model.safetensors`: the configuration in its metadata, the
//! dense parameters and every row with its optimizer state): the input replaces the file
//! of a valid saved model; loading it for prediction, or reading its configuration,
//! gives a model or an error, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoal_ctr::trainer::{CtrPredictor, CtrTrainConfig};

fuzz_target!(|data: &[u8]| {
    let base = common::ctr_model();
    let dir = common::scratch().join("ctr-model");
    common::copy_dir(base, &dir);
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    let _ = CtrPredictor::load(&dir);
    let _ = CtrTrainConfig::saved_in(&dir);
});
