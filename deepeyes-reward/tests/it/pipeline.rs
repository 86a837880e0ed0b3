//! Pipelines built from TOML, end to end with a loopback judge: rules first, the judge only when
//! they cannot decide, and the failure policies.

use deepeyes_core::reward::{RewardFn, RewardInput};
use deepeyes_reward::{Error, FailurePolicy, PipelineConfig, Registry, flags};

use crate::server::{JudgeServer, dead_url};

const CROP: &str =
    "<tool_response><|vision_start|><|image_pad|><|image_pad|><|vision_end|></tool_response>";

fn config(judge_url: &str, on_failure: FailurePolicy) -> PipelineConfig {
    let mut config = PipelineConfig::deepeyes().unwrap();
    let judge = config.judge.as_mut().unwrap();
    judge.base_url = judge_url.to_string();
    judge.model = Some("m".into());
    judge.timeout_secs = 1.0;
    judge.max_retries = 1;
    judge.backoff_initial_ms = 1;
    judge.backoff_max_ms = 2;
    judge.on_failure = on_failure;
    config
}

fn visual<'a>(ground_truth: &'a str, response: &'a str) -> RewardInput<'a> {
    RewardInput {
        data_source: "vstar",
        question: "What is the colour of the scarf?",
        ground_truth,
        response,
        trajectory: None,
    }
}

#[test]
fn rules_decide_without_the_judge_and_the_judge_decides_the_rest() {
    let server = JudgeServer::answering("VERDICT: CORRECT");
    let pipeline = config(&server.url(), FailurePolicy::Error)
        .build(&Registry::new())
        .unwrap();

    let decided = format!("<think>zoom</think>{CROP}<think>ok</think><answer>Red.</answer>");
    let score = pipeline.score(&visual("red", &decided)).unwrap();
    assert_eq!(score.term("accuracy"), Some(1.0));
    assert_eq!(score.term("tool"), Some(1.0));
    assert!(score.flags.is_empty(), "{:?}", score.flags);
    assert_eq!(server.chat_requests(), 0);

    let open = format!("<think>zoom</think>{CROP}<think>ok</think><answer>crimson</answer>");
    let score = pipeline.score(&visual("red", &open)).unwrap();
    assert_eq!(server.chat_requests(), 1);
    assert_eq!(score.term("accuracy"), Some(1.0));
    assert_eq!(score.term("tool"), Some(1.0));
    assert!(score.flags.contains(&flags::BY_JUDGE.to_string()));
    assert!((score.total - 2.0).abs() < 1e-12);
    // DeepEyes' visual judge temperature comes from the shipped config.
    assert_eq!(server.requests()[0].json()["temperature"], 0.3);

    let math = RewardInput {
        data_source: "thinklite_eureka",
        question: "Factor x^2-1.",
        ground_truth: "(x-1)(x+1)",
        response: r"<think>difference of squares</think> \boxed{(x+1)(x-1)}",
        trajectory: None,
    };
    let score = pipeline.score(&math).unwrap();
    assert_eq!(server.chat_requests(), 2);
    assert_eq!(score.term("accuracy"), Some(1.0));
    assert!((score.total - 1.2).abs() < 1e-12);
    let body = server.requests()[1].json();
    assert_eq!(body["temperature"], 0.0);
    assert!(
        body["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("math problem")
    );
}

#[test]
fn a_dead_judge_with_rule_fallback_is_flagged_not_silent() {
    let pipeline = config(&dead_url(), FailurePolicy::RuleFallback)
        .build(&Registry::new())
        .unwrap();
    let open = format!("{CROP}<answer>crimson</answer>");
    let score = pipeline.score(&visual("red", &open)).unwrap();
    assert_eq!(score.term("accuracy"), Some(0.0));
    assert_eq!(score.term("tool"), Some(0.0));
    assert_eq!(score.flags, vec![flags::JUDGE_FALLBACK.to_string()]);
    // Rule-decided samples are unaffected.
    let decided = format!("{CROP}<answer>red</answer>");
    let score = pipeline.score(&visual("red", &decided)).unwrap();
    assert!(score.flags.is_empty());
    assert!((score.total - 2.0).abs() < 1e-12);
}

#[test]
fn a_dead_judge_with_the_error_policy_fails_the_sample() {
    let url = dead_url();
    let pipeline = config(&url, FailurePolicy::Error)
        .build(&Registry::new())
        .unwrap();
    let err = pipeline
        .evaluate(&visual("red", "<answer>crimson</answer>"))
        .unwrap_err();
    assert!(matches!(err, Error::Judge(_)), "{err}");
    let core = pipeline
        .score(&visual("red", "<answer>crimson</answer>"))
        .unwrap_err()
        .to_string();
    assert!(core.contains(&url) && core.contains("2 attempt"), "{core}");
}

#[test]
fn a_garbage_answering_judge_with_fallback_is_flagged() {
    let server = JudgeServer::answering("I would rather not say.");
    let pipeline = config(&server.url(), FailurePolicy::RuleFallback)
        .build(&Registry::new())
        .unwrap();
    let score = pipeline
        .score(&visual("red", "<answer>crimson</answer>"))
        .unwrap();
    assert_eq!(score.flags, vec![flags::JUDGE_FALLBACK.to_string()]);
    assert_eq!(server.chat_requests(), 2);
}

#[test]
fn without_a_judge_undecided_answers_are_flagged() {
    let mut config = PipelineConfig::deepeyes().unwrap();
    config.judge = None;
    let pipeline = config.build(&Registry::new()).unwrap();
    let score = pipeline
        .score(&visual("red", "<answer>crimson</answer>"))
        .unwrap();
    assert_eq!(score.term("accuracy"), Some(0.0));
    assert_eq!(score.flags, vec![flags::UNDECIDED_NO_JUDGE.to_string()]);
}

#[test]
fn the_ablation_config_has_no_tool_term() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/rewards/deepeyes-no-tool-bonus.toml"
    );
    let mut config = PipelineConfig::from_toml_file(path).unwrap();
    config.judge = None;
    let pipeline = config.build(&Registry::new()).unwrap();
    let response = format!("{CROP}<answer>red</answer>");
    let score = pipeline.score(&visual("red", &response)).unwrap();
    assert_eq!(score.term("tool"), None);
    assert!((score.total - 0.8).abs() < 1e-12);
    let bounds = pipeline.bounds_for("vstar").unwrap();
    assert!((bounds.min + 0.2).abs() < 1e-12 && (bounds.max - 0.8).abs() < 1e-12);
}

