//! Learning-rate schedules: linear warm-up followed by constant, cosine or
//! inverse-square-root decay.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// The base rate after warm-up.
    Constant,
    /// Cosine decay from the base rate to `min_ratio * base` at `total_steps`.
    Cosine,
    /// `base * sqrt(warmup / step)` after warm-up.
    InvSqrt,
}

/// A learning-rate schedule, a pure function of the step number (so a resumed run
/// gets exactly the rates of an uninterrupted one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_ratio: f32,
}

impl LrSchedule {
    /// The rate for the update numbered `step` (0-based).
    pub fn lr(&self, step: u64) -> f32 {
        let s = step + 1;
        if self.warmup_steps > 0 && s <= self.warmup_steps {
            return self.base * s as f32 / self.warmup_steps as f32;
        }
        match self.kind {
            ScheduleKind::Constant => self.base,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let t = ((s - self.warmup_steps.min(s)) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                let min = self.min_ratio as f64;
                (self.base as f64 * (min + (1.0 - min) * cos)) as f32
            }
            ScheduleKind::InvSqrt => {
                let w = self.warmup_steps.max(1) as f32;
                self.base * (w / s as f32).sqrt()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let s = LrSchedule {
            kind: ScheduleKind::Cosine,
            base: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(59) - 0.55).abs() < 1e-3);
        assert!((s.lr(109) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn inv_sqrt_decays() {
        let s = LrSchedule {
            kind: ScheduleKind::InvSqrt,
            base: 1.0,
            warmup_steps: 4,
            total_steps: 0,
            min_ratio: 0.0,
        };
        assert!((s.lr(3) - 1.0).abs() < 1e-6);
        assert!((s.lr(15) - 0.5).abs() < 1e-6);
    }
}
