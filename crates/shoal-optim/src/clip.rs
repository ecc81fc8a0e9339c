//! Gradient-norm clipping, computed as PyTorch's `clip_grad_norm_` does.

use rayon::prelude::*;

/// Sum of squares of one span, blocks of 4096 in f32 lanes added in f64.
fn sum_squares(span: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in span.chunks(4096) {
        let mut lanes = [0.0f32; 16];
        let mut it = block.chunks_exact(16);
        for c in &mut it {
            for (l, g) in lanes.iter_mut().zip(c) {
                *l += g * g;
            }
        }
        let tail: f32 = it.remainder().iter().map(|g| g * g).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// Values per span summed on one thread.
const SPAN: usize = 1 << 18;

/// The L2 norm of all values in `grads`. Sums run in f32 over 16 independent lanes (so
/// they vectorise) per block of 4096 values, and the blocks are added in f64; spans of
/// 2^18 values in parallel, their sums added in order (the same result on any number
/// of threads).
pub fn global_norm(grads: &[f32]) -> f32 {
    if grads.len() <= SPAN {
        return sum_squares(grads).sqrt() as f32;
    }
    let spans: Vec<f64> = grads.par_chunks(SPAN).map(sum_squares).collect();
    spans.iter().sum::<f64>().sqrt() as f32
}

/// The factor PyTorch's `clip_grad_norm_` would scale gradients of norm `norm` by:
/// `max_norm / (norm + 1e-6)` when that is below 1, else 1.
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        coef
    } else {
        1.0
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`, and
/// returns the norm before clipping. As in PyTorch, the scale is
/// `max_norm / (norm + 1e-6)` and is only applied when it is below 1.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        grads.iter_mut().for_each(|g| *g *= coef);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_to_max_norm_and_keeps_direction() {
        let mut g = vec![3.0, 4.0];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        assert!((g[0] / g[1] - 0.75).abs() < 1e-6);
    }

    /// PyTorch's `clip_grad_norm_` divides by `norm + 1e-6`: a gradient of norm 1e-6
    /// clipped to 1e-7 is scaled by 1e-7 / 2e-6 = 0.05 (not 0.1).
    #[test]
    fn tiny_norms_clip_as_pytorch_does() {
        let mut g = vec![6e-7, 8e-7];
        let n = clip_grad_norm(&mut g, 1e-7);
        assert!((n - 1e-6).abs() < 1e-12);
        assert!(
            (g[0] - 3e-8).abs() < 1e-13 && (g[1] - 4e-8).abs() < 1e-13,
            "{g:?}"
        );
    }

    #[test]
    fn small_gradients_untouched() {
        let mut g = vec![0.1, -0.2];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.1, -0.2]);
    }
}
