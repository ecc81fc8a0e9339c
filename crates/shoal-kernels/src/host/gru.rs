//! The fused GRU recurrence (PyTorch's gate layout r, z, n) over a whole sequence, and
//! its backward pass through time.
//!
//! The input projections `xp = x W_ih^T + b_ih` of all steps are computed beforehand in
//! one large product; each step here does one `[B, H] x [H, 3H]` product and one pass of
//! gate arithmetic. The backward pass does one `[B, 3H] x [3H, H]` product per step and
//! accumulates the recurrent weight gradient in a single `[3H, T*B] x [T*B, H]` product
//! at the end. All buffers are allocated once per call.
//!
//! Padding: where `mask[b, t]` is 0 the state is carried over unchanged, so the output
//! at the last step is each sequence's state after its last real token.

use super::{math, sgemm};

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GruDims {
    pub batch: usize,
    pub steps: usize,
    pub hidden: usize,
}

/// What the forward pass keeps for the backward pass, time-major (`[T, B, H]`).
#[derive(Debug, Clone, Default)]
pub struct GruSaved {
    pub r: Vec<f32>,
    pub z: Vec<f32>,
    pub n: Vec<f32>,
    /// `h W_hn^T + b_hn`, the hidden part of the candidate's pre-activation.
    pub ghn: Vec<f32>,
    /// The state entering each step.
    pub h_prev: Vec<f32>,
    /// LayerNorm only: the normalised recurrent product `[T, B, 3H]` and each gate's
    /// reciprocal standard deviation `[T, B, 3]`.
    pub ghat: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Per-gate LayerNorm of the recurrent product, `y = (g - mean) / sqrt(var + eps) * gamma
/// + beta` over each gate's `H` values; `gamma`, `beta`: `[3H]`.
#[derive(Debug, Clone, Copy)]
pub struct GateNorm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
}

/// The epsilon of the LayerNorm (as in the step-by-step path).
pub const LN_EPS: f32 = 1e-5;

/// Forward. `xp`: `[B, T, 3H]`; `h0`: `[B, H]`; `w_hh`: `[3H, H]`; `b_hh`: `[3H]`;
/// `mask`: optional `[B, T]`; `out`: `[B, T, H]`. Fills `saved` (reused across calls).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    d: GruDims,
    xp: &[f32],
    h0: &[f32],
    w_hh: &[f32],
    b_hh: &[f32],
    mask: Option<&[f32]>,
    ln: Option<GateNorm>,
    out: &mut [f32],
    s: &mut GruSaved,
    threads: usize,
) {
    let GruDims {
        batch: bs,
        steps: t_len,
        hidden: h,
    } = d;
    let g = 3 * h;
    assert_eq!(xp.len(), bs * t_len * g);
    assert_eq!(h0.len(), bs * h);
    assert_eq!(w_hh.len(), g * h);
    assert_eq!(b_hh.len(), g);
    assert_eq!(out.len(), bs * t_len * h);
    if let Some(m) = mask {
        assert_eq!(m.len(), bs * t_len);
    }
    let n_all = t_len * bs * h;
    for v in [&mut s.r, &mut s.z, &mut s.n, &mut s.ghn, &mut s.h_prev] {
        v.clear();
        v.resize(n_all, 0.0);
    }
    if ln.is_some() {
        s.ghat.clear();
        s.ghat.resize(t_len * bs * g, 0.0);
        s.rstd.clear();
        s.rstd.resize(t_len * bs * 3, 0.0);
    }
    let mut hcur = h0.to_vec();
    let mut gh = vec![0.0f32; bs * g];
    for t in 0..t_len {
        // gh = h W_hh^T: W_hh^T element (p, j) = w_hh[j * h + p].
        sgemm(
            bs, g, h, &hcur, h, 1, w_hh, 1, h, &mut gh, g, false, threads,
        );
        if let Some(norm) = ln {
            for b in 0..bs {
                let row = &mut gh[b * g..(b + 1) * g];
                let at = (t * bs + b) * g;
                for k in 0..3 {
                    let seg = &mut row[k * h..(k + 1) * h];
                    let mean = seg.iter().sum::<f32>() / h as f32;
                    let var = seg.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / h as f32;
                    let rstd = 1.0 / (var + LN_EPS).sqrt();
                    s.rstd[(t * bs + b) * 3 + k] = rstd;
                    let xhat = &mut s.ghat[at + k * h..at + (k + 1) * h];
                    let gm = &norm.gamma[k * h..(k + 1) * h];
                    let bt = &norm.beta[k * h..(k + 1) * h];
                    for j in 0..h {
                        let xh = (seg[j] - mean) * rstd;
                        xhat[j] = xh;
                        seg[j] = xh * gm[j] + bt[j];
                    }
                }
            }
        }
        for b in 0..bs {
            let m = mask.map_or(1.0, |m| m[b * t_len + t]);
            let x = &xp[(b * t_len + t) * g..(b * t_len + t + 1) * g];
            let ghb = &gh[b * g..(b + 1) * g];
            let base = (t * bs + b) * h;
            let o = &mut out[(b * t_len + t) * h..(b * t_len + t + 1) * h];
            let hb = &mut hcur[b * h..(b + 1) * h];
            gates_row(
                h,
                m,
                x,
                ghb,
                b_hh,
                &mut s.r[base..base + h],
                &mut s.z[base..base + h],
                &mut s.n[base..base + h],
                &mut s.ghn[base..base + h],
                &mut s.h_prev[base..base + h],
                hb,
                o,
            );
        }
    }
}

