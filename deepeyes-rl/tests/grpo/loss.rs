//! The GRPO policy loss: gradient checks, clipping bounds, masking, aggregation and errors.

use deepeyes_core::StopReason;
use deepeyes_rl::Error;
use deepeyes_rl::grpo::{
    GrpoConfig, KlEstimator, LossAggregation, LossNormalization, LossScale, LossStats,
    PolicyLossInput, TokenTargets, group_advantages, loss_keep, plan_updates, policy_loss,
    prepare_batch, token_pg_loss,
};
use ndarray::{Array2, s};
use proptest::prelude::*;

use crate::common::trajectory;

/// Owned inputs of one loss call.
#[derive(Debug, Clone)]
struct Case {
    logp: Array2<f64>,
    old: Array2<f64>,
    adv: Array2<f64>,
    mask: Array2<f64>,
    reference: Option<Array2<f64>>,
    entropy: Option<Array2<f64>>,
}

impl Case {
    fn input(&self) -> PolicyLossInput<'_, f64> {
        PolicyLossInput {
            logprobs: self.logp.view(),
            old_logprobs: self.old.view(),
            advantages: self.adv.view(),
            mask: self.mask.view(),
            ref_logprobs: self.reference.as_ref().map(|a| a.view()),
            entropy: self.entropy.as_ref().map(|a| a.view()),
            rollout_logprobs: None,
        }
    }
}

fn agg_mode() -> impl Strategy<Value = LossAggregation> {
    prop_oneof![
        Just(LossAggregation::TokenMean),
        Just(LossAggregation::SeqMeanTokenSum),
        Just(LossAggregation::SeqMeanTokenMean),
    ]
}

fn estimator() -> impl Strategy<Value = KlEstimator> {
    prop_oneof![
        Just(KlEstimator::K1),
        Just(KlEstimator::K2),
        Just(KlEstimator::K3)
    ]
}

fn config() -> impl Strategy<Value = GrpoConfig> {
    (
        agg_mode(),
        estimator(),
        prop_oneof![Just(0.0), 0.01f64..0.5],
        prop_oneof![Just(0.0), 0.001f64..0.1],
        0.1f64..0.3,
        0.1f64..0.4,
        prop_oneof![Just(None), (1.5f64..4.0).prop_map(Some)],
    )
        .prop_map(|(mode, est, kl, ent, lo, hi, dual)| GrpoConfig {
            loss_agg_mode: mode,
            kl_estimator: est,
            kl_coef: kl,
            entropy_coef: ent,
            clip_low: lo,
            clip_high: hi,
            dual_clip: dual,
            ..GrpoConfig::default()
        })
}

/// A batch of 1–4 rows × 1–10 tokens. Old log-probs differ from the current ones by up to ±0.6
/// so every clip region is visited; advantages are per row, as GRPO broadcasts them.
fn case() -> impl Strategy<Value = Case> {
    (1usize..5, 1usize..11).prop_flat_map(|(b, t)| {
        let n = b * t;
        (
            prop::collection::vec(-4.0f64..-0.01, n),
            prop::collection::vec(-0.6f64..0.6, n),
            prop::collection::vec(-3.0f64..3.0, b),
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec(-4.0f64..-0.01, n),
            prop::collection::vec(0.0f64..3.0, n),
        )
            .prop_map(move |(logp, delta, adv, mask, reference, entropy)| {
                let logp = Array2::from_shape_vec((b, t), logp).unwrap();
                let old = &logp + &Array2::from_shape_vec((b, t), delta).unwrap();
                let adv = Array2::from_shape_fn((b, t), |(i, _)| adv[i]);
                let mask = Array2::from_shape_vec(
                    (b, t),
                    mask.into_iter().map(|m| f64::from(u8::from(m))).collect(),
                )
                .unwrap();
                Case {
                    logp,
                    old,
                    adv,
                    mask,
                    reference: Some(Array2::from_shape_vec((b, t), reference).unwrap()),
                    entropy: Some(Array2::from_shape_vec((b, t), entropy).unwrap()),
                }
            })
    })
}

