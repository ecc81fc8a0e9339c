//! The sparse table against the dense optimizer on a small table: SGD and Adagrad give
//! the dense result for any touch pattern (untouched rows get a zero gradient, which
//! those rules ignore); lazy Adam gives dense Adam when every row is touched every step;
//! FTRL follows a direct transcription of the paper's per-coordinate update.

use shoal_optim::{Optimizer, OptimizerConfig, OptimizerKind, SparseRule, SparseTable};

fn grad(step: usize, row: usize, j: usize) -> f32 {
    (((step * 31 + row * 7 + j * 3) % 17) as f32 - 8.0) / 8.0
}

/// Runs `steps` updates touching `touched(step)` rows of a `rows x dim` table both
/// sparsely and densely; returns (sparse values, dense values) in row order.
fn both(
    kind: OptimizerKind,
    rows: usize,
    dim: usize,
    steps: usize,
    touched: impl Fn(usize) -> Vec<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let cfg = OptimizerConfig {
        kind,
        eps: 1e-6,
        ..Default::default()
    };
    let keys: Vec<u64> = (0..rows as u64).map(|r| r * 1_000_003 + 17).collect();
    let mut t = SparseTable::new(dim, SparseRule::from_dense(&cfg), 0.1, 5).unwrap();
    let mut dense: Vec<f32> = keys
        .iter()
        .flat_map(|&k| (0..dim).map(move |j| (k, j)))
        .map(|(k, j)| t.init_value(k, j))
        .collect();
    let mut opt = Optimizer::new(cfg, rows * dim).unwrap();
    for s in 0..steps {
        let rows_now = touched(s);
        let ks: Vec<u64> = rows_now.iter().map(|&r| keys[r]).collect();
        let g: Vec<f32> = rows_now
            .iter()
            .flat_map(|&r| (0..dim).map(move |j| grad(s, r, j)))
            .collect();
        t.apply(&ks, &g, 0.05).unwrap();
        let mut dg = vec![0.0; rows * dim];
        for &r in &rows_now {
            for j in 0..dim {
                dg[r * dim + j] = grad(s, r, j);
            }
        }
        opt.step(0.05, &mut dense, &dg).unwrap();
    }
    let mut out = vec![0.0; rows * dim];
    t.pull(&keys, &mut out).unwrap();
    (out, dense)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
}

#[test]
fn sgd_and_adagrad_rows_match_the_dense_update() {
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adagrad] {
        // Each step touches a different subset (row 8 never).
        let (s, d) = both(kind, 9, 4, 12, |s| {
            (0..8).filter(|r| (r + s) % 3 != 0).collect()
        });
        assert!(close(&s, &d), "{kind:?}");
    }
}

#[test]
fn lazy_adam_is_dense_adam_when_every_row_is_touched() {
    let (s, d) = both(OptimizerKind::Adam, 6, 3, 10, |_| (0..6).collect());
    assert!(close(&s, &d));
    // ... and differs once rows are skipped (dense Adam keeps moving them).
    let (s, d) = both(OptimizerKind::Adam, 6, 3, 10, |s| {
        (0..6).filter(|r| (r + s) % 2 == 0).collect()
    });
    assert!(!close(&s, &d));
}

#[test]
fn ftrl_follows_the_per_coordinate_rule() {
    let (alpha, beta, l1, l2) = (0.1f32, 1.0f32, 0.05f32, 0.01f32);
    let mut t = SparseTable::new(2, SparseRule::Ftrl { beta, l1, l2 }, 0.1, 0).unwrap();
    let (mut z, mut n, mut w) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
    for s in 0..20 {
        let g = [grad(s, 0, 0), grad(s, 0, 1) * 0.01];
        t.apply(&[42], &g, alpha).unwrap();
        for j in 0..2 {
            let sigma = ((n[j] + g[j] * g[j]).sqrt() - n[j].sqrt()) / alpha;
            z[j] += g[j] - sigma * w[j];
            n[j] += g[j] * g[j];
            w[j] = if z[j].abs() <= l1 {
                0.0
            } else {
                -(z[j] - z[j].signum() * l1) / ((beta + n[j].sqrt()) / alpha + l2)
            };
        }
    }
    assert!(close(t.get(42).unwrap(), &w));
    assert!(w[0] != 0.0, "the first coordinate should have moved");
    // The tiny second coordinate is held at exactly zero by the L1 term.
    assert_eq!(w[1], 0.0);
}

