//! SGD with momentum, Adam and Adagrad over flat buffers, with PyTorch's update rules.

use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Values per parallel block of an element-wise update.
const BLOCK: usize = 1 << 16;

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adagrad,
}

/// Hyper-parameters of an optimizer (the learning rate comes per step from a schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// SGD momentum (0 disables it).
    pub momentum: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Adam/Adagrad epsilon. PyTorch's default is 1e-8 (Adam) and 1e-10 (Adagrad).
    pub eps: f32,
    /// L2 penalty added to the gradient, as PyTorch's `weight_decay`.
    pub weight_decay: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adam,
            momentum: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: f32, why| Error::InvalidConfig {
            field,
            value: value.to_string(),
            why,
        };
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad("momentum", self.momentum, "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return Err(bad("beta1", self.beta1, "must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("beta2", self.beta2, "must be in [0, 1)"));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(bad("eps", self.eps, "must be positive"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(bad("weight_decay", self.weight_decay, "must be >= 0"));
        }
        Ok(())
    }
}

/// An optimizer over one flat parameter buffer of fixed length; its state buffers have
/// the same length and layout.
#[derive(Debug, Clone)]
pub struct Optimizer {
    cfg: OptimizerConfig,
    steps: u64,
    /// First moment (Adam), momentum buffer (SGD), squared-gradient sum (Adagrad).
    m: Vec<f32>,
    /// Second moment (Adam only).
    v: Vec<f32>,
}

