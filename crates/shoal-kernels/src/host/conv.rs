//! Host kernels of the CNN: 3x3 same-padding convolution by im2col and matrix products
//! (forward, and backward to the weights and the input), 2x2 max pooling, batch
//! normalisation over (batch, height, width) per channel. Images are `[C, H, W]`
//! row-major, batches `[B, C, H, W]`.

use super::sgemm;
use rayon::prelude::*;

/// `cols[(c * 9 + ky * 3 + kx), y * w + x] = x[c, y + ky - 1, x + kx - 1]` (0 outside).
pub fn im2col3(x: &[f32], c: usize, h: usize, w: usize, cols: &mut [f32]) {
    let hw = h * w;
    debug_assert_eq!(cols.len(), c * 9 * hw);
    for ci in 0..c {
        let img = &x[ci * hw..(ci + 1) * hw];
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut cols[(ci * 9 + ky * 3 + kx) * hw..(ci * 9 + ky * 3 + kx + 1) * hw];
                for y in 0..h {
                    let sy = y as isize + ky as isize - 1;
                    let dst = &mut row[y * w..(y + 1) * w];
                    if sy < 0 || sy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &img[sy as usize * w..(sy as usize + 1) * w];
                    match kx {
                        0 => {
                            dst[0] = 0.0;
                            dst[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => dst.copy_from_slice(src),
                        _ => {
                            dst[..w - 1].copy_from_slice(&src[1..]);
                            dst[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Adds `cols` (as [`im2col3`] lays them out) back into the image `dx`.
pub fn col2im3_add(cols: &[f32], c: usize, h: usize, w: usize, dx: &mut [f32]) {
    let hw = h * w;
    for ci in 0..c {
        let img = &mut dx[ci * hw..(ci + 1) * hw];
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &cols[(ci * 9 + ky * 3 + kx) * hw..(ci * 9 + ky * 3 + kx + 1) * hw];
                for y in 0..h {
                    let sy = y as isize + ky as isize - 1;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    let src = &row[y * w..(y + 1) * w];
                    let dst = &mut img[sy as usize * w..(sy as usize + 1) * w];
                    match kx {
                        0 => dst[..w - 1]
                            .iter_mut()
                            .zip(&src[1..])
                            .for_each(|(d, s)| *d += s),
                        1 => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
                        _ => dst[1..]
                            .iter_mut()
                            .zip(&src[..w - 1])
                            .for_each(|(d, s)| *d += s),
                    }
                }
            }
        }
    }
}

/// One image: `z[co, :] = W[co, :] . cols` (+ `bias[co]` when given), `W` `[cout, cin*9]`;
/// the product on `threads` threads.
#[allow(clippy::too_many_arguments)]
pub fn conv3_forward(
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    wt: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
    cols: &mut [f32],
    z: &mut [f32],
    threads: usize,
) {
    let hw = h * w;
    im2col3(x, cin, h, w, cols);
    match bias {
        Some(b) => {
            for (co, row) in z.chunks_mut(hw).enumerate() {
                row.fill(b[co]);
            }
        }
        None => z.fill(0.0),
    }
    sgemm(
        cout,
        hw,
        cin * 9,
        wt,
        cin * 9,
        1,
        cols,
        hw,
        1,
        z,
        hw,
        true,
        threads,
    );
}

/// One image's backward: `dw += dz . cols^T`, `db += sum(dz)` per channel when given,
/// and, when `dx` is given, `dx = col2im(W^T . dz)` (`dcols` is scratch).
#[allow(clippy::too_many_arguments)]
pub fn conv3_backward(
    x: &[f32],
    (cin, h, w): (usize, usize, usize),
    wt: &[f32],
    cout: usize,
    dz: &[f32],
    cols: &mut [f32],
    dcols: &mut [f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
) {
    let hw = h * w;
    let k = cin * 9;
    im2col3(x, cin, h, w, cols);
    sgemm(cout, k, hw, dz, hw, 1, cols, 1, hw, dw, k, true, 1);
    if let Some(db) = db {
        for (co, row) in dz.chunks(hw).enumerate() {
            db[co] += row.iter().sum::<f32>();
        }
    }
    if let Some(dx) = dx {
        sgemm(k, hw, cout, wt, 1, k, dz, hw, 1, dcols, hw, false, 1);
        dx.fill(0.0);
        col2im3_add(dcols, cin, h, w, dx);
    }
}

/// 2x2 max pooling, stride 2, of one image `[c, h, w]` (h, w even) into `y`
/// `[c, h/2, w/2]`; `arg` gets the input index of each maximum (the first of equal
/// values, in the order top-left, top-right, bottom-left, bottom-right). Branch-free
/// over each output row so that it vectorises.
pub fn maxpool2(x: &[f32], (c, h, w): (usize, usize, usize), y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow) = (h / 2, w / 2);
    for ci in 0..c {
        for oy in 0..oh {
            let base = ci * h * w + 2 * oy * w;
            let (r0, r1) = (&x[base..base + w], &x[base + w..base + 2 * w]);
            let o = ci * oh * ow + oy * ow;
            for (ox, (yv, av)) in y[o..o + ow].iter_mut().zip(&mut arg[o..o + ow]).enumerate() {
                let i = base + 2 * ox;
                let (a, b, cc, d) = (r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
                let (m1, i1) = if b > a { (b, i + 1) } else { (a, i) };
                let (m2, i2) = if d > cc { (d, i + w + 1) } else { (cc, i + w) };
                let (m, k) = if m2 > m1 { (m2, i2) } else { (m1, i1) };
                *yv = m;
                *av = k as u32;
            }
        }
    }
}

super::math::multiversion! {
    /// Two sums over one row in 16 f32 lanes (so they vectorise), returned in f64: of
    /// the values and of their products with `other` (the row itself for squares).
    pub fn row_sums(r: &[f32], other: &[f32]) -> [f64; 2] {
        let (mut a, mut b) = ([0.0f32; 16], [0.0f32; 16]);
        let mut it = r.chunks_exact(16).zip(other.chunks_exact(16));
        for (c, o) in &mut it {
            for j in 0..16 {
                a[j] += c[j];
                b[j] += c[j] * o[j];
            }
        }
        let n = r.len() / 16 * 16;
        let (mut sa, mut sb) = (0.0f64, 0.0f64);
        for (v, w) in r[n..].iter().zip(&other[n..]) {
            sa += *v as f64;
            sb += (*v * *w) as f64;
        }
        [
            sa + a.iter().map(|&v| v as f64).sum::<f64>(),
            sb + b.iter().map(|&v| v as f64).sum::<f64>(),
        ]
    }
}

super::math::multiversion! {
    /// `xhat = (x - mu) * is`, `y = max(lo, g * xhat + bt)` over one row.
    pub fn bn_apply(x: &[f32], xh: &mut [f32], y: &mut [f32], p: [f32; 5]) {
        let [mu, is, g, bt, lo] = p;
        for ((h, o), &v) in xh.iter_mut().zip(y.iter_mut()).zip(x) {
            *h = (v - mu) * is;
            *o = (g * *h + bt).max(lo);
        }
    }
}

super::math::multiversion! {
    /// `dx = k * (n * dy - sdy - xhat * sdyx)` over one row.
    pub fn bn_back_apply(dy: &[f32], xh: &[f32], dx: &mut [f32], p: [f32; 4]) {
        let [k, n, sdy, sdyx] = p;
        for ((o, &d), &x) in dx.iter_mut().zip(dy).zip(xh) {
            *o = k * (n * d - sdy - x * sdyx);
        }
    }
}

/// Per-row [`row_sums`] of `[b, c, hw]` rows in parallel, then per channel in row order
/// (the same result on any number of threads) into `per_channel`.
fn channel_sums(
    x: &[f32],
    other: Option<&[f32]>,
    (b, c, hw): (usize, usize, usize),
    rows: &mut Vec<[f64; 2]>,
    per_channel: &mut Vec<[f64; 2]>,
) {
    rows.resize(b * c, [0.0; 2]);
    match other {
        Some(o) => rows
            .par_iter_mut()
            .zip(x.par_chunks(hw).zip(o.par_chunks(hw)))
            .for_each(|(s, (r, o))| *s = row_sums(r, o)),
        None => rows
            .par_iter_mut()
            .zip(x.par_chunks(hw))
            .for_each(|(s, r)| *s = row_sums(r, r)),
    }
    per_channel.clear();
    per_channel.resize(c, [0.0; 2]);
    for (i, s) in rows.iter().enumerate() {
        let t = &mut per_channel[i % c];
        t[0] += s[0];
        t[1] += s[1];
    }
}

/// Scratch of the batch-normalisation kernels (per-row and per-channel sums).
#[derive(Debug, Default, Clone)]
pub struct BnScratch {
    rows: Vec<[f64; 2]>,
    chans: Vec<[f64; 2]>,
}

/// Per channel of `x` `[b, c, hw]`: mean and 1/sqrt(var + eps) (biased variance), the
/// normalised `xhat`, and `y = gamma * xhat + beta` (then `max(0, y)` with `relu`).
/// Rows run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train(
    x: &[f32],
    (b, c, hw): (usize, usize, usize),
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    mean: &mut [f32],
    inv_std: &mut [f32],
    xhat: &mut [f32],
    y: &mut [f32],
    relu: bool,
    sc: &mut BnScratch,
) {
    let n = (b * hw) as f64;
    channel_sums(x, None, (b, c, hw), &mut sc.rows, &mut sc.chans);
    for (ci, &[s, s2]) in sc.chans.iter().enumerate() {
        let m = s / n;
        let var = (s2 / n - m * m).max(0.0);
        mean[ci] = m as f32;
        inv_std[ci] = (1.0 / (var + eps as f64).sqrt()) as f32;
    }
    let (mean, inv_std) = (&*mean, &*inv_std);
    xhat.par_chunks_mut(hw)
        .zip(y.par_chunks_mut(hw))
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(r, ((xh, yv), xv))| {
            let ci = r % c;
            let lo = if relu { 0.0 } else { f32::NEG_INFINITY };
            bn_apply(xv, xh, yv, [mean[ci], inv_std[ci], gamma[ci], beta[ci], lo]);
        });
}

/// Backward of [`batchnorm_train`] (without its ReLU): from `dy`, adds to `dgamma`,
/// `dbeta`, writes `dx`. Rows run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    dy: &[f32],
    xhat: &[f32],
    (b, c, hw): (usize, usize, usize),
    gamma: &[f32],
    inv_std: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dx: &mut [f32],
    sc: &mut BnScratch,
) {
    let n = (b * hw) as f32;
    channel_sums(dy, Some(xhat), (b, c, hw), &mut sc.rows, &mut sc.chans);
    for (ci, &[sdy, sdyx]) in sc.chans.iter().enumerate() {
        dgamma[ci] += sdyx as f32;
        dbeta[ci] += sdy as f32;
    }
    let chans = &sc.chans;
    dx.par_chunks_mut(hw)
        .zip(dy.par_chunks(hw).zip(xhat.par_chunks(hw)))
        .enumerate()
        .for_each(|(r, (o, (d, xh)))| {
            let ci = r % c;
            let k = gamma[ci] * inv_std[ci] / n;
            let (sdy, sdyx) = (chans[ci][0] as f32, chans[ci][1] as f32);
            bn_back_apply(d, xh, o, [k, n, sdy, sdyx]);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::test_values;

    /// The im2col product equals a direct convolution; col2im is its adjoint.
    #[test]
    fn conv_matches_direct_convolution() {
        let (cin, h, w, cout) = (2, 5, 4, 3);
        let x = test_values(cin * h * w, 1);
        let wt = test_values(cout * cin * 9, 2);
        let b = test_values(cout, 3);
        let mut cols = vec![0.0; cin * 9 * h * w];
        let mut z = vec![0.0; cout * h * w];
        conv3_forward(&x, (cin, h, w), &wt, Some(&b), cout, &mut cols, &mut z, 1);
        for co in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut s = b[co];
                    for ci in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) = (y as isize + ky - 1, xx as isize + kx - 1);
                                if sy >= 0 && sx >= 0 && sy < h as isize && sx < w as isize {
                                    s += wt[((co * cin + ci) * 3 + ky as usize) * 3 + kx as usize]
                                        * x[(ci * h + sy as usize) * w + sx as usize];
                                }
                            }
                        }
                    }
                    assert!((z[(co * h + y) * w + xx] - s).abs() < 1e-5);
                }
            }
        }
        // <im2col(x), c> == <x, col2im(c)>
        let c = test_values(cols.len(), 4);
        let mut back = vec![0.0; x.len()];
        col2im3_add(&c, cin, h, w, &mut back);
        let lhs: f32 = cols.iter().zip(&c).map(|(a, b)| a * b).sum();
        let rhs: f32 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
    }
}
