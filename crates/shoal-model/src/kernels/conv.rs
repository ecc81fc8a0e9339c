//! Host kernels of the CNN: 3x3 same-padding convolution by im2col and matrix products
//! (forward, and backward to the weights and the input), 2x2 max pooling, batch
//! normalisation over (batch, height, width) per channel. Images are `[C, H, W]`
//! row-major, batches `[B, C, H, W]`.

use super::sgemm;

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
/// `[c, h/2, w/2]`; `arg` gets the input index of each maximum.
pub fn maxpool2(x: &[f32], (c, h, w): (usize, usize, usize), y: &mut [f32], arg: &mut [u32]) {
    let (oh, ow) = (h / 2, w / 2);
    for ci in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                let base = ci * h * w + 2 * oy * w + 2 * ox;
                let mut best = base;
                for i in [base + 1, base + w, base + w + 1] {
                    if x[i] > x[best] {
                        best = i;
                    }
                }
                let o = ci * oh * ow + oy * ow + ox;
                y[o] = x[best];
                arg[o] = best as u32;
            }
        }
    }
}

/// Per channel of `x` `[b, c, hw]`: mean and 1/sqrt(var + eps) (biased variance), the
/// normalised `xhat`, and `y = gamma * xhat + beta`.
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
) {
    let n = (b * hw) as f64;
    for ci in 0..c {
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for bi in 0..b {
            for &v in &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw] {
                s += v as f64;
                s2 += (v as f64) * (v as f64);
            }
        }
        let m = s / n;
        let var = (s2 / n - m * m).max(0.0);
        mean[ci] = m as f32;
        inv_std[ci] = (1.0 / (var + eps as f64).sqrt()) as f32;
        let (g, bt, mu, is) = (gamma[ci], beta[ci], mean[ci], inv_std[ci]);
        for bi in 0..b {
            let r = (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
            for ((xh, yv), &v) in xhat[r.clone()].iter_mut().zip(&mut y[r.clone()]).zip(&x[r]) {
                *xh = (v - mu) * is;
                *yv = g * *xh + bt;
            }
        }
    }
}

/// Backward of [`batchnorm_train`]: from `dy`, adds to `dgamma`, `dbeta`, writes `dx`.
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
) {
    let n = (b * hw) as f32;
    for ci in 0..c {
        let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
        for bi in 0..b {
            let r = (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
            for (&d, &xh) in dy[r.clone()].iter().zip(&xhat[r]) {
                sdy += d as f64;
                sdyx += (d * xh) as f64;
            }
        }
        dgamma[ci] += sdyx as f32;
        dbeta[ci] += sdy as f32;
        let k = gamma[ci] * inv_std[ci] / n;
        let (sdy, sdyx) = (sdy as f32, sdyx as f32);
        for bi in 0..b {
            let r = (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
            for ((o, &d), &xh) in dx[r.clone()].iter_mut().zip(&dy[r.clone()]).zip(&xhat[r]) {
                *o = k * (n * d - sdy - xh * sdyx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_values;

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
