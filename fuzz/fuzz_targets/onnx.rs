//! ONNX files: a CNN or an error naming what is wrong, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::file("model.onnx", data);
    let _ = shoal_cnn::onnx::import(&p);
});
