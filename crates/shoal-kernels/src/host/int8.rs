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
/// `kp` bytes), `[rows, n]`; blocks of 4 weight rows in parallel when `n > 1` (one input
/// row runs on the calling thread: waking the pool costs more than the product, and its
/// spinning workers then compete with the caller on a machine with few cores).
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
    let block = |(blk, acc): (usize, &mut [i32])| {
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
    };
    if n > 1 {
        acc.par_chunks_mut(4 * n).enumerate().for_each(block);
    } else {
        acc.chunks_mut(4 * n).enumerate().for_each(block);
    }
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

/// A 3x3 convolution (padding 1, stride 1) with int8 weights on an unsigned int8 image,
/// computed in place of a matrix product without building patches: the image is held
/// as groups of 4 channels, each a zero-bordered `(H+2) x (W+2)` plane of 4-byte pixels
/// ([`ConvU8::pack`]), so the 4 channels of any pixel are one 32-bit word and 16
/// consecutive pixels one 512-bit load. Output positions run over the bordered grid's
/// rows (`p = y * (W+2) + x`, the 2 border columns computed and ignored), so each of the
/// 9 taps is a fixed offset from `p`: `vpdpbusd` multiplies 16 positions' 4 channels by
/// one output channel's 4 weights, 8 output channels x 32 positions per tile. For
/// activations that are never negative (after ReLU) with zero as code 0, the codes need
/// no offset and the zero border is exact padding.
#[derive(Debug, Clone)]
pub struct ConvU8 {
    pub cin: usize,
    pub cout: usize,
    /// Weights per block of 8 output channels: `[block][tap][cin / 4][8]`, 4 int8 codes
    /// (4 input channels) per i32; output channels beyond `cout` are zeros.
    w8: Vec<i32>,
    /// Per output channel: the weight scale.
    pub scale: Vec<f32>,
}

/// Output channels per tile of [`ConvU8`].
const CO_TILE: usize = 8;

impl ConvU8 {
    /// From f32 weights `[cout, cin, 3, 3]`; `cin` must be a multiple of 4.
    pub fn new(w: &[f32], cout: usize, cin: usize) -> Result<Self> {
        if cin == 0 || !cin.is_multiple_of(4) || cout == 0 {
            return Err(Error::Shape(format!(
                "direct int8 convolution needs input channels in fours (got {cin} -> {cout})"
            )));
        }
        let q = QuantI8::from_dense(w, cout, cin * 9)?;
        let c4n = cin / 4;
        let blocks = cout.div_ceil(CO_TILE);
        let mut w8 = vec![0i32; blocks * 9 * c4n * CO_TILE];
        for co in 0..cout {
            let (blk, r) = (co / CO_TILE, co % CO_TILE);
            for tap in 0..9 {
                for c4 in 0..c4n {
                    let mut b = [0u8; 4];
                    for (j, v) in b.iter_mut().enumerate() {
                        *v = q.q[co * cin * 9 + (c4 * 4 + j) * 9 + tap] as u8;
                    }
                    w8[((blk * 9 + tap) * c4n + c4) * CO_TILE + r] = i32::from_le_bytes(b);
                }
            }
        }
        Ok(Self {
            cin,
            cout,
            w8,
            scale: q.scale,
        })
    }

    /// Positions of the bordered grid one output covers: `h * (w + 2)` rounded up to 32.
    pub fn positions((h, w): (usize, usize)) -> usize {
        (h * (w + 2)).div_ceil(32) * 32
    }

    /// Words per group of 4 channels in the packed image: the bordered plane of pixels
    /// (4 one-byte codes each) and room for the last tile's reads past it.
    pub fn plane_words((h, w): (usize, usize)) -> usize {
        (h + 2) * (w + 2) + 64
    }