fn scale() -> impl Strategy<Value = LossScale> {
    prop_oneof![
        (1usize..5).prop_map(|a| LossScale::MicroBatch {
            accumulation_steps: a
        }),
        (40usize..60, 5usize..9).prop_map(|(t, s)| LossScale::MiniBatch {
            tokens: t,
            sequences: s
        }),
    ]
}

fn loss(cfg: &GrpoConfig, c: &Case, sc: LossScale) -> f64 {
    policy_loss(cfg, &c.input(), sc).unwrap().loss
}

/// Central difference of the loss along one entry of `which`; `None` at a kink (one-sided
/// differences disagree), where the derivative is not defined.
fn numeric_grad(
    cfg: &GrpoConfig,
    c: &Case,
    sc: LossScale,
    at: (usize, usize),
    entropy: bool,
) -> Option<f64> {
    let h = 1e-6;
    let eval = |d: f64| {
        let mut p = c.clone();
        if entropy {
            p.entropy.as_mut().unwrap()[at] += d;
        } else {
            p.logp[at] += d;
        }
        loss(cfg, &p, sc)
    };
    let (plus, zero, minus) = (eval(h), eval(0.0), eval(-h));
    let fwd = (plus - zero) / h;
    let bwd = (zero - minus) / h;
    ((fwd - bwd).abs() < 1e-5 * (1.0 + fwd.abs())).then(|| (plus - minus) / (2.0 * h))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The analytic gradient matches finite differences for every aggregation mode, with and
    /// without KL (all three estimators) and entropy terms, under both loss scales.
    #[test]
    fn gradient_matches_finite_differences(cfg in config(), c in case(), sc in scale()) {
        let out = policy_loss(&cfg, &c.input(), sc).unwrap();
        let (mut checked, mut selected) = (0usize, 0usize);
        for ((i, j), &m) in c.mask.indexed_iter() {
            if m == 0.0 {
                continue;
            }
            selected += 1;
            if let Some(num) = numeric_grad(&cfg, &c, sc, (i, j), false) {
                let ana = out.grad_logprobs[(i, j)];
                prop_assert!((num - ana).abs() < 1e-6 * (1.0 + ana.abs()),
                    "logp[{i},{j}]: numeric {num} vs analytic {ana}");
                checked += 1;
            }
            let num = numeric_grad(&cfg, &c, sc, (i, j), true).unwrap();
            let ana = out.grad_entropy.as_ref().unwrap()[(i, j)];
            prop_assert!((num - ana).abs() < 1e-6 * (1.0 + ana.abs()),
                "entropy[{i},{j}]: numeric {num} vs analytic {ana}");
        }
        // Kinks are measure-zero: nearly every selected token must have been checked.
        prop_assert!(checked + 1 >= selected, "only {checked} of {selected} tokens checked");
    }

    /// Masked tokens are never read and get exactly zero gradient, whatever they hold.
    #[test]
    fn masked_tokens_get_zero_gradient(cfg in config(), c in case(), sc in scale(), junk in -1e6f64..1e6) {
        let clean = policy_loss(&cfg, &c.input(), sc).unwrap();
        let mut dirty = c.clone();
        for ((i, j), &m) in c.mask.indexed_iter() {
            if m == 0.0 {
                dirty.logp[(i, j)] = f64::NAN;
                dirty.old[(i, j)] = junk;
                dirty.adv[(i, j)] = f64::INFINITY;
                dirty.reference.as_mut().unwrap()[(i, j)] = -junk;
                dirty.entropy.as_mut().unwrap()[(i, j)] = f64::NAN;
            }
        }
        let out = policy_loss(&cfg, &dirty.input(), sc).unwrap();
        prop_assert_eq!(out.loss, clean.loss);
        for ((i, j), &m) in c.mask.indexed_iter() {
            if m == 0.0 {
                prop_assert_eq!(out.grad_logprobs[(i, j)], 0.0);
                prop_assert_eq!(out.grad_entropy.as_ref().unwrap()[(i, j)], 0.0);
            }
        }
        prop_assert_eq!(out.grad_logprobs, clean.grad_logprobs);
    }

    /// The clipped objective never rewards moving the ratio past the trust region: with A > 0 the
    /// per-token loss is at least −A(1+ε_high) and flat beyond it; with A < 0 it is flat below
    /// 1 − ε_low, and the dual clip caps it at −A·c.
    #[test]
    fn clipping_bounds_hold(
        log_ratio in -3.0f64..3.0,
        adv in -5.0f64..5.0,
        lo in 0.05f64..0.5,
        hi in 0.05f64..0.5,
        dual in prop_oneof![Just(None), (1.1f64..5.0).prop_map(Some)],
    ) {
        let tl = token_pg_loss(-1.0 + log_ratio, -1.0, adv, lo, hi, dual);
        let r = log_ratio.exp();
        prop_assert!((tl.ratio - r).abs() < 1e-12 * r.max(1.0));
        if adv > 0.0 {
            prop_assert!(tl.loss >= -adv * (1.0 + hi) - 1e-12);
            if r > 1.0 + hi {
                prop_assert_eq!(tl.grad, 0.0);
                prop_assert!(tl.clipped);
            } else {
                prop_assert!((tl.grad + adv * r).abs() < 1e-12 * (1.0 + adv.abs() * r));
            }
        }
        if adv < 0.0 {
            if r < 1.0 - lo {
                prop_assert_eq!(tl.grad, 0.0);
            }
            if let Some(c) = dual {
                prop_assert!(tl.loss <= -adv * c + 1e-12);
                if r > c {
                    prop_assert_eq!(tl.grad, 0.0);
                    prop_assert!(tl.dual_clipped);
                }
            } else if r > 1.0 + hi {
                prop_assert!(tl.grad != 0.0, "negative advantage must keep pushing r down");
            }
        }
        prop_assert!(tl.loss.is_finite() && tl.grad.is_finite());
    }

    /// With mini-batch normalisation, micro-batch losses and gradients add up to the whole
    /// batch's, whatever the split.
    #[test]
    fn mini_batch_scale_is_split_invariant(cfg in config(), c in case(), cut in 0usize..5) {
        let rows = c.logp.nrows();
        let cut = cut.min(rows);
        let whole = LossScale::mini_batch([c.mask.view()]);
        let full = policy_loss(&cfg, &c.input(), whole).unwrap();
        let part = |r: std::ops::Range<usize>| {
            let p = Case {
                logp: c.logp.slice(s![r.clone(), ..]).to_owned(),
                old: c.old.slice(s![r.clone(), ..]).to_owned(),
                adv: c.adv.slice(s![r.clone(), ..]).to_owned(),
                mask: c.mask.slice(s![r.clone(), ..]).to_owned(),
                reference: c.reference.as_ref().map(|a| a.slice(s![r.clone(), ..]).to_owned()),
                entropy: c.entropy.as_ref().map(|a| a.slice(s![r.clone(), ..]).to_owned()),
            };
            policy_loss(&cfg, &p.input(), whole).unwrap()
        };
        let (a, b) = (part(0..cut), part(cut..rows));
        prop_assert!((a.loss + b.loss - full.loss).abs() < 1e-9 * (1.0 + full.loss.abs()));
        let mut stats = LossStats::default();
        stats.merge(&a.stats);
        stats.merge(&b.stats);
        prop_assert_eq!(stats.tokens, full.stats.tokens);
        prop_assert_eq!(stats.clipped_tokens, full.stats.clipped_tokens);
        prop_assert!((stats.clip_fraction() - full.stats.clip_fraction()).abs() < 1e-12);
        for i in 0..rows {
            let g = if i < cut { a.grad_logprobs.row(i) } else { b.grad_logprobs.row(i - cut) };
            for j in 0..c.logp.ncols() {
                prop_assert!((g[j] - full.grad_logprobs[(i, j)]).abs() < 1e-12);
            }
        }
    }
}

