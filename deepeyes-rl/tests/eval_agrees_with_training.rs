//! One notion of "correct" and one of IoU: `deepeyes eval` and the training step see the same
//! trajectory the same way.
//!
//! A scripted model answers (and zooms) exactly as told, through the real agent loop and the real
//! zoom tool. Evaluation grades with the reward's accuracy term ([`VisualConfig::accuracy`]); the
//! training step scores the decoded response with DeepEyes' reward pipeline and measures IoU with
//! [`rollout_metrics`]. Every verdict and every IoU must agree.

use std::sync::{Arc, Mutex};

use deepeyes_core::dataset::{
    GroundTruthBox, Item, ItemImage, Position, PreparedItem, prepare_item,
};
use deepeyes_core::protocol::{IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START};
use deepeyes_core::{
    Agent, FinishReason, GenerateRequest, Generation, Image, ImageLimits, PreprocessConfig,
    PromptTemplates, RewardFn, RewardInput, Task, TokenCodec, Trajectory, VisionLanguageModel,
};
use deepeyes_reward::{PipelineConfig, Registry, VisualConfig};
use deepeyes_rl::eval::{EvalConfig, Evaluator, ItemRecord};
use deepeyes_rl::metrics::{ScoredTrajectory, rollout_metrics};
use deepeyes_tools::{CoordinateFrame, ToolRegistry, ToolsConfig};

/// A codec with one id per protocol marker and one per character.
struct CharCodec;

const SPECIALS: [&str; 5] = [IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END];
const CHAR_BASE: u32 = 16;

impl TokenCodec for CharCodec {
    fn encode(&self, text: &str) -> deepeyes_core::Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        'outer: while let Some(c) = rest.chars().next() {
            for (id, special) in SPECIALS.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(special) {
                    ids.push(id as u32);
                    rest = after;
                    continue 'outer;
                }
            }
            ids.push(CHAR_BASE + c as u32);
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> deepeyes_core::Result<String> {
        ids.iter()
            .map(|&id| match SPECIALS.get(id as usize) {
                Some(s) => Ok((*s).to_string()),
                None => char::from_u32(id - CHAR_BASE)
                    .map(String::from)
                    .ok_or_else(|| deepeyes_core::Error::Tokenizer(format!("bad id {id}"))),
            })
            .collect()
    }
}

/// Plays back `turns[k]` when its context holds `k + 1` images (the input, then one per crop).
struct ScriptedModel {
    codec: CharCodec,
    turns: Vec<String>,
    calls: Mutex<usize>,
}

impl ScriptedModel {
    fn new(turns: &[String]) -> Self {
        Self {
            codec: CharCodec,
            turns: turns.to_vec(),
            calls: Mutex::new(0),
        }
    }
}

impl VisionLanguageModel for ScriptedModel {
    fn generate(&self, request: &GenerateRequest<'_>) -> deepeyes_core::Result<Generation> {
        *self.calls.lock().unwrap() += 1;
        let text = format!("{}{IM_END}", self.turns[request.images.len() - 1]);
        let tokens = self.codec.encode(&text)?;
        Ok(Generation {
            logprobs: vec![0.0; tokens.len()],
            tokens,
            finish: FinishReason::Stop,
        })
    }

    fn codec(&self) -> &dyn TokenCodec {
        &self.codec
    }
}

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
    let model = ScriptedModel::new(turns);
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
    let model = ScriptedModel::new(turns);
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