#[test]
fn rows_are_created_on_first_touch_and_restored_exactly() {
    let rule = SparseRule::LazyAdam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let mut t = SparseTable::new(3, rule, 0.01, 9).unwrap();
    let mut out = vec![0.0; 6];
    t.pull(&[u64::MAX, 1 << 40], &mut out).unwrap();
    assert_eq!(t.len(), 2);
    // Initial values depend on the key, not on the order of first touch.
    let mut u = SparseTable::new(3, rule, 0.01, 9).unwrap();
    let mut out2 = vec![0.0; 6];
    u.pull(&[1 << 40, u64::MAX], &mut out2).unwrap();
    assert_eq!(&out[..3], &out2[3..]);
    t.apply(&[u64::MAX], &[0.1, -0.2, 0.3], 0.01).unwrap();
    let (keys, values) = t.rows();
    let (state, steps) = t.state();
    let mut r = SparseTable::new(3, rule, 0.01, 9).unwrap();
    r.restore(&keys, &values, &state, &steps).unwrap();
    t.apply(&[u64::MAX, 7], &[0.1; 6], 0.01).unwrap();
    r.apply(&[u64::MAX, 7], &[0.1; 6], 0.01).unwrap();
    assert_eq!(t.get(u64::MAX), r.get(u64::MAX));
    assert_eq!(t.get(7), r.get(7));
    assert!(r.restore(&[1, 1], &[0.0; 6], &[0.0; 12], &[0, 0]).is_err());
}

#[test]
fn row_adagrad_keeps_one_accumulator_per_row() {
    let eps = 1e-8f32;
    let mut t = SparseTable::new(3, SparseRule::RowAdagrad { eps }, 0.1, 4).unwrap();
    let mut w: Vec<f32> = (0..3).map(|j| t.init_value(99, j)).collect();
    let mut acc = 0.0f32;
    for s in 0..15 {
        let g: Vec<f32> = (0..3).map(|j| grad(s, 1, j)).collect();
        t.apply(&[99], &g, 0.05).unwrap();
        acc += g.iter().map(|x| x * x).sum::<f32>() / 3.0;
        for (w, g) in w.iter_mut().zip(&g) {
            *w -= 0.05 * g / (acc.sqrt() + eps);
        }
    }
    assert!(close(t.get(99).unwrap(), &w));
    // One state value per row.
    assert_eq!(t.state().0.len(), 1);
}

#[test]
fn idle_rows_are_evicted_and_the_rest_kept_intact() {
    let rule = SparseRule::LazyAdam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let mut t = SparseTable::new(2, rule, 0.1, 3).unwrap();
    assert!(t.evict_idle(1).is_err(), "eviction needs tracking");
    t.track_updates();
    // Keys 0..40 updated at ticks 0..4; then only the even ones for 10 more ticks.
    for tick in 0..14u32 {
        let keys: Vec<u64> = (0..40u64).filter(|k| tick < 4 || k % 2 == 0).collect();
        let g = vec![0.1f32; keys.len() * 2];
        t.apply(&keys, &g, 0.01).unwrap();
        t.tick();
    }
    // A copy to compare the survivors with.
    let mut reference = t.clone();
    let before: Vec<Vec<f32>> = (0..40u64)
        .map(|k| reference.get(k).unwrap().to_vec())
        .collect();
    assert_eq!(t.evict_idle(5).unwrap(), 20);
    assert_eq!(t.len(), 20);
    for k in 0..40u64 {
        match t.get(k) {
            Some(row) => {
                assert_eq!(k % 2, 0, "odd key {k} should have gone");
                assert_eq!(row, &before[k as usize][..]);
            }
            None => assert_eq!(k % 2, 1, "even key {k} was evicted"),
        }
    }
    // Survivors keep their optimizer state: one more update matches the reference.
    t.apply(&[2, 4], &[0.3; 4], 0.01).unwrap();
    reference.apply(&[2, 4], &[0.3; 4], 0.01).unwrap();
    assert_eq!(t.get(2), reference.get(2));
    assert_eq!(t.get(4), reference.get(4));
    // An evicted key starts afresh.
    let mut fresh = vec![0.0; 2];
    t.pull(&[1], &mut fresh).unwrap();
    assert_eq!(fresh, vec![t.init_value(1, 0), t.init_value(1, 1)]);
    let (keys, _) = t.rows();
    assert_eq!(keys.len(), 21);
}

/// Eviction compacts across the table's fixed blocks (16,384 rows each): survivors moved
/// from later blocks into earlier ones keep their values.
#[test]
fn eviction_compacts_across_blocks() {
    let mut t = SparseTable::new(3, SparseRule::RowAdagrad { eps: 1e-8 }, 0.1, 8).unwrap();
    t.track_updates();
    let keys: Vec<u64> = (0..40_000u64).collect();
    t.apply(&keys, &vec![0.2; keys.len() * 3], 0.01).unwrap();
    t.tick();
    t.tick();
    // Keep every third key fresh; the rest go idle.
    let fresh: Vec<u64> = keys.iter().copied().filter(|k| k % 3 == 0).collect();
    t.apply(&fresh, &vec![-0.1; fresh.len() * 3], 0.01).unwrap();
    let want: Vec<Vec<f32>> = fresh.iter().map(|&k| t.get(k).unwrap().to_vec()).collect();
    assert_eq!(t.evict_idle(1).unwrap(), keys.len() - fresh.len());
    assert_eq!(t.len(), fresh.len());
    for (k, w) in fresh.iter().zip(&want) {
        assert_eq!(t.get(*k).unwrap(), &w[..], "key {k}");
    }
    assert!(t.get(1).is_none() && t.get(39_998).is_none());
}