fn one_row(logp: &[f64], old: &[f64], adv: f64, mask: &[f64]) -> Case {
    let t = logp.len();
    let row = |v: &[f64]| Array2::from_shape_vec((1, t), v.to_vec()).unwrap();
    Case {
        logp: row(logp),
        old: row(old),
        adv: Array2::from_elem((1, t), adv),
        mask: row(mask),
        reference: None,
        entropy: None,
    }
}

#[test]
fn token_mean_by_hand() {
    // Two rows; tokens (ratio, A): row 0 → (1, 1), (e^0.5, 1) clipped at 1.2; row 1 → (1, −2).
    let c = Case {
        logp: ndarray::array![[-1.0, -0.5, 0.0], [-2.0, 0.0, 0.0]],
        old: ndarray::array![[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]],
        adv: ndarray::array![[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]],
        mask: ndarray::array![[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        reference: None,
        entropy: None,
    };
    let cfg = GrpoConfig::default();
    let micro = LossScale::MicroBatch {
        accumulation_steps: 2,
    };
    let out = policy_loss(&cfg, &c.input(), micro).unwrap();
    let expect = (-1.0 - 1.2 + 2.0) / 3.0 / 2.0;
    assert!((out.loss - expect).abs() < 1e-12, "{}", out.loss);
    assert_eq!(out.stats.clipped_tokens, 1);
    assert!((out.grad_logprobs[(0, 0)] - (-1.0 / 6.0)).abs() < 1e-12);
    assert_eq!(out.grad_logprobs[(0, 1)], 0.0);
    assert!((out.grad_logprobs[(1, 0)] - (2.0 / 6.0)).abs() < 1e-12);
    assert!((out.stats.approx_kl() - (-0.5 / 3.0)).abs() < 1e-12);

    // seq-mean-token-sum: row sums (−2.2, 2) over 2 sequences; seq-mean-token-mean: (−1.1, 2)/2.
    let sum_cfg = GrpoConfig {
        loss_agg_mode: LossAggregation::SeqMeanTokenSum,
        ..cfg.clone()
    };
    let one = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    assert!((policy_loss(&sum_cfg, &c.input(), one).unwrap().loss - (-0.2 / 2.0)).abs() < 1e-12);
    let mean_cfg = GrpoConfig {
        loss_agg_mode: LossAggregation::SeqMeanTokenMean,
        ..cfg
    };
    assert!((policy_loss(&mean_cfg, &c.input(), one).unwrap().loss - (0.9 / 2.0)).abs() < 1e-12);
}

#[test]
fn dual_clip_caps_negative_advantages() {
    // ratio e^2 ≈ 7.39 > c = 3 with A = −1: the loss is capped at 3 and the gradient vanishes.
    let c = one_row(&[0.0], &[-2.0], -1.0, &[1.0]);
    let one = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    let out = policy_loss(&GrpoConfig::default(), &c.input(), one).unwrap();
    assert!((out.loss - 3.0).abs() < 1e-12);
    assert_eq!(out.grad_logprobs[(0, 0)], 0.0);
    assert_eq!(out.stats.dual_clipped_tokens, 1);
    let no_dual = GrpoConfig {
        dual_clip: None,
        ..GrpoConfig::default()
    };
    let out = policy_loss(&no_dual, &c.input(), one).unwrap();
    assert!((out.loss - 2f64.exp()).abs() < 1e-12);
    assert!((out.grad_logprobs[(0, 0)] - 2f64.exp()).abs() < 1e-12);
}

#[test]
fn clip_higher_widens_the_upper_bound() {
    let c = one_row(&[1.25f64.ln()], &[0.0], 1.0, &[1.0]); // ratio 1.25
    let one = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    let out = policy_loss(&GrpoConfig::default(), &c.input(), one).unwrap();
    assert_eq!(out.stats.clipped_tokens, 1);
    let higher = GrpoConfig {
        clip_high: 0.28,
        ..GrpoConfig::default()
    };
    let out = policy_loss(&higher, &c.input(), one).unwrap();
    assert_eq!(out.stats.clipped_tokens, 0);
    assert!((out.grad_logprobs[(0, 0)] + 1.25).abs() < 1e-12);
}

#[test]
fn k3_matches_the_closed_form_and_is_clamped() {
    let (v, g) = KlEstimator::K3.value_and_grad(-1.0, -1.5);
    let d = -0.5f64;
    assert!((v - (d.exp() - d - 1.0)).abs() < 1e-15);
    assert!((g - (1.0 - d.exp())).abs() < 1e-15);
    let (v, g) = KlEstimator::K3.value_and_grad(-20.0, 0.0); // ref − logp = 20 → e^20 − 21, clamped
    assert_eq!((v, g), (10.0, 0.0));
    assert_eq!(KlEstimator::K1.value_and_grad(-1.0, -3.0), (2.0, 1.0));
    assert_eq!(KlEstimator::K2.value_and_grad(-1.0, -3.0), (2.0, 2.0));
}

#[test]
fn f32_inputs_work_and_agree_with_f64() {
    let c = one_row(
        &[-1.0, -0.7, -0.2],
        &[-1.1, -0.7, -0.5],
        0.8,
        &[1.0, 1.0, 1.0],
    );
    let (l32, o32, a32, m32) = (
        c.logp.mapv(|x| x as f32),
        c.old.mapv(|x| x as f32),
        c.adv.mapv(|x| x as f32),
        c.mask.mapv(|x| x as f32),
    );
    let input = PolicyLossInput {
        logprobs: l32.view(),
        old_logprobs: o32.view(),
        advantages: a32.view(),
        mask: m32.view(),
        ref_logprobs: None,
        entropy: None,
        rollout_logprobs: Some(o32.view()),
    };
    let one = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    let out32 = policy_loss(&GrpoConfig::default(), &input, one).unwrap();
    let out64 = policy_loss(&GrpoConfig::default(), &c.input(), one).unwrap();
    assert!((out32.loss - out64.loss).abs() < 1e-6);
    assert_eq!(out32.stats.rollout_logprob_diff(), Some(0.0));
    for (a, b) in out32.grad_logprobs.iter().zip(&out64.grad_logprobs) {
        assert!((f64::from(*a) - b).abs() < 1e-6);
    }
}

#[test]
fn empty_selection_is_zero_not_nan() {
    let c = one_row(&[-1.0, -2.0], &[-1.0, -2.0], 1.0, &[0.0, 0.0]);
    for mode in [
        LossAggregation::TokenMean,
        LossAggregation::SeqMeanTokenSum,
        LossAggregation::SeqMeanTokenMean,
    ] {
        let cfg = GrpoConfig {
            loss_agg_mode: mode,
            ..GrpoConfig::default()
        };
        let out = policy_loss(
            &cfg,
            &c.input(),
            LossScale::MicroBatch {
                accumulation_steps: 1,
            },
        )
        .unwrap();
        assert_eq!(out.loss, 0.0);
        assert!(out.grad_logprobs.iter().all(|&g| g == 0.0));
        assert_eq!(out.stats.clip_fraction(), 0.0);
        assert_eq!(out.stats.ratio_mean(), 1.0);
    }
}

#[test]
fn bad_inputs_are_errors_that_name_the_entry() {
    let one = LossScale::MicroBatch {
        accumulation_steps: 1,
    };
    let cfg = GrpoConfig::default();
    let mut c = one_row(&[-1.0, -2.0], &[-1.0, -2.0], 1.0, &[1.0, 1.0]);
    c.logp[(0, 1)] = f64::NAN;
    let err = policy_loss(&cfg, &c.input(), one).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFiniteInput {
                input: "logprobs",
                row: 0,
                col: 1,
                ..
            }
        ),
        "{err}"
    );

    let mut c = one_row(&[-1.0, -2.0], &[-1.0, -2.0], 1.0, &[1.0, 0.5]);
    let err = policy_loss(&cfg, &c.input(), one).unwrap_err();
    assert!(err.to_string().contains("mask[0, 1] = 0.5"), "{err}");

    c.mask[(0, 1)] = 1.0;
    let kl = GrpoConfig {
        kl_coef: 0.1,
        ..cfg.clone()
    };
    assert!(
        policy_loss(&kl, &c.input(), one)
            .unwrap_err()
            .to_string()
            .contains("kl-coef")
    );
    let ent = GrpoConfig {
        entropy_coef: 0.01,
        ..cfg.clone()
    };
    assert!(
        policy_loss(&ent, &c.input(), one)
            .unwrap_err()
            .to_string()
            .contains("entropy-coef")
    );

    let mut short = c.clone();
    short.old = Array2::zeros((1, 3));
    assert!(matches!(
        policy_loss(&cfg, &short.input(), one).unwrap_err(),
        Error::Shape { .. }
    ));
    assert!(
        policy_loss(
            &cfg,
            &c.input(),
            LossScale::MicroBatch {
                accumulation_steps: 0
            }
        )
        .is_err()
    );
    assert!(
        policy_loss(
            &cfg,
            &c.input(),
            LossScale::MiniBatch {
                tokens: 1,
                sequences: 1
            }
        )
        .unwrap_err()
        .to_string()
        .contains("smaller")
    );
}

