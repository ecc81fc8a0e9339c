//! Saved CNN models (`meta.json` and `model.safetensors`): the input replaces one file
//! of a valid saved model (its first byte picks which: even `meta.json`, odd
//! `model.safetensors`); loading gives a model or an error, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = common::cnn_model();
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let file = ["meta.json", "model.safetensors"][pick as usize % 2];
    let dir = common::scratch().join("cnn-model");
    common::copy_dir(base, &dir);
    std::fs::write(dir.join(file), bytes).unwrap();
    let _ = shoal_cnn::trainer::CnnModel::load(&dir);
});
