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
        check_bits(bits)?;
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
        // Lloyd iterations on sorted values: assignments are contiguous ranges.
        let mut sorted = live.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        for _ in 0..iters {
            let mut sum = vec![0.0f64; k];
            let mut n = vec![0usize; k];
            let mut j = 0;
            for &v in &sorted {
                while j + 1 < k && (v - c[j]).abs() > (v - c[j + 1]).abs() {
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
            c.sort_by(|a, b| a.total_cmp(b));
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
        cb.codes = w.iter().map(|&v| cb.code_of(v)).collect();
        Ok(cb)
    }

    fn code_of(&self, v: f32) -> u8 {
        if self.zero_code && v == 0.0 {
            return 0;
        }
        let mut best = 0;
        for (i, &c) in self.centroids.iter().enumerate() {
            if (v - c).abs() < (v - self.centroids[best]).abs() {
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
}
