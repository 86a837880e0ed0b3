//! Golden tests: hand-written responses, one or more per rule, scored by the shipped DeepEyes
//! pipeline (rules only, plus a scripted judge where the rules cannot decide).

use std::sync::Arc;

use deepeyes_core::reward::{RewardFn, RewardInput};
use deepeyes_core::trajectory::{StopReason, ToolCallRecord, ToolOutcome, Trajectory};
use deepeyes_reward::judge::{JudgeError, JudgeRequest, JudgeVerdict};
use deepeyes_reward::{FailurePolicy, JudgeHandle, Pipeline, PipelineConfig, Registry, Verifier};

const CROP: &str = "\n<|im_start|>user\n<tool_response><|vision_start|><|image_pad|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>Think first, then answer.</tool_response><|im_end|>\n<|im_start|>assistant\n";
const CALL: &str = "<tool_call>{\"name\": \"image_zoom_in_tool\", \"arguments\": {\"bbox_2d\": [10, 20, 300, 400]}}</tool_call><|im_end|>";
const FAILED_CALL: &str =
    "\n<|im_start|>user\nError: ZOOM IN ARGUMENTS ARE INVALID<|im_end|>\n<|im_start|>assistant\n";

/// A judge that says "correct" exactly when the prediction is in `accepted`.
fn scripted(accepted: &'static [&'static str]) -> JudgeHandle {
    let verifier = move |request: &JudgeRequest<'_>| -> Result<JudgeVerdict, JudgeError> {
        let correct = accepted.contains(&request.prediction);
        Ok(JudgeVerdict::fresh(
            correct,
            if correct {
                "VERDICT: CORRECT"
            } else {
                "VERDICT: INCORRECT"
            },
        ))
    };
    JudgeHandle::new(
        Arc::new(verifier) as Arc<dyn Verifier>,
        FailurePolicy::Error,
    )
}

fn pipeline(judge: Option<JudgeHandle>) -> Pipeline {
    PipelineConfig::deepeyes()
        .unwrap()
        .build_with_judge(&Registry::new(), judge, None)
        .unwrap()
}

struct Case {
    name: &'static str,
    source: &'static str,
    question: &'static str,
    truth: &'static str,
    response: String,
    /// (accuracy, format, tool); tool is `None` for math.
    terms: (f64, f64, Option<f64>),
    flags: &'static [&'static str],
}

fn case(
    name: &'static str,
    source: &'static str,
    question: &'static str,
    truth: &'static str,
    response: impl Into<String>,
    terms: (f64, f64, Option<f64>),
    flags: &'static [&'static str],
) -> Case {
    Case {
        name,
        source,
        question,
        truth,
        response: response.into(),
        terms,
        flags,
    }
}

