//! Inputs shared by the collectives tests: small integers, so sums are exact.

/// Rank r's input: small integers (exactly representable, so sums are exact).
pub fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

/// The sum over `n` ranks of their inputs.
pub fn expected_sum(n: usize, len: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; len];
    for r in 0..n {
        for (a, b) in s.iter_mut().zip(input(r, len)) {
            *a += b;
        }
    }
    s
}
