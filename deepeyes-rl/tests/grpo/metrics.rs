//! Step metrics from trajectories and rewards, the JSONL file, and its resume behaviour.

use deepeyes_core::{RewardBreakdown, RewardTerm, StopReason};
use deepeyes_rl::grpo::{GrpoConfig, LossScale, PolicyLossInput, policy_loss};
use deepeyes_rl::metrics::{
    JsonlWriter, ScoredTrajectory, StepMetrics, TimeSplit, TrainEvent, UpdateMetrics, read_jsonl,
    rollout_metrics,
};
use ndarray::array;

use crate::common::{trajectory, zoom_call};

fn visual(acc: f64, fmt: f64, tool: f64) -> RewardBreakdown {
    let term = |name: &str, value: f64, weight: f64| RewardTerm {
        name: name.into(),
        value,
        weight,
    };
    RewardBreakdown::from_terms(vec![
        term("accuracy", acc, 0.8),
        term("format", fmt, 0.2),
        term("tool", tool, 1.2),
    ])
}

#[test]
fn rollout_metrics_by_hand() {
    let gt = [[0.0, 0.0, 100.0, 100.0]];
    // Group 0: a correct answer after one good zoom (IoU 0.25) and one failed zoom (no crop
    // shown, so no IoU); a wrong answer with no tool.
    let t0 = trajectory(
        4,
        &[(5, 3), (5, 3), (6, 0)],
        StopReason::Answered,
        vec![
            zoom_call(0, [0.0, 0.0, 50.0, 50.0], true),
            zoom_call(1, [200.0, 200.0, 260.0, 260.0], false),
        ],
    );
    let t1 = trajectory(4, &[(10, 0)], StopReason::Answered, vec![]);
    // Group 1: two identical rewards (zero variance); one hits the turn cap, one is cut.
    let t2 = trajectory(
        2,
        &[(3, 2), (3, 0)],
        StopReason::MaxTurns,
        vec![zoom_call(0, [0.0, 0.0, 100.0, 100.0], true)],
    );
    let t3 = trajectory(2, &[(8, 0)], StopReason::TurnLength, vec![]);
    let (r0, r1, r2, r3) = (
        visual(1.0, 0.0, 1.0),
        visual(0.0, 0.0, 0.0),
        visual(0.0, -1.0, 0.0),
        visual(0.0, -1.0, 0.0),
    );
    let mut r1 = r1;
    r1.flags.push("judge_unavailable_rule_fallback".into());
    let batch = [
        ScoredTrajectory {
            trajectory: &t0,
            reward: &r0,
            group: 0,
            gt_boxes: &gt,
        },
        ScoredTrajectory {
            trajectory: &t1,
            reward: &r1,
            group: 0,
            gt_boxes: &gt,
        },
        ScoredTrajectory {
            trajectory: &t2,
            reward: &r2,
            group: 1,
            gt_boxes: &gt,
        },
        ScoredTrajectory {
            trajectory: &t3,
            reward: &r3,
            group: 1,
            gt_boxes: &[],
        },
    ];
    let m = rollout_metrics(&batch).unwrap();
    let rewards = [2.0, 0.0, -0.2, -0.2];
    let mean = rewards.iter().sum::<f64>() / 4.0;
    let std = (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
    assert_eq!((m.trajectories, m.groups), (4, 2));
    assert!((m.reward_mean - mean).abs() < 1e-12 && (m.reward_std - std).abs() < 1e-12);
    assert_eq!((m.reward_min, m.reward_max), (-0.2, 2.0));
    assert_eq!(m.reward_terms["accuracy"], 0.25);
    assert_eq!(m.reward_terms["format"], -0.5);
    assert_eq!(m.reward_terms["tool"], 0.25);
    assert_eq!(m.accuracy, Some(0.25));
    assert_eq!(m.format_error_rate, Some(0.5));
    assert_eq!(m.reward_flags["judge_unavailable_rule_fallback"], 1);
    assert_eq!((m.tool_calls_mean, m.tool_calls_max), (0.75, 2));
    assert_eq!(m.valid_crop_rate, Some(2.0 / 3.0));
    // IoUs of the regions shown: 0.25 and 1 (the failed call showed nothing; the last
    // trajectory has no boxes and no calls).
    assert!((m.grounding_iou.unwrap() - 0.625).abs() < 1e-12);
    assert_eq!(m.response_length_mean, (16 + 10 + 6 + 8) as f64 / 4.0);
    assert_eq!(m.response_length_max, 16);
    assert_eq!(m.response_tokens_mean, (22 + 10 + 8 + 8) as f64 / 4.0);
    assert_eq!(m.zero_variance_group_share, 0.5);
    assert_eq!(
        (m.answered_rate, m.max_turns_rate, m.truncated_rate),
        (0.5, 0.25, 0.25)
    );

    let mut bad = r3.clone();
    bad.total = f64::NAN;
    let batch = [ScoredTrajectory {
        trajectory: &t3,
        reward: &bad,
        group: 0,
        gt_boxes: &[],
    }];
    assert!(
        rollout_metrics(&batch)
            .unwrap_err()
            .to_string()
            .contains("trajectory 0")
    );
    assert!(rollout_metrics(&[]).is_err());
}

#[test]
fn no_terms_no_boxes_no_calls() {
    let t = trajectory(1, &[(3, 0)], StopReason::NoAction, vec![]);
    let r = RewardBreakdown {
        total: 0.5,
        ..RewardBreakdown::default()
    };
    let m = rollout_metrics(&[ScoredTrajectory {
        trajectory: &t,
        reward: &r,
        group: 0,
        gt_boxes: &[],
    }])
    .unwrap();
    assert_eq!(
        (
            m.accuracy,
            m.format_error_rate,
            m.valid_crop_rate,
            m.grounding_iou
        ),
        (None, None, None, None)
    );
    assert_eq!(m.zero_variance_group_share, 0.0);
    let json = serde_json::to_value(&m).unwrap();
    assert!(json.get("accuracy").is_none() && json.get("grounding_iou").is_none());
}

fn step(i: u64) -> StepMetrics {
    let logp = array![[-1.0f32, -0.5]];
    let mask = array![[1.0f32, 1.0]];
    let adv = array![[1.0f32, 1.0]];
    let out = policy_loss(
        &GrpoConfig::default(),
        &PolicyLossInput {
            logprobs: logp.view(),
            old_logprobs: logp.view(),
            advantages: adv.view(),
            mask: mask.view(),
            ref_logprobs: None,
            entropy: None,
            rollout_logprobs: None,
        },
        LossScale::MicroBatch {
            accumulation_steps: 1,
        },
    )
    .unwrap();
    let t = trajectory(1, &[(2, 0)], StopReason::Answered, vec![]);
    let r = visual(1.0, 0.0, 0.0);
    StepMetrics {
        step: i,
        rollout: rollout_metrics(&[ScoredTrajectory {
            trajectory: &t,
            reward: &r,
            group: 0,
            gt_boxes: &[],
        }])
        .unwrap(),
        update: UpdateMetrics::from_loss(&out.stats, 0.5, 1e-6, 1, 0),
        time: TimeSplit {
            time_rollout_s: 1.0,
            time_step_s: 2.0,
            ..TimeSplit::default()
        },
    }
}

#[test]
fn jsonl_round_trip_is_flat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/metrics.jsonl");
    let mut w = JsonlWriter::create(&path).unwrap();
    w.write(&step(0)).unwrap();
    w.write(&step(1)).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "reward_mean",
        "accuracy",
        "tool_calls_mean",
        "clip_fraction",
        "grad_norm",
        "time_rollout_s",
    ] {
        assert!(first.get(key).is_some(), "{key} missing in {first}");
    }
    assert_eq!(first["reward_terms"]["accuracy"], 1.0);
    let back: Vec<StepMetrics> = read_jsonl(&path).unwrap();
    assert_eq!(back, vec![step(0), step(1)]);
}

