//! The token-level PPO clipped surrogate of GRPO, with its analytic gradient.
//!
//! [`policy_loss`] works on padded `[batch, tokens]` arrays of per-token values that a training
//! engine produced (current log-probs, optionally entropies) plus the fixed targets (old
//! log-probs, advantages, mask, optionally reference log-probs). It returns the loss, the
//! gradient of the loss with respect to each current log-prob (and entropy), and statistics.
//! An autodiff engine then backpropagates the surrogate `Σ gradᵢ · logpᵢ (+ Σ hᵢ · Hᵢ)`, whose
//! gradient with respect to the model parameters equals the loss's, without re-deriving the
//! PPO algebra in tensor code.
//!
//! For each selected token `i` with advantage `A`, ratio `r = exp(logp − old)` (log-ratio clamped
//! to ±20 as verl does):
//!
//! - `ℓ = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))`;
//! - with dual clip `c` and `A < 0`: `ℓ = min(ℓ, −A·c)`;
//! - plus `β·KL(logp, ref)` with the chosen estimator, minus `α·H`;
//!
//! aggregated with the chosen [`LossAggregation`] and [`LossScale`].

use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::grpo::GrpoConfig;

/// Log-ratios are clamped to `±LOG_RATIO_CLAMP` before `exp` (verl's guard against overflow).
pub const LOG_RATIO_CLAMP: f64 = 20.0;
/// The low-variance (k3) KL estimate is clamped to `±K3_CLAMP` (as verl does).
pub const K3_CLAMP: f64 = 10.0;

/// How per-token losses are reduced to one number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggregation {
    /// Mean over every selected token of the batch (DeepEyes).
    #[default]
    TokenMean,
    /// Sum over each sequence's selected tokens, then mean over sequences.
    SeqMeanTokenSum,
    /// Mean over each sequence's selected tokens, then mean over sequences (original GRPO).
    SeqMeanTokenMean,
}

/// Estimator of `KL(π ‖ π_ref)` from the log-probs of the sampled tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlEstimator {
    /// `logp − ref` (unbiased, high variance); verl's `kl`.
    #[serde(alias = "kl")]
    K1,
    /// `½ (logp − ref)²`; verl's `mse`.
    #[serde(alias = "mse")]
    K2,
    /// `exp(ref − logp) − (ref − logp) − 1`, clamped to ±10 (non-negative, low variance); verl's
    /// `low_var_kl`.
    #[default]
    #[serde(alias = "low-var-kl", alias = "low_var_kl")]
    K3,
}

impl KlEstimator {
    /// The estimate and its derivative with respect to `logp`.
    pub fn value_and_grad(self, logp: f64, ref_logp: f64) -> (f64, f64) {
        match self {
            Self::K1 => (logp - ref_logp, 1.0),
            Self::K2 => {
                let d = logp - ref_logp;
                (0.5 * d * d, d)
            }
            Self::K3 => {
                let raw = ref_logp - logp;
                let kl = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
                let dkl = if raw.abs() > LOG_RATIO_CLAMP {
                    0.0
                } else {
                    -1.0
                };
                let ratio = kl.exp();
                let value = ratio - kl - 1.0;
                let clamped = value.clamp(-K3_CLAMP, K3_CLAMP);
                let grad = if value.abs() > K3_CLAMP {
                    0.0
                } else {
                    (ratio - 1.0) * dkl
                };
                (clamped, grad)
            }
        }
    }
}

/// How the aggregated loss of one micro-batch is normalised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossScale {
    /// Normalise within the micro-batch, then divide by the number of gradient-accumulation
    /// steps (verl as DeepEyes ran it). Micro-batches with different token counts weigh equally.
    MicroBatch {
        /// Micro-batches accumulated into one optimizer step (≥ 1).
        accumulation_steps: usize,
    },
    /// Normalise by totals over the whole mini-batch, so the micro-batch losses add up exactly to
    /// the mini-batch loss whatever the split.
    MiniBatch {
        /// Selected tokens in the mini-batch.
        tokens: usize,
        /// Sequences with at least one selected token in the mini-batch.
        sequences: usize,
    },
}

