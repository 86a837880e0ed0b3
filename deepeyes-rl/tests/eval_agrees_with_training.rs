//! One notion of "correct" and one of IoU: `deepeyes eval` and the training step see the same
//! trajectory the same way.
//!
//! A scripted model (`deepeyes_core::testing`) answers (and zooms) exactly as told, through the real agent loop and the real
//! zoom tool. Evaluation grades with the reward's accuracy term ([`VisualConfig::accuracy`]); the
//! training step scores the decoded response with DeepEyes' reward pipeline and measures IoU with
//! [`rollout_metrics`]. Every verdict and every IoU must agree.

use std::sync::Arc;

use deepeyes_core::dataset::{
    GroundTruthBox, Item, ItemImage, Position, PreparedItem, prepare_item,
};
use deepeyes_core::testing::ScriptedModel;
use deepeyes_core::{
    Agent, Image, ImageLimits, PreprocessConfig, PromptTemplates, RewardFn, RewardInput, Task,
    Trajectory, VisionLanguageModel,
};
use deepeyes_reward::{PipelineConfig, Registry, VisualConfig};
use deepeyes_rl::eval::{EvalConfig, Evaluator, ItemRecord};
use deepeyes_rl::metrics::{ScoredTrajectory, rollout_metrics};
use deepeyes_tools::{CoordinateFrame, ToolRegistry, ToolsConfig};

fn png(width: u32, height: u32) -> Vec<u8> {
    let raw: Vec<u8> = (0..width * height * 3).map(|v| (v % 251) as u8).collect();
    Image::from_raw(width, height, raw)
        .unwrap()
        .to_png()
        .unwrap()
}

fn item(options: &[&str], correct: Option<usize>, answer: &str, gt: [f64; 4]) -> Item {
    let limits = ImageLimits::default();
    Item {
        id: format!("item-{answer}"),
        data_source: "vstar".into(),
        question: "How many cats sit on the sign?".into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        correct_option: correct,
        answer: answer.into(),
        images: vec![ItemImage::from_encoded(png(640, 480), "test image", &limits).unwrap()],
        boxes: vec![GroundTruthBox {
            bbox: gt,
            label: None,
            image: 0,
        }],
        category: None,
        prompt: vec![],
        extra: serde_json::Map::new(),
        position: Position::file("test"),
    }
}

/// The zoom tool in `frame`, as the CLI registers it.
fn tools(frame: CoordinateFrame) -> Vec<Arc<dyn deepeyes_core::Tool>> {
    let mut config = ToolsConfig::default();
    config.zoom_in.frame = frame;
    ToolRegistry::from_config(&config).unwrap().tools()
}

/// What `deepeyes eval` records for `item` when the model plays `turns`.
fn evaluate(item: &PreparedItem, turns: &[String], frame: CoordinateFrame) -> ItemRecord {
    let model = ScriptedModel::from_turns(turns.to_vec());
    let grader = VisualConfig::default().accuracy(None);
    let evaluator = Evaluator::new(
        &model,
        tools(frame),
        PromptTemplates::default(),
        EvalConfig::default(),
        &grader,
    )
    .unwrap();
    evaluator
        .evaluate(std::slice::from_ref(item))
        .unwrap()
        .remove(0)
}

/// The trajectory a training rollout gets for `item` when the model plays `turns`, with the
/// reward the trainer gives it (DeepEyes' pipeline over the decoded response, no judge).
fn train_rollout(
    item: &PreparedItem,
    turns: &[String],
    frame: CoordinateFrame,
) -> (Trajectory, deepeyes_core::RewardBreakdown) {
    let model = ScriptedModel::from_turns(turns.to_vec());
    let agent = Agent::new(
        &model,
        tools(frame),
        PromptTemplates::default(),
        Default::default(),
    )
    .unwrap();
    let task = Task {
        question: item.question.clone(),
        images: item.item.decode_images(&ImageLimits::default()).unwrap(),
    };
    let traj = agent.run(&task, 3).unwrap();
    let mut rewards = PipelineConfig::deepeyes().unwrap();
    rewards.judge = None;
    let pipeline = rewards.build(&Registry::new()).unwrap();
    let response = model.codec().decode(traj.response_tokens()).unwrap();
    let reward = pipeline
        .score(&RewardInput {
            data_source: &item.item.data_source,
            question: &item.question,
            ground_truth: &item.ground_truth(),
            response: &response,
            trajectory: Some(&traj),
        })
        .unwrap();
    (traj, reward)
}

fn answer(text: &str) -> String {
    format!("<think>Looked.</think><answer>{text}</answer>")
}