fn visual_cases() -> Vec<Case> {
    let q = "What is the colour of the umbrella?";
    let mc = "Where is the dog relative to the car?\nA. left\nB. right\nC. behind";
    vec![
        case(
            "correct with a crop: full reward",
            "vstar",
            q,
            "red",
            format!(
                "<think>Too small; zoom.</think>{CALL}{CROP}<think>Now it is clear.</think><answer>Red</answer>"
            ),
            (1.0, 0.0, Some(1.0)),
            &[],
        ),
        case(
            "correct without any tool call: no bonus",
            "vstar",
            q,
            "red",
            "<think>Clearly red.</think><answer>red</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "a failed tool call earns nothing",
            "vstar",
            q,
            "red",
            format!(
                "<think>zoom</think>{CALL}{FAILED_CALL}<think>guess</think><answer>red</answer>"
            ),
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "wrong answer with a crop: no bonus",
            "vstar",
            "How many cups?",
            "3",
            format!("<think>zoom</think>{CALL}{CROP}<think>count</think><answer>4</answer>"),
            (0.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "missing answer tags: not a format error, whole response is the answer",
            "chart",
            q,
            "red",
            "red",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "unbalanced think",
            "vstar",
            q,
            "red",
            "<think>hmm<answer>red</answer>",
            (1.0, -1.0, Some(0.0)),
            &["format_unbalanced_think"],
        ),
        case(
            "unbalanced vision markers",
            "vstar",
            q,
            "red",
            "<think>x</think><|vision_start|><|image_pad|><answer>red</answer>",
            (1.0, -1.0, Some(1.0)),
            &["format_unbalanced_vision"],
        ),
        case(
            "unbalanced answer after the last think",
            "vstar",
            q,
            "red",
            "<think>x</think><answer>red",
            (1.0, -1.0, Some(0.0)),
            &["format_unbalanced_answer"],
        ),
        case(
            "answer tags inside the thinking do not count",
            "vstar",
            q,
            "red",
            "<think>maybe <answer> blue</think><answer>red</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "a 1000-character answer: format error and accuracy 0",
            "vstar",
            q,
            "red",
            format!("{CROP}<answer>red {}</answer>", "very ".repeat(200)),
            (0.0, -1.0, Some(0.0)),
            &["answer_too_long", "format_answer_too_long"],
        ),
        case(
            "a 999-character answer is still scored",
            "vstar",
            q,
            "red",
            format!("<answer>{}</answer>", "r".repeat(999)),
            (0.0, 0.0, Some(0.0)),
            &["accuracy_by_judge"],
        ),
        case(
            "multiple choice by letter",
            "chart",
            mc,
            "B",
            format!("{CROP}<answer>(B)</answer>"),
            (1.0, 0.0, Some(1.0)),
            &[],
        ),
        case(
            "multiple choice by option text",
            "chart",
            mc,
            "B",
            "<answer>Right.</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "multiple choice, wrong letter",
            "chart",
            mc,
            "B",
            format!("{CROP}<answer>C. behind</answer>"),
            (0.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "yes/no",
            "vstar",
            "Is the door open?",
            "no",
            "<answer>No, it is closed.</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "yes/no, wrong",
            "vstar",
            "Is the door open?",
            "no",
            format!("{CROP}<answer>Yes.</answer>"),
            (0.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "number with a unit",
            "chart",
            "What is the peak value?",
            "12.5",
            "<answer>about 12.50 units</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "normalised exact match",
            "vstar",
            q,
            "the dark green",
            "<answer>Dark-green!</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "boxed visual answer",
            "vstar",
            q,
            "red",
            "<answer>\\boxed{red}</answer>",
            (1.0, 0.0, Some(0.0)),
            &[],
        ),
        case(
            "paraphrase: the judge accepts",
            "vstar",
            q,
            "red",
            format!("{CROP}<answer>scarlet</answer>"),
            (1.0, 0.0, Some(1.0)),
            &["accuracy_by_judge"],
        ),
        case(
            "paraphrase: the judge rejects",
            "vstar",
            q,
            "red",
            format!("{CROP}<answer>pinkish</answer>"),
            (0.0, 0.0, Some(0.0)),
            &["accuracy_by_judge"],
        ),
        case(
            "empty answer",
            "vstar",
            q,
            "red",
            format!("{CROP}<answer> </answer>"),
            (0.0, 0.0, Some(0.0)),
            &[],
        ),
    ]
}

fn math_cases() -> Vec<Case> {
    let q = "Compute 3/6.";
    vec![
        case(
            "one boxed fraction",
            "thinklite_eureka",
            q,
            "1/2",
            r"<think>halve</think>The answer is \boxed{\dfrac{1}{2}}.",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "decimal for a fraction",
            "thinklite",
            q,
            r"\frac{1}{2}",
            r"<think>x</think>\boxed{0.5}",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "percentage",
            "thinklite",
            "What share?",
            "25%",
            r"\boxed{0.25}",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "degrees",
            "thinklite",
            "Angle?",
            "30",
            r"\boxed{30^\circ}",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "text units",
            "thinklite",
            "Length?",
            "12",
            r"\boxed{12\text{ cm}}",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "left/right and spaces",
            "thinklite",
            "Point?",
            "(1,2)",
            r"\boxed{\left( 1 , 2 \right)}",
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "wrong number",
            "thinklite_eureka",
            q,
            "1/2",
            r"\boxed{0.4}",
            (0.0, 0.0, None),
            &[],
        ),
        case(
            "no boxed answer: format error, accuracy 0",
            "thinklite_eureka",
            q,
            "1/2",
            "<think>x</think>one half",
            (0.0, -1.0, None),
            &["no_boxed_answer", "format_no_boxed"],
        ),
        case(
            "boxed only inside the thinking",
            "thinklite_eureka",
            q,
            "1/2",
            r"<think>\boxed{1/2}</think>done",
            (0.0, -1.0, None),
            &["no_boxed_answer", "format_no_boxed"],
        ),
        case(
            "two boxed answers: format error, the last one is scored",
            "thinklite_eureka",
            q,
            "1/2",
            r"\boxed{2} no wait \boxed{1/2}",
            (1.0, -1.0, None),
            &["format_multiple_boxed"],
        ),
        case(
            "unbalanced think",
            "thinklite_eureka",
            q,
            "1/2",
            r"<think>x \boxed{1/2}",
            (1.0, -1.0, None),
            &["format_unbalanced_think"],
        ),
        case(
            "no tool bonus for math, even with a crop",
            "thinklite_eureka",
            q,
            "1/2",
            format!("{CROP}\\boxed{{1/2}}"),
            (1.0, 0.0, None),
            &[],
        ),
        case(
            "symbolic: the judge decides",
            "thinklite_eureka",
            "Factor.",
            "(x-1)(x+1)",
            r"\boxed{(x+1)(x-1)}",
            (1.0, 0.0, None),
            &["accuracy_by_judge"],
        ),
        case(
            "choice letter",
            "thinklite",
            "Which?",
            "C",
            r"\boxed{(C)}",
            (1.0, 0.0, None),
            &[],
        ),
    ]
}

#[test]
fn every_rule_scores_as_written() {
    let pipeline = pipeline(Some(scripted(&["scarlet", "(x+1)(x-1)"])));
    let mut failures = Vec::new();
    for case in visual_cases().into_iter().chain(math_cases()) {
        let input = RewardInput {
            data_source: case.source,
            question: case.question,
            ground_truth: case.truth,
            response: &case.response,
            trajectory: None,
        };
        let score = pipeline.score(&input).unwrap();
        let got = (
            score.term("accuracy").unwrap(),
            score.term("format").unwrap(),
            score.term("tool"),
        );
        let (w_acc, w_fmt, w_tool) = if case.source.starts_with("thinklite") {
            (1.2, 0.4, 0.0)
        } else {
            (0.8, 0.2, 1.2)
        };
        let want_total =
            w_acc * case.terms.0 + w_fmt * case.terms.1 + w_tool * case.terms.2.unwrap_or(0.0);
        let flags: Vec<&str> = score.flags.iter().map(String::as_str).collect();
        if got != case.terms || flags != case.flags || (score.total - want_total).abs() > 1e-12 {
            failures.push(format!(
                "{}: got {got:?} {flags:?} total {}, want {:?} {:?} total {want_total}",
                case.name, score.total, case.terms, case.flags
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn trajectory(outcomes: Vec<ToolOutcome>) -> Trajectory {
    Trajectory {
        tokens: Vec::new(),
        mask: Vec::new(),
        logprobs: Vec::new(),
        prompt_len: 0,
        images: Vec::new(),
        image_sources: Vec::new(),
        image_sizes: Vec::new(),
        tool_calls: outcomes
            .into_iter()
            .enumerate()
            .map(|(turn, outcome)| ToolCallRecord {
                turn,
                raw: String::new(),
                call: None,
                outcome,
            })
            .collect(),
        turns: Vec::new(),
        answer: None,
        stop: StopReason::Answered,
    }
}

#[test]
fn the_trajectory_is_the_evidence_of_a_returned_crop_when_given() {
    let pipeline = pipeline(None);
    let with_crop = format!("{CROP}<answer>red</answer>");
    let no_crop = "<answer>red</answer>";
    let ok = trajectory(vec![ToolOutcome::Ok {
        images: 1,
        text: None,
        region: None,
    }]);
    let failed = trajectory(vec![
        ToolOutcome::Error {
            message: "ZOOM IN ARGUMENTS ARE INVALID".into(),
        },
        ToolOutcome::Dropped {
            reason: "token budget".into(),
        },
        ToolOutcome::Ok {
            images: 0,
            text: Some("no image".into()),
            region: None,
        },
    ]);
    let score = |response: &str, trajectory: Option<&Trajectory>| {
        let input = RewardInput {
            data_source: "vstar",
            question: "q",
            ground_truth: "red",
            response,
            trajectory,
        };
        pipeline.score(&input).unwrap()
    };
    let agree = score(&with_crop, Some(&ok));
    assert_eq!(agree.term("tool"), Some(1.0));
    assert!(agree.flags.is_empty());
    // The text claims a crop the trajectory never returned: no bonus, and a flag.
    let forged = score(&with_crop, Some(&failed));
    assert_eq!(forged.term("tool"), Some(0.0));
    assert_eq!(forged.flags, vec!["tool_evidence_mismatch".to_string()]);
    let hidden = score(no_crop, Some(&ok));
    assert_eq!(hidden.term("tool"), Some(1.0));
    assert_eq!(hidden.flags, vec!["tool_evidence_mismatch".to_string()]);
    assert_eq!(score(no_crop, Some(&failed)).term("tool"), Some(0.0));
}