#[test]
fn trajectories_to_targets_with_over_turn_masking() {
    let answered = trajectory(3, &[(2, 4), (3, 0)], StopReason::Answered, vec![]);
    let over = trajectory(2, &[(1, 2), (1, 2), (2, 0)], StopReason::MaxTurns, vec![]);
    let cut = trajectory(1, &[(4, 0)], StopReason::TurnLength, vec![]);
    let cfg = GrpoConfig {
        mask_max_turns: true,
        ..GrpoConfig::default()
    };
    let trajs = [&answered, &over, &cut];
    let keep: Vec<bool> = trajs.iter().map(|t| loss_keep(t, &cfg)).collect();
    assert_eq!(keep, vec![true, false, true]);
    let truncating = GrpoConfig {
        mask_truncated: true,
        ..GrpoConfig::default()
    };
    assert!(!loss_keep(&cut, &truncating) && loss_keep(&over, &truncating));

    let adv = group_advantages(&[1.0, 0.0, 0.5], &[0, 0, 0], true, 1e-6).unwrap();
    let targets = TokenTargets::from_trajectories(&trajs, &adv, &keep).unwrap();
    assert_eq!(targets.mask.dim(), (3, 12));
    assert_eq!(targets.lengths, vec![12, 10, 5]);
    // Row 0: prompt 3, 2 generated, 4 observation, 3 generated.
    let row0: Vec<f32> = targets.mask.row(0).to_vec();
    assert_eq!(row0, vec![0., 0., 0., 1., 1., 0., 0., 0., 0., 1., 1., 1.]);
    assert!(targets.mask.row(1).iter().all(|&m| m == 0.0));
    assert_eq!(targets.selected_tokens(), 5 + 4);
    assert_eq!(targets.advantages[(0, 3)], adv[0] as f32);
    assert_eq!(targets.advantages[(0, 5)], 0.0);
    // Rollout log-probs are kept for the masked-out trajectory too (diagnostics).
    assert!(targets.rollout_logprobs[(1, 2)] < 0.0);

    let sub = targets.select(&[2, 0]).unwrap();
    assert_eq!(sub.mask.dim(), (2, 12));
    assert_eq!(sub.mask.row(1), targets.mask.row(0));
    let sub = targets.select(&[2]).unwrap();
    assert_eq!(sub.mask.dim(), (1, 5));
    assert!(targets.select(&[3]).is_err());
    assert!(TokenTargets::from_trajectories(&trajs, &adv[..2], &keep).is_err());
}

