//! Compressed CNN files (`.shoalz`): a model or an error, never a panic, and no length
//! field allocates past what the file holds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = shoal_cnn::compress::decode(data, Path::new("fuzz.shoalz"));
});