    /// Quantizes a `[c, h, w]` image of values >= 0 (`c` a multiple of 4) to codes
    /// `round(v * inv)` (at most 255) and packs them into `out` as [`ConvU8::run`] reads
    /// them (zero border).
    pub fn pack(x: &[f32], c: usize, (h, w): (usize, usize), inv: f32, out: &mut Vec<u32>) {
        assert!(
            c.is_multiple_of(4) && x.len() >= c * h * w,
            "pack: bad image"
        );
        let pw = Self::plane_words((h, w));
        out.clear();
        out.resize(c / 4 * pw, 0);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature; the body is the portable one.
            unsafe { pack_v4(x, c, (h, w), inv, out) };
            return;
        }
        pack_generic(x, c, (h, w), inv, out);
    }
    /// `acc[co * np + p]` = the i32 product of output channel `co` at bordered-grid
    /// position `p = y * (w + 2) + x` (valid for `x < w`) of the packed image `x`;
    /// returns `np` ([`ConvU8::positions`]). Blocks of 8 output channels on the thread
    /// pool when `parallel`.
    pub fn run(&self, x: &[u32], hw2: (usize, usize), acc: &mut Vec<i32>, parallel: bool) -> usize {
        self.run_with(x, hw2, acc, parallel, vnni())
    }

    fn run_with(
        &self,
        x: &[u32],
        (h, w): (usize, usize),
        acc: &mut Vec<i32>,
        parallel: bool,
        fast: bool,
    ) -> usize {
        let np = Self::positions((h, w));
        let pw = Self::plane_words((h, w));
        let c4n = self.cin / 4;
        assert!(x.len() >= c4n * pw, "packed image too short");
        let row = w + 2;
        let blocks = self.cout.div_ceil(CO_TILE);
        acc.resize(blocks * CO_TILE * np, 0);
        let fast = fast && vnni();
        let tile = |(blk, out): (usize, &mut [i32])| {
            let wb = &self.w8[blk * 9 * c4n * CO_TILE..(blk + 1) * 9 * c4n * CO_TILE];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has the features; every read is below word
                // `c4 * pw + np + 2 * row + 2 + 32` of `x`, inside `c4n * pw`
                // (plane_words leaves 64 pixels after the bordered plane); `wb` holds
                // `9 * c4n * 8` words; `out` `8 * np` outputs.
                unsafe { conv_direct_vnni(x, pw, c4n, row, np, wb, out) };
                return;
            }
            for r in 0..CO_TILE {
                for p in 0..np {
                    let mut s = 0i32;
                    for tap in 0..9 {
                        let off = (tap / 3) * row + tap % 3;
                        for c4 in 0..c4n {
                            let wv = wb[(tap * c4n + c4) * CO_TILE + r].to_le_bytes();
                            let xv = x[c4 * pw + p + off].to_le_bytes();
                            for j in 0..4 {
                                s += xv[j] as i32 * wv[j] as i8 as i32;
                            }
                        }
                    }
                    out[r * np + p] = s;
                }
            }
        };
        let acc = &mut acc[..blocks * CO_TILE * np];
        if parallel {
            acc.par_chunks_mut(CO_TILE * np).enumerate().for_each(tile);
        } else {
            acc.chunks_mut(CO_TILE * np).enumerate().for_each(tile);
        }
        np
    }
}

/// [`ConvU8::pack`]'s loop: 4 channel planes at a time, one word per pixel.
#[inline(always)]
fn pack_generic(x: &[f32], c: usize, (h, w): (usize, usize), inv: f32, out: &mut [u32]) {
    let (hw, pw) = (h * w, ConvU8::plane_words((h, w)));
    let code = |v: f32| (v * inv + 0.5).clamp(0.0, 255.0) as u32;
    for c4 in 0..c / 4 {
        let planes = &x[c4 * 4 * hw..(c4 + 1) * 4 * hw];
        let (p0, rest) = planes.split_at(hw);
        let (p1, rest) = rest.split_at(hw);
        let (p2, p3) = rest.split_at(hw);
        let dst = &mut out[c4 * pw..(c4 + 1) * pw];
        for y in 0..h {
            let at = (y + 1) * (w + 2) + 1;
            let r = y * w..(y + 1) * w;
            for ((((d, &a), &b), &cc), &e) in dst[at..at + w]
                .iter_mut()
                .zip(&p0[r.clone()])
                .zip(&p1[r.clone()])
                .zip(&p2[r.clone()])
                .zip(&p3[r])
            {
                *d = code(a) | code(b) << 8 | code(cc) << 16 | code(e) << 24;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_v4(x: &[f32], c: usize, (h, w): (usize, usize), inv: f32, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let (hw, pw) = (h * w, ConvU8::plane_words((h, w)));
    let (vinv, half) = (_mm512_set1_ps(inv), _mm512_set1_ps(0.5));
    let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
    let code = |p: *const f32, m: __mmask16| {
        let v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p), vinv, half);
        _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi))
    };
    for c4 in 0..c / 4 {
        let src = x.as_ptr().add(c4 * 4 * hw);
        let dst = out.as_mut_ptr().add(c4 * pw);
        for y in 0..h {
            let at = dst.add((y + 1) * (w + 2) + 1);
            let mut x0 = 0;
            while x0 < w {
                let m: __mmask16 = if w - x0 >= 16 {
                    0xffff
                } else {
                    (1u16 << (w - x0)) - 1
                };
                let p = src.add(y * w + x0);
                let q0 = code(p, m);
                let q1 = _mm512_slli_epi32::<8>(code(p.add(hw), m));
                let q2 = _mm512_slli_epi32::<16>(code(p.add(2 * hw), m));
                let q3 = _mm512_slli_epi32::<24>(code(p.add(3 * hw), m));
                let word = _mm512_or_si512(_mm512_or_si512(q0, q1), _mm512_or_si512(q2, q3));
                _mm512_mask_storeu_epi32(at.add(x0) as *mut i32, m, word);
                x0 += 16;
            }
        }
    }
}

