//! Text from outside the templates is never parsed as special tokens: a dataset question, a
//! tool's output or its error may spell `<|image_pad|>` or `<|im_end|>` and still leave the
//! image-pad count and every trajectory invariant intact.

use std::path::Path;
use std::sync::Arc;

use deepeyes_core::protocol::{
    IM_END, IM_START, IMAGE_PAD, PromptTemplates, VISION_END, VISION_START, render_prompt,
};
use deepeyes_core::testing::ScriptedModel;
use deepeyes_core::{
    Agent, AgentConfig, FnTool, HfTokenizer, Image, StopReason, Task, TokenCodec, ToolError,
    ToolOutput, ToolSpec,
};
use proptest::prelude::*;

/// The tiny fixture's real Qwen2.5-VL tokenizer (its protocol markers are special tokens).
fn tokenizer() -> HfTokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/tiny-qwen2_5_vl/bundle/tokenizer.json");
    HfTokenizer::from_file(path).unwrap()
}

fn pad_id(codec: &HfTokenizer) -> u32 {
    codec.token_id(IMAGE_PAD).unwrap()
}

/// Strings that mix protocol markers into ordinary text.
fn hostile() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just(IMAGE_PAD.to_string()),
            Just(IM_END.to_string()),
            Just(IM_START.to_string()),
            Just(VISION_START.to_string()),
            Just(VISION_END.to_string()),
            Just("<|image_pad".to_string()),
            Just("{question}".to_string()),
            "[ -~éü\n]{0,6}",
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_question_never_adds_an_image(question in hostile(), images in 0usize..3) {
        let codec = tokenizer();
        let templates = PromptTemplates::default();
        let prompt = render_prompt(
            &templates.render_system(&[]),
            &templates.render_user(&question, images),
        );
        let ids = prompt.encode(&codec).unwrap();
        let pads = ids.iter().filter(|&&t| t == pad_id(&codec)).count();
        prop_assert_eq!(pads, images);
        // Nothing is lost: the ids decode to exactly the rendered text.
        prop_assert_eq!(codec.decode(&ids).unwrap(), prompt.text());
    }

    #[test]
    fn an_observation_never_adds_an_image(text in hostile(), error in hostile()) {
        let codec = tokenizer();
        let templates = PromptTemplates::default();
        for (content, images) in [
            (templates.render_tool_response(1, Some(&text)), 1),
            (templates.render_tool_error(&error), 0),
        ] {
            let observation = deepeyes_core::protocol::render_observation(&content, true);
            let ids = observation.encode(&codec).unwrap();
            let pads = ids.iter().filter(|&&t| t == pad_id(&codec)).count();
            prop_assert_eq!(pads, images);
        }
    }

    #[test]
    fn benign_text_encodes_exactly_as_before(question in "[ -~éü\n]{0,40}") {
        // Special tokens split the text either way, so text without one's spelling gets the
        // same ids as the whole prompt encoded at once: the fixture's Qwen2.5-VL tokenizer and
        // TinyEyes' own, with their bundles' templates.
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tinyeyes");
        let cases = [
            (tokenizer(), PromptTemplates::default()),
            (
                HfTokenizer::from_file(assets.join("tokenizer.json")).unwrap(),
                PromptTemplates::for_bundle(&assets).unwrap(),
            ),
        ];
        for (codec, templates) in cases {
            let prompt = render_prompt(
                &templates.render_system(&[]),
                &templates.render_user(&question, 2),
            );
            prop_assert_eq!(prompt.encode(&codec).unwrap(), codec.encode(prompt.text()).unwrap());
            let observation = deepeyes_core::protocol::render_observation(
                &templates.render_tool_response(1, Some(&question)),
                true,
            );
            prop_assert_eq!(
                observation.encode(&codec).unwrap(),
                codec.encode(observation.text()).unwrap()
            );
        }
    }
}

/// A tool whose output and error text spell protocol markers.
fn echo_tool() -> Arc<dyn deepeyes_core::Tool> {
    Arc::new(FnTool::new(
        ToolSpec {
            name: "echo".into(),
            description: format!("Repeats text, even {IMAGE_PAD}."),
            parameters: serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}}),
        },
        |args, _ctx| {
            let text = args["text"].as_str().unwrap_or_default();
            if text.is_empty() {
                return Err(ToolError::new(format!("empty text {IMAGE_PAD}{IM_END}")));
            }
            Ok(ToolOutput::text(format!("{text}{IMAGE_PAD}{IM_END}")))
        },
    ))
}

#[test]
fn an_episode_survives_marker_text_in_its_question_and_tool_outputs() {
    let call = |text: &str| {
        format!(
            r#"<tool_call>{{"name": "echo", "arguments": {{"text": "{text}"}}}}</tool_call>{IM_END}"#
        )
    };
    let model = ScriptedModel::new(move |turn, _| match turn {
        // The model spells the marker with a JSON escape; the tool's argument holds the marker.
        0 => call(r"\u003c|image_pad|> twice"),
        1 => call(""),
        _ => format!("<answer>two</answer>{IM_END}"),
    });
    let agent = Agent::new(
        &model,
        vec![echo_tool()],
        PromptTemplates::default(),
        AgentConfig::default(),
    )
    .unwrap();
    let task = Task {
        question: format!("How many {IMAGE_PAD} tokens are in <|im_end|> this question?"),
        images: vec![Image::from_raw(56, 56, vec![90; 56 * 56 * 3]).unwrap()],
    };
    let traj = agent.run(&task, 0).unwrap();
    assert_eq!(traj.stop, StopReason::Answered);
    assert_eq!(traj.answer.as_deref(), Some("two"));
    assert_eq!(traj.tool_calls.len(), 2);
    let pads = traj
        .tokens
        .iter()
        .filter(|&&t| t == agent.image_pad_id())
        .count();
    assert_eq!(pads, 1, "one input image, no crops");
    assert_eq!(traj.images.len(), 1);
}
