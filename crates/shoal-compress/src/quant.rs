//! int8 quantization: per-output-channel symmetric weights (`w = scale[r] * q`, q in
//! -127..=127) and the int8 product: each input row quantized on the fly (dynamic, one
//! scale per row), products accumulated in i32, rescaled once per output. On CPUs with
//! AVX-512 VNNI the product runs on `vpdpbusd` (64 multiply-adds an instruction) over
//! 4x4 tiles of (batch rows, output rows), with the activations offset to unsigned
//! (`x + 128`) and the offset taken back through each row's weight sum; elsewhere a
//! portable loop computes the same integers.

use crate::{Error, Result};
use rayon::prelude::*;

/// Row length of the packed layout (one 512-bit register of bytes).
const LANE: usize = 64;

/// A `rows x cols` matrix as int8 with one scale per row (output channel).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantI8 {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    /// `q` with rows padded with zeros to a multiple of 64, and each row's sum.
    packed: Vec<i8>,
    row_sum: Vec<i32>,
}

/// Buffers of the int8 product, reused from call to call.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    q: Vec<i8>,
    xu: Vec<u8>,
    xs: Vec<f32>,
    acc: Vec<i32>,
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

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
        let kp = cols.div_ceil(LANE) * LANE;
        let mut packed = vec![0i8; rows * kp];
        for (dst, src) in packed.chunks_mut(kp).zip(q.chunks(cols)) {
            dst[..cols].copy_from_slice(src);
        }
        let row_sum = q
            .chunks(cols)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Ok(Self {
            rows,
            cols,
            q,
            scale,
            packed,
            row_sum,
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
    /// and i32 accumulation.
    pub fn matmul_t(&self, x: &[f32], batch: usize, bias: &[f32], sc: &mut Scratch, y: &mut [f32]) {
        self.matmul_impl(x, batch, bias, sc, y, vnni())
    }

    /// [`QuantI8::matmul_t`] on the VNNI kernel (`fast`, when the CPU has it) or the
    /// portable loop.
    fn matmul_impl(
        &self,
        x: &[f32],
        batch: usize,
        bias: &[f32],
        sc: &mut Scratch,
        y: &mut [f32],
        fast: bool,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let kp = cols.div_ceil(LANE) * LANE;
        // Activations as u8 = q + 128, padded with 128 (q = 0).
        sc.xu.clear();
        sc.xu.resize(batch * kp, 128);
        sc.xs.clear();
        sc.q.resize(cols, 0);
        for (b, row) in x.chunks(cols).enumerate().take(batch) {
            let s = quantize_row(row, &mut sc.q);
            sc.xs.push(s);
            for (d, &v) in sc.xu[b * kp..b * kp + cols].iter_mut().zip(&sc.q) {
                *d = (v as i16 + 128) as u8;
            }
        }
        // acc[r, b] = sum_c xu[b, c] * q[r, c]; blocks of 4 output rows in parallel.
        sc.acc.resize(rows * batch, 0);
        let (xu, packed) = (&sc.xu[..], &self.packed[..]);
        let fast = fast && vnni();
        sc.acc
            .par_chunks_mut(4 * batch)
            .enumerate()
            .for_each(|(blk, acc)| {
                let r0 = blk * 4;
                let nr = (rows - r0).min(4);
                let w = &packed[r0 * kp..(r0 + nr) * kp];
                #[cfg(target_arch = "x86_64")]
                if fast {
                    // SAFETY: the CPU has the features (checked above); the slices hold
                    // `nr` rows of `kp` weights, `batch` rows of `kp` activations, and
                    // `nr * batch` outputs, which is all the kernel reads and writes.
                    unsafe { tile_vnni(xu, batch, w, nr, kp, acc) };
                    return;
                }
                let _ = fast;
                for ri in 0..nr {
                    for b in 0..batch {
                        acc[ri * batch + b] = w[ri * kp..(ri + 1) * kp]
                            .iter()
                            .zip(&xu[b * kp..(b + 1) * kp])
                            .map(|(&a, &u)| a as i32 * u as i32)
                            .sum();
                    }
                }
            });
        for b in 0..batch {
            for r in 0..rows {
                let v = sc.acc[r * batch + b] - 128 * self.row_sum[r];
                y[b * rows + r] = bias[r] + v as f32 * self.scale[r] * sc.xs[b];
            }
        }
    }
}

/// `acc[ri * batch + b] = sum_k xu[b, k] * w[ri, k]` for `nr` (<= 4) rows of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni(xu: &[u8], batch: usize, w: &[i8], nr: usize, kp: usize, acc: &mut [i32]) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_si512();
    let mut b0 = 0;
    while b0 < batch {
        let nb = (batch - b0).min(4);
        let mut a = [[zero; 4]; 4];
        let mut k = 0;
        while k < kp {
            let mut xs = [zero; 4];
            for (bi, x) in xs.iter_mut().enumerate().take(nb) {
                *x = _mm512_loadu_si512(xu.as_ptr().add((b0 + bi) * kp + k) as *const _);
            }
            let mut ws = [zero; 4];
            for (ri, v) in ws.iter_mut().enumerate().take(nr) {
                *v = _mm512_loadu_si512(w.as_ptr().add(ri * kp + k) as *const _);
            }
            for bi in 0..4 {
                for ri in 0..4 {
                    a[bi][ri] = _mm512_dpbusd_epi32(a[bi][ri], xs[bi], ws[ri]);
                }
            }
            k += LANE;
        }
        for bi in 0..nb {
            for ri in 0..nr {
                acc[ri * batch + b0 + bi] = _mm512_reduce_add_epi32(a[bi][ri]);
            }
        }
        b0 += 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_is_within_half_a_step_and_the_product_exact_in_integers() {
        let (rows, cols) = (9, 137);
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
        for batch in [1, 3, 6] {
            let x: Vec<f32> = (0..batch * cols).map(|i| (i as f32 * 0.3).cos()).collect();
            let bias = vec![0.5; rows];
            let mut y = vec![0.0; batch * rows];
            m.matmul_t(&x, batch, &bias, &mut Scratch::default(), &mut y);
            // The portable loop gives the same integers as the VNNI kernel.
            let mut y2 = vec![0.0; batch * rows];
            m.matmul_impl(&x, batch, &bias, &mut Scratch::default(), &mut y2, false);
            assert_eq!(y, y2);
            // The reference: the same quantized activations, integer dot products.
            for b in 0..batch {
                let mut xq = vec![0i8; cols];
                let sx = quantize_row(&x[b * cols..(b + 1) * cols], &mut xq);
                for r in 0..rows {
                    let dot: i32 = (0..cols)
                        .map(|c| xq[c] as i32 * m.q[r * cols + c] as i32)
                        .sum();
                    let want = 0.5 + dot as f32 * m.scale[r] * sx;
                    assert!(
                        (y[b * rows + r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{} vs {want}",
                        y[b * rows + r]
                    );
                    // And close to the float product.
                    let exact: f32 = 0.5
                        + (0..cols)
                            .map(|c| x[b * cols + c] * w[r * cols + c])
                            .sum::<f32>();
                    let norm: f32 = (0..cols)
                        .map(|c| (x[b * cols + c] * w[r * cols + c]).abs())
                        .sum();
                    assert!((want - exact).abs() < 0.02 * norm);
                }
            }
        }
    }
}
