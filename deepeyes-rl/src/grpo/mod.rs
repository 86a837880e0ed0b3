//! GRPO as pure functions: group advantages, the clipped token-level surrogate with its analytic
//! gradient, trajectory masking, DAPO dynamic sampling and the update plan of one step.
//!
//! Nothing here knows about the model: a training engine computes per-token log-probs (and
//! entropies), calls [`policy_loss`], and backpropagates `Σ grad · logp`.

mod advantage;
mod batch;
mod filter;
mod loss;

use serde::{Deserialize, Serialize};

pub use advantage::{GroupStats, group_advantages, group_stats};
pub use batch::{MiniBatch, PreparedBatch, TokenTargets, UpdatePlan, plan_updates, prepare_batch};
pub use filter::{DynamicSampler, SamplerState, loss_keep, zero_variance_groups};
pub use loss::{
    K3_CLAMP, KlEstimator, LOG_RATIO_CLAMP, LossAggregation, LossScale, LossStats, PolicyLossInput,
    PolicyLossOutput, Real, TokenLoss, policy_loss, token_pg_loss,
};

use crate::config::ConfigErrors;

/// How the loss of a micro-batch is normalised when gradients are accumulated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossNormalization {
    /// Each micro-batch is normalised on its own and divided by the accumulation steps (verl as
    /// DeepEyes ran it): [`LossScale::MicroBatch`].
    #[default]
    MicroBatch,
    /// Normalised by the mini-batch's totals, independent of the micro-batch split:
    /// [`LossScale::MiniBatch`].
    MiniBatch,
}

/// DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts until
/// the step has enough informative groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DynamicSamplingConfig {
    /// Whether to filter and refill (DeepEyes: off).
    pub enabled: bool,
    /// Most generation rounds per step; when they run out the step trains on the groups it has.
    pub max_rounds: usize,
}

impl Default for DynamicSamplingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_rounds: 10,
        }
    }
}

/// The GRPO algorithm's settings. Defaults reproduce DeepEyes' 7B run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct GrpoConfig {
    /// Trajectories sampled per prompt (16).
    pub group_size: usize,
    /// Divide by the group's standard deviation (true); false is Dr. GRPO.
    pub norm_by_std: bool,
    /// Added to the standard deviation (1e-6).
    pub adv_epsilon: f64,
    /// Lower ratio clip ε_low (0.2): the ratio is clipped at `1 − ε_low`.
    pub clip_low: f64,
    /// Upper ratio clip ε_high (0.2); DAPO's clip-higher raises it (e.g. 0.28).
    pub clip_high: f64,
    /// Dual-clip bound `c` on negative advantages (3.0); `false` disables it.
    #[serde(with = "crate::config::off_or_number")]
    pub dual_clip: Option<f64>,
    /// Loss aggregation (`token-mean`).
    pub loss_agg_mode: LossAggregation,
    /// Normalisation across gradient accumulation (`micro-batch`).
    pub loss_normalization: LossNormalization,
    /// Weight of the KL penalty to the reference policy (0: no reference model is needed).
    pub kl_coef: f64,
    /// Estimator of that KL (`k3`, the low-variance one).
    pub kl_estimator: KlEstimator,
    /// Weight of the entropy bonus (0).
    pub entropy_coef: f64,
    /// Exclude from the loss trajectories that hit the turn cap (over-turn masking; false).
    pub mask_max_turns: bool,
    /// Exclude from the loss trajectories cut by the per-turn or total token limit (false).
    pub mask_truncated: bool,
    /// DAPO dynamic sampling (off).
    pub dynamic_sampling: DynamicSamplingConfig,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            group_size: 16,
            norm_by_std: true,
            adv_epsilon: 1e-6,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            loss_agg_mode: LossAggregation::TokenMean,
            loss_normalization: LossNormalization::MicroBatch,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            mask_max_turns: false,
            mask_truncated: false,
            dynamic_sampling: DynamicSamplingConfig::default(),
        }
    }
}

impl GrpoConfig {
    /// Whether a reference model is needed (KL coefficient not 0).
    pub fn needs_reference(&self) -> bool {
        self.kl_coef != 0.0
    }

    /// Whether entropies are needed (entropy coefficient not 0).
    pub fn needs_entropy(&self) -> bool {
        self.entropy_coef != 0.0
    }

    /// Checks every value (as `deepeyes train` does for its `[grpo]` table); the error lists each
    /// invalid key.
    pub fn validate(&self) -> crate::Result<()> {
        let mut errs = ConfigErrors::default();
        self.check("grpo", &mut errs);
        errs.into_result("grpo")
    }

    /// Records every invalid value under `prefix` (e.g. `grpo`).
    pub(crate) fn check(&self, prefix: &str, errs: &mut ConfigErrors) {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.group_size == 0 {
            errs.push(key("group-size"), "must be at least 1");
        }
        if !(self.adv_epsilon > 0.0 && self.adv_epsilon.is_finite()) {
            errs.push(key("adv-epsilon"), "must be a positive number");
        }
        if !(self.clip_low > 0.0 && self.clip_low < 1.0) {
            errs.push(key("clip-low"), "must be in (0, 1)");
        }
        if !(self.clip_high > 0.0 && self.clip_high.is_finite()) {
            errs.push(key("clip-high"), "must be a positive number");
        }
        if let Some(c) = self.dual_clip
            && !(c > 1.0 && c.is_finite())
        {
            errs.push(
                key("dual-clip"),
                "must be a number greater than 1, or false to disable it",
            );
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            errs.push(key("kl-coef"), "must be a finite number ≥ 0");
        }
        if !self.entropy_coef.is_finite() {
            errs.push(key("entropy-coef"), "must be a finite number");
        }
        if self.dynamic_sampling.enabled {
            if self.dynamic_sampling.max_rounds == 0 {
                errs.push(key("dynamic-sampling.max-rounds"), "must be at least 1");
            }
            if self.group_size < 2 {
                errs.push(
                    key("dynamic-sampling.enabled"),
                    "needs group-size ≥ 2 (a group of one has no variance to test)",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_validation_and_strict_keys() {
        GrpoConfig::default().validate().unwrap();
        let bad = GrpoConfig {
            clip_high: -1.0,
            kl_coef: f64::NAN,
            ..GrpoConfig::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(
            msg.contains("grpo.clip-high") && msg.contains("grpo.kl-coef"),
            "{msg}"
        );
        let err = toml::from_str::<GrpoConfig>("clip-high = 0.28\nclip-hgh = 1").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `clip-hgh`"),
            "{err}"
        );
        let cfg: GrpoConfig = toml::from_str("clip-high = 0.28\ndual-clip = false").unwrap();
        assert_eq!(
            (cfg.clip_high, cfg.dual_clip, cfg.group_size),
            (0.28, None, 16)
        );
    }
}
