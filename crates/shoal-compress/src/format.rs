//! The compressed model file: `SHOALZ01`, a JSON header (the caller's configuration and
//! one record per tensor: shape, sparse or dense, how values are kept, where its bytes
//! are), the tensors' bytes, and a CRC32 of all that. Sparse tensors keep the gaps
//! between their non-zero positions Huffman-coded (a gap of 255 or more is written as
//! 255s, each "skip 255", then the rest); values are f32, int8 with one scale per row,
//! or codebook codes (Huffman-coded) with their shared values in the header.

use crate::{huffman, Error, Result};
use serde::{Deserialize, Serialize};
use shoal_kernels::host::int8::quantize_row;

const MAGIC: &[u8; 8] = b"SHOALZ01";

/// How a tensor's (kept) values are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Values {
    F32,
    /// Symmetric int8, one scale per row (first dimension).
    Int8,
    /// Codes into these shared values.
    Codebook {
        centroids: Vec<f32>,
    },
}

/// One tensor to write: its values as the compressed model computes with them (zeros
/// where pruned, already quantized or shared).
#[derive(Debug, Clone)]
pub struct TensorIn<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
    pub sparse: bool,
    pub values: Values,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    name: String,
    shape: Vec<usize>,
    sparse: bool,
    values: Values,
    /// Bytes of the gap stream (sparse) and of the values, in that order.
    gaps_len: usize,
    values_len: usize,
    /// Non-zero values (sparse) or all of them.
    count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    config: serde_json::Value,
    tensors: Vec<Record>,
}

/// A decoded tensor: name, shape, values (dense, row-major).
pub type TensorOut = (String, Vec<usize>, Vec<f32>);

