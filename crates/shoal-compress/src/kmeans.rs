//! Weight sharing (Deep Compression): a layer's weights clustered into `2^bits` shared
//! values by k-means (centroids spread linearly between the smallest and largest weight,
//! then Lloyd iterations), each weight stored as the code of its centroid. Pruned
//! (zero) weights stay out of the clustering and keep code 0 meaning zero when the
//! layer is sparse. Fine-tuning moves the centroids by the summed gradients of their
//! weights.

use crate::{error::setting, Result};

/// Shared values and one code per weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    pub bits: u32,
    pub centroids: Vec<f32>,
    pub codes: Vec<u8>,
    /// Code 0 is a fixed zero (for pruned layers); the centroids are codes 1...
    pub zero_code: bool,
}

/// Checks a code width.
pub fn check_bits(bits: u32) -> Result<()> {
    if !(1..=8).contains(&bits) {
        return Err(setting("bits", format!("{bits}: codes of 1 to 8 bits")));
    }
    Ok(())
}

impl Codebook {
    /// Clusters `w` into `2^bits` values (`2^bits - 1` plus zero when `keep_zeros`:
    /// zeros are pruned weights and stay zero).
    pub fn fit(w: &[f32], bits: u32, keep_zeros: bool, iters: usize) -> Result<Self> {
        Self::fit_with_rate(w, bits, keep_zeros, iters, 0.0)
    }

