//! The dense optimizers and clipping at the sizes the NMT model uses (3.7 M values: the
//! parallel paths), against the update rules written out in f64 as PyTorch documents
//! them (`torch.optim.{SGD, Adam, Adagrad}`, `clip_grad_norm_`).

use shoal_optim::{
    clip_coefficient, clip_grad_norm, global_norm, Optimizer, OptimizerConfig, OptimizerKind,
};

/// Deterministic values in [-scale, scale) (SplitMix64).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Above 2^18 values the norm is summed in spans on several threads: it equals the f64
/// sum of squares (f32 lanes inside blocks of 4,096 leave ~1e-7 relative; bound 1e-6)
/// and is the same bits on 1, 2 and 3 threads.
#[test]
fn global_norm_of_millions_of_values_is_exact_and_independent_of_threads() {
    for n in [(1 << 18) + 1, 3 * (1 << 18) + 12_345, 3_723_712] {
        let g = values(n, n as u64, 0.01);
        let want = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let one = in_pool(1, || global_norm(&g));
        assert!(
            (one as f64 - want).abs() <= 1e-6 * want,
            "{n} values: {one} vs {want}"
        );
        for threads in [2, 3] {
            let got = in_pool(threads, || global_norm(&g));
            assert_eq!(
                got.to_bits(),
                one.to_bits(),
                "{n} values on {threads} threads"
            );
        }
    }
}

/// One large gradient among millions of small ones (an embedding row that is hit hard):
/// an f32 running sum would drop the small ones' 3.7 (of 1e6) once it holds the large
/// one; summed by blocks in f64 they count. Within 2e-7 of the f64 norm (measured 3e-8;
/// an f32 running sum: 1.9e-6).
#[test]
fn global_norm_keeps_small_gradients_beside_a_large_one() {
    let mut g = vec![1e-3f32; 3_723_712];
    g[0] = 1e3;
    let want = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let got = global_norm(&g) as f64;
    assert!(
        (got - want).abs() <= 2e-7 * want,
        "{got} vs {want} (without the small ones: 1000)"
    );
}

/// The update rules in f64, one parameter at a time (PyTorch's, with L2 weight decay
/// added to the gradient; SGD without dampening or Nesterov).
struct Reference {
    kind: OptimizerKind,
    cfg: OptimizerConfig,
    t: i32,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn new(cfg: OptimizerConfig, n: usize) -> Self {
        Self {
            kind: cfg.kind,
            cfg,
            t: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, lr: f64, p: &mut [f64], g: &[f32], scale: f64) {
        self.t += 1;
        let c = &self.cfg;
        let (b1, b2, eps, wd) = (
            c.beta1 as f64,
            c.beta2 as f64,
            c.eps as f64,
            c.weight_decay as f64,
        );
        for i in 0..p.len() {
            let g = g[i] as f64 * scale + wd * p[i];
            match self.kind {
                OptimizerKind::Sgd => {
                    let mu = c.momentum as f64;
                    let d = if mu > 0.0 {
                        self.m[i] = if self.t == 1 { g } else { mu * self.m[i] + g };
                        self.m[i]
                    } else {
                        g
                    };
                    p[i] -= lr * d;
                }
                OptimizerKind::Adam => {
                    self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
                    self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
                    let bc1 = 1.0 - b1.powi(self.t);
                    let bc2 = 1.0 - b2.powi(self.t);
                    let denom = self.v[i].sqrt() / bc2.sqrt() + eps;
                    p[i] -= lr / bc1 * self.m[i] / denom;
                }
                OptimizerKind::Adagrad => {
                    self.m[i] += g * g;
                    p[i] -= lr * g / (self.m[i].sqrt() + eps);
                }
            }
        }
    }
}

/// Several updates with the gradient clipped inside the optimizer's pass (a scale below
/// one) on 150,001 parameters (three parallel blocks of Adam and a partial one), for
/// each rule, with and without weight decay: the parameters follow the f64 rules within
/// the f32 rounding of a few updates (bounds below), and equal the bits of clipping
/// first and then stepping with scale 1.
#[test]
fn clipped_updates_follow_the_rules_and_equal_clipping_first() {
    let n = 150_001;
    let configs = [
        OptimizerConfig::default(),
        OptimizerConfig {
            weight_decay: 0.01,
            ..OptimizerConfig::default()
        },
        OptimizerConfig {
            beta1: 0.5,
            beta2: 0.9,
            eps: 1e-3,
            ..OptimizerConfig::default()
        },
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.01,
            ..OptimizerConfig::default()
        },
        OptimizerConfig {
            kind: OptimizerKind::Sgd,
            ..OptimizerConfig::default()
        },
        OptimizerConfig {
            kind: OptimizerKind::Adagrad,
            eps: 1e-10,
            ..OptimizerConfig::default()
        },
    ];
    for cfg in configs {
        let start = values(n, 7, 0.5);
        let mut fused = start.clone();
        let mut separate = start.clone();
        let mut reference: Vec<f64> = start.iter().map(|&x| x as f64).collect();
        let mut opt_fused = Optimizer::new(cfg, n).unwrap();
        let mut opt_separate = Optimizer::new(cfg, n).unwrap();
        let mut opt_ref = Reference::new(cfg, n);
        // Adam and Adagrad move each value by about lr a step; SGD by lr times the
        // (clipped) gradient.
        let lr = if cfg.kind == OptimizerKind::Sgd {
            1.0
        } else {
            0.01
        };
        for step in 0..4u64 {
            // Gradients of norm ~3.7 clipped to 1 (scale ~0.27), except the last step.
            let max_norm = if step == 3 { 1e3 } else { 1.0 };
            let g = values(n, 100 + step, 0.0167);
            let norm = global_norm(&g);
            let scale = clip_coefficient(norm, max_norm);
            assert!(step == 3 || scale < 0.5, "step {step}: the clip is active");
            opt_fused.step_scaled(lr, &mut fused, &g, scale).unwrap();
            let mut clipped = g.clone();
            clip_grad_norm(&mut clipped, max_norm);
            opt_separate.step(lr, &mut separate, &clipped).unwrap();
            opt_ref.step(lr as f64, &mut reference, &g, scale as f64);
        }
        assert_eq!(
            fused, separate,
            "{cfg:?}: clipping in the pass changes bits"
        );
        let moved = start
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(moved > 1e-3, "{cfg:?}: the parameters moved ({moved})");
        let worst = fused
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        // f32 rounding of four updates: measured 2.7e-6 of the largest change without
        // weight decay. With it, `g * scale + wd * p` nearly cancels for some values, and
        // Adam and Adagrad divide by that small sum's own size, so its f32 rounding shows:
        // measured 2.3e-4 (Adam).
        let tol = if cfg.weight_decay > 0.0 { 1e-3 } else { 2e-5 };
        assert!(
            worst <= tol * moved,
            "{cfg:?}: worst {worst:e} against the f64 rule (largest change {moved:e})"
        );
    }
}