impl LossScale {
    /// A [`LossScale::MiniBatch`] computed from the masks of every micro-batch of a mini-batch.
    pub fn mini_batch<'a, T: Real>(masks: impl IntoIterator<Item = ArrayView2<'a, T>>) -> Self {
        let (mut tokens, mut sequences) = (0usize, 0usize);
        for mask in masks {
            for row in mask.rows() {
                let n = row.iter().filter(|m| m.to_f64() != 0.0).count();
                tokens += n;
                sequences += usize::from(n > 0);
            }
        }
        Self::MiniBatch { tokens, sequences }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The float types the loss accepts (`f32`, `f64`); the math runs in `f64` either way.
pub trait Real: Copy + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed {
    /// Widens to `f64`.
    fn to_f64(self) -> f64;
    /// Narrows from `f64`.
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// The per-token inputs of [`policy_loss`], all `[batch, tokens]`, padded alike. Column `j` of a
/// row is the `j`-th token of that trajectory; only entries where `mask` is 1 are read.
#[derive(Debug, Clone)]
pub struct PolicyLossInput<'a, T: Real = f32> {
    /// Log-probs of the sampled tokens under the current policy (what gradients flow into).
    pub logprobs: ArrayView2<'a, T>,
    /// Log-probs under the policy that is being improved (recomputed before the update).
    pub old_logprobs: ArrayView2<'a, T>,
    /// Per-token advantages (GRPO broadcasts each trajectory's advantage over its tokens).
    pub advantages: ArrayView2<'a, T>,
    /// 1 for tokens that enter the loss (model-generated, trajectory kept), 0 otherwise.
    pub mask: ArrayView2<'a, T>,
    /// Log-probs under the frozen reference policy; required when `kl-coef` is not 0.
    pub ref_logprobs: Option<ArrayView2<'a, T>>,
    /// Per-token entropies of the current policy; required when `entropy-coef` is not 0.
    pub entropy: Option<ArrayView2<'a, T>>,
    /// Log-probs the rollout engine reported while sampling, for the train/rollout mismatch
    /// statistic only.
    pub rollout_logprobs: Option<ArrayView2<'a, T>>,
}

/// What [`policy_loss`] returns.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput<T: Real = f32> {
    /// The scaled loss of this micro-batch: policy-gradient part + `β`·KL − `α`·entropy.
    pub loss: f64,
    /// `∂loss/∂logprobs[b, t]`; 0 wherever the mask is 0.
    pub grad_logprobs: Array2<T>,
    /// `∂loss/∂entropy[b, t]` when entropies were given (`−α` times the token weight).
    pub grad_entropy: Option<Array2<T>>,
    /// Statistics, mergeable across micro-batches.
    pub stats: LossStats,
}

/// Sums behind the loss statistics; [`LossStats::merge`] them across micro-batches, read the
/// means from the methods.
#[derive(Debug, Clone, PartialEq)]
pub struct LossStats {
    /// Total scaled loss.
    pub loss: f64,
    /// Scaled policy-gradient part of the loss.
    pub pg_loss: f64,
    /// Scaled KL part of the loss, before `β` (0 without a reference).
    pub kl_loss: f64,
    /// Scaled entropy aggregate, before `α` (0 without entropies).
    pub entropy_loss: f64,
    /// Selected tokens.
    pub tokens: usize,
    /// Sequences with at least one selected token.
    pub sequences: usize,
    /// Tokens where the ratio clip was binding (`−A·clip(r) > −A·r`).
    pub clipped_tokens: usize,
    /// Tokens where the dual clip was binding (negative advantage, loss capped at `−A·c`).
    pub dual_clipped_tokens: usize,
    /// Tokens whose gradient is non-zero.
    pub active_tokens: usize,
    /// Σ ratio.
    pub ratio_sum: f64,
    /// Smallest ratio (+∞ when no token).
    pub ratio_min: f64,
    /// Largest ratio (−∞ when no token).
    pub ratio_max: f64,
    /// Σ (old − new) log-prob: verl's `ppo_kl`.
    pub old_new_kl_sum: f64,
    /// Σ k3(old, new), a non-negative estimate of KL(old ‖ new).
    pub old_new_k3_sum: f64,
    /// Σ KL estimate to the reference, when one was given.
    pub ref_kl_sum: Option<f64>,
    /// Σ entropy, when entropies were given.
    pub entropy_sum: Option<f64>,
    /// Σ |old − rollout| log-prob, when rollout log-probs were given.
    pub rollout_abs_diff_sum: Option<f64>,
}

fn add_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