math::multiversion! {
    /// The gate arithmetic of one batch row at one step.
    ///
    /// Gates from the input projection `x` and recurrent product `gh` (`[3H]` each), the
    /// new state into `hb` (which holds the previous one) and `o`; keeps r, z, n, the
    /// candidate's hidden part and the previous state for the backward pass. Element-wise
    /// passes, each simple enough to vectorise.
    #[allow(clippy::too_many_arguments)]
    pub fn gates_row(
        h: usize,
        m: f32,
        x: &[f32],
        gh: &[f32],
        b_hh: &[f32],
        r: &mut [f32],
        z: &mut [f32],
        n: &mut [f32],
        ghn: &mut [f32],
        hp: &mut [f32],
        hb: &mut [f32],
        o: &mut [f32],
    ) {
        let (r, z, n, ghn, hp, hb, o) = (
            &mut r[..h],
            &mut z[..h],
            &mut n[..h],
            &mut ghn[..h],
            &mut hp[..h],
            &mut hb[..h],
            &mut o[..h],
        );
        let (x, gh, b) = (&x[..3 * h], &gh[..3 * h], &b_hh[..3 * h]);
        for j in 0..h {
            r[j] = math::sigmoid(x[j] + gh[j] + b[j]);
            z[j] = math::sigmoid(x[h + j] + gh[h + j] + b[h + j]);
            ghn[j] = gh[2 * h + j] + b[2 * h + j];
        }
        for j in 0..h {
            n[j] = math::tanh(x[2 * h + j] + r[j] * ghn[j]);
        }
        for j in 0..h {
            let p = hb[j];
            hp[j] = p;
            let hn = n[j] + z[j] * (p - n[j]);
            let v = p + m * (hn - p);
            hb[j] = v;
            o[j] = v;
        }
    }
}

