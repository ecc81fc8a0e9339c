//! Data-plane frames off the wire: headers and payloads read from arbitrary bytes
//! return frames or errors, and no header's length makes the reader allocate past the
//! bound it was given.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_comm::frame::{read_exact, read_header};

const MAX: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    for _ in 0..16 {
        let Ok(h) = read_header(&mut r, 1, MAX) else {
            break;
        };
        assert!(h.len <= MAX, "a header over the bound was accepted");
        let mut p = vec![0u8; h.len as usize];
        if read_exact(&mut r, &mut p, 1).is_err() {
            break;
        }
    }
});