#[test]
fn eval_and_training_reward_agree_on_every_answer() {
    let gt = [100.0, 100.0, 300.0, 300.0];
    let choice = prepare_item(item(&["3", "4", "5", "none"], Some(1), "4", gt), 0, false);
    let open = prepare_item(item(&[], None, "4", gt), 0, false);
    let yes = prepare_item(item(&[], None, "yes", gt), 0, false);
    // (item, answer, correct?) — the verdicts both sides must reach.
    let cases: [(&PreparedItem, &str, Option<bool>); 11] = [
        (&choice, "B", Some(true)),
        (&choice, "(B) 4", Some(true)),
        (&choice, "4", Some(true)),
        (&choice, r"\boxed{B}", Some(true)),
        (&choice, "A", Some(false)),
        (&open, "4 cats", Some(true)),
        (&open, "four", None),
        (&open, "5", Some(false)),
        (&yes, "Yes, there are.", Some(true)),
        (&yes, "No.", Some(false)),
        (&open, "I cannot tell from here", None),
    ];
    for (prepared, text, expected) in cases {
        let turns = [answer(text)];
        let record = evaluate(prepared, &turns, CoordinateFrame::Original);
        let verdict = &record.samples[0].verdict;
        let (_, reward) = train_rollout(prepared, &turns, CoordinateFrame::Original);
        let accuracy = reward.term("accuracy").unwrap();
        assert_eq!(
            verdict.correct,
            accuracy > 0.5,
            "{text:?} for {:?}: eval {verdict:?}, training accuracy {accuracy} ({:?})",
            prepared.ground_truth(),
            reward.flags
        );
        if let Some(correct) = expected {
            assert_eq!(verdict.correct, correct, "{text:?}: {verdict:?}");
        }
    }
}

#[test]
fn eval_and_training_metrics_report_the_same_iou_in_every_frame() {
    let gt = [100.0, 100.0, 300.0, 300.0];
    let (w, h) = (640.0, 480.0);
    let (rh, rw) = PreprocessConfig::default().smart_resize(480, 640).unwrap();
    for frame in CoordinateFrame::ALL {
        // The ground-truth box written in `frame`'s coordinates.
        let (sx, sy) = match frame {
            CoordinateFrame::Original => (1.0, 1.0),
            CoordinateFrame::Resized => (f64::from(rw) / w, f64::from(rh) / h),
            CoordinateFrame::Relative => (1000.0 / w, 1000.0 / h),
            CoordinateFrame::RelativeUnit => (1.0 / w, 1.0 / h),
        };
        let args = [gt[0] * sx, gt[1] * sy, gt[2] * sx, gt[3] * sy];
        let turns = [
            format!(
                r#"<think>Zoom.</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": [{}, {}, {}, {}]}}}}</tool_call>"#,
                args[0], args[1], args[2], args[3]
            ),
            answer("4"),
        ];
        let prepared = prepare_item(item(&[], None, "4", gt), 0, false);
        let record = evaluate(&prepared, &turns, frame);
        let eval_iou = record.samples[0].calls[0]
            .iou
            .expect("eval measured an IoU");

        let (traj, reward) = train_rollout(&prepared, &turns, frame);
        let boxes = prepared.item.first_image_boxes();
        let metrics = rollout_metrics(&[ScoredTrajectory {
            trajectory: &traj,
            reward: &reward,
            group: 0,
            gt_boxes: &boxes,
        }])
        .unwrap();
        let train_iou = metrics.grounding_iou.expect("training measured an IoU");
        assert_eq!(eval_iou, train_iou, "{frame}");
        // The crop is the ground-truth region up to rounding, whatever the frame.
        assert!(eval_iou > 0.98, "{frame}: IoU {eval_iou}");
        assert_eq!(
            reward.term("tool"),
            Some(1.0),
            "{frame}: the bonus was paid"
        );
    }
}

/// A look that misses, a second that finds the box, then an answer: the evaluation counts the
/// answer under two looks with its verdict, marks which look hit, and says that the agent
/// looked again after a miss; an answer after one look that hit counts under one look.
#[test]
fn eval_reports_looks_per_answer_and_looking_again_after_a_miss() {
    let gt = [100.0, 100.0, 300.0, 300.0];
    let zoom = |b: [u32; 4]| {
        format!(
            r#"<tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": [{}, {}, {}, {}]}}}}</tool_call>"#,
            b[0], b[1], b[2], b[3]
        )
    };
    let prepared = prepare_item(item(&[], None, "4", gt), 0, false);
    let two = evaluate(
        &prepared,
        &[
            zoom([400, 300, 600, 460]),
            zoom([120, 120, 280, 280]),
            answer("4"),
        ],
        CoordinateFrame::Original,
    );
    let calls = &two.samples[0].calls;
    assert_eq!(
        calls.iter().map(|c| c.hit).collect::<Vec<_>>(),
        [Some(false), Some(true)]
    );
    let one = evaluate(
        &prepared,
        &[zoom([150, 150, 250, 250]), answer("5")],
        CoordinateFrame::Original,
    );
    let summary = deepeyes_rl::eval::summarize("vstar", &[two, one], 0);
    let looks: Vec<(usize, usize, f64)> = summary
        .tools
        .by_looks
        .iter()
        .map(|l| (l.looks, l.answers, l.accuracy))
        .collect();
    assert_eq!(looks, [(1, 1, 0.0), (2, 1, 1.0)]);
    assert_eq!(summary.tools.look_again_after_miss, Some(1.0));
    assert_eq!(summary.tools.look_again_after_hit, Some(0.0));
}
