//! Subword tokenizer files (JSON): a tokenizer that then encodes a sentence, or an
//! error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_data::SubwordTokenizer;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(t) = SubwordTokenizer::from_json(&s) {
        let _ = t.encode("a man walks his dog in the snow .");
    }
});
