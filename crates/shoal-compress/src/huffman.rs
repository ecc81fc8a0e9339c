//! Canonical Huffman coding of byte streams (codes and index gaps of compressed
//! layers): the code lengths are stored (one byte per symbol, limited to 24 bits), the
//! codes derived from them, the bits packed most significant first.

use crate::{Error, Result};

const MAX_LEN: u8 = 24;

/// Code lengths for the symbol counts `freq` (0 for absent symbols), at most 24 bits.
fn lengths(freq: &[u64; 256]) -> [u8; 256] {
    let mut len = [0u8; 256];
    let syms: Vec<usize> = (0..256).filter(|&s| freq[s] > 0).collect();
    match syms.len() {
        0 => return len,
        1 => {
            len[syms[0]] = 1;
            return len;
        }
        _ => {}
    }
    // Package the two lightest nodes until one is left (O(n^2) over at most 256).
    let mut scale = 0;
    loop {
        let mut nodes: Vec<(u64, Vec<usize>)> = syms
            .iter()
            .map(|&s| ((freq[s] >> scale).max(1), vec![s]))
            .collect();
        len = [0u8; 256];
        while nodes.len() > 1 {
            nodes.sort_by_key(|n| std::cmp::Reverse(n.0));
            let (wa, a) = nodes.pop().expect("two nodes");
            let (wb, b) = nodes.pop().expect("two nodes");
            for &s in a.iter().chain(&b) {
                len[s] += 1;
            }
            nodes.push((wa + wb, [a, b].concat()));
        }
        if len.iter().all(|&l| l <= MAX_LEN) {
            return len;
        }
        // Flatten the distribution and try again.
        scale += 2;
    }
}

/// Canonical codes from lengths: (code, length) per symbol.
fn codes(len: &[u8; 256]) -> [(u32, u8); 256] {
    let mut out = [(0u32, 0u8); 256];
    let mut order: Vec<usize> = (0..256).filter(|&s| len[s] > 0).collect();
    order.sort_by_key(|&s| (len[s], s));
    let mut code = 0u32;
    let mut prev = 0u8;
    for (i, &s) in order.iter().enumerate() {
        if i > 0 {
            code = (code + 1) << (len[s] - prev);
        } else {
            code = 0;
        }
        prev = len[s];
        out[s] = (code, len[s]);
    }
    out
}

/// Encodes `data`: 256 length bytes, the symbol count (u64 LE), the packed bits.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut freq = [0u64; 256];
    for &b in data {
        freq[b as usize] += 1;
    }
    let len = lengths(&freq);
    let table = codes(&len);
    let mut out = Vec::with_capacity(264 + data.len() / 2);
    out.extend_from_slice(&len);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let (mut acc, mut nbits) = (0u64, 0u32);
    for &b in data {
        let (c, l) = table[b as usize];
        acc = (acc << l) | c as u64;
        nbits += l as u32;
        while nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
        }
    }
    if nbits > 0 {
        out.push((acc << (8 - nbits)) as u8);
    }
    out
}

/// Decodes what [`encode`] wrote; a truncated or inconsistent stream is an error.
pub fn decode(b: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::Format(format!("Huffman stream: {why}"));
    if b.len() < 264 {
        return Err(bad("shorter than its header"));
    }
    let mut len = [0u8; 256];
    len.copy_from_slice(&b[..256]);
    if len.iter().any(|&l| l > MAX_LEN) {
        return Err(bad("a code longer than 24 bits"));
    }
    let n = u64::from_le_bytes(b[256..264].try_into().expect("8 bytes")) as usize;
    let table = codes(&len);
    // Decoding by (length, code) -> symbol, canonical: per length, the first code and
    // the symbols in order.
    let mut by_len: Vec<Vec<(u32, u8)>> = vec![Vec::new(); MAX_LEN as usize + 1];
    for (s, &(c, l)) in table.iter().enumerate() {
        if l > 0 {
            by_len[l as usize].push((c, s as u8));
        }
    }
    for v in &mut by_len {
        v.sort();
    }
    if n > 0 && by_len.iter().all(|v| v.is_empty()) {
        return Err(bad("symbols but no codes"));
    }
    let bits = &b[264..];
    let mut out = Vec::with_capacity(n);
    let (mut pos, mut code, mut l) = (0usize, 0u32, 0usize);
    while out.len() < n {
        let byte = *bits.get(pos / 8).ok_or_else(|| bad("truncated"))?;
        let bit = (byte >> (7 - pos % 8)) & 1;
        pos += 1;
        code = (code << 1) | bit as u32;
        l += 1;
        if l > MAX_LEN as usize {
            return Err(bad("no code matches"));
        }
        let v = &by_len[l];
        if let (Some(first), Some(last)) = (v.first(), v.last()) {
            if code >= first.0 && code <= last.0 {
                out.push(v[(code - first.0) as usize].1);
                code = 0;
                l = 0;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_compresses_skewed_data() {
        for data in [
            vec![],
            vec![7u8; 100],
            (0..=255u8).collect::<Vec<_>>(),
            (0..10_000u32)
                .map(|i| if i % 10 == 0 { (i % 7) as u8 } else { 3 })
                .collect(),
            // Fibonacci-like counts force long codes (the 24-bit limit).
            (0..40u32)
                .flat_map(|s| std::iter::repeat_n(s as u8, 1usize << (s / 2).min(18)))
                .collect(),
        ] {
            let e = encode(&data);
            assert_eq!(decode(&e).unwrap(), data);
        }
        let skew: Vec<u8> = (0..10_000u32)
            .map(|i| if i % 10 == 0 { 1 } else { 0 })
            .collect();
        assert!(
            encode(&skew).len() < 264 + 10_000 / 7,
            "about a bit per symbol"
        );
        let e = encode(&skew);
        assert!(decode(&e[..e.len() - 10]).is_err());
        assert!(decode(&e[..100]).is_err());
    }
}
