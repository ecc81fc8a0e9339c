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
        let fast = fast && vnni();
        product_u8(&self.packed, rows, kp, &sc.xu, batch, &mut sc.acc, fast);
        for b in 0..batch {
            for r in 0..rows {
                let v = sc.acc[r * batch + b] - 128 * self.row_sum[r];
                y[b * rows + r] = bias[r] + v as f32 * self.scale[r] * sc.xs[b];
            }
        }
    }
}

/// The i32 products of `rows` packed weight rows with `n` unsigned input rows (both of
/// `kp` bytes), `[rows, n]`; blocks of 4 weight rows in parallel.
fn product_u8(
    packed: &[i8],
    rows: usize,
    kp: usize,
    xu: &[u8],
    n: usize,
    acc: &mut Vec<i32>,
    fast: bool,
) {
    acc.resize(rows * n, 0);
    acc.par_chunks_mut(4 * n)
        .enumerate()
        .for_each(|(blk, acc)| {
            let r0 = blk * 4;
            let nr = (rows - r0).min(4);
            let w = &packed[r0 * kp..(r0 + nr) * kp];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: `fast` only when the CPU has the features; the slices hold `nr`
                // rows of `kp` weights, `n` rows of `kp` inputs, and `nr * n` outputs, which
                // is all the kernel reads and writes.
                unsafe { tile_vnni(xu, n, w, nr, kp, acc) };
                return;
            }
            let _ = fast;
            for ri in 0..nr {
                for j in 0..n {
                    acc[ri * n + j] = w[ri * kp..(ri + 1) * kp]
                        .iter()
                        .zip(&xu[j * kp..(j + 1) * kp])
                        .map(|(&a, &u)| a as i32 * u as i32)
                        .sum();
                }
            }
        });
}

/// A 3x3, padding-1 convolution with int8 weights (one scale per output channel) on
/// unsigned int8 images, laid out for `vpdpbusd` over pixels: the patches as groups of
/// 4 consecutive patch values per pixel (`[k / 4][pixel][4]`), each output channel's
/// 4 weights of a group broadcast to all 16 lanes, so 16 pixels accumulate per
/// instruction with no horizontal sums (small patch lengths make those dominate in a
/// row-times-row product).
#[derive(Debug, Clone)]
pub struct ConvI8 {
    pub cin: usize,
    pub cout: usize,
    /// Weights `[cout, groups]`, 4 int8 codes packed per i32 (patch order
    /// `ci * 9 + ky * 3 + kx`, zero-padded to a multiple of 4).
    w4: Vec<i32>,
    groups: usize,
    /// Per output channel: the weight scale and the sum of codes.
    pub scale: Vec<f32>,
    pub row_sum: Vec<i32>,
}

/// Buffers of [`ConvI8::run`].
#[derive(Debug, Default, Clone)]
pub struct ConvScratch {
    cols: Vec<u8>,
}

impl ConvI8 {
    /// From f32 weights `[cout, cin, 3, 3]`.
    pub fn new(w: &[f32], cout: usize, cin: usize) -> Result<Self> {
        let k = cin * 9;
        let q = QuantI8::from_dense(w, cout, k)?;
        let groups = k.div_ceil(4);
        let mut w4 = vec![0i32; cout * groups];
        for co in 0..cout {
            for g in 0..groups {
                let mut b = [0u8; 4];
                for (j, v) in b.iter_mut().enumerate() {
                    if let Some(&c) = q.q.get(co * k + g * 4 + j).filter(|_| g * 4 + j < k) {
                        *v = c as u8;
                    }
                }
                w4[co * groups + g] = i32::from_le_bytes(b);
            }
        }
        Ok(Self {
            cin,
            cout,
            w4,
            groups,
            scale: q.scale.clone(),
            row_sum: q.row_sum.clone(),
        })
    }

    /// `acc[co * np + p]` = the i32 product of output channel `co` at pixel `p` of the
    /// `[cin, h, w]` unsigned image `xu` (`q + 128`; the offset not taken back), with
    /// `np` = the pixel count rounded up to 32. Output channels in blocks of 4 on the
    /// thread pool when `parallel`.
    pub fn run(
        &self,
        xu: &[u8],
        hw2: (usize, usize),
        sc: &mut ConvScratch,
        acc: &mut Vec<i32>,
        parallel: bool,
    ) -> usize {
        self.run_with(xu, hw2, sc, acc, parallel, vnni())
    }

