//! Configuration: the input as a TOML file of the CTR and of the CNN trainer, and its
//! lines as `--set key=value` overrides of their defaults; each read (and validated) or
//! refused with an error naming the key, never a panic.
#![no_main]
#[path = "common.rs"]
mod common;
use libfuzzer_sys::fuzz_target;
use shoal_cnn::trainer::CnnTrainConfig;
use shoal_ctr::trainer::CtrTrainConfig;
use shoal_runtime::config::layered;

fuzz_target!(|data: &[u8]| {
    let p = common::file("config.toml", data);
    if let Ok(c) = layered::<CtrTrainConfig>(Some(&p), &[], &[]) {
        let _ = c.validate();
    }
    if let Ok(c) = layered::<CnnTrainConfig>(Some(&p), &[], &[]) {
        let _ = c.validate();
    }
    let text = String::from_utf8_lossy(data);
    let set: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .take(16)
        .collect();
    if let Ok(c) = layered::<CtrTrainConfig>(None, &[], &set) {
        let _ = c.validate();
    }
    if let Ok(c) = layered::<CnnTrainConfig>(None, &[], &set) {
        let _ = c.validate();
    }
});