/// The largest value of `xs` (0 for an empty slice or all values <= 0).
pub fn max_nonneg(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut it = xs.chunks_exact(16);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    it.remainder()
        .iter()
        .chain(lanes.iter())
        .fold(0.0f32, |m, &x| if x > m { x } else { m })
}

/// The output of a [`ConvU8`] for a `[cout, h, w]` image: `max(0, acc * k[co] +
/// shift[co])` for the valid positions of each row into `out`; returns the maximum.
pub fn requant_relu(
    acc: &[i32],
    np: usize,
    (h, w): (usize, usize),
    k: &[f32],
    shift: &[f32],
    out: &mut [f32],
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature; the body is the portable one.
        return unsafe { requant_v4(acc, np, (h, w), k, shift, out) };
    }
    requant_generic(acc, np, (h, w), k, shift, out)
}

#[inline(always)]
fn requant_generic(
    acc: &[i32],
    np: usize,
    (h, w): (usize, usize),
    k: &[f32],
    shift: &[f32],
    out: &mut [f32],
) -> f32 {
    let hw = h * w;
    let mut lanes = [0.0f32; 16];
    for (co, (&kc, &sc)) in k.iter().zip(shift).enumerate() {
        let src = &acc[co * np..co * np + h * (w + 2)];
        let dst = &mut out[co * hw..(co + 1) * hw];
        for (drow, srow) in dst.chunks_exact_mut(w).zip(src.chunks_exact(w + 2)) {
            for (i, (o, &v)) in drow.iter_mut().zip(srow).enumerate() {
                *o = (v as f32 * kc + sc).max(0.0);
                lanes[i % 16] = lanes[i % 16].max(*o);
            }
        }
    }
    lanes.iter().copied().fold(0.0, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn requant_v4(
    acc: &[i32],
    np: usize,
    (h, w): (usize, usize),
    k: &[f32],
    shift: &[f32],
    out: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let hw = h * w;
    let zero = _mm512_setzero_ps();
    let mut best = zero;
    assert!(acc.len() >= (k.len().max(1) - 1) * np + h * (w + 2) && out.len() >= k.len() * hw);
    for (co, (&kc, &sc)) in k.iter().zip(shift).enumerate() {
        let (vk, vs) = (_mm512_set1_ps(kc), _mm512_set1_ps(sc));
        for y in 0..h {
            let src = acc.as_ptr().add(co * np + y * (w + 2));
            let dst = out.as_mut_ptr().add(co * hw + y * w);
            let mut x0 = 0;
            while x0 < w {
                let m: __mmask16 = if w - x0 >= 16 {
                    0xffff
                } else {
                    (1u16 << (w - x0)) - 1
                };
                let v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, src.add(x0)));
                let o = _mm512_max_ps(_mm512_fmadd_ps(v, vk, vs), zero);
                _mm512_mask_storeu_ps(dst.add(x0), m, o);
                best = _mm512_max_ps(best, o);
                x0 += 16;
            }
        }
    }
    _mm512_reduce_max_ps(best)
}

