//! Frames off the wire, damaged (`shoal_testkit::damaged`): reading a header and its
//! payload from damaged bytes returns the frame or an error naming the peer; none
//! panics, and no length in a header makes the reader allocate past the bound it was
//! given.

use shoal_comm::frame::{read_exact, read_header, write_frame, Kind};
use shoal_testkit::{damaged, never_panics};

#[test]
fn damaged_frames_are_refused_without_a_panic() {
    let mut wire = Vec::new();
    for (kind, tag, payload) in [
        (Kind::Hello, 0u32, &b"\x01\0\0\0\0\0\0\0secret"[..]),
        (Kind::Data, 7, &[1u8, 2, 3, 4, 5, 6, 7, 8][..]),
        (Kind::Data, 9, &[][..]),
    ] {
        write_frame(&mut wire, kind, tag, &[payload], 1).unwrap();
    }
    let max = 1024;
    let read_all = |bytes: &[u8]| -> shoal_comm::Result<usize> {
        let mut r = std::io::Cursor::new(bytes);
        let mut n = 0;
        for _ in 0..3 {
            let h = read_header(&mut r, 1, max)?;
            assert!(h.len <= max, "a header longer than the bound was accepted");
            let mut p = vec![0u8; h.len as usize];
            read_exact(&mut r, &mut p, 1)?;
            n += 1;
        }
        Ok(n)
    };
    assert_eq!(read_all(&wire).unwrap(), 3);
    never_panics("frames", &damaged(&wire, 31, 500), read_all);
}

/// TLS files, damaged: the CA, the certificate and the key each refused with an error
/// (or, where the damage spared them, accepted), never a panic.
#[cfg(feature = "tls")]
#[test]
fn damaged_tls_files_are_refused_without_a_panic() {
    use shoal_comm::tls::{Pem, Tls};
    let good = Pem::generate().unwrap();
    Tls::new(&good).unwrap();
    for (i, part) in [&good.ca, &good.cert, &good.key].into_iter().enumerate() {
        let inputs = damaged(part.as_bytes(), 40 + i as u64, 300);
        never_panics("TLS files", &inputs, |b| {
            let mut p = good.clone();
            let text = String::from_utf8_lossy(b).into_owned();
            match i {
                0 => p.ca = text,
                1 => p.cert = text,
                _ => p.key = text,
            }
            Tls::new(&p).map(|_| ())
        });
    }
}
