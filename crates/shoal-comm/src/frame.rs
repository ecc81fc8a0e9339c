//! The wire format of one message: a 24-byte header (magic `SHL1`, version, kind, tag,
//! payload length) followed by the payload. The length is checked against a configured
//! maximum before anything is allocated or read, so a garbage or hostile header fails
//! that connection with a clear error instead of exhausting memory.

use crate::{Error, Result};
use std::io::{IoSlice, Read, Write};

pub const MAGIC: [u8; 4] = *b"SHL1";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
/// Default largest payload accepted (1 GiB).
pub const DEFAULT_MAX_PAYLOAD: u64 = 1 << 30;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Collective or point-to-point data.
    Data = 1,
    /// Connection handshake: the sender's rank and the job token.
    Hello = 2,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub tag: u32,
    pub len: u64,
}

impl Header {
    /// The 24 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.tag.to_le_bytes());
        // 12..16 reserved (zero)
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses and validates header bytes received from `peer`.
    pub fn decode(b: &[u8; HEADER_LEN], peer: usize, max_payload: u64) -> Result<Self> {
        let bad = |why: String| Error::Frame { peer, why };
        if b[0..4] != MAGIC {
            return Err(bad(format!(
                "bad magic {:02x?} (expected \"SHL1\")",
                &b[0..4]
            )));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(bad(format!(
                "protocol version {version}, this build speaks {VERSION}"
            )));
        }
        let kind = match u16::from_le_bytes([b[6], b[7]]) {
            1 => Kind::Data,
            2 => Kind::Hello,
            k => return Err(bad(format!("unknown frame kind {k}"))),
        };
        let tag = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&b[16..24]);
        let len = u64::from_le_bytes(l);
        if len > max_payload {
            return Err(bad(format!(
                "payload of {len} bytes exceeds the limit of {max_payload}"
            )));
        }
        Ok(Self { kind, tag, len })
    }
}

/// Most payload parts one frame may be gathered from.
pub const MAX_PARTS: usize = 7;

/// Writes one frame: the header, then `parts` back to back as its payload, with
/// vectored writes straight from the callers' buffers (no copy, no allocation).
pub fn write_frame(
    s: &mut impl Write,
    kind: Kind,
    tag: u32,
    parts: &[&[u8]],
    peer: usize,
) -> Result<()> {
    if parts.len() > MAX_PARTS {
        return Err(Error::Mismatch(format!(
            "a frame has at most {MAX_PARTS} parts, got {}",
            parts.len()
        )));
    }
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let h = Header {
        kind,
        tag,
        len: len as u64,
    }
    .encode();
    let mut bufs: [&[u8]; MAX_PARTS + 1] = [&[]; MAX_PARTS + 1];
    bufs[0] = &h;
    bufs[1..=parts.len()].copy_from_slice(parts);
    let mut first = 0;
    // write_all_vectored is unstable: write, then advance over what was written.
    while first < bufs.len() {
        if bufs[first].is_empty() {
            first += 1;
            continue;
        }
        let slices: [IoSlice; MAX_PARTS + 1] =
            std::array::from_fn(|i| IoSlice::new(if i >= first { bufs[i] } else { &[] }));
        let mut n = s.write_vectored(&slices).map_err(|source| Error::Io {
            what: match past_deadline(&source) {
                true => format!("sending to rank {peer}: it took nothing within the deadline"),
                false => format!("sending to rank {peer}"),
            },
            source,
        })?;
        if n == 0 {
            return Err(Error::Disconnected { peer });
        }
        for b in bufs[first..].iter_mut() {
            let k = n.min(b.len());
            *b = &b[k..];
            n -= k;
        }
    }
    Ok(())
}

/// Whether a socket error is its timeout running out (`SO_RCVTIMEO`/`SO_SNDTIMEO` say
/// "would block").
fn past_deadline(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Fills `buf` from the stream; end of stream is [`Error::Disconnected`].
pub fn read_exact(s: &mut impl Read, buf: &mut [u8], peer: usize) -> Result<()> {
    s.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Disconnected { peer }
        } else {
            Error::Io {
                what: match past_deadline(&e) {
                    true => format!("receiving from rank {peer}: nothing came within the deadline"),
                    false => format!("receiving from rank {peer}"),
                },
                source: e,
            }
        }
    })
}

/// Reads and validates one header.
pub fn read_header(s: &mut impl Read, peer: usize, max_payload: u64) -> Result<Header> {
    let mut hb = [0u8; HEADER_LEN];
    read_exact(s, &mut hb, peer)?;
    Header::decode(&hb, peer, max_payload)
}

/// The bytes of an `f32` slice (little-endian machines only, as the wire format).
pub(crate) fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; every byte may be read as u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// The bytes of an `f32` slice, writable: any bytes written are a valid f32.
pub(crate) fn f32_bytes_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, std::mem::size_of_val(x)) }
}

/// The bytes of a `u64` slice.
pub(crate) fn u64_bytes(x: &[u64]) -> &[u8] {
    // SAFETY: u64 has no padding; every byte may be read as u8.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

#[cfg(target_endian = "big")]
compile_error!("shoal-comm's wire format is little-endian and reinterprets buffers in place");

/// Whether `presented` is the job token `expected`, compared in time that depends only
/// on the lengths (not on where the first difference is).
pub fn same_token(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_gather_parts_and_read_back() {
        let mut wire = Vec::new();
        write_frame(&mut wire, Kind::Data, 9, &[b"ab", b"", b"cde"], 1).unwrap();
        let mut r = &wire[..];
        let h = read_header(&mut r, 1, 100).unwrap();
        assert_eq!((h.tag, h.len), (9, 5));
        let mut body = [0u8; 5];
        read_exact(&mut r, &mut body, 1).unwrap();
        assert_eq!(&body, b"abcde");
        let e = read_exact(&mut r, &mut body, 1).unwrap_err().to_string();
        assert!(e.contains("rank 1"), "{e}");
    }

    #[test]
    fn round_trip_and_rejections() {
        let h = Header {
            kind: Kind::Data,
            tag: 77,
            len: 12345,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b, 1, 1 << 20).unwrap(), h);
        let e = Header::decode(&b, 1, 100).unwrap_err().to_string();
        assert!(
            e.contains("exceeds the limit") && e.contains("rank 1"),
            "{e}"
        );
        let mut g = b;
        g[0] = b'X';
        assert!(Header::decode(&g, 3, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut v = b;
        v[4] = 9;
        assert!(Header::decode(&v, 3, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let mut k = b;
        k[6] = 99;
        assert!(Header::decode(&k, 3, 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("kind"));
    }
}
