//! Parallel corpora: the input's bytes up to its first 0xFF are the source side, the
//! rest the target side; either empty-line rule; pairs or an error, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoal_data::{load_parallel, EmptyLines};

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|&b| b == 0xFF).unwrap_or(data.len());
    let src = common::file("src", &data[..cut]);
    let tgt = common::file("tgt", data.get(cut + 1..).unwrap_or(&[]));
    for empty in [EmptyLines::Error, EmptyLines::Skip] {
        let _ = load_parallel(&src, &tgt, empty);
    }
});