#[test]
fn the_unconditional_ablation_pays_for_a_crop_with_a_wrong_answer() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/rewards/deepeyes-unconditional-tool-bonus.toml"
    );
    let mut config = PipelineConfig::from_toml_file(path).unwrap();
    config.judge = None;
    let unconditional = config.build(&Registry::new()).unwrap();
    let mut deepeyes = PipelineConfig::deepeyes().unwrap();
    deepeyes.judge = None;
    let conditional = deepeyes.build(&Registry::new()).unwrap();
    let wrong = format!("{CROP}<answer>blue</answer>");
    let right = format!("{CROP}<answer>red</answer>");
    let score = |p: &deepeyes_reward::Pipeline, response: &str| {
        p.score(&visual("red", response)).unwrap().term("tool")
    };
    assert_eq!(score(&unconditional, &wrong), Some(1.0));
    assert_eq!(score(&conditional, &wrong), Some(0.0));
    assert_eq!(score(&unconditional, &right), Some(1.0));
    // Without a crop there is nothing to pay for.
    assert_eq!(score(&unconditional, "<answer>red</answer>"), Some(0.0));
}

#[test]
fn the_shipped_file_and_the_embedded_copy_are_the_same() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/rewards/deepeyes.toml"
    );
    let on_disk = std::fs::read_to_string(path).unwrap();
    assert_eq!(on_disk, deepeyes_reward::DEEPEYES_TOML);
}

#[test]
fn the_composed_config_scores_like_the_presets() {
    let mut shipped = PipelineConfig::deepeyes().unwrap();
    shipped.judge = None;
    let composed = shipped.build(&Registry::new()).unwrap();
    let presets = PipelineConfig::from_toml_str(
        "version = 1\n[sources]\nvstar = 'v'\nthinklite_eureka = 'm'\n[rewards.v]\ntype = 'deepeyes-visual'\n[rewards.m]\ntype = 'deepeyes-math'",
        "presets",
    )
    .unwrap()
    .build(&Registry::new())
    .unwrap();
    let responses = [
        format!("<think>a</think>{CROP}<think>b</think><answer>red</answer>"),
        format!("<think>a</think>{CROP}<answer>blue</answer>"),
        "<answer>red".to_string(),
        format!("<answer>{}</answer>", "x".repeat(1000)),
        r"<think>x</think> \boxed{3}".to_string(),
        r"\boxed{3} \boxed{4}".to_string(),
    ];
    for source in ["vstar", "thinklite_eureka"] {
        for response in &responses {
            let input = RewardInput {
                data_source: source,
                question: "q",
                ground_truth: if source == "vstar" { "red" } else { "4" },
                response,
                trajectory: None,
            };
            assert_eq!(
                composed.score(&input).unwrap(),
                presets.score(&input).unwrap(),
                "{source}: {response}"
            );
        }
        assert_eq!(
            composed.bounds_for(source).unwrap(),
            presets.bounds_for(source).unwrap()
        );
    }
}

#[test]
fn a_batch_is_scored_concurrently_within_max_concurrency_and_in_order() {
    use std::time::Duration;

    use crate::server::{Reply, chat};

    // The judge calls "colour N" correct for even N, slowly, so the requests overlap.
    let server = JudgeServer::start(|req, _| {
        let user = req.json()["messages"][1]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let even = ["colour 0", "colour 2", "colour 4", "colour 6"]
            .iter()
            .any(|c| user.contains(c));
        let verdict = if even {
            "VERDICT: CORRECT"
        } else {
            "VERDICT: INCORRECT"
        };
        Reply::After(Duration::from_millis(80), Box::new(chat(verdict)))
    });
    let mut config = config(&server.url(), FailurePolicy::Error);
    config.judge.as_mut().unwrap().max_concurrency = 3;
    let pipeline = config.build(&Registry::new()).unwrap();
    assert_eq!(pipeline.concurrency(), 3);

    let responses: Vec<String> = (0..8)
        .map(|i| format!("{CROP}<answer>colour {i}</answer>"))
        .collect();
    let inputs: Vec<RewardInput<'_>> = responses.iter().map(|r| visual("red", r)).collect();
    let scored = pipeline.score_batch(&inputs);
    let accuracy: Vec<f64> = scored
        .iter()
        .map(|s| s.as_ref().unwrap().term("accuracy").unwrap())
        .collect();
    assert_eq!(accuracy, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    assert_eq!(server.chat_requests(), 8);
    let most = server.max_in_flight();
    assert!((2..=3).contains(&most), "max in flight: {most}");
}