#[test]
fn resume_drops_steps_past_the_checkpoint_and_torn_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let mut w = JsonlWriter::create(&path).unwrap();
    for i in 0..4 {
        w.write(&step(i)).unwrap();
    }
    drop(w);
    // A kill in the middle of a write leaves a torn last line.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\": 4, \"reward_me");
    std::fs::write(&path, text).unwrap();

    let mut w = JsonlWriter::resume(&path, Some(1)).unwrap();
    w.write(&step(2)).unwrap();
    let back: Vec<StepMetrics> = read_jsonl(&path).unwrap();
    assert_eq!(
        back.iter().map(|s| s.step).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );

    // Without a checkpoint, the run starts over.
    let w = JsonlWriter::resume(&path, None).unwrap();
    drop(w);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");

    // A bad line that is not the last one is an error naming it.
    std::fs::write(&path, "{\"step\":0}\nnot json\n{\"step\":1}\n").unwrap();
    let err = read_jsonl::<serde_json::Value>(&path).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn events_are_tagged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let mut w = JsonlWriter::append(&path).unwrap();
    w.write(&TrainEvent::SkippedUpdate {
        step: 3,
        reason: "grad norm NaN".into(),
    })
    .unwrap();
    let back: Vec<TrainEvent> = read_jsonl(&path).unwrap();
    assert!(matches!(
        &back[0],
        TrainEvent::SkippedUpdate { step: 3, .. }
    ));
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"event\":\"skipped_update\"")
    );
}
