//! Compressed sparse rows for pruned fully-connected layers, and the kernel that runs
//! them: `y = x W^T + b` touching only the kept weights. Batches are transposed once so
//! each kept weight is one multiply-add across the whole batch (contiguous, vectorised);
//! rows of `W` are spread over the threads.

use crate::{Error, Result};
use rayon::prelude::*;

/// Buffers a batched product reuses from call to call.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    xt: Vec<f32>,
    yt: Vec<f32>,
}

/// A `rows x cols` matrix keeping only its non-zero entries.
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    pub rows: usize,
    pub cols: usize,
    /// Row `r`'s entries are `indptr[r]..indptr[r + 1]`.
    pub indptr: Vec<u32>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// The non-zero entries of the row-major `w` (`rows x cols`).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values for {rows}x{cols}",
                w.len()
            )));
        }
        let mut indptr = Vec::with_capacity(rows + 1);
        let (mut indices, mut values) = (Vec::new(), Vec::new());
        indptr.push(0);
        for r in 0..rows {
            for (c, &v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    indices.push(c as u32);
                    values.push(v);
                }
            }
            indptr.push(indices.len() as u32);
        }
        Ok(Self {
            rows,
            cols,
            indptr,
            indices,
            values,
        })
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// The dense row-major matrix.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            for e in self.indptr[r] as usize..self.indptr[r + 1] as usize {
                w[r * self.cols + self.indices[e] as usize] = self.values[e];
            }
        }
        w
    }

    /// `y[b, r] = bias[r] + sum_c x[b, c] * W[r, c]` for `batch` rows of `x`.
    pub fn matmul_t(&self, x: &[f32], batch: usize, bias: &[f32], sc: &mut Scratch, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert_eq!(x.len(), batch * cols);
        debug_assert_eq!(y.len(), batch * rows);
        if batch == 1 {
            // On the calling thread (see shoal_kernels::host::int8::product_u8 on why not the
            // pool).
            y.iter_mut().enumerate().for_each(|(r, out)| {
                let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
                let mut s = bias[r];
                for (&c, &v) in self.indices[a..b].iter().zip(&self.values[a..b]) {
                    s += v * x[c as usize];
                }
                *out = s;
            });
            return;
        }
        let Scratch { xt, yt } = sc;
        xt.resize(cols * batch, 0.0);
        for b in 0..batch {
            for c in 0..cols {
                xt[c * batch + b] = x[b * cols + c];
            }
        }
        let xt = &xt[..];
        // yt[r, :] = bias[r] + sum over kept (c, v) of v * xt[c, :], then transposed.
        yt.resize(rows * batch, 0.0);
        yt.par_chunks_mut(batch).enumerate().for_each(|(r, acc)| {
            acc.fill(bias[r]);
            let (a, b) = (self.indptr[r] as usize, self.indptr[r + 1] as usize);
            for (&c, &v) in self.indices[a..b].iter().zip(&self.values[a..b]) {
                let src = &xt[c as usize * batch..(c as usize + 1) * batch];
                for (o, &s) in acc.iter_mut().zip(src) {
                    *o += v * s;
                }
            }
        });
        for r in 0..rows {
            for b in 0..batch {
                y[b * rows + r] = yt[r * batch + b];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_round_trips_and_multiplies_like_dense() {
        let (rows, cols) = (7, 11);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 3 == 0 {
                    (i as f32 * 0.37).sin()
                } else {
                    0.0
                }
            })
            .collect();
        let m = Csr::from_dense(&w, rows, cols).unwrap();
        assert_eq!(m.to_dense(), w);
        assert_eq!(m.nnz(), w.iter().filter(|v| **v != 0.0).count());
        let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.1).collect();
        for batch in [1, 5] {
            let x: Vec<f32> = (0..batch * cols).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut y = vec![0.0; batch * rows];
            m.matmul_t(&x, batch, &bias, &mut Scratch::default(), &mut y);
            for b in 0..batch {
                for r in 0..rows {
                    let want: f32 = bias[r]
                        + (0..cols)
                            .map(|c| x[b * cols + c] * w[r * cols + c])
                            .sum::<f32>();
                    assert!((y[b * rows + r] - want).abs() < 1e-5);
                }
            }
        }
    }
}