math::multiversion! {
    /// The backward gate arithmetic of one batch row at one step: from the gradient
    /// reaching this step's state (`dh`, carried, plus `dout`) to the gradients of the
    /// input projection (`dx`), of the recurrent product (`dg`, `[3H]`) and, through the
    /// direct paths, of the previous state (written back into `dh`).
    #[allow(clippy::too_many_arguments)]
    pub fn grad_row(
        h: usize,
        m: f32,
        dout: &[f32],
        r: &[f32],
        z: &[f32],
        n: &[f32],
        ghn: &[f32],
        hp: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        dh: &mut [f32],
    ) {
        let (dout, r, z, n, ghn, hp, dh) = (
            &dout[..h],
            &r[..h],
            &z[..h],
            &n[..h],
            &ghn[..h],
            &hp[..h],
            &mut dh[..h],
        );
        let (dx, dg) = (&mut dx[..3 * h], &mut dg[..3 * h]);
        for j in 0..h {
            let gsum = dh[j] + dout[j];
            let dhn = m * gsum;
            let dn = dhn * (1.0 - z[j]);
            let dz = dhn * (hp[j] - n[j]);
            let dan = dn * (1.0 - n[j] * n[j]);
            let dr = dan * ghn[j];
            let dar = dr * r[j] * (1.0 - r[j]);
            let daz = dz * z[j] * (1.0 - z[j]);
            dx[j] = dar;
            dx[h + j] = daz;
            dx[2 * h + j] = dan;
            dg[j] = dar;
            dg[h + j] = daz;
            dg[2 * h + j] = dan * r[j];
            // Direct paths to h_{t-1}: the carried part and h' = ... + z h.
            dh[j] = (1.0 - m) * gsum + dhn * z[j];
        }
    }
}

