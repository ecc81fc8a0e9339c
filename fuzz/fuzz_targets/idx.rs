//! IDX image files (MNIST's format, plain or gzip'd): the input as the images file
//! against a valid labels file, and as the labels against valid images; images or an
//! error, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoal_data::images::read_idx_pair;

fuzz_target!(|data: &[u8]| {
    let mut images = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    images.extend(0u8..12);
    let labels = [0u8, 0, 8, 1, 0, 0, 0, 2, 3, 7];
    let (vi, vl) = (
        common::file("images", &images),
        common::file("labels", &labels),
    );
    let fi = common::file("fuzz-images", data);
    let _ = read_idx_pair(&fi, &vl, 10);
    let fi_gz = common::file("fuzz-images.gz", data);
    let _ = read_idx_pair(&fi_gz, &vl, 10);
    let fl = common::file("fuzz-labels", data);
    let _ = read_idx_pair(&vi, &fl, 10);
});
