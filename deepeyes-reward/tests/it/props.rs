//! Property tests over tag soups: bounds, the tool-bonus condition, and the format rules
//! against an independent oracle written the way DeepEyes' Python reads.

use std::sync::Arc;

use deepeyes_core::reward::{RewardFn, RewardInput};
use deepeyes_core::trajectory::{StopReason, ToolCallRecord, ToolOutcome, Trajectory};
use deepeyes_reward::format::{BoxedMode, boxed_contents, math_format, visual_format};
use deepeyes_reward::judge::{JudgeError, JudgeRequest, JudgeVerdict};
use deepeyes_reward::{
    FailurePolicy, JudgeHandle, MathConfig, Pipeline, PipelineConfig, Registry, RewardSpec,
    Verifier, VisualConfig,
};
use proptest::prelude::*;

const PIECES: &[&str] = &[
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|vision_start|><|image_pad|>",
    "<|image_pad|><|vision_end|>",
    "<tool_call>",
    "</tool_call>",
    "\\boxed{",
    "}",
    "{",
    "red",
    "Red.",
    "yes",
    "No",
    "3",
    "1/2",
    "(B)",
    "A. red\nB. blue",
    " ",
    "\n",
    "é",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(PIECES).prop_map(str::to_string),
            1 => "[a-z<>/|{}\\\\ ]{0,6}",
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

/// Python's `s.count(sub)`, computed by splitting.
fn py_count(text: &str, sub: &str) -> usize {
    text.split(sub).count() - 1
}

/// DeepEyes' visual format rule, as its Python reads.
fn oracle_visual_format_error(response: &str) -> bool {
    let tail = response.split("</think>").last().unwrap_or("");
    let answer = response
        .split("<answer>")
        .last()
        .unwrap_or("")
        .split("</answer>")
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c));
    py_count(response, "<think>") != py_count(response, "</think>")
        || py_count(response, "<|vision_start|><|image_pad|>")
            != py_count(response, "<|image_pad|><|vision_end|>")
        || py_count(tail, "<answer>") != py_count(tail, "</answer>")
        || answer.chars().count() >= 1000
}