/// Gradients of one call.
#[derive(Debug, Clone, Default)]
pub struct GruGrads {
    /// `[B, T, 3H]`
    pub dxp: Vec<f32>,
    /// `[B, H]`
    pub dh0: Vec<f32>,
    /// `[3H, H]`
    pub dw_hh: Vec<f32>,
    /// `[3H]`
    pub db_hh: Vec<f32>,
    /// LayerNorm only: `[3H]` each (empty otherwise).
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// Backward through time given `dout` (`[B, T, H]`, the gradient of every output).
pub fn backward(
    d: GruDims,
    w_hh: &[f32],
    mask: Option<&[f32]>,
    ln: Option<GateNorm>,
    saved: &GruSaved,
    dout: &[f32],
    threads: usize,
) -> GruGrads {
    let GruDims {
        batch: bs,
        steps: t_len,
        hidden: h,
    } = d;
    let g = 3 * h;
    assert_eq!(dout.len(), bs * t_len * h);
    assert_eq!(saved.r.len(), t_len * bs * h);
    let mut dxp = vec![0.0f32; bs * t_len * g];
    // All steps' gate gradients, time-major [T*B, 3H], for the weight gradient.
    let mut dgh = vec![0.0f32; t_len * bs * g];
    let mut dh = vec![0.0f32; bs * h];
    let mut db_hh = vec![0.0f32; g];
    let (mut dgamma, mut dbeta) = match ln {
        Some(_) => (vec![0.0f32; g], vec![0.0f32; g]),
        None => (Vec::new(), Vec::new()),
    };
    for t in (0..t_len).rev() {
        for b in 0..bs {
            let m = mask.map_or(1.0, |m| m[b * t_len + t]);
            let base = (t * bs + b) * h;
            let dx = &mut dxp[(b * t_len + t) * g..(b * t_len + t + 1) * g];
            let dg = &mut dgh[(t * bs + b) * g..(t * bs + b + 1) * g];
            let dhb = &mut dh[b * h..(b + 1) * h];
            let dob = &dout[(b * t_len + t) * h..(b * t_len + t + 1) * h];
            grad_row(
                h,
                m,
                dob,
                &saved.r[base..base + h],
                &saved.z[base..base + h],
                &saved.n[base..base + h],
                &saved.ghn[base..base + h],
                &saved.h_prev[base..base + h],
                dx,
                dg,
                dhb,
            );
            for (acc, v) in db_hh.iter_mut().zip(dg.iter()) {
                *acc += v;
            }
            if let Some(norm) = ln {
                // Through the LayerNorm: dg becomes the gradient of the raw product.
                let at = (t * bs + b) * g;
                for k in 0..3 {
                    let xh = &saved.ghat[at + k * h..at + (k + 1) * h];
                    let rstd = saved.rstd[(t * bs + b) * 3 + k];
                    let seg = &mut dg[k * h..(k + 1) * h];
                    let gm = &norm.gamma[k * h..(k + 1) * h];
                    let (mut m1, mut m2) = (0.0f32, 0.0f32);
                    for j in 0..h {
                        dbeta[k * h + j] += seg[j];
                        dgamma[k * h + j] += seg[j] * xh[j];
                        let dxh = seg[j] * gm[j];
                        m1 += dxh;
                        m2 += dxh * xh[j];
                        seg[j] = dxh;
                    }
                    let (m1, m2) = (m1 / h as f32, m2 / h as f32);
                    for j in 0..h {
                        seg[j] = rstd * (seg[j] - m1 - xh[j] * m2);
                    }
                }
            }
        }
        // dh += dgh_t W_hh  ([B, 3H] x [3H, H]).
        let dg_t = &dgh[t * bs * g..(t + 1) * bs * g];
        sgemm(bs, h, g, dg_t, g, 1, w_hh, h, 1, &mut dh, h, true, threads);
    }
    // dW_hh = dgh^T h_prev: [3H, T*B] x [T*B, H], one product.
    let rows = t_len * bs;
    let mut dw_hh = vec![0.0f32; g * h];
    sgemm(
        g,
        h,
        rows,
        &dgh,
        1,
        g,
        &saved.h_prev,
        h,
        1,
        &mut dw_hh,
        h,
        false,
        threads,
    );
    GruGrads {
        dxp,
        dh0: dh,
        dw_hh,
        db_hh,
        dgamma,
        dbeta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::test_values as rand;

    /// Analytic gradients of `sum(out * c)` equal central finite differences (in f64
    /// sums of f32 runs), for every input, with and without the gate LayerNorm.
    #[test]
    fn backward_matches_finite_differences() {
        let d = GruDims {
            batch: 3,
            steps: 4,
            hidden: 5,
        };
        let g = 3 * d.hidden;
        let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0];
        let c = rand(d.batch * d.steps * d.hidden, 5);
        for with_ln in [false, true] {
            // xp, h0, w_hh, b_hh, gamma, beta
            let args0 = [
                rand(d.batch * d.steps * g, 1),
                rand(d.batch * d.hidden, 2),
                rand(g * d.hidden, 3)
                    .iter()
                    .map(|x| x * 0.5)
                    .collect::<Vec<_>>(),
                rand(g, 4),
                rand(g, 6).iter().map(|x| 1.0 + 0.3 * x).collect::<Vec<_>>(),
                rand(g, 7).iter().map(|x| 0.2 * x).collect::<Vec<_>>(),
            ];
            let run = |a: &[Vec<f32>; 6], saved: &mut GruSaved| {
                let ln = with_ln.then(|| GateNorm {
                    gamma: &a[4],
                    beta: &a[5],
                });
                let mut out = vec![0.0; c.len()];
                forward(
                    d,
                    &a[0],
                    &a[1],
                    &a[2],
                    &a[3],
                    Some(&mask),
                    ln,
                    &mut out,
                    saved,
                    1,
                );
                out.iter()
                    .zip(&c)
                    .map(|(o, c)| *o as f64 * *c as f64)
                    .sum::<f64>()
            };
            let mut saved = GruSaved::default();
            run(&args0, &mut saved);
            let ln = with_ln.then(|| GateNorm {
                gamma: &args0[4],
                beta: &args0[5],
            });
            let gr = backward(d, &args0[2], Some(&mask), ln, &saved, &c, 1);
            let mut analytic = vec![&gr.dxp, &gr.dh0, &gr.dw_hh, &gr.db_hh];
            if with_ln {
                analytic.push(&gr.dgamma);
                analytic.push(&gr.dbeta);
            }
            let eps = 1e-3f32;
            for (which, an) in analytic.iter().enumerate() {
                for i in 0..an.len() {
                    let mut p = args0.clone();
                    p[which][i] += eps;
                    let up = run(&p, &mut GruSaved::default());
                    p[which][i] -= 2.0 * eps;
                    let down = run(&p, &mut GruSaved::default());
                    let fd = (up - down) / (2.0 * eps as f64);
                    let x = an[i] as f64;
                    assert!(
                        (fd - x).abs() < 2e-3 + 1e-2 * fd.abs(),
                        "ln={with_ln} arg {which}[{i}]: analytic {x} fd {fd}"
                    );
                }
            }
        }
    }
}
