//! Gradient-norm clipping, computed as PyTorch's `clip_grad_norm_` does.

/// The L2 norm of all values in `grads` (accumulated in f64).
pub fn global_norm(grads: &[f32]) -> f32 {
    grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`, and
/// returns the norm before clipping. As in PyTorch, the scale is
/// `max_norm / (norm + 1e-6)` and is only applied when it is below 1.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = global_norm(grads);
    let coef = max_norm / (norm + 1e-6);
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

    #[test]
    fn small_gradients_untouched() {
        let mut g = vec![0.1, -0.2];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.1, -0.2]);
    }
}
