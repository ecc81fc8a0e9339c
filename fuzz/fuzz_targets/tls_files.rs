//! TLS files: a CA, a certificate and a key (the input's three parts, split at zero
//! bytes) are turned into TLS settings or refused with an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_comm::tls::{Pem, Tls};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let pem = Pem {
        ca: next(),
        cert: next(),
        key: next(),
    };
    let _ = Tls::new(&pem);
});
