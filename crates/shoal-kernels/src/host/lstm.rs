//! The fused LSTM recurrence (PyTorch's gate layout i, f, g, o) over a whole sequence,
//! and its backward pass through time; the same machinery as [`super::gru`].
//!
//! The output holds both states of every step, `[B, T, 2H]` (`h` then `c`), so that
//! one tensor carries the outputs and the final cell state.

use super::sgemm;

/// Sizes of one call.
pub use super::gru::GruDims as LstmDims;

/// What the forward pass keeps for the backward pass, time-major (`[T, B, H]`).
#[derive(Debug, Clone, Default)]
pub struct LstmSaved {
    pub i: Vec<f32>,
    pub f: Vec<f32>,
    pub g: Vec<f32>,
    pub o: Vec<f32>,
    /// `tanh(c')` of the candidate cell state.
    pub tc: Vec<f32>,
    pub c_prev: Vec<f32>,
    pub h_prev: Vec<f32>,
}

use super::math::{sigmoid, tanh};

/// Forward. `xp`: `[B, T, 4H]`; `h0`, `c0`: `[B, H]`; `w_hh`: `[4H, H]`; `b_hh`:
/// `[4H]`; `mask`: optional `[B, T]`; `out`: `[B, T, 2H]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    d: LstmDims,
    xp: &[f32],
    h0: &[f32],
    c0: &[f32],
    w_hh: &[f32],
    b_hh: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
    s: &mut LstmSaved,
    threads: usize,
) {
    let (bs, t_len, h) = (d.batch, d.steps, d.hidden);
    let g4 = 4 * h;
    assert_eq!(xp.len(), bs * t_len * g4);
    assert_eq!(h0.len(), bs * h);
    assert_eq!(c0.len(), bs * h);
    assert_eq!(w_hh.len(), g4 * h);
    assert_eq!(b_hh.len(), g4);
    assert_eq!(out.len(), bs * t_len * 2 * h);
    if let Some(m) = mask {
        assert_eq!(m.len(), bs * t_len);
    }
    let n_all = t_len * bs * h;
    for v in [
        &mut s.i,
        &mut s.f,
        &mut s.g,
        &mut s.o,
        &mut s.tc,
        &mut s.c_prev,
        &mut s.h_prev,
    ] {
        v.clear();
        v.resize(n_all, 0.0);
    }
    let mut hcur = h0.to_vec();
    let mut ccur = c0.to_vec();
    let mut gh = vec![0.0f32; bs * g4];
    for t in 0..t_len {
        sgemm(
            bs, g4, h, &hcur, h, 1, w_hh, 1, h, &mut gh, g4, false, threads,
        );
        for b in 0..bs {
            let m = mask.map_or(1.0, |m| m[b * t_len + t]);
            let x = &xp[(b * t_len + t) * g4..(b * t_len + t + 1) * g4];
            let ghb = &gh[b * g4..(b + 1) * g4];
            let o_row = (b * t_len + t) * 2 * h;
            let base = (t * bs + b) * h;
            let r = base..base + h;
            gates_row(
                h,
                m,
                x,
                ghb,
                b_hh,
                [
                    &mut s.i[r.clone()],
                    &mut s.f[r.clone()],
                    &mut s.g[r.clone()],
                    &mut s.o[r.clone()],
                    &mut s.tc[r.clone()],
                    &mut s.c_prev[r.clone()],
                    &mut s.h_prev[r],
                ],
                &mut hcur[b * h..(b + 1) * h],
                &mut ccur[b * h..(b + 1) * h],
                &mut out[o_row..o_row + 2 * h],
            );
        }
    }
}

super::math::multiversion! {
    /// The gate arithmetic of one batch row at one step.
    ///
    /// Gates from the input projection `x` and recurrent product `gh` (`[4H]` each); the
    /// new `h`, `c` into `hb`, `cb` (which hold the previous ones) and `out` (`[2H]`);
    /// keeps i, f, g, o, tanh(c'), c and h before the step (`keep`) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn gates_row(
        h: usize,
        m: f32,
        x: &[f32],
        gh: &[f32],
        b: &[f32],
        keep: [&mut [f32]; 7],
        hb: &mut [f32],
        cb: &mut [f32],
        out: &mut [f32],
    ) {
        let [ig, fg, gg, og, tc, cprev, hprev] = keep;
        let (ig, fg, gg, og) = (&mut ig[..h], &mut fg[..h], &mut gg[..h], &mut og[..h]);
        let (tc, cprev, hprev, hb, cb) = (
            &mut tc[..h],
            &mut cprev[..h],
            &mut hprev[..h],
            &mut hb[..h],
            &mut cb[..h],
        );
        let (x, gh, b, out) = (&x[..4 * h], &gh[..4 * h], &b[..4 * h], &mut out[..2 * h]);
        for j in 0..h {
            ig[j] = sigmoid(x[j] + gh[j] + b[j]);
            fg[j] = sigmoid(x[h + j] + gh[h + j] + b[h + j]);
        }
        for j in 0..h {
            gg[j] = tanh(x[2 * h + j] + gh[2 * h + j] + b[2 * h + j]);
            og[j] = sigmoid(x[3 * h + j] + gh[3 * h + j] + b[3 * h + j]);
        }
        for j in 0..h {
            let (hp, cp) = (hb[j], cb[j]);
            hprev[j] = hp;
            cprev[j] = cp;
            let cn = fg[j] * cp + ig[j] * gg[j];
            let t = tanh(cn);
            tc[j] = t;
            let hn = og[j] * t;
            let hnew = hp + m * (hn - hp);
            let cnew = cp + m * (cn - cp);
            hb[j] = hnew;
            cb[j] = cnew;
            out[j] = hnew;
            out[h + j] = cnew;
        }
    }
}