impl Default for LossStats {
    /// Statistics of no tokens (the ratio extremes start at ±∞).
    fn default() -> Self {
        Self {
            loss: 0.0,
            pg_loss: 0.0,
            kl_loss: 0.0,
            entropy_loss: 0.0,
            tokens: 0,
            sequences: 0,
            clipped_tokens: 0,
            dual_clipped_tokens: 0,
            active_tokens: 0,
            ratio_sum: 0.0,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            old_new_kl_sum: 0.0,
            old_new_k3_sum: 0.0,
            ref_kl_sum: None,
            entropy_sum: None,
            rollout_abs_diff_sum: None,
        }
    }
}

impl LossStats {
    /// Adds another micro-batch's statistics.
    pub fn merge(&mut self, other: &Self) {
        self.loss += other.loss;
        self.pg_loss += other.pg_loss;
        self.kl_loss += other.kl_loss;
        self.entropy_loss += other.entropy_loss;
        self.tokens += other.tokens;
        self.sequences += other.sequences;
        self.clipped_tokens += other.clipped_tokens;
        self.dual_clipped_tokens += other.dual_clipped_tokens;
        self.active_tokens += other.active_tokens;
        self.ratio_sum += other.ratio_sum;
        self.ratio_min = self.ratio_min.min(other.ratio_min);
        self.ratio_max = self.ratio_max.max(other.ratio_max);
        self.old_new_kl_sum += other.old_new_kl_sum;
        self.old_new_k3_sum += other.old_new_k3_sum;
        self.ref_kl_sum = add_opt(self.ref_kl_sum, other.ref_kl_sum);
        self.entropy_sum = add_opt(self.entropy_sum, other.entropy_sum);
        self.rollout_abs_diff_sum = add_opt(self.rollout_abs_diff_sum, other.rollout_abs_diff_sum);
    }

    fn per_token(&self, sum: f64) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            sum / self.tokens as f64
        }
    }

    /// Share of selected tokens where the ratio clip was binding.
    pub fn clip_fraction(&self) -> f64 {
        self.per_token(self.clipped_tokens as f64)
    }

    /// Share of selected tokens where the dual clip was binding.
    pub fn dual_clip_fraction(&self) -> f64 {
        self.per_token(self.dual_clipped_tokens as f64)
    }

    /// Mean ratio over selected tokens (1 when there are none).
    pub fn ratio_mean(&self) -> f64 {
        if self.tokens == 0 {
            1.0
        } else {
            self.ratio_sum / self.tokens as f64
        }
    }

    /// Mean `old − new` log-prob (verl's `ppo_kl`).
    pub fn approx_kl(&self) -> f64 {
        self.per_token(self.old_new_kl_sum)
    }

    /// Mean k3 estimate of KL(old ‖ new).
    pub fn approx_kl_k3(&self) -> f64 {
        self.per_token(self.old_new_k3_sum)
    }

    /// Mean KL estimate to the reference.
    pub fn ref_kl(&self) -> Option<f64> {
        self.ref_kl_sum.map(|s| self.per_token(s))
    }

    /// Mean entropy.
    pub fn entropy(&self) -> Option<f64> {
        self.entropy_sum.map(|s| self.per_token(s))
    }

    /// Mean |old − rollout| log-prob difference.
    pub fn rollout_logprob_diff(&self) -> Option<f64> {
        self.rollout_abs_diff_sum.map(|s| self.per_token(s))
    }
}

/// Loss and derivative of one token's clipped policy-gradient term, and which clips bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    /// The per-token loss.
    pub loss: f64,
    /// Its derivative with respect to the current log-prob.
    pub grad: f64,
    /// The importance ratio (after the log-ratio clamp).
    pub ratio: f64,
    /// The ratio clip was binding.
    pub clipped: bool,
    /// The dual clip was binding.
    pub dual_clipped: bool,
}

/// The clipped surrogate of one token: `logp` current and `old` log-prob, advantage `adv`.
pub fn token_pg_loss(
    logp: f64,
    old: f64,
    adv: f64,
    clip_low: f64,
    clip_high: f64,
    dual_clip: Option<f64>,
) -> TokenLoss {
    let raw = logp - old;
    let log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP);
    let ratio = log_ratio.exp();
    let dratio = if raw.abs() > LOG_RATIO_CLAMP {
        0.0
    } else {
        ratio
    };
    let unclipped = -adv * ratio;
    let clipped_loss = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high);
    let (mut loss, mut grad, clipped) = if clipped_loss > unclipped {
        // Only possible when the clamp is active, where it is flat in `logp`.
        (clipped_loss, 0.0, true)
    } else {
        (unclipped, -adv * dratio, false)
    };
    let mut dual_clipped = false;
    if let Some(c) = dual_clip
        && adv < 0.0
        && loss > -adv * c
    {
        loss = -adv * c;
        grad = 0.0;
        dual_clipped = true;
    }
    TokenLoss {
        loss,
        grad,
        ratio,
        clipped,
        dual_clipped,
    }
}