    fn run_with(
        &self,
        xu: &[u8],
        (h, w): (usize, usize),
        sc: &mut ConvScratch,
        acc: &mut Vec<i32>,
        parallel: bool,
        fast: bool,
    ) -> usize {
        let hw = h * w;
        let np = hw.div_ceil(32) * 32;
        let g_n = self.groups;
        // Patches: cols[(g * np + p) * 4 + j] = patch value g * 4 + j of pixel p.
        let cols = &mut sc.cols;
        cols.clear();
        cols.resize(g_n * np * 4, 128);
        for ci in 0..self.cin {
            let img = &xu[ci * hw..(ci + 1) * hw];
            for ky in 0..3 {
                for kx in 0..3 {
                    let kk = ci * 9 + ky * 3 + kx;
                    let (g, j) = (kk / 4, kk % 4);
                    let plane = &mut cols[g * np * 4..(g * np + hw) * 4];
                    for y in 0..h {
                        let sy = y as isize + ky as isize - 1;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        let row = &img[sy as usize * w..(sy as usize + 1) * w];
                        let dst = &mut plane[y * w * 4..(y + 1) * w * 4];
                        // Output pixel x reads input column x + kx - 1.
                        let (d, r) = match kx {
                            0 => (&mut dst[4..], &row[..w - 1]),
                            1 => (&mut dst[..], row),
                            _ => (&mut dst[..(w - 1) * 4], &row[1..]),
                        };
                        for (px, &v) in d.chunks_exact_mut(4).zip(r) {
                            px[j] = v;
                        }
                    }
                }
            }
        }
        acc.resize(self.cout * np, 0);
        let cols = &cols[..];
        let fast = fast && vnni();
        let block = |(blk, out): (usize, &mut [i32])| {
            let co0 = blk * 4;
            let nco = (self.cout - co0).min(4);
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has the features; `cols` holds `g_n * np * 4` bytes,
                // `w4` `cout * g_n` words, `out` `nco * np` outputs, `np` a multiple of
                // 32: every load and store below stays inside them.
                unsafe {
                    conv_tile_vnni(
                        cols,
                        g_n,
                        np,
                        &self.w4[co0 * g_n..(co0 + nco) * g_n],
                        nco,
                        out,
                    )
                };
                return;
            }
            for r in 0..nco {
                for p in 0..np {
                    let mut s = 0i32;
                    for g in 0..g_n {
                        let wb = self.w4[(co0 + r) * g_n + g].to_le_bytes();
                        for j in 0..4 {
                            s += cols[(g * np + p) * 4 + j] as i32 * wb[j] as i8 as i32;
                        }
                    }
                    out[r * np + p] = s;
                }
            }
        };
        if parallel {
            acc.par_chunks_mut(4 * np).enumerate().for_each(block);
        } else {
            acc.chunks_mut(4 * np).enumerate().for_each(block);
        }
        np
    }
}

/// `out[r * np + p] = sum_g dot4(cols[g][p], w4[r][g])` for `nco` (<= 4) output
/// channels, 32 pixels (two registers) at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn conv_tile_vnni(
    cols: &[u8],
    g_n: usize,
    np: usize,
    w4: &[i32],
    nco: usize,
    out: &mut [i32],
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_si512();
    let mut p0 = 0;
    while p0 < np {
        let mut a = [[zero; 2]; 4];
        for g in 0..g_n {
            let base = cols.as_ptr().add((g * np + p0) * 4);
            let x0 = _mm512_loadu_si512(base as *const _);
            let x1 = _mm512_loadu_si512(base.add(64) as *const _);
            for (r, ar) in a.iter_mut().enumerate().take(nco) {
                let wv = _mm512_set1_epi32(*w4.get_unchecked(r * g_n + g));
                ar[0] = _mm512_dpbusd_epi32(ar[0], x0, wv);
                ar[1] = _mm512_dpbusd_epi32(ar[1], x1, wv);
            }
        }
        for (r, ar) in a.iter().enumerate().take(nco) {
            let o = out.as_mut_ptr().add(r * np + p0);
            _mm512_storeu_si512(o as *mut _, ar[0]);
            _mm512_storeu_si512(o.add(16) as *mut _, ar[1]);
        }
        p0 += 32;
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

    /// The int8 convolution equals a direct integer convolution of the same codes, on
    /// the VNNI kernel and the portable loop, serial and parallel.
    #[test]
    fn int8_convolution_is_exact_in_integers() {
        let (cin, cout, h, w) = (3, 6, 5, 7);
        let wf: Vec<f32> = (0..cout * cin * 9)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let conv = ConvI8::new(&wf, cout, cin).unwrap();
        let q = QuantI8::from_dense(&wf, cout, cin * 9).unwrap();
        let xu: Vec<u8> = (0..cin * h * w).map(|i| (i * 37 % 251) as u8).collect();
        for (fast, par) in [(true, true), (true, false), (false, true)] {
            let mut acc = Vec::new();
            let np = conv.run_with(
                &xu,
                (h, w),
                &mut ConvScratch::default(),
                &mut acc,
                par,
                fast,
            );
            for co in 0..cout {
                for y in 0..h {
                    for x in 0..w {
                        let mut s = 0i32;
                        for ci in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (sy, sx) = (
                                        y as isize + ky as isize - 1,
                                        x as isize + kx as isize - 1,
                                    );
                                    let v =
                                        if sy >= 0 && sx >= 0 && sy < h as isize && sx < w as isize
                                        {
                                            xu[ci * h * w + sy as usize * w + sx as usize] as i32
                                        } else {
                                            128
                                        };
                                    s += v * q.q[co * cin * 9 + ci * 9 + ky * 3 + kx] as i32;
                                }
                            }
                        }
                        assert_eq!(acc[co * np + y * w + x], s, "fast {fast} par {par}");
                    }
                }
            }
        }
    }

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
