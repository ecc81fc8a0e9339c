//! Fused softmax cross-entropy over a large vocabulary: the mean negative log-likelihood
//! of the target ids over the rows with weight 1, and its gradient
//! `w_i / count * (softmax(x_i) - q_i)` computed in one pass over the logits, rows in
//! parallel. `q_i` is the target's one-hot vector, or with label smoothing `e` the
//! mixture `(1 - e) onehot(t_i) + e / V` (PyTorch's `label_smoothing`, whose loss is
//! `lse - (1 - e) x_t - e mean(x)`). For training, [`linear_forward_grad`] computes the loss and the
//! gradient of the logits in the same visit of each row (one `exp` per logit, the row in
//! L1 cache between its passes) and the logits buffer is reused from step to step.

use super::math;
use rayon::prelude::*;
use std::sync::Mutex;

/// The `[N, V]` buffer of the last training step, kept for the next (20 MB at the NMT
/// model's shapes: a fresh one costs page faults or a memset every step).
static SPARE: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// A buffer of `len` values whose contents are unspecified (the caller overwrites them).
fn take_buffer(len: usize) -> Vec<f32> {
    let mut b = std::mem::take(&mut *SPARE.lock().unwrap_or_else(|e| e.into_inner()));
    b.resize(len, 0.0);
    b
}

/// Gives a buffer back for the next [`take_buffer`].
pub fn give_back(b: Vec<f32>) {
    *SPARE.lock().unwrap_or_else(|e| e.into_inner()) = b;
}

/// Everything [`linear_backward_from_grad`] needs from the forward pass.
#[derive(Debug, Clone)]
pub struct XentGrad {
    /// `d loss / d logits` for an upstream gradient of 1, `[N, V]`.
    pub dlogits: Vec<f32>,
    /// Column sums of `dlogits` (the bias gradient for an upstream gradient of 1).
    pub dbias: Vec<f32>,
}

/// Training forward of the output projection and cross-entropy: `logits = x W^T + b`,
/// the mean loss over weighted rows, and (in the same pass over each row) the gradient
/// of the loss with respect to the logits and the bias. `x`: `[N, H]`; `w`: `[V, H]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_grad(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    h: usize,
    targets: &[u32],
    weights: &[f32],
    smoothing: f32,
    threads: usize,
) -> (f32, XentGrad) {
    let n = targets.len();
    let v = b.len();
    let e = smoothing;
    assert_eq!(x.len(), n * h);
    assert_eq!(w.len(), v * h);
    assert_eq!(weights.len(), n);
    let mut dl = take_buffer(n * v);
    // logits = x W^T, overwriting whatever the reused buffer held.
    super::sgemm(n, v, h, x, h, 1, w, 1, h, &mut dl, v, false, threads);
    let count: f32 = weights.iter().sum::<f32>().max(1.0);
    let block = n.div_ceil(threads.max(1)).max(1);
    let (loss, dbias) = dl
        .par_chunks_mut(block * v)
        .enumerate()
        .map(|(k, rows)| {
            let mut db = vec![0.0f32; v];
            let mut loss = 0.0f64;
            for (j, row) in rows.chunks_exact_mut(v).enumerate() {
                let i = k * block + j;
                let wi = weights[i] / count;
                if wi == 0.0 {
                    row.fill(0.0);
                    continue;
                }
                let t = (targets[i] as usize).min(v - 1);
                let m = math::add_max(row, b);
                let xt = row[t];
                if e == 0.0 {
                    let sum = math::exp_sum_in_place(row, m);
                    loss += wi as f64 * (m + sum.ln() - xt) as f64;
                    math::scale_add(row, wi / sum, &mut db);
                    row[t] -= wi;
                    db[t] -= wi;
                    continue;
                }
                let mean = (row.iter().map(|&a| a as f64).sum::<f64>() / v as f64) as f32;
                let sum = math::exp_sum_in_place(row, m);
                loss += wi as f64 * (m + sum.ln() - (1.0 - e) * xt - e * mean) as f64;
                math::scale_add(row, wi / sum, &mut db);
                let (hit, spread) = (wi * (1.0 - e), wi * e / v as f32);
                for (r, d) in row.iter_mut().zip(db.iter_mut()) {
                    *r -= spread;
                    *d -= spread;
                }
                row[t] -= hit;
                db[t] -= hit;
            }
            (loss, db)
        })
        .reduce(
            || (0.0, vec![0.0f32; v]),
            |(la, mut da), (lb, db)| {
                for (a, b) in da.iter_mut().zip(&db) {
                    *a += b;
                }
                (la + lb, da)
            },
        );
    (loss as f32, XentGrad { dlogits: dl, dbias })
}

