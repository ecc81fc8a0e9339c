//! Low-rank factorization of a fully-connected layer: `W (out x in) ~ A B` with
//! `A = U_r S_r` (`out x r`) and `B = V_r^T` (`r x in`), from the SVD (nalgebra); the
//! rank chosen for a size ratio or a share of the spectrum's energy.

use crate::{error::setting, Error, Result};
use nalgebra::DMatrix;

/// The two factors of a layer and the singular values they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub out: usize,
    pub inp: usize,
    pub rank: usize,
    /// `out x rank`, row-major.
    pub a: Vec<f32>,
    /// `rank x inp`, row-major.
    pub b: Vec<f32>,
}

/// How to pick the rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankBy {
    /// This rank.
    Rank(usize),
    /// The largest rank whose factors take at most `1/ratio` of the layer's values.
    Ratio(f64),
    /// The smallest rank keeping this share of the sum of squared singular values.
    Energy(f64),
}

/// The singular values of `w` (`out x inp`, row-major), largest first.
pub fn singular_values(w: &[f32], out: usize, inp: usize) -> Result<Vec<f64>> {
    let m = matrix(w, out, inp)?;
    Ok(m.singular_values().iter().copied().collect())
}

fn matrix(w: &[f32], out: usize, inp: usize) -> Result<DMatrix<f64>> {
    if w.len() != out * inp || out == 0 || inp == 0 {
        return Err(Error::Shape(format!("{} values for {out}x{inp}", w.len())));
    }
    Ok(DMatrix::from_row_iterator(
        out,
        inp,
        w.iter().map(|&v| v as f64),
    ))
}

/// The rank `by` asks for, given the singular values.
pub fn pick_rank(by: RankBy, out: usize, inp: usize, sv: &[f64]) -> Result<usize> {
    let full = out.min(inp);
    let r = match by {
        RankBy::Rank(r) => r,
        RankBy::Ratio(x) => {
            if !(x.is_finite() && x >= 1.0) {
                return Err(setting("svd ratio", format!("{x}: must be at least 1")));
            }
            ((out * inp) as f64 / x / (out + inp) as f64).floor() as usize
        }
        RankBy::Energy(e) => {
            if !(e > 0.0 && e <= 1.0) {
                return Err(setting("svd energy", format!("{e}: must be in (0, 1]")));
            }
            let total: f64 = sv.iter().map(|s| s * s).sum();
            let mut acc = 0.0;
            let mut r = 0;
            for s in sv {
                if acc >= e * total {
                    break;
                }
                acc += s * s;
                r += 1;
            }
            r
        }
    };
    if r == 0 || r > full {
        return Err(setting(
            "svd rank",
            format!("{r}: must be between 1 and {full} for a {out}x{inp} layer"),
        ));
    }
    Ok(r)
}

/// Factors `w` at the rank `by` picks.
pub fn factorize(w: &[f32], out: usize, inp: usize, by: RankBy) -> Result<LowRank> {
    let m = matrix(w, out, inp)?;
    let svd = m.svd(true, true);
    let (u, vt) = match (svd.u, svd.v_t) {
        (Some(u), Some(v)) => (u, v),
        _ => return Err(Error::Shape("the SVD did not converge".into())),
    };
    // nalgebra orders singular values decreasingly.
    let sv: Vec<f64> = svd.singular_values.iter().copied().collect();
    let rank = pick_rank(by, out, inp, &sv)?;
    let mut a = vec![0.0f32; out * rank];
    for i in 0..out {
        for j in 0..rank {
            a[i * rank + j] = (u[(i, j)] * sv[j]) as f32;
        }
    }
    let mut b = vec![0.0f32; rank * inp];
    for j in 0..rank {
        for k in 0..inp {
            b[j * inp + k] = vt[(j, k)] as f32;
        }
    }
    Ok(LowRank {
        out,
        inp,
        rank,
        a,
        b,
    })
}

impl LowRank {
    /// `A B`, row-major `out x inp`.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.out * self.inp];
        for i in 0..self.out {
            for j in 0..self.rank {
                let a = self.a[i * self.rank + j];
                for (o, &b) in w[i * self.inp..(i + 1) * self.inp]
                    .iter_mut()
                    .zip(&self.b[j * self.inp..(j + 1) * self.inp])
                {
                    *o += a * b;
                }
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_rank_matrix_is_recovered_and_ranks_follow_the_rule() {
        let (out, inp) = (12, 20);
        // Rank 3 by construction.
        let w: Vec<f32> = (0..out * inp)
            .map(|i| {
                let (r, c) = ((i / inp) as f32, (i % inp) as f32);
                (r * 0.3).sin() * (c * 0.2).cos()
                    + 0.5 * (r * 0.7).cos() * (c * 0.9).sin()
                    + 0.1 * r * c / 50.0
            })
            .collect();
        let lr = factorize(&w, out, inp, RankBy::Energy(0.999_999)).unwrap();
        assert_eq!(lr.rank, 3);
        let back = lr.to_dense();
        for (a, b) in back.iter().zip(&w) {
            assert!((a - b).abs() < 1e-4);
        }
        let sv = singular_values(&w, out, inp).unwrap();
        assert_eq!(pick_rank(RankBy::Ratio(2.0), out, inp, &sv).unwrap(), 3);
        assert!(pick_rank(RankBy::Rank(0), out, inp, &sv).is_err());
        assert!(pick_rank(RankBy::Rank(13), out, inp, &sv).is_err());
        assert!(pick_rank(RankBy::Ratio(0.5), out, inp, &sv).is_err());
        assert!(pick_rank(RankBy::Energy(1.5), out, inp, &sv).is_err());
    }
}