/// One block of 8 output channels of [`ConvU8`], 32 positions at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn conv_direct_vnni(
    x: &[u32],
    pw: usize,
    c4n: usize,
    row: usize,
    np: usize,
    wb: &[i32],
    out: &mut [i32],
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_si512();
    let xp = x.as_ptr();
    let mut p0 = 0;
    while p0 < np {
        let mut a = [[zero; 2]; CO_TILE];
        for tap in 0..9 {
            let off = (tap / 3) * row + tap % 3;
            for c4 in 0..c4n {
                let base = xp.add(c4 * pw + p0 + off);
                let x0 = _mm512_loadu_si512(base as *const _);
                let x1 = _mm512_loadu_si512(base.add(16) as *const _);
                let wp = wb.as_ptr().add((tap * c4n + c4) * CO_TILE);
                for (r, ar) in a.iter_mut().enumerate() {
                    let wv = _mm512_set1_epi32(*wp.add(r));
                    ar[0] = _mm512_dpbusd_epi32(ar[0], x0, wv);
                    ar[1] = _mm512_dpbusd_epi32(ar[1], x1, wv);
                }
            }
        }
        for (r, ar) in a.iter().enumerate() {
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

    /// Weights `[cout, cin, 3, 3]` (f32 and their int8 codes) and an unsigned image
    /// `[cin, h, w]` for the convolution tests.
    fn conv_case(cin: usize, cout: usize, (h, w): (usize, usize)) -> (Vec<f32>, QuantI8, Vec<u8>) {
        let wf: Vec<f32> = (0..cout * cin * 9)
            .map(|i| (i as f32 * 0.53).cos())
            .collect();
        let q = QuantI8::from_dense(&wf, cout, cin * 9).unwrap();
        let xu: Vec<u8> = (0..cin * h * w).map(|i| (i * 53 % 256) as u8).collect();
        (wf, q, xu)
    }

    /// Every output `acc[co * np + y * row + x]` equals the integer 3x3 convolution
    /// (padding 1, `pad` outside) of the codes `xu` with the codes of `q`.
    fn assert_exact(
        acc: &[i32],
        (np, row): (usize, usize),
        xu: &[u8],
        q: &QuantI8,
        (cin, h, w): (usize, usize, usize),
        pad: i32,
        what: &str,
    ) {
        for co in 0..q.rows {
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0i32;
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) = (y + ky, x + kx);
                                let v = if sy < 1 || sx < 1 || sy > h || sx > w {
                                    pad
                                } else {
                                    xu[ci * h * w + (sy - 1) * w + sx - 1] as i32
                                };
                                s += v * q.q[co * cin * 9 + ci * 9 + ky * 3 + kx] as i32;
                            }
                        }
                    }
                    assert_eq!(acc[co * np + y * row + x], s, "{what}: ({co}, {y}, {x})");
                }
            }
        }
    }

    /// Whether the VNNI kernels can be compared with the portable loops here. Without
    /// VNNI both sides run the portable loop: a failure under CI (the kernels would go
    /// untested), a notice elsewhere.
    fn vnni_checked() -> bool {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        if !vnni() {
            assert!(
                !ci,
                "this CPU has no AVX-512 VNNI: the int8 kernels go untested in CI"
            );
            eprintln!("notice: no AVX-512 VNNI here; the VNNI kernels are not compared");
        }
        vnni()
    }

    /// The direct convolution equals the integer convolution of the same codes with zero
    /// padding, on the VNNI kernel and the portable loop, for output channels not a
    /// multiple of the tile.
    #[test]
    fn direct_int8_convolution_is_exact_in_integers() {
        vnni_checked();
        let (cin, cout, h, w) = (8, 11, 6, 9);
        let (wf, q, xu) = conv_case(cin, cout, (h, w));
        let conv = ConvU8::new(&wf, cout, cin).unwrap();
        let xf: Vec<f32> = xu.iter().map(|&v| v as f32 * 0.5).collect();
        let mut packed = Vec::new();
        ConvU8::pack(&xf, cin, (h, w), 2.0, &mut packed);
        for (fast, par) in [(true, true), (true, false), (false, false)] {
            let mut acc = Vec::new();
            let np = conv.run_with(&packed, (h, w), &mut acc, par, fast);
            let what = format!("fast {fast} par {par}");
            assert_exact(&acc, (np, w + 2), &xu, &q, (cin, h, w), 0, &what);
        }
        assert!(ConvU8::new(&wf[..cout * 3 * 9], cout, 3).is_err());
    }

    /// The int8 convolution equals the integer convolution of the same codes (offset
    /// codes, so the padding is 128), on the VNNI kernel and the portable loop, serial
    /// and parallel.
    #[test]
    fn int8_convolution_is_exact_in_integers() {
        vnni_checked();
        let (cin, cout, h, w) = (3, 6, 5, 7);
        let (wf, q, xu) = conv_case(cin, cout, (h, w));
        let conv = ConvI8::new(&wf, cout, cin).unwrap();
        for (fast, par) in [(true, true), (true, false), (false, true)] {
            let mut acc = Vec::new();
            let mut sc = ConvScratch::default();
            let np = conv.run_with(&xu, (h, w), &mut sc, &mut acc, par, fast);
            let what = format!("fast {fast} par {par}");
            assert_exact(&acc, (np, w), &xu, &q, (cin, h, w), 128, &what);
        }
    }

    #[test]
    fn int8_is_within_half_a_step_and_the_product_exact_in_integers() {
        vnni_checked();
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
                    // The same integers times the same two scales, in another order: a
                    // few roundings of f32.
                    assert!(
                        (y[b * rows + r] - want).abs() <= 1e-6 * want.abs().max(1.0),
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
