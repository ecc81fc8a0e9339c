//! Fused softmax cross-entropy over a large vocabulary: the mean negative log-likelihood
//! of the target ids over the rows with weight 1, and its gradient
//! `w_i / count * (softmax(x_i) - onehot(t_i))` computed in one pass over the logits,
//! rows in parallel.

use super::math;
use rayon::prelude::*;

/// Forward. `logits`: `[N, V]` row-major; `targets`, `weights`: `[N]`. Returns the mean
/// loss over weighted rows and each row's log-sum-exp (kept for the backward pass).
pub fn forward(logits: &[f32], v: usize, targets: &[u32], weights: &[f32]) -> (f32, Vec<f32>) {
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
    let total: f64 = (0..n)
        .map(|i| {
            let t = targets[i] as usize;
            let t = t.min(v - 1);
            weights[i] as f64 * (lse[i] - logits[i * v + t]) as f64
        })
        .sum();
    ((total / count as f64) as f32, lse)
}

/// Backward: turns `logits` (consumed) into `d loss / d logits` scaled by `grad`.
pub fn backward(
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
        for x in row.iter_mut() {
            *x = scale * math::exp(*x - l);
        }
        let t = (targets[i] as usize).min(v - 1);
        row[t] -= scale;
    });
    logits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_formula_and_finite_differences() {
        let (n, v) = (4, 7);
        let logits: Vec<f32> = (0..n * v)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let targets = [3u32, 0, 6, 2];
        let weights = [1.0, 1.0, 0.0, 1.0];
        let (loss, lse) = forward(&logits, v, &targets, &weights);
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
            let up = forward(&p, v, &targets, &weights).0;
            p[k] -= 2.0 * eps;
            let down = forward(&p, v, &targets, &weights).0;
            let fd = (up - down) / (2.0 * eps);
            assert!((fd - g[k]).abs() < 1e-3, "[{k}]: analytic {} fd {fd}", g[k]);
        }
    }
}
