//! Magnitude pruning: masks that keep the largest weights of a layer (or of all layers
//! under one global threshold), and the gradual schedule of Zhu & Gupta (AGP).

use crate::{error::setting, Result};

/// Checks a sparsity fraction.
pub fn check_sparsity(s: f64) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(setting(
            "sparsity",
            format!(
                "{:.4} ({:.1}%): must be at least 0 and below 1 (100%)",
                s,
                s * 100.0
            ),
        ));
    }
    Ok(())
}

/// The magnitude below which `sparsity` of `w` falls (the k-th smallest |w|); weights
/// strictly above it are kept.
pub fn threshold(w: &[f32], sparsity: f64) -> Result<f32> {
    check_sparsity(sparsity)?;
    if w.is_empty() {
        return Ok(0.0);
    }
    let k = ((w.len() as f64 * sparsity).round() as usize).min(w.len());
    if k == 0 {
        return Ok(-1.0);
    }
    let mut mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
    let (_, t, _) = mags.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
    Ok(*t)
}

/// Keeps the weights of magnitude above `t` (`true` = kept).
pub fn mask_above(w: &[f32], t: f32) -> Vec<bool> {
    w.iter().map(|v| v.abs() > t).collect()
}

/// A mask keeping the `1 - sparsity` largest-magnitude weights of one layer.
pub fn layer_mask(w: &[f32], sparsity: f64) -> Result<Vec<bool>> {
    Ok(mask_above(w, threshold(w, sparsity)?))
}

/// One threshold over several layers together (global magnitude pruning).
pub fn global_threshold(layers: &[&[f32]], sparsity: f64) -> Result<f32> {
    let all: Vec<f32> = layers.iter().flat_map(|l| l.iter().copied()).collect();
    threshold(&all, sparsity)
}

/// Zeroes the weights a mask drops.
pub fn apply_mask(w: &mut [f32], mask: &[bool]) {
    for (v, &k) in w.iter_mut().zip(mask) {
        if !k {
            *v = 0.0;
        }
    }
}

/// The sparsity of the gradual schedule at step `t` of `n`: from `initial` to `target`
/// along `target + (initial - target) * (1 - t/n)^3` (fast early, gentle late).
pub fn agp(initial: f64, target: f64, t: u64, n: u64) -> f64 {
    if n == 0 || t >= n {
        return target;
    }
    let r = 1.0 - t as f64 / n as f64;
    target + (initial - target) * r * r * r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_largest_and_refuse_bad_fractions() {
        let w = [0.5f32, -3.0, 0.1, 2.0, -0.2, 1.0, 0.0, -0.7];
        let m = layer_mask(&w, 0.5).unwrap();
        assert_eq!(m, vec![false, true, false, true, false, true, false, true]);
        assert_eq!(
            layer_mask(&w, 0.0).unwrap(),
            vec![true, true, true, true, true, true, true, true]
        );
        let g = global_threshold(&[&w[..4], &w[4..]], 0.75).unwrap();
        assert_eq!(mask_above(&w, g).iter().filter(|k| **k).count(), 2);
        for bad in [1.0, 1.2, -0.1, f64::NAN] {
            let e = threshold(&w, bad).unwrap_err().to_string();
            assert!(e.contains("sparsity"), "{e}");
        }
        assert_eq!(agp(0.0, 0.9, 0, 10), 0.0);
        assert!((agp(0.0, 0.9, 10, 10) - 0.9).abs() < 1e-12);
        assert!(agp(0.0, 0.9, 5, 10) > 0.9 * 0.5, "front-loaded");
    }
}