    /// [`Codebook::fit`] with entropy-constrained assignment (ECSQ, as in Choi et al.,
    /// "Towards the limit of network quantization"): each weight goes to the centroid
    /// minimising `(w - c)^2 + rate * var(w) * -log2 p(c)`, `p` the centroids' shares of
    /// the previous iteration. `rate` 0 is plain k-means; above it, popular centroids
    /// take more weights, so the codes' entropy (what the Huffman-coded file stores per
    /// weight) falls below `bits`, at the price of a larger rounding error.
    pub fn fit_with_rate(
        w: &[f32],
        bits: u32,
        keep_zeros: bool,
        iters: usize,
        rate: f32,
    ) -> Result<Self> {
        check_bits(bits)?;
        if !(rate >= 0.0 && rate.is_finite()) {
            return Err(setting("rate", format!("{rate}: must be >= 0")));
        }
        let k = (1usize << bits) - keep_zeros as usize;
        if k == 0 {
            return Err(setting("bits", "1 bit with pruning leaves no shared value"));
        }
        let live: Vec<f32> = w
            .iter()
            .copied()
            .filter(|v| !keep_zeros || *v != 0.0)
            .collect();
        let (lo, hi) = live
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let mut c: Vec<f32> = if live.is_empty() {
            vec![0.0; k]
        } else {
            (0..k)
                .map(|i| lo + (hi - lo) * (i as f32 + 0.5) / k as f32)
                .collect()
        };
        // Each centroid's penalty in squared-weight units: rate * var * -log2(share).
        let var = if live.is_empty() {
            0.0
        } else {
            let mean = live.iter().map(|&v| v as f64).sum::<f64>() / live.len() as f64;
            live.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / live.len() as f64
        };
        let mut penalty = vec![0.0f64; k];
        // Lloyd iterations on sorted values: assignments are contiguous ranges (the
        // penalties shift the boundaries between neighbours, not their order).
        let mut sorted = live.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let cost = |v: f32, c: f32, pen: f64| (v as f64 - c as f64).powi(2) + pen;
        for _ in 0..iters {
            let mut sum = vec![0.0f64; k];
            let mut n = vec![0usize; k];
            let mut j = 0;
            for &v in &sorted {
                while j + 1 < k && cost(v, c[j], penalty[j]) > cost(v, c[j + 1], penalty[j + 1]) {
                    j += 1;
                }
                sum[j] += v as f64;
                n[j] += 1;
            }
            let mut moved = false;
            for i in 0..k {
                if n[i] > 0 {
                    let m = (sum[i] / n[i] as f64) as f32;
                    moved |= m != c[i];
                    c[i] = m;
                }
            }
            if rate > 0.0 {
                let total = sorted.len().max(1) as f64;
                for i in 0..k {
                    let share = (n[i] as f64 / total).max(1e-9);
                    let p = rate as f64 * var * -share.log2();
                    moved |= p != penalty[i];
                    penalty[i] = p;
                }
            }
            // Keep centroids (and their penalties) in increasing order.
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&a, &b| c[a].total_cmp(&c[b]));
            c = order.iter().map(|&i| c[i]).collect();
            penalty = order.iter().map(|&i| penalty[i]).collect();
            if !moved {
                break;
            }
        }
        let mut cb = Self {
            bits,
            centroids: c,
            codes: Vec::new(),
            zero_code: keep_zeros,
        };
        cb.codes = w.iter().map(|&v| cb.code_of(v, &penalty)).collect();
        Ok(cb)
    }

    /// The code of `v`: the centroid of least squared distance plus penalty.
    fn code_of(&self, v: f32, penalty: &[f64]) -> u8 {
        if self.zero_code && v == 0.0 {
            return 0;
        }
        let cost = |i: usize| (v as f64 - self.centroids[i] as f64).powi(2) + penalty[i];
        let mut best = 0;
        for i in 1..self.centroids.len() {
            if cost(i) < cost(best) {
                best = i;
            }
        }
        (best + self.zero_code as usize) as u8
    }

    /// The value of code `q`.
    pub fn value(&self, q: u8) -> f32 {
        match (self.zero_code, q) {
            (true, 0) => 0.0,
            (true, q) => self.centroids[q as usize - 1],
            (false, q) => self.centroids[q as usize],
        }
    }

    /// The shared weights, one per code.
    pub fn decode(&self, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(&self.codes) {
            *o = self.value(q);
        }
    }

    /// One step of centroid fine-tuning: each centroid moves by `-lr` times the sum of
    /// its weights' gradients.
    pub fn step(&mut self, grad: &[f32], lr: f32) {
        let mut g = vec![0.0f64; self.centroids.len()];
        for (&q, &d) in self.codes.iter().zip(grad) {
            if self.zero_code && q == 0 {
                continue;
            }
            g[q as usize - self.zero_code as usize] += d as f64;
        }
        for (c, d) in self.centroids.iter_mut().zip(g) {
            *c -= lr * d as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_shared_values_and_keeps_zeros() {
        // Three clear clusters and pruned zeros.
        let mut w = Vec::new();
        for i in 0..300 {
            let base = [-1.0f32, 0.2, 2.0][i % 3];
            w.push(base + ((i * 37 % 11) as f32 - 5.0) * 0.001);
            if i % 4 == 0 {
                w.push(0.0);
            }
        }
        let cb = Codebook::fit(&w, 2, true, 50).unwrap();
        assert_eq!(cb.centroids.len(), 3);
        for (c, want) in cb.centroids.iter().zip([-1.0, 0.2, 2.0]) {
            assert!((c - want).abs() < 0.01, "{:?}", cb.centroids);
        }
        let mut back = vec![0.0; w.len()];
        cb.decode(&mut back);
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() < 0.01 || (*b == 0.0 && *a == 0.0));
        }
        // Fine-tuning moves a centroid by the sum of its weights' gradients.
        let mut c2 = cb.clone();
        let g: Vec<f32> = cb
            .codes
            .iter()
            .map(|&q| if q == 1 { 0.01 } else { 0.0 })
            .collect();
        c2.step(&g, 1.0);
        assert!((c2.centroids[0] - (cb.centroids[0] - 1.0)).abs() < 1e-4);
        assert!(Codebook::fit(&w, 0, false, 1).is_err());
        assert!(Codebook::fit(&w, 9, false, 1).is_err());
    }

    /// Entropy of a codebook's codes, bits per weight.
    fn entropy(cb: &Codebook) -> f64 {
        let mut n = [0usize; 256];
        cb.codes.iter().for_each(|&q| n[q as usize] += 1);
        let t = cb.codes.len() as f64;
        n.iter()
            .filter(|&&c| c > 0)
            .map(|&c| -(c as f64 / t) * (c as f64 / t).log2())
            .sum()
    }

    /// Entropy-constrained clustering: rate 0 is k-means exactly; a positive rate
    /// lowers the codes' entropy and raises the rounding error, more with a larger rate;
    /// every code still decodes to its own centroid.
    #[test]
    fn entropy_constrained_codes_trade_bits_for_error() {
        // A bell-shaped layer (sums of 4 uniforms from a SplitMix64 stream).
        let uniform = |i: u64| {
            let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let w: Vec<f32> = (0..20_000u64)
            .map(|i| (0..4).map(|k| (uniform(i * 4 + k) - 0.5) as f32).sum())
            .collect();
        let err = |cb: &Codebook| {
            let mut back = vec![0.0; w.len()];
            cb.decode(&mut back);
            back.iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
        };
        let plain = Codebook::fit(&w, 2, false, 30).unwrap();
        assert_eq!(
            plain,
            Codebook::fit_with_rate(&w, 2, false, 30, 0.0).unwrap()
        );
        let (mut last_h, mut last_e) = (entropy(&plain), err(&plain));
        assert!(last_h > 1.9, "k-means spreads 2-bit codes evenly: {last_h}");
        for rate in [0.1f32, 0.3] {
            let cb = Codebook::fit_with_rate(&w, 2, false, 30, rate).unwrap();
            let (h, e) = (entropy(&cb), err(&cb));
            assert!(
                h < last_h - 0.02 && e > last_e,
                "rate {rate}: {h} bits, error {e}"
            );
            (last_h, last_e) = (h, e);
        }
        assert!(Codebook::fit_with_rate(&w, 2, false, 1, -1.0).is_err());
        assert!(Codebook::fit_with_rate(&w, 2, false, 1, f32::NAN).is_err());
    }
}
