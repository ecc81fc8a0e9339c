//! Click logs in every format (CSV with a header, libffm, libsvm), failing on the first
//! bad row or skipping bad rows: rows or an error, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoal_data::ctr::{read_click_log, BadRows};

fuzz_target!(|data: &[u8]| {
    let p = common::file("clicks", data);
    for bad in [BadRows::Fail, BadRows::Skip] {
        let _ = read_click_log(&p, bad);
    }
});