impl Optimizer {
    /// An optimizer for `len` parameters, state zeroed.
    pub fn new(cfg: OptimizerConfig, len: usize) -> Result<Self> {
        cfg.validate()?;
        let v = if cfg.kind == OptimizerKind::Adam {
            vec![0.0; len]
        } else {
            Vec::new()
        };
        Ok(Self {
            cfg,
            steps: 0,
            m: vec![0.0; len],
            v,
        })
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Number of parameters this optimizer updates.
    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// Applies one update with learning rate `lr` to `params` given `grads`.
    pub fn step(&mut self, lr: f32, params: &mut [f32], grads: &[f32]) -> Result<()> {
        self.step_scaled(lr, params, grads, 1.0)
    }

    /// [`Optimizer::step`] with every gradient multiplied by `scale` first (gradient
    /// clipping without a pass of its own; `scale` 1 changes nothing).
    pub fn step_scaled(
        &mut self,
        lr: f32,
        params: &mut [f32],
        grads: &[f32],
        scale: f32,
    ) -> Result<()> {
        let n = self.m.len();
        if params.len() != n {
            return Err(Error::LengthMismatch {
                what: "parameters".into(),
                expected: n,
                got: params.len(),
            });
        }
        if grads.len() != n {
            return Err(Error::LengthMismatch {
                what: "gradients".into(),
                expected: n,
                got: grads.len(),
            });
        }
        self.steps += 1;
        let c = self.cfg;
        let wd = c.weight_decay;
        match c.kind {
            OptimizerKind::Sgd => {
                let first = self.steps == 1;
                for ((p, &g), b) in params.iter_mut().zip(grads).zip(self.m.iter_mut()) {
                    let g = g * scale + wd * *p;
                    let d = if c.momentum > 0.0 {
                        *b = if first { g } else { c.momentum * *b + g };
                        *b
                    } else {
                        g
                    };
                    *p -= lr * d;
                }
            }
            OptimizerKind::Adam => {
                let t = self.steps as i32;
                let bc1 = 1.0 - (c.beta1 as f64).powi(t);
                let bc2 = 1.0 - (c.beta2 as f64).powi(t);
                let step_size = (lr as f64 / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                // Blocks in parallel: the update is element-wise.
                params
                    .par_chunks_mut(BLOCK)
                    .zip(grads.par_chunks(BLOCK))
                    .zip(self.m.par_chunks_mut(BLOCK))
                    .zip(self.v.par_chunks_mut(BLOCK))
                    .for_each(|(((p, g), m), v)| {
                        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                            let g = g * scale + wd * *p;
                            *m = c.beta1 * *m + (1.0 - c.beta1) * g;
                            *v = c.beta2 * *v + (1.0 - c.beta2) * g * g;
                            let denom = v.sqrt() / bc2_sqrt + c.eps;
                            *p -= step_size * *m / denom;
                        }
                    });
            }
            OptimizerKind::Adagrad => {
                for ((p, &g), s) in params.iter_mut().zip(grads).zip(self.m.iter_mut()) {
                    let g = g * scale + wd * *p;
                    *s += g * g;
                    *p -= lr * g / (s.sqrt() + c.eps);
                }
            }
        }
        Ok(())
    }

    /// The state buffers by name, for checkpoints.
    pub fn state(&self) -> Vec<(&'static str, &[f32])> {
        match self.cfg.kind {
            OptimizerKind::Sgd => vec![("momentum", &self.m)],
            OptimizerKind::Adam => vec![("exp_avg", &self.m), ("exp_avg_sq", &self.v)],
            OptimizerKind::Adagrad => vec![("sum", &self.m)],
        }
    }

    /// [`Optimizer::state`] copied out (to send or save while the optimizer goes on).
    pub fn state_owned(&self) -> Vec<(String, Vec<f32>)> {
        self.state()
            .into_iter()
            .map(|(n, d)| (n.to_string(), d.to_vec()))
            .collect()
    }

    /// Restores state saved by [`Optimizer::state`] and the step counter.
    pub fn load_state(&mut self, steps: u64, buffers: &[(&str, &[f32])]) -> Result<()> {
        let names: Vec<&'static str> = self.state().iter().map(|(n, _)| *n).collect();
        for name in &names {
            let Some((_, data)) = buffers.iter().find(|(n, _)| n == name) else {
                return Err(Error::State(format!("missing buffer '{name}'")));
            };
            if data.len() != self.m.len() {
                return Err(Error::LengthMismatch {
                    what: format!("optimizer state buffer '{name}'"),
                    expected: self.m.len(),
                    got: data.len(),
                });
            }
        }
        for (name, data) in buffers {
            match *name {
                "momentum" | "sum" | "exp_avg" if names.contains(name) => {
                    self.m.copy_from_slice(data)
                }
                "exp_avg_sq" if names.contains(name) => self.v.copy_from_slice(data),
                other => {
                    return Err(Error::State(format!(
                        "unexpected buffer '{other}' for a {:?} optimizer",
                        self.cfg.kind
                    )))
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: OptimizerKind) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            momentum: 0.9,
            ..Default::default()
        }
    }

    /// Adam's first step moves every parameter by lr * sign(g) (bias correction makes
    /// m_hat = g and v_hat = g^2), whatever the gradient's magnitude.
    #[test]
    fn adam_first_step_is_lr_times_sign() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Adam), 3).unwrap();
        let mut p = vec![1.0, 1.0, 1.0];
        o.step(0.1, &mut p, &[5.0, -0.01, 2.0]).unwrap();
        for (got, want) in p.iter().zip([0.9, 1.1, 0.9]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    /// Adam minimises a quadratic.
    #[test]
    fn adam_minimises_quadratic() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Adam), 2).unwrap();
        let mut p = vec![3.0f32, -2.0];
        for _ in 0..2000 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * (x - 1.0)).collect();
            o.step(0.05, &mut p, &g).unwrap();
        }
        assert!(p.iter().all(|x| (x - 1.0).abs() < 1e-2), "{p:?}");
    }

    /// SGD with momentum follows the recurrence written out by hand.
    #[test]
    fn sgd_momentum_recurrence() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Sgd), 1).unwrap();
        let mut p = vec![0.0];
        o.step(0.1, &mut p, &[1.0]).unwrap(); // buf = 1, p = -0.1
        o.step(0.1, &mut p, &[1.0]).unwrap(); // buf = 1.9, p = -0.29
        assert!((p[0] + 0.29).abs() < 1e-6);
    }

    #[test]
    fn adagrad_steps() {
        let mut o = Optimizer::new(
            OptimizerConfig {
                eps: 1e-10,
                ..cfg(OptimizerKind::Adagrad)
            },
            1,
        )
        .unwrap();
        let mut p = vec![0.0];
        o.step(1.0, &mut p, &[2.0]).unwrap(); // s = 4, p = -1
        o.step(1.0, &mut p, &[2.0]).unwrap(); // s = 8, p = -1 - 2/sqrt(8)
        assert!((p[0] - (-1.0 - 2.0 / 8f32.sqrt())).abs() < 1e-6);
    }

    /// Saving and restoring state in the middle gives the same trajectory.
    #[test]
    fn state_round_trip_resumes_exactly() {
        let grads = |i: usize| vec![(i as f32).sin(), (i as f32 * 0.7).cos(), 0.3];
        let mut a = Optimizer::new(cfg(OptimizerKind::Adam), 3).unwrap();
        let mut pa = vec![0.5; 3];
        for i in 0..10 {
            a.step(0.01, &mut pa, &grads(i)).unwrap();
        }
        let mut b0 = Optimizer::new(cfg(OptimizerKind::Adam), 3).unwrap();
        let mut pb = vec![0.5; 3];
        for i in 0..4 {
            b0.step(0.01, &mut pb, &grads(i)).unwrap();
        }
        let saved: Vec<(String, Vec<f32>)> = b0
            .state()
            .iter()
            .map(|(n, d)| (n.to_string(), d.to_vec()))
            .collect();
        let mut b = Optimizer::new(cfg(OptimizerKind::Adam), 3).unwrap();
        let view: Vec<(&str, &[f32])> = saved
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        b.load_state(b0.steps(), &view).unwrap();
        for i in 4..10 {
            b.step(0.01, &mut pb, &grads(i)).unwrap();
        }
        assert_eq!(pa, pb);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Adam), 2).unwrap();
        assert!(o.step(0.1, &mut [0.0; 3], &[0.0; 3]).is_err());
        assert!(o.step(0.1, &mut [0.0; 2], &[0.0; 1]).is_err());
        assert!(o.load_state(1, &[("exp_avg", &[0.0; 2])]).is_err());
        assert!(o
            .load_state(1, &[("exp_avg", &[0.0; 2]), ("exp_avg_sq", &[0.0; 5])])
            .is_err());
        let bad = OptimizerConfig {
            beta1: 1.5,
            ..Default::default()
        };
        assert!(Optimizer::new(bad, 1).is_err());
    }
}
