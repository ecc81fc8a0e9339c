//! Host (CPU) kernels on flat `f32` slices: the matrix-product helper ([`sgemm`]),
//! vectorised math ([`math`]), the GRU and LSTM recurrences forward and backward through
//! time, the fused projection + softmax cross-entropy, the CNN's convolution, batch norm
//! and pooling, and the int8 products and convolutions ([`int8`]).

pub mod conv;
pub mod gru;
pub mod int8;
pub mod lstm;
pub mod math;
pub mod xent;

/// `c = a * b` (or `c += a * b` when `accumulate`), all row-major with the given
/// row strides; `a` is `m x k` with element `(i, p)` at `i * a_rs + p * a_cs`, `b` is
/// `k x n` likewise, `c` is `m x n` with row stride `c_rs`. `threads` > 1 lets the
/// product use the engine's thread pool.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    assert!(c.len() >= (m - 1) * c_rs + n);
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index the product touches
    // (row i < m, column j < n, inner p < k) inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Deterministic values in [-1, 1) for the kernels' tests (xorshift32).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive_with_strides_and_accumulation() {
        let (m, n, k) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // b given transposed: element (p, j) at j * k + p.
        let bt: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![1.0; m * n];
        sgemm(m, n, k, &a, k, 1, &bt, 1, k, &mut c, n, true, 1);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