/// DeepEyes' `re.findall(r'\\boxed{([^}]+)}', text)`, by hand.
fn oracle_regex_boxed(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = "\\boxed{".chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + pattern.len() <= chars.len() {
        if chars[i..i + pattern.len()] == pattern[..] {
            let start = i + pattern.len();
            let end = (start..chars.len()).find(|&j| chars[j] == '}');
            if let Some(end) = end
                && end > start
            {
                found.push(chars[start..end].iter().collect());
                i = end + 1;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// A judge whose verdicts are a fixed function of the prediction, or one that always fails.
fn judge(mode: u8) -> Option<JudgeHandle> {
    match mode {
        0 => None,
        1 => {
            let v = |r: &JudgeRequest<'_>| -> Result<JudgeVerdict, JudgeError> {
                Ok(JudgeVerdict::fresh(
                    r.prediction.len().is_multiple_of(2),
                    "VERDICT",
                ))
            };
            Some(JudgeHandle::new(
                Arc::new(v) as Arc<dyn Verifier>,
                FailurePolicy::Error,
            ))
        }
        _ => {
            let v = |_: &JudgeRequest<'_>| -> Result<JudgeVerdict, JudgeError> {
                Err(JudgeError::Other("down".into()))
            };
            Some(JudgeHandle::new(
                Arc::new(v) as Arc<dyn Verifier>,
                FailurePolicy::RuleFallback,
            ))
        }
    }
}

fn weighted(weights: [f64; 5], min_accuracy: f64, mode: u8) -> Pipeline {
    let visual = VisualConfig {
        accuracy_weight: weights[0],
        format_weight: weights[1],
        tool_weight: weights[2],
        tool_min_accuracy: min_accuracy,
        ..VisualConfig::default()
    };
    let math = MathConfig {
        accuracy_weight: weights[3],
        format_weight: weights[4],
        ..MathConfig::default()
    };
    let mut config = PipelineConfig::deepeyes().unwrap();
    config
        .rewards
        .insert("visual".into(), RewardSpec::DeepeyesVisual(visual));
    config
        .rewards
        .insert("math".into(), RewardSpec::DeepeyesMath(math));
    config
        .build_with_judge(&Registry::new(), judge(mode), None)
        .unwrap()
}

fn trajectory(outcomes: &[u8]) -> Trajectory {
    Trajectory {
        tokens: Vec::new(),
        mask: Vec::new(),
        logprobs: Vec::new(),
        prompt_len: 0,
        images: Vec::new(),
        image_sources: Vec::new(),
        image_sizes: Vec::new(),
        tool_calls: outcomes
            .iter()
            .enumerate()
            .map(|(turn, kind)| ToolCallRecord {
                turn,
                raw: String::new(),
                call: None,
                outcome: match kind % 4 {
                    0 => ToolOutcome::Ok {
                        images: 1,
                        text: None,
                        region: None,
                    },
                    1 => ToolOutcome::Ok {
                        images: 0,
                        text: None,
                        region: None,
                    },
                    2 => ToolOutcome::Error {
                        message: "bad bbox".into(),
                    },
                    _ => ToolOutcome::Dropped {
                        reason: "budget".into(),
                    },
                },
            })
            .collect(),
        turns: Vec::new(),
        answer: None,
        stop: StopReason::Answered,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn totals_stay_within_the_configured_bounds(
        response in soup(),
        truth in prop::sample::select(&["red", "B", "3", "yes", "1/2"][..]),
        weights in prop::array::uniform5(-3.0f64..3.0),
        min_accuracy in 0.0f64..1.0,
        mode in 0u8..3,
        math in any::<bool>(),
    ) {
        let pipeline = weighted(weights, min_accuracy, mode);
        let source = if math { "thinklite_eureka" } else { "chart" };
        let input = RewardInput { data_source: source, question: "A. red\nB. blue", ground_truth: truth, response: &response, trajectory: None };
        let score = pipeline.score(&input).unwrap();
        let bounds = pipeline.bounds_for(source).unwrap();
        prop_assert!(bounds.contains(score.total), "{} outside {:?}", score.total, bounds);
        let recomputed: f64 = score.terms.iter().map(|t| t.value * t.weight).sum();
        prop_assert!((recomputed - score.total).abs() < 1e-9);
    }

    #[test]
    fn the_tool_bonus_needs_a_correct_answer_and_a_returned_image(
        response in soup(),
        truth in prop::sample::select(&["red", "B", "3", "yes"][..]),
        outcomes in prop::option::of(prop::collection::vec(0u8..4, 0..4)),
        mode in 0u8..3,
    ) {
        let pipeline = weighted([0.8, 0.2, 1.2, 1.2, 0.4], 0.5, mode);
        let trajectory = outcomes.as_deref().map(trajectory);
        let input = RewardInput { data_source: "vstar", question: "q", ground_truth: truth, response: &response, trajectory: trajectory.as_ref() };
        let score = pipeline.score(&input).unwrap();
        let tool = score.term("tool").unwrap();
        let accuracy = score.term("accuracy").unwrap();
        let returned = match &trajectory {
            Some(t) => t.tool_calls.iter().any(|c| c.outcome.returned_image()),
            None => response.contains("<|vision_start|><|image_pad|>"),
        };
        prop_assert_eq!(tool == 1.0, accuracy > 0.5 && returned);
        prop_assert!(tool == 0.0 || tool == 1.0);
    }

    #[test]
    fn the_visual_format_rules_match_the_oracle(response in soup()) {
        let check = visual_format(&response, Some(1000));
        prop_assert_eq!(!check.is_ok(), oracle_visual_format_error(&response));
        let pipeline = weighted([0.8, 0.2, 1.2, 1.2, 0.4], 0.5, 0);
        let input = RewardInput { data_source: "vstar", question: "q", ground_truth: "red", response: &response, trajectory: None };
        let format = pipeline.score(&input).unwrap().term("format").unwrap();
        prop_assert_eq!(format == -1.0, oracle_visual_format_error(&response));
    }

    #[test]
    fn the_math_format_rules_match_the_oracle(response in soup()) {
        let tail = response.split("</think>").last().unwrap_or("");
        let boxed = oracle_regex_boxed(tail);
        let oracle_error = py_count(&response, "<think>") != py_count(&response, "</think>") || boxed.len() != 1;
        let check = math_format(&response, BoxedMode::DeepeyesRegex);
        prop_assert_eq!(!check.is_ok(), oracle_error);
        let found: Vec<String> = check.boxed.iter().map(|s| s.to_string()).collect();
        prop_assert_eq!(found, boxed);
    }

    #[test]
    fn boxed_modes_agree_without_nested_braces(response in soup()) {
        // Where every box closes before any other `{`, the balanced reading is the regex's.
        let simple = response.split("\\boxed{").skip(1).all(|rest| {
            match (rest.find('}'), rest.find('{')) {
                (Some(close), Some(open)) => close < open,
                (Some(_), None) => true,
                (None, _) => false,
            }
        });
        // Escaped braces count for the balanced reading only.
        prop_assume!(simple && !response.contains("\\}") && !response.contains("\\{"));
        prop_assert_eq!(
            boxed_contents(&response, BoxedMode::Balanced),
            boxed_contents(&response, BoxedMode::DeepeyesRegex)
        );
    }

    #[test]
    fn rules_never_panic_on_arbitrary_text(pred in "\\PC{0,40}", truth in "\\PC{0,20}", q in "\\PC{0,40}") {
        let _ = deepeyes_reward::rules::visual_answer(&pred, &truth, &q, Default::default());
        let _ = deepeyes_reward::rules::math_answer(&pred, &truth);
        let _ = deepeyes_reward::rules::evaluate(&pred);
    }
}
