//! int8 quantization: per-output-channel symmetric weights (`w = scale[r] * q`, q in
//! -127..=127) and the int8 product: each input row quantized on the fly (dynamic, one
//! scale per row), products accumulated in i32, rescaled once per output.

use crate::{Error, Result};
use rayon::prelude::*;

/// A `rows x cols` matrix as int8 with one scale per row (output channel).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantI8 {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
}

/// Symmetric int8 of a slice: the scale (`max|v| / 127`, 1 for all zeros) and codes.
pub fn quantize_row(v: &[f32], q: &mut [i8]) -> f32 {
    let m = v.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    let scale = if m > 0.0 { m / 127.0 } else { 1.0 };
    for (o, &x) in q.iter_mut().zip(v) {
        *o = (x / scale).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

impl QuantI8 {
    /// Quantizes the row-major `w` (`rows x cols`), one scale per row.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols || cols == 0 {
            return Err(Error::Shape(format!(
                "{} values for {rows}x{cols}",
                w.len()
            )));
        }
        let mut q = vec![0i8; rows * cols];
        let scale = w
            .chunks(cols)
            .zip(q.chunks_mut(cols))
            .map(|(r, qr)| quantize_row(r, qr))
            .collect();
        Ok(Self {
            rows,
            cols,
            q,
            scale,
        })
    }

    /// The dequantized matrix (what the int8 model computes with, as f32).
    pub fn to_dense(&self) -> Vec<f32> {
        self.q
            .chunks(self.cols)
            .zip(&self.scale)
            .flat_map(|(r, &s)| r.iter().map(move |&v| v as f32 * s))
            .collect()
    }

    /// `y[b, r] = bias[r] + sum_c x[b, c] * W[r, c]` with `x` quantized per row to int8
    /// (`xq` is scratch) and i32 accumulation.
    pub fn matmul_t(&self, x: &[f32], batch: usize, bias: &[f32], xq: &mut Vec<i8>, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        xq.resize(batch * cols, 0);
        let xs: Vec<f32> = x
            .chunks(cols)
            .zip(xq.chunks_mut(cols))
            .map(|(r, q)| quantize_row(r, q))
            .collect();
        let xq = &xq[..];
        y.par_chunks_mut(rows).enumerate().for_each(|(b, yr)| {
            let xb = &xq[b * cols..(b + 1) * cols];
            for (r, o) in yr.iter_mut().enumerate() {
                let wr = &self.q[r * cols..(r + 1) * cols];
                *o = bias[r] + dot_i8(wr, xb) as f32 * self.scale[r] * xs[b];
            }
        });
    }
}

/// The i32 dot product of two int8 vectors (widened to i16 pairs, which vectorises).
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let chunks = a.len() / 16;
    for i in 0..chunks {
        let (x, y) = (&a[i * 16..i * 16 + 16], &b[i * 16..i * 16 + 16]);
        for j in 0..16 {
            acc[j] += x[j] as i16 as i32 * y[j] as i16 as i32;
        }
    }
    let mut s: i32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] as i32 * b[i] as i32;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_is_within_half_a_step_and_the_product_close() {
        let (rows, cols) = (9, 37);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.91).sin() * (1 + i % 5) as f32)
            .collect();
        let m = QuantI8::from_dense(&w, rows, cols).unwrap();
        let back = m.to_dense();
        for r in 0..rows {
            for c in 0..cols {
                assert!((back[r * cols + c] - w[r * cols + c]).abs() <= m.scale[r] * 0.5 + 1e-6);
            }
        }
        let batch = 3;
        let x: Vec<f32> = (0..batch * cols).map(|i| (i as f32 * 0.3).cos()).collect();
        let bias = vec![0.5; rows];
        let mut y = vec![0.0; batch * rows];
        m.matmul_t(&x, batch, &bias, &mut Vec::new(), &mut y);
        for b in 0..batch {
            for r in 0..rows {
                let want: f32 = bias[r]
                    + (0..cols)
                        .map(|c| x[b * cols + c] * w[r * cols + c])
                        .sum::<f32>();
                let norm: f32 = (0..cols)
                    .map(|c| (x[b * cols + c] * w[r * cols + c]).abs())
                    .sum();
                assert!(
                    (y[b * rows + r] - want).abs() < 0.02 * norm,
                    "{} vs {want}",
                    y[b * rows + r]
                );
            }
        }
        assert_eq!(dot_i8(&[1, -2, 3], &[4, 5, -6]), 4 - 10 - 18);
    }
}