fn nearest(c: &[f32], v: f32) -> u8 {
    let mut best = 0;
    for (i, &x) in c.iter().enumerate() {
        if (v - x).abs() < (v - c[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// Serialises the tensors with `config` (any JSON the reader needs to rebuild the model).
pub fn write(config: serde_json::Value, tensors: &[TensorIn]) -> Result<Vec<u8>> {
    let mut records = Vec::new();
    let mut payload = Vec::new();
    for t in tensors {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() || t.shape.is_empty() {
            return Err(Error::Shape(format!(
                "{}: {} values for shape {:?}",
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        let rows = t.shape[0];
        let cols = n / rows.max(1);
        // Positions kept, and the gap stream.
        let kept: Vec<usize> = if t.sparse {
            (0..n).filter(|&i| t.data[i] != 0.0).collect()
        } else {
            (0..n).collect()
        };
        let mut gaps_len = 0;
        if t.sparse {
            let mut gaps = Vec::with_capacity(kept.len());
            let mut next = 0usize;
            for &i in &kept {
                let mut g = i - next;
                while g >= 255 {
                    gaps.push(255u8);
                    g -= 255;
                }
                gaps.push(g as u8);
                next = i + 1;
            }
            let enc = huffman::encode(&gaps);
            gaps_len = enc.len();
            payload.extend_from_slice(&enc);
        }
        let start = payload.len();
        match &t.values {
            Values::F32 => {
                for &i in &kept {
                    payload.extend_from_slice(&t.data[i].to_le_bytes());
                }
            }
            Values::Int8 => {
                let mut q = vec![0i8; cols];
                let mut codes = Vec::with_capacity(kept.len());
                for r in 0..rows {
                    let row = &t.data[r * cols..(r + 1) * cols];
                    let s = quantize_row(row, &mut q);
                    payload.extend_from_slice(&s.to_le_bytes());
                    for (c, &v) in q.iter().enumerate() {
                        if !t.sparse || row[c] != 0.0 {
                            codes.push(v as u8);
                        }
                    }
                }
                payload.extend_from_slice(&codes);
            }
            Values::Codebook { centroids } => {
                if centroids.is_empty() || centroids.len() > 256 {
                    return Err(Error::Shape(format!(
                        "{}: {} shared values (1 to 256)",
                        t.name,
                        centroids.len()
                    )));
                }
                let codes: Vec<u8> = kept
                    .iter()
                    .map(|&i| nearest(centroids, t.data[i]))
                    .collect();
                payload.extend_from_slice(&huffman::encode(&codes));
            }
        }
        records.push(Record {
            name: t.name.clone(),
            shape: t.shape.clone(),
            sparse: t.sparse,
            values: t.values.clone(),
            gaps_len,
            values_len: payload.len() - start,
            count: kept.len(),
        });
    }
    let header = serde_json::to_vec(&Header {
        config,
        tensors: records,
    })
    .map_err(|e| Error::Format(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + header.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads a file [`write`] made: the configuration and every tensor, decoded to dense
/// values. A truncated, corrupt or foreign file is an error saying which.
pub fn read(b: &[u8]) -> Result<(serde_json::Value, Vec<TensorOut>)> {
    let bad = |why: String| Error::Format(why);
    if b.len() < 16 || &b[..8] != MAGIC {
        return Err(bad(
            "not a shoal compressed model (no SHOALZ01 magic)".into()
        ));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(bad(
            "checksum mismatch: the file is truncated or corrupt".into()
        ));
    }
    let hl = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let header: Header = body
        .get(12..12 + hl)
        .ok_or_else(|| bad("header runs past the end".into()))
        .and_then(|h| serde_json::from_slice(h).map_err(|e| bad(format!("header: {e}"))))?;
    let mut at = 12 + hl;
    let mut take = |n: usize, what: &str| -> Result<&[u8]> {
        let s = body
            .get(at..at + n)
            .ok_or_else(|| Error::Format(format!("{what} runs past the end")))?;
        at += n;
        Ok(s)
    };
    let mut out = Vec::new();
    for r in header.tensors {
        let n: usize = r.shape.iter().product();
        if r.shape.is_empty() || r.count > n {
            return Err(bad(format!(
                "{}: {} values in shape {:?}",
                r.name, r.count, r.shape
            )));
        }
        let rows = r.shape[0];
        let cols = n / rows.max(1);
        let kept: Vec<usize> = if r.sparse {
            let gaps = huffman::decode(take(r.gaps_len, &r.name)?)?;
            let mut pos = Vec::with_capacity(r.count);
            let mut next = 0usize;
            for g in gaps {
                if g == 255 {
                    next += 255;
                    continue;
                }
                next += g as usize;
                pos.push(next);
                next += 1;
            }
            if pos.len() != r.count || pos.last().is_some_and(|&p| p >= n) {
                return Err(bad(format!("{}: positions do not fit its shape", r.name)));
            }
            pos
        } else {
            (0..n).collect()
        };
        let v = take(r.values_len, &r.name)?;
        let mut dense = vec![0.0f32; n];
        match &r.values {
            Values::F32 => {
                if v.len() != 4 * kept.len() {
                    return Err(bad(format!("{}: {} value bytes", r.name, v.len())));
                }
                for (&i, c) in kept.iter().zip(v.chunks_exact(4)) {
                    dense[i] = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            Values::Int8 => {
                if v.len() != 4 * rows + kept.len() {
                    return Err(bad(format!("{}: {} value bytes", r.name, v.len())));
                }
                let scales: Vec<f32> = v[..4 * rows]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                for (&i, &q) in kept.iter().zip(&v[4 * rows..]) {
                    dense[i] = q as i8 as f32 * scales[i / cols];
                }
            }
            Values::Codebook { centroids } => {
                let codes = huffman::decode(v)?;
                if codes.len() != kept.len() || codes.iter().any(|&c| c as usize >= centroids.len())
                {
                    return Err(bad(format!("{}: codes do not fit its codebook", r.name)));
                }
                for (&i, &c) in kept.iter().zip(&codes) {
                    dense[i] = centroids[c as usize];
                }
            }
        }
        out.push((r.name, r.shape, dense));
    }
    if at != body.len() {
        return Err(bad(format!(
            "{} bytes after the last tensor",
            body.len() - at
        )));
    }
    Ok((header.config, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_round_trips_and_damage_is_caught() {
        let (rows, cols) = (6, 300);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 7 == 0 || i == 1000 {
                    ((i as f32) * 0.13).sin()
                } else {
                    0.0
                }
            })
            .collect();
        let mut q = w.clone();
        for (r, row) in q.chunks_mut(cols).enumerate() {
            let mut codes = vec![0i8; cols];
            let s = quantize_row(&w[r * cols..(r + 1) * cols], &mut codes);
            for (o, c) in row.iter_mut().zip(&codes) {
                *o = *c as f32 * s;
            }
        }
        let cents = vec![-0.5f32, 0.25, 0.75];
        let shared: Vec<f32> = w
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    0.0
                } else {
                    cents[nearest(&cents, v) as usize]
                }
            })
            .collect();
        let cases = [
            (w.clone(), false, Values::F32),
            (w.clone(), true, Values::F32),
            (q.clone(), false, Values::Int8),
            (q.clone(), true, Values::Int8),
            (
                shared.clone(),
                true,
                Values::Codebook {
                    centroids: cents.clone(),
                },
            ),
        ];
        let ins: Vec<TensorIn> = cases
            .iter()
            .enumerate()
            .map(|(i, (d, sparse, v))| TensorIn {
                name: format!("t{i}"),
                shape: vec![rows, cols],
                data: d,
                sparse: *sparse,
                values: v.clone(),
            })
            .collect();
        let bytes = write(serde_json::json!({"model": "x"}), &ins).unwrap();
        let (cfg, out) = read(&bytes).unwrap();
        assert_eq!(cfg["model"], "x");
        for ((d, _, _), (_, shape, got)) in cases.iter().zip(&out) {
            assert_eq!(shape, &vec![rows, cols]);
            for (a, b) in got.iter().zip(d) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
        // Damage anywhere is caught; so are a truncated file and a foreign one.
        let mut bad = bytes.clone();
        bad[40] ^= 1;
        assert!(read(&bad).unwrap_err().to_string().contains("checksum"));
        assert!(read(&bytes[..bytes.len() / 2]).is_err());
        assert!(read(b"PK\x03\x04 not ours at all")
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}
