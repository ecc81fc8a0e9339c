//! The CTR models' gradients against central finite differences of their own loss, for
//! every kind (LR, FM, DeepFM, Wide & Deep), dense and per-row; and FM's pairwise term
//! against its definition as a sum over field pairs.

use shoal_ctr::model::{CtrConfig, CtrKind, CtrModel, Workspace};

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn mean_loss(m: &CtrModel, dense: &[f32], rows: &[f32], labels: &[f32], batch: usize) -> f64 {
    let mut ws = Workspace::default();
    let mut dg = vec![0.0; m.dense_len()];
    let mut rg = vec![0.0; rows.len()];
    m.forward_backward(dense, rows, labels, batch, &mut ws, &mut dg, &mut rg)
        .unwrap()
        / batch as f64
}

#[test]
fn gradients_match_finite_differences() {
    for kind in [CtrKind::Lr, CtrKind::Fm, CtrKind::Deepfm, CtrKind::WideDeep] {
        let cfg = CtrConfig {
            kind,
            fields: 3,
            dim: 2,
            hidden: vec![5, 4],
        };
        let m = CtrModel::new(cfg.clone()).unwrap();
        let batch = 6;
        let mut dense = m.init_dense(3);
        dense[0] = 0.1;
        // Non-zero biases so that every ReLU path is exercised.
        for (i, v) in values(dense.len(), 11, 0.05)
            .into_iter()
            .enumerate()
            .skip(1)
        {
            dense[i] += v;
        }
        let rows = values(batch * cfg.fields * cfg.row_width(), 7, 0.8);
        let labels: Vec<f32> = (0..batch).map(|b| (b % 2) as f32).collect();
        let mut ws = Workspace::default();
        let mut dg = vec![0.0; m.dense_len()];
        let mut rg = vec![0.0; rows.len()];
        m.forward_backward(&dense, &rows, &labels, batch, &mut ws, &mut dg, &mut rg)
            .unwrap();
        let h = 1e-3f32;
        let center = mean_loss(&m, &dense, &rows, &labels, batch);
        let mut kinks = 0;
        let mut check = |analytic: f32, plus: f64, minus: f64, what: String| {
            let num = (plus - minus) / (2.0 * h as f64);
            // A ReLU switching inside [-h, h] makes the one-sided slopes disagree: the
            // central difference is meaningless there, so such a coordinate is skipped
            // (and counted).
            let (right, left) = ((plus - center) / h as f64, (center - minus) / h as f64);
            if (right - left).abs() > 0.05 * (right.abs() + left.abs()) + 1e-3 {
                kinks += 1;
                return;
            }
            assert!(
                (analytic as f64 - num).abs() <= 2e-4 + 1e-2 * num.abs(),
                "{kind:?} {what}: analytic {analytic} vs numeric {num}"
            );
        };
        for i in 0..dense.len() {
            let (mut p, mut q) = (dense.clone(), dense.clone());
            p[i] += h;
            q[i] -= h;
            check(
                dg[i],
                mean_loss(&m, &p, &rows, &labels, batch),
                mean_loss(&m, &q, &rows, &labels, batch),
                format!("dense[{i}]"),
            );
        }
        for i in 0..rows.len() {
            let (mut p, mut q) = (rows.clone(), rows.clone());
            p[i] += h;
            q[i] -= h;
            check(
                rg[i],
                mean_loss(&m, &dense, &p, &labels, batch),
                mean_loss(&m, &dense, &q, &labels, batch),
                format!("row value {i}"),
            );
        }
        assert!(
            kinks <= 3,
            "{kind:?}: {kinks} coordinates sit on a ReLU kink"
        );
    }
}

#[test]
fn fm_logit_is_bias_plus_weights_plus_pairwise_products() {
    let cfg = CtrConfig {
        kind: CtrKind::Fm,
        fields: 4,
        dim: 3,
        hidden: vec![],
    };
    let m = CtrModel::new(cfg.clone()).unwrap();
    let rows = values(4 * 4, 5, 1.0);
    let mut dense = m.init_dense(0);
    dense[0] = -0.25;
    let mut ws = Workspace::default();
    m.forward(&dense, &rows, 1, &mut ws).unwrap();
    let mut want = -0.25f32;
    for i in 0..4 {
        want += rows[i * 4];
        for j in i + 1..4 {
            for d in 0..3 {
                want += rows[i * 4 + 1 + d] * rows[j * 4 + 1 + d];
            }
        }
    }
    assert!(
        (ws.logits[0] - want).abs() < 1e-5,
        "{} vs {want}",
        ws.logits[0]
    );
}