/// Gradients of [`linear_forward_grad`] for an upstream gradient `grad`:
/// `(dx [N, H], dw [V, H], db [V])`. The logits buffer goes back for the next step.
pub fn linear_backward_from_grad(
    g: XentGrad,
    x: &[f32],
    w: &[f32],
    h: usize,
    grad: f32,
    threads: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let XentGrad {
        dlogits: mut dl,
        dbias: mut db,
    } = g;
    let v = db.len();
    let n = dl.len() / v.max(1);
    if grad != 1.0 {
        dl.par_chunks_mut(v.max(1))
            .for_each(|row| row.iter_mut().for_each(|d| *d *= grad));
        db.iter_mut().for_each(|d| *d *= grad);
    }
    let mut dx = vec![0.0f32; n * h];
    // dx = dl W  ([N, V] x [V, H]).
    super::sgemm(n, h, v, &dl, v, 1, w, h, 1, &mut dx, h, false, threads);
    let mut dw = vec![0.0f32; v * h];
    // dW = dl^T x  ([V, N] x [N, H]).
    super::sgemm(v, h, n, &dl, 1, v, x, h, 1, &mut dw, h, false, threads);
    give_back(dl);
    (dx, dw, db)
}

/// Forward. `logits`: `[N, V]` row-major; `targets`, `weights`: `[N]`; `smoothing`:
/// the label smoothing (0: none). Returns the mean loss over weighted rows and each
/// row's log-sum-exp (kept for the backward pass).
pub fn forward(
    logits: &[f32],
    v: usize,
    targets: &[u32],
    weights: &[f32],
    smoothing: f32,
) -> (f32, Vec<f32>) {
    let n = targets.len();
    assert_eq!(logits.len(), n * v);
    assert_eq!(weights.len(), n);
    let lse: Vec<f32> = logits
        .par_chunks(v)
        .map(|row| {
            let m = math::max(row);
            m + math::sum_exp(row, m).ln()
        })
        .collect();
    let count: f32 = weights.iter().sum::<f32>().max(1.0);
    let e = smoothing;
    let total: f64 = (0..n)
        .map(|i| {
            let t = targets[i] as usize;
            let t = t.min(v - 1);
            let row = &logits[i * v..(i + 1) * v];
            if e == 0.0 || weights[i] == 0.0 {
                return weights[i] as f64 * (lse[i] - row[t]) as f64;
            }
            let mean = (row.iter().map(|&a| a as f64).sum::<f64>() / v as f64) as f32;
            weights[i] as f64 * (lse[i] - (1.0 - e) * row[t] - e * mean) as f64
        })
        .sum();
    ((total / count as f64) as f32, lse)
}