/// Gradients of one call.
#[derive(Debug, Clone, Default)]
pub struct LstmGrads {
    pub dxp: Vec<f32>,
    pub dh0: Vec<f32>,
    pub dc0: Vec<f32>,
    pub dw_hh: Vec<f32>,
    pub db_hh: Vec<f32>,
}

/// Backward through time given `dout` (`[B, T, 2H]`).
pub fn backward(
    d: LstmDims,
    w_hh: &[f32],
    mask: Option<&[f32]>,
    saved: &LstmSaved,
    dout: &[f32],
    threads: usize,
) -> LstmGrads {
    let (bs, t_len, h) = (d.batch, d.steps, d.hidden);
    let g4 = 4 * h;
    assert_eq!(dout.len(), bs * t_len * 2 * h);
    assert_eq!(saved.i.len(), t_len * bs * h);
    let mut dxp = vec![0.0f32; bs * t_len * g4];
    let mut dgh = vec![0.0f32; t_len * bs * g4];
    let mut dh = vec![0.0f32; bs * h];
    let mut dc = vec![0.0f32; bs * h];
    for t in (0..t_len).rev() {
        for b in 0..bs {
            let m = mask.map_or(1.0, |m| m[b * t_len + t]);
            let base = (t * bs + b) * h;
            let o_row = (b * t_len + t) * 2 * h;
            for j in 0..h {
                let gh_tot = dh[b * h + j] + dout[o_row + j];
                let gc_tot = dc[b * h + j] + dout[o_row + h + j];
                let (ig, fg, gg, og) = (
                    saved.i[base + j],
                    saved.f[base + j],
                    saved.g[base + j],
                    saved.o[base + j],
                );
                let (tc, cp) = (saved.tc[base + j], saved.c_prev[base + j]);
                let dhn = m * gh_tot;
                let dcn = m * gc_tot + dhn * og * (1.0 - tc * tc);
                let da = [
                    dcn * gg * ig * (1.0 - ig),
                    dcn * cp * fg * (1.0 - fg),
                    dcn * ig * (1.0 - gg * gg),
                    dhn * tc * og * (1.0 - og),
                ];
                let xrow = (b * t_len + t) * g4;
                let grow = (t * bs + b) * g4;
                for (k, v) in da.iter().enumerate() {
                    dxp[xrow + k * h + j] = *v;
                    dgh[grow + k * h + j] = *v;
                }
                dh[b * h + j] = (1.0 - m) * gh_tot;
                dc[b * h + j] = (1.0 - m) * gc_tot + dcn * fg;
            }
        }
        let dg_t = &dgh[t * bs * g4..(t + 1) * bs * g4];
        sgemm(
            bs, h, g4, dg_t, g4, 1, w_hh, h, 1, &mut dh, h, true, threads,
        );
    }
    let rows = t_len * bs;
    let mut dw_hh = vec![0.0f32; g4 * h];
    sgemm(
        g4,
        h,
        rows,
        &dgh,
        1,
        g4,
        &saved.h_prev,
        h,
        1,
        &mut dw_hh,
        h,
        false,
        threads,
    );
    let mut db_hh = vec![0.0f32; g4];
    for row in dgh.chunks_exact(g4) {
        for (acc, v) in db_hh.iter_mut().zip(row) {
            *acc += v;
        }
    }
    LstmGrads {
        dxp,
        dh0: dh,
        dc0: dc,
        dw_hh,
        db_hh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::test_values as rand;

    #[test]
    fn backward_matches_finite_differences() {
        let d = LstmDims {
            batch: 3,
            steps: 4,
            hidden: 4,
        };
        let g4 = 4 * d.hidden;
        let args0 = [
            rand(d.batch * d.steps * g4, 1),
            rand(d.batch * d.hidden, 2),
            rand(d.batch * d.hidden, 3),
            rand(g4 * d.hidden, 4)
                .iter()
                .map(|x| x * 0.5)
                .collect::<Vec<_>>(),
            rand(g4, 5),
        ];
        let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0];
        let coef = rand(d.batch * d.steps * 2 * d.hidden, 6);
        let loss = |a: &[Vec<f32>; 5]| -> f64 {
            let mut out = vec![0.0; coef.len()];
            forward(
                d,
                &a[0],
                &a[1],
                &a[2],
                &a[3],
                &a[4],
                Some(&mask),
                &mut out,
                &mut LstmSaved::default(),
                1,
            );
            out.iter()
                .zip(&coef)
                .map(|(o, c)| *o as f64 * *c as f64)
                .sum()
        };
        let mut out = vec![0.0; coef.len()];
        let mut saved = LstmSaved::default();
        let a = &args0;
        forward(
            d,
            &a[0],
            &a[1],
            &a[2],
            &a[3],
            &a[4],
            Some(&mask),
            &mut out,
            &mut saved,
            1,
        );
        let gr = backward(d, &a[3], Some(&mask), &saved, &coef, 1);
        let analytic = [&gr.dxp, &gr.dh0, &gr.dc0, &gr.dw_hh, &gr.db_hh];
        let eps = 1e-3f32;
        for (which, an) in analytic.iter().enumerate() {
            for i in 0..an.len() {
                let mut p = args0.clone();
                p[which][i] += eps;
                let up = loss(&p);
                p[which][i] -= 2.0 * eps;
                let down = loss(&p);
                let fd = (up - down) / (2.0 * eps as f64);
                let x = an[i] as f64;
                assert!(
                    (fd - x).abs() < 1e-3 + 1e-2 * fd.abs(),
                    "arg {which}[{i}]: analytic {x} fd {fd}"
                );
            }
        }
    }
}