fn check_shape<T: Real>(
    name: &'static str,
    a: &ArrayView2<'_, T>,
    shape: (usize, usize),
) -> Result<()> {
    if a.dim() != shape {
        return Err(Error::shape(format!(
            "{name} is {:?} but logprobs is {:?}",
            a.dim(),
            shape
        )));
    }
    Ok(())
}

fn read<T: Real>(name: &'static str, a: &ArrayView2<'_, T>, row: usize, col: usize) -> Result<f64> {
    let v = a[(row, col)].to_f64();
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::NonFiniteInput {
            input: name,
            row,
            col,
            value: v,
        })
    }
}

/// The GRPO policy loss of one micro-batch, its gradient and statistics.
///
/// Errors (never NaN) when shapes disagree, a selected entry is not finite (naming input, row and
/// column), a mask entry is neither 0 nor 1, `kl-coef`/`entropy-coef` are set without the inputs
/// they need, or `scale` is degenerate.
///
/// ```
/// use deepeyes_rl::grpo::{policy_loss, GrpoConfig, LossScale, PolicyLossInput};
/// use ndarray::array;
///
/// let logp = array![[0.0f32, -1.0, -0.5]];
/// let old = array![[0.0f32, -1.0, -0.7]];
/// let adv = array![[0.0f32, 1.5, 1.5]];
/// let mask = array![[0.0f32, 1.0, 1.0]]; // the first token is prompt
/// let input = PolicyLossInput {
///     logprobs: logp.view(), old_logprobs: old.view(), advantages: adv.view(), mask: mask.view(),
///     ref_logprobs: None, entropy: None, rollout_logprobs: None,
/// };
/// let out = policy_loss(&GrpoConfig::default(), &input, LossScale::MicroBatch { accumulation_steps: 1 }).unwrap();
/// assert_eq!(out.grad_logprobs[(0, 0)], 0.0);
/// assert_eq!(out.stats.clipped_tokens, 1); // ratio e^0.2 > 1.2 with a positive advantage
/// ```
pub fn policy_loss<T: Real>(
    cfg: &GrpoConfig,
    input: &PolicyLossInput<'_, T>,
    scale: LossScale,
) -> Result<PolicyLossOutput<T>> {
    let shape = input.logprobs.dim();
    check_shape("old_logprobs", &input.old_logprobs, shape)?;
    check_shape("advantages", &input.advantages, shape)?;
    check_shape("mask", &input.mask, shape)?;
    if let Some(r) = &input.ref_logprobs {
        check_shape("ref_logprobs", r, shape)?;
    }
    if let Some(e) = &input.entropy {
        check_shape("entropy", e, shape)?;
    }
    if let Some(r) = &input.rollout_logprobs {
        check_shape("rollout_logprobs", r, shape)?;
    }
    if cfg.kl_coef != 0.0 && input.ref_logprobs.is_none() {
        return Err(Error::invalid(
            "ref_logprobs",
            format!(
                "kl-coef is {} but no reference log-probs were given",
                cfg.kl_coef
            ),
        ));
    }
    if cfg.entropy_coef != 0.0 && input.entropy.is_none() {
        return Err(Error::invalid(
            "entropy",
            format!(
                "entropy-coef is {} but no entropies were given",
                cfg.entropy_coef
            ),
        ));
    }

    // Count selected tokens per row and check the mask.
    let (rows, cols) = shape;
    let mut row_tokens = vec![0usize; rows];
    for ((b, t), m) in input.mask.indexed_iter() {
        match m.to_f64() {
            0.0 => {}
            1.0 => row_tokens[b] += 1,
            v => {
                return Err(Error::invalid(
                    "mask",
                    format!("mask[{b}, {t}] = {v}; entries must be 0 or 1"),
                ));
            }
        }
    }
    let tokens: usize = row_tokens.iter().sum();
    let sequences = row_tokens.iter().filter(|&&n| n > 0).count();

    // Token weights: the loss is Σ w · ℓ over selected tokens.
    let (factor, token_den, seq_den) = match scale {
        LossScale::MicroBatch { accumulation_steps } => {
            if accumulation_steps == 0 {
                return Err(Error::invalid("accumulation_steps", "must be at least 1"));
            }
            (1.0 / accumulation_steps as f64, tokens, sequences)
        }
        LossScale::MiniBatch {
            tokens: t,
            sequences: s,
        } => {
            if t < tokens || s < sequences {
                return Err(Error::invalid(
                    "scale",
                    format!(
                        "mini-batch totals ({t} tokens, {s} sequences) are smaller than this \
                         micro-batch's ({tokens} tokens, {sequences} sequences)"
                    ),
                ));
            }
            (1.0, t, s)
        }
    };
    let weight_of_row = |b: usize| -> f64 {
        if row_tokens[b] == 0 {
            return 0.0;
        }
        match cfg.loss_agg_mode {
            LossAggregation::TokenMean => factor / token_den as f64,
            LossAggregation::SeqMeanTokenSum => factor / seq_den as f64,
            LossAggregation::SeqMeanTokenMean => factor / (seq_den as f64 * row_tokens[b] as f64),
        }
    };

    let mut grad = Array2::<T>::from_elem(shape, T::from_f64(0.0));
    let mut grad_entropy = input
        .entropy
        .as_ref()
        .map(|_| Array2::<T>::from_elem(shape, T::from_f64(0.0)));
    let mut stats = LossStats {
        tokens,
        sequences,
        ref_kl_sum: input.ref_logprobs.is_some().then_some(0.0),
        entropy_sum: input.entropy.is_some().then_some(0.0),
        rollout_abs_diff_sum: input.rollout_logprobs.is_some().then_some(0.0),
        ..LossStats::default()
    };

    for b in 0..rows {
        let w = weight_of_row(b);
        if w == 0.0 {
            continue;
        }
        for t in 0..cols {
            if input.mask[(b, t)].to_f64() == 0.0 {
                continue;
            }
            let logp = read("logprobs", &input.logprobs, b, t)?;
            let old = read("old_logprobs", &input.old_logprobs, b, t)?;
            let adv = read("advantages", &input.advantages, b, t)?;
            let tl = token_pg_loss(logp, old, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip);
            let mut g = tl.grad;
            stats.pg_loss += w * tl.loss;
            stats.clipped_tokens += usize::from(tl.clipped);
            stats.dual_clipped_tokens += usize::from(tl.dual_clipped);
            stats.ratio_sum += tl.ratio;
            stats.ratio_min = stats.ratio_min.min(tl.ratio);
            stats.ratio_max = stats.ratio_max.max(tl.ratio);
            stats.old_new_kl_sum += old - logp;
            stats.old_new_k3_sum += KlEstimator::K3.value_and_grad(logp, old).0;

            if let Some(r) = &input.ref_logprobs {
                let ref_logp = read("ref_logprobs", r, b, t)?;
                let (kl, dkl) = cfg.kl_estimator.value_and_grad(logp, ref_logp);
                stats.kl_loss += w * kl;
                if let Some(s) = stats.ref_kl_sum.as_mut() {
                    *s += kl;
                }
                g += cfg.kl_coef * dkl;
            }
            if let (Some(e), Some(ge)) = (&input.entropy, grad_entropy.as_mut()) {
                let h = read("entropy", e, b, t)?;
                stats.entropy_loss += w * h;
                if let Some(s) = stats.entropy_sum.as_mut() {
                    *s += h;
                }
                ge[(b, t)] = T::from_f64(-cfg.entropy_coef * w);
            }
            if let Some(r) = &input.rollout_logprobs {
                let rl = read("rollout_logprobs", r, b, t)?;
                if let Some(s) = stats.rollout_abs_diff_sum.as_mut() {
                    *s += (old - rl).abs();
                }
            }
            stats.active_tokens += usize::from(g != 0.0);
            grad[(b, t)] = T::from_f64(w * g);
        }
    }
    stats.loss =
        stats.pg_loss + cfg.kl_coef * stats.kl_loss - cfg.entropy_coef * stats.entropy_loss;
    if !stats.loss.is_finite() {
        // Unreachable with finite inputs and the clamps above; kept as a hard guard.
        return Err(Error::invalid(
            "loss",
            format!("computed a non-finite loss {}", stats.loss),
        ));
    }
    Ok(PolicyLossOutput {
        loss: stats.loss,
        grad_logprobs: grad,
        grad_entropy,
        stats,
    })
}