/// Drives the API as an engine would, with the log-probs themselves as the parameters: prepare
/// the step, cut micro-batches, accumulate `grad` per micro-batch, take a gradient step.
#[test]
fn engine_style_step_moves_the_policy_the_right_way() {
    let trajs: Vec<_> = (0..8)
        .map(|i| {
            trajectory(
                2 + i % 3,
                &[(3 + i % 2, 2), (2, 0)],
                StopReason::Answered,
                vec![],
            )
        })
        .collect();
    let refs: Vec<_> = trajs.iter().collect();
    let rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5];
    let groups = [0, 0, 0, 0, 1, 1, 1, 1];
    for normalization in [LossNormalization::MicroBatch, LossNormalization::MiniBatch] {
        let cfg = GrpoConfig {
            group_size: 4,
            loss_normalization: normalization,
            ..GrpoConfig::default()
        };
        let prepared = prepare_batch(&cfg, &refs, &rewards, &groups).unwrap();
        assert!(prepared.groups[1].zero_variance && !prepared.groups[0].zero_variance);
        let targets = &prepared.targets;
        let params = targets.rollout_logprobs.mapv(f64::from);
        let plan = plan_updates(8, 8, 3, 1, None).unwrap();
        let mini = &plan.epochs[0][0];
        assert_eq!(mini.accumulation_steps(), 3);
        let scale = targets.loss_scale(cfg.loss_normalization, mini).unwrap();
        let mut grad = Array2::<f64>::zeros(params.dim());
        let mut stats = LossStats::default();
        for micro in &mini.micro_batches {
            let sub = targets.select(micro).unwrap();
            let width = sub.mask.ncols();
            let mut logp = Array2::<f64>::zeros((micro.len(), width));
            for (i, &r) in micro.iter().enumerate() {
                logp.row_mut(i).assign(&params.slice(s![r, ..width]));
            }
            let (adv, mask) = (sub.advantages.mapv(f64::from), sub.mask.mapv(f64::from));
            let out = policy_loss(
                &cfg,
                &PolicyLossInput {
                    logprobs: logp.view(),
                    old_logprobs: logp.view(),
                    advantages: adv.view(),
                    mask: mask.view(),
                    ref_logprobs: None,
                    entropy: None,
                    rollout_logprobs: None,
                },
                scale,
            )
            .unwrap();
            stats.merge(&out.stats);
            for (i, &r) in micro.iter().enumerate() {
                let mut row = grad.slice_mut(s![r, ..width]);
                row += &out.grad_logprobs.row(i);
            }
        }
        assert_eq!(stats.tokens, targets.selected_tokens());
        assert_eq!(stats.clip_fraction(), 0.0); // on-policy: ratio 1 everywhere
        if normalization == LossNormalization::MiniBatch {
            // Accumulated micro-batch gradients equal the whole batch's token-mean gradient.
            let n = targets.selected_tokens() as f64;
            for ((b, t), &g) in grad.indexed_iter() {
                let expect =
                    -f64::from(targets.advantages[(b, t)]) * f64::from(targets.mask[(b, t)]) / n;
                assert!((g - expect).abs() < 1e-12, "{b},{t}: {g} vs {expect}");
            }
        }
        // Gradient descent raises the log-probs of rewarded tokens, lowers the others and
        // leaves the zero-variance group alone.
        let stepped = &params - &(&grad * 10.0);
        for b in 0..8 {
            let moved: f64 = (0..params.ncols())
                .map(|t| (stepped[(b, t)] - params[(b, t)]) * f64::from(targets.mask[(b, t)]))
                .sum();
            match b {
                0 | 3 => assert!(moved > 0.0, "row {b}"),
                1 | 2 => assert!(moved < 0.0, "row {b}"),
                _ => assert_eq!(moved, 0.0, "row {b}"),
            }
        }
    }
}
