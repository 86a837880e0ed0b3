//! Learning-rate schedules and gradient-norm clipping, as plain arithmetic the engine applies.

use serde::{Deserialize, Serialize};

use crate::config::ConfigErrors;
use crate::error::{Error, Result};

/// The shape of the learning rate after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Constant (DeepEyes).
    #[default]
    Constant,
    /// Half a cosine from the base rate down to `min-lr-ratio` × base at the last step.
    Cosine,
}

/// A learning-rate schedule: linear warm-up, then constant or cosine decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ScheduleConfig {
    /// `constant` or `cosine`.
    pub kind: ScheduleKind,
    /// Optimizer steps of linear warm-up (0).
    pub warmup_steps: u64,
    /// Floor of the cosine decay as a fraction of the base rate (0).
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl ScheduleConfig {
    /// The multiplier of the base rate at optimizer step `step` (0-based) of `total_steps`.
    ///
    /// Warm-up ramps linearly as `(step + 1) / warmup_steps`, so the first step already moves
    /// (unlike Hugging Face's ramp, which starts at 0). Cosine decays over the steps after
    /// warm-up and reaches `min_lr_ratio` at the last step; steps past `total_steps` stay there
    /// (a run with a single step after warm-up keeps the base rate).
    ///
    /// ```
    /// use deepeyes_rl::schedule::{ScheduleConfig, ScheduleKind};
    ///
    /// let s = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_steps: 2, min_lr_ratio: 0.1 };
    /// assert_eq!(s.multiplier(0, 10), 0.5);
    /// assert_eq!(s.multiplier(2, 10), 1.0);
    /// assert!((s.multiplier(9, 10) - 0.1).abs() < 1e-12);
    /// ```
    pub fn multiplier(&self, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                let span = total_steps
                    .saturating_sub(self.warmup_steps)
                    .saturating_sub(1);
                let progress = if span == 0 {
                    0.0
                } else {
                    ((step - self.warmup_steps) as f64 / span as f64).min(1.0)
                };
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos
            }
        }
    }

    /// The learning rate at `step` of `total_steps` for base rate `base_lr`.
    pub fn lr(&self, base_lr: f64, step: u64, total_steps: u64) -> f64 {
        base_lr * self.multiplier(step, total_steps)
    }

    pub(crate) fn check(&self, prefix: &str, total_steps: u64, errs: &mut ConfigErrors) {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            errs.push(format!("{prefix}.min-lr-ratio"), "must be in [0, 1]");
        }
        if self.warmup_steps > total_steps {
            errs.push(
                format!("{prefix}.warmup-steps"),
                format!(
                    "{} is more than the {total_steps} steps of the run",
                    self.warmup_steps
                ),
            );
        }
    }
}

/// The factor that scales gradients so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` computes it: `min(1, max_norm / (norm + 1e-6))`.
///
/// Errors when `norm` is not finite: the step must be skipped (verl skips it too), and the error
/// says so instead of letting NaN reach the weights.
pub fn grad_clip_factor(norm: f64, max_norm: Option<f64>) -> Result<f64> {
    if !norm.is_finite() {
        return Err(Error::invalid(
            "grad_norm",
            format!("gradient norm is {norm}; skip this update"),
        ));
    }
    Ok(match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_with_warmup() {
        let s = ScheduleConfig {
            warmup_steps: 4,
            ..ScheduleConfig::default()
        };
        let m: Vec<f64> = (0..6).map(|i| s.multiplier(i, 6)).collect();
        assert_eq!(m, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
        assert_eq!(ScheduleConfig::default().lr(1e-6, 0, 80), 1e-6);
    }

    #[test]
    fn cosine_is_monotone_and_hits_the_floor() {
        let s = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            min_lr_ratio: 0.2,
        };
        let m: Vec<f64> = (0..20).map(|i| s.multiplier(i, 20)).collect();
        assert_eq!(m[0], 1.0);
        assert!(m.windows(2).all(|w| w[1] <= w[0]));
        assert!((m[19] - 0.2).abs() < 1e-12);
        assert!((s.multiplier(50, 20) - 0.2).abs() < 1e-12);
        assert_eq!(s.multiplier(0, 1), 1.0);
    }

    #[test]
    fn clip_factor() {
        assert_eq!(grad_clip_factor(0.5, Some(1.0)).unwrap(), 1.0);
        assert!((grad_clip_factor(4.0, Some(1.0)).unwrap() - 0.25).abs() < 1e-6);
        assert_eq!(grad_clip_factor(4.0, None).unwrap(), 1.0);
        assert!(grad_clip_factor(f64::NAN, Some(1.0)).is_err());
    }
}
