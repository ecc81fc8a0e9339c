//! The wire format of one message: a 24-byte header (magic `SHL1`, version, kind, tag,
//! payload length) followed by the payload. The length is checked against a configured
//! maximum before anything is allocated or read, so a garbage or hostile header fails
//! that connection with a clear error instead of exhausting memory.

use crate::{Error, Result};

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

#[cfg(test)]
mod tests {
    use super::*;

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