/// Output projection fused with the cross-entropy: `logits = x W^T + b` computed into
/// `logits` (`[N, V]`, reused by the backward pass), then [`forward`].
/// `x`: `[N, H]`; `w`: `[V, H]`; `b`: `[V]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    h: usize,
    targets: &[u32],
    weights: &[f32],
    smoothing: f32,
    logits: &mut Vec<f32>,
    threads: usize,
) -> (f32, Vec<f32>) {
    let n = targets.len();
    let v = b.len();
    assert_eq!(x.len(), n * h);
    assert_eq!(w.len(), v * h);
    logits.clear();
    logits.resize(n * v, 0.0);
    logits
        .par_chunks_mut(v)
        .for_each(|row| row.copy_from_slice(b));
    // logits += x W^T: W^T element (p, j) = w[j * h + p].
    super::sgemm(n, v, h, x, h, 1, w, 1, h, logits, v, true, threads);
    forward(logits, v, targets, weights, smoothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backward: turns `logits` (consumed) into `d loss / d logits` scaled by `grad`.
    fn backward(
        mut logits: Vec<f32>,
        v: usize,
        targets: &[u32],
        weights: &[f32],
        lse: &[f32],
        grad: f32,
    ) -> Vec<f32> {
        let count: f32 = weights.iter().sum::<f32>().max(1.0);
        logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let scale = grad * weights[i] / count;
            if scale == 0.0 {
                row.fill(0.0);
                return;
            }
            let l = lse[i];
            math::exp_scale(row, l, scale);
            let t = (targets[i] as usize).min(v - 1);
            row[t] -= scale;
        });
        logits
    }

    /// Gradients of [`linear_forward`] given the upstream gradient `grad` of the loss:
    /// `(dx [N, H], dw [V, H], db [V])`, the two-pass way (softmax gradient, then the
    /// products): the reference [`linear_forward_grad`] is compared with.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        logits: Vec<f32>,
        x: &[f32],
        w: &[f32],
        h: usize,
        targets: &[u32],
        weights: &[f32],
        lse: &[f32],
        grad: f32,
        threads: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = targets.len();
        let v = logits.len() / n.max(1);
        let dl = backward(logits, v, targets, weights, lse, grad);
        let mut dx = vec![0.0f32; n * h];
        // dx = dl W  ([N, V] x [V, H]).
        crate::host::sgemm(n, h, v, &dl, v, 1, w, h, 1, &mut dx, h, false, threads);
        let mut dw = vec![0.0f32; v * h];
        // dW = dl^T x  ([V, N] x [N, H]).
        crate::host::sgemm(v, h, n, &dl, 1, v, x, h, 1, &mut dw, h, false, threads);
        let mut db = vec![0.0f32; v];
        for row in dl.chunks_exact(v) {
            for (acc, g) in db.iter_mut().zip(row) {
                *acc += g;
            }
        }
        (dx, dw, db)
    }

    /// Inputs `x [n, h]`, weights `w [v, h]` and bias `b [v]` of a projection.
    fn projection(n: usize, h: usize, v: usize) -> [Vec<f32>; 3] {
        [
            (0..n * h)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
                .collect(),
            (0..v * h)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
                .collect(),
            (0..v).map(|i| (i as f32 * 0.7).sin()).collect(),
        ]
    }

    #[test]
    fn linear_version_matches_finite_differences() {
        let (n, h, v) = (3, 4, 6);
        let [x, w, b] = projection(n, h, v);
        let targets = [1u32, 5, 2];
        let weights = [1.0, 0.0, 1.0];
        let f = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut l = Vec::new();
            linear_forward(x, w, b, h, &targets, &weights, 0.0, &mut l, 1).0
        };
        let mut logits = Vec::new();
        let (_, lse) = linear_forward(&x, &w, &b, h, &targets, &weights, 0.0, &mut logits, 1);
        let (dx, dw, db) = linear_backward(logits, &x, &w, h, &targets, &weights, &lse, 1.0, 1);
        let eps = 1e-2f32;
        let fd = |which: usize, i: usize| {
            let mut a = [x.clone(), w.clone(), b.clone()];
            a[which][i] += eps;
            let up = f(&a[0], &a[1], &a[2]);
            a[which][i] -= 2.0 * eps;
            let down = f(&a[0], &a[1], &a[2]);
            (up - down) / (2.0 * eps)
        };
        for (which, an) in [&dx, &dw, &db].iter().enumerate() {
            for i in 0..an.len() {
                let g = fd(which, i);
                assert!(
                    (g - an[i]).abs() < 2e-3,
                    "arg {which}[{i}]: analytic {} fd {g}",
                    an[i]
                );
            }
        }
    }

    #[test]
    fn training_forward_gives_the_same_loss_and_gradients() {
        let (n, h, v) = (7, 5, 37);
        let [x, w, b] = projection(n, h, v);
        let targets = [1u32, 36, 2, 0, 9, 9, 20];
        let weights = [1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 1.0];
        for (threads, grad) in [(1, 1.0), (3, 1.0), (2, 0.37)] {
            let mut logits = Vec::new();
            let (want_loss, lse) =
                linear_forward(&x, &w, &b, h, &targets, &weights, 0.0, &mut logits, 1);
            let want = linear_backward(logits, &x, &w, h, &targets, &weights, &lse, grad, 1);
            let (loss, g) = linear_forward_grad(&x, &w, &b, h, &targets, &weights, 0.0, threads);
            assert!((loss - want_loss).abs() < 1e-5, "{loss} vs {want_loss}");
            let got = linear_backward_from_grad(g, &x, &w, h, grad, threads);
            for (a, b) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
                assert_eq!(a.len(), b.len());
                for (p, q) in a.iter().zip(b.iter()) {
                    assert!((p - q).abs() < 1e-5, "{p} vs {q}");
                }
            }
        }
    }

    /// Loss and gradients of the projection + cross-entropy by the definition, in f64
    /// with plain loops (no shared kernel or math helper): `(loss, dx, dw, db)`.
    fn reference_f64(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        h: usize,
        targets: &[u32],
        weights: &[f32],
    ) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
        reference_smoothed_f64(x, w, b, h, targets, weights, 0.0)
    }

    /// [`reference_f64`] with label smoothing `e`: the target distribution is
    /// `(1 - e) onehot + e / V`, the loss its cross-entropy with the softmax.
    fn reference_smoothed_f64(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        h: usize,
        targets: &[u32],
        weights: &[f32],
        e: f64,
    ) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, v) = (targets.len(), b.len());
        let count = weights.iter().map(|&w| w as f64).sum::<f64>().max(1.0);
        let (mut loss, mut dx, mut dw, mut db) =
            (0.0, vec![0.0; n * h], vec![0.0; v * h], vec![0.0; v]);
        for i in 0..n {
            let xi = &x[i * h..(i + 1) * h];
            let z: Vec<f64> = (0..v)
                .map(|j| {
                    let wj = &w[j * h..(j + 1) * h];
                    b[j] as f64
                        + xi.iter()
                            .zip(wj)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let se: f64 = z.iter().map(|&zj| (zj - m).exp()).sum();
            let t = targets[i] as usize;
            let wi = weights[i] as f64 / count;
            let q = |j: usize| e / v as f64 + if j == t { 1.0 - e } else { 0.0 };
            loss += wi * (0..v).map(|j| -q(j) * (z[j] - m - se.ln())).sum::<f64>();
            for j in 0..v {
                let g = wi * ((z[j] - m).exp() / se - q(j));
                db[j] += g;
                for k in 0..h {
                    dx[i * h + k] += g * w[j * h + k] as f64;
                    dw[j * h + k] += g * xi[k] as f64;
                }
            }
        }
        (loss, dx, dw, db)
    }

    /// Each of `dx`, `dw`, `db` (for an upstream gradient `grad`) within 1e-5 of its f64
    /// reference's largest value.
    fn assert_gradients_close(pairs: [(&Vec<f32>, &Vec<f64>); 3], grad: f32, threads: usize) {
        for (name, (got, want)) in ["dx", "dw", "db"].into_iter().zip(pairs) {
            assert_eq!(got.len(), want.len());
            let top = want.iter().fold(0.0f64, |a, &b| a.max(b.abs())) * grad as f64;
            let worst = got
                .iter()
                .zip(want.iter())
                .map(|(&p, &q)| (p as f64 - q * grad as f64).abs())
                .fold(0.0, f64::max);
            assert!(
                worst <= 1e-5 * top,
                "{name} (threads {threads}): worst {worst} of {top}"
            );
        }
    }

    /// The training forward at the default model's shapes (hidden 128, vocabulary
    /// 8,000; rows split over 2 and 3 threads, an upstream gradient below 1, padding
    /// rows) against the f64 definition. f32 sums over 8,000 logits and 128 inputs
    /// leave errors near 1e-6 of each gradient's largest value (measured worst: 1.7e-6,
    /// in dx; the loss 8e-9): the bounds are 1e-5 and 1e-7.
    #[test]
    fn training_forward_at_the_nmt_model_shapes() {
        let (n, h, v) = (48, 128, 8000);
        let x = crate::host::test_values(n * h, 1);
        let w: Vec<f32> = crate::host::test_values(v * h, 2)
            .iter()
            .map(|a| a * 0.3)
            .collect();
        let b = crate::host::test_values(v, 3);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| if i % 9 == 4 { 0.0 } else { 1.0 }).collect();
        let (want_loss, want_dx, want_dw, want_db) =
            reference_f64(&x, &w, &b, h, &targets, &weights);
        // Twice each: the second call reuses the logits buffer the first gave back.
        for (threads, grad) in [(2, 1.0f32), (3, 0.37), (2, 1.0), (1, 0.37)] {
            let (loss, g) = linear_forward_grad(&x, &w, &b, h, &targets, &weights, 0.0, threads);
            assert!(
                (loss as f64 - want_loss).abs() < 1e-7 * want_loss,
                "{loss} vs {want_loss}"
            );
            let (dx, dw, db) = linear_backward_from_grad(g, &x, &w, h, grad, threads);
            assert_gradients_close(
                [(&dx, &want_dx), (&dw, &want_dw), (&db, &want_db)],
                grad,
                threads,
            );
        }
    }

    /// Label smoothing 0.1 (fairseq's and OpenNMT's usual setting) against the f64
    /// definition: the training forward's loss and gradients (padding rows, 1-3
    /// threads, an upstream gradient below 1) and the evaluation forward's loss, within
    /// f32 rounding of sums over 301 logits (bounds: 1e-6 of the loss, 1e-5 of each
    /// gradient's largest value, as at the model's shapes).
    #[test]
    fn label_smoothing_matches_its_definition() {
        let (n, h, v) = (13, 16, 301);
        let x = crate::host::test_values(n * h, 4);
        let w: Vec<f32> = crate::host::test_values(v * h, 5)
            .iter()
            .map(|a| a * 0.5)
            .collect();
        let b = crate::host::test_values(v, 6);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 53) % v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| if i % 5 == 2 { 0.0 } else { 1.0 }).collect();
        let e = 0.1f32;
        let (want_loss, want_dx, want_dw, want_db) =
            reference_smoothed_f64(&x, &w, &b, h, &targets, &weights, e as f64);
        let (plain, ..) = reference_f64(&x, &w, &b, h, &targets, &weights);
        assert!(
            (want_loss - plain).abs() > 1e-3,
            "smoothing changes the loss"
        );
        let mut logits = Vec::new();
        let (eval_loss, _) = linear_forward(&x, &w, &b, h, &targets, &weights, e, &mut logits, 2);
        assert!(
            (eval_loss as f64 - want_loss).abs() < 1e-6 * want_loss,
            "{eval_loss} vs {want_loss}"
        );
        for (threads, grad) in [(1, 1.0f32), (2, 0.37), (3, 1.0)] {
            let (loss, g) = linear_forward_grad(&x, &w, &b, h, &targets, &weights, e, threads);
            assert!(
                (loss as f64 - want_loss).abs() < 1e-6 * want_loss,
                "{loss} vs {want_loss}"
            );
            let (dx, dw, db) = linear_backward_from_grad(g, &x, &w, h, grad, threads);
            assert_gradients_close(
                [(&dx, &want_dx), (&dw, &want_dw), (&db, &want_db)],
                grad,
                threads,
            );
        }
    }

    #[test]
    fn matches_direct_formula_and_finite_differences() {
        let (n, v) = (4, 7);
        let logits: Vec<f32> = (0..n * v)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let targets = [3u32, 0, 6, 2];
        let weights = [1.0, 1.0, 0.0, 1.0];
        let (loss, lse) = forward(&logits, v, &targets, &weights, 0.0);
        let mut want = 0.0f64;
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let z: f64 = row.iter().map(|x| (*x as f64).exp()).sum();
            want += weights[i] as f64 * (z.ln() - row[targets[i] as usize] as f64);
        }
        want /= 3.0;
        assert!((loss as f64 - want).abs() < 1e-5, "{loss} vs {want}");
        let g = backward(logits.clone(), v, &targets, &weights, &lse, 1.0);
        let eps = 1e-2f32;
        for k in 0..n * v {
            let mut p = logits.clone();
            p[k] += eps;
            let up = forward(&p, v, &targets, &weights, 0.0).0;
            p[k] -= 2.0 * eps;
            let down = forward(&p, v, &targets, &weights, 0.0).0;
            let fd = (up - down) / (2.0 * eps);
            assert!((fd - g[k]).abs() < 1e-3, "[{k}]: analytic {} fd {fd}", g[k]);
        }
    }
}
