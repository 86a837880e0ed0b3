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

/// TinyEyes' real tokenizer, loaded once: every protocol tag there (`<tool_call>`, `<answer>`,
/// `<tool_response>`, `<think>`, …) is a special token, not only the image and turn markers.
fn tinyeyes() -> Arc<HfTokenizer> {
    static CODEC: std::sync::OnceLock<Arc<HfTokenizer>> = std::sync::OnceLock::new();
    Arc::clone(CODEC.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tinyeyes/tokenizer.json");
        Arc::new(HfTokenizer::from_file(path).unwrap())
    }))
}

/// Strings mixing every special token of TinyEyes' tokenizer, fragments of them and ordinary
/// text.
fn hostile_tinyeyes() -> impl Strategy<Value = String> {
    let specials = tinyeyes().special_tokens();
    assert!(specials.iter().any(|s| s == "<tool_call>"), "{specials:?}");
    proptest::collection::vec(
        prop_oneof![
            3 => proptest::sample::select(specials),
            1 => Just("<|image_pad".to_string()),
            1 => Just("{text}".to_string()),
            3 => "[ -~éü\n]{0,6}",
        ],
        0..10,
    )
    .prop_map(|parts| parts.concat())
}

/// A tool that echoes its `text` argument with a crop, and one that rejects every call,
/// quoting the value it was given (as the zoom tool quotes a bad `bbox_2d` item).
fn echo_and_strict_tools(tool_text: String) -> Vec<Arc<dyn deepeyes_core::Tool>> {
    let spec = |name: &str| ToolSpec {
        name: name.into(),
        description: format!("A tool; {tool_text}"),
        parameters: serde_json::json!({"type": "object"}),
    };
    let (echo_spec, strict_spec) = (spec("echo"), spec("strict"));
    let echo = FnTool::new(echo_spec, move |args, ctx| {
        let text = args["text"].as_str().unwrap_or_default();
        let crop = ctx.original_images[0].clone();
        Ok(ToolOutput {
            text: Some(format!("{text}|{tool_text}")),
            images: vec![crop],
            region: None,
        })
    });
    let strict = FnTool::new(strict_spec, |args, _| {
        Err(ToolError::new(format!(
            "bbox_2d[0] must be a number, got {}",
            args["bbox_2d"][0]
        )))
    });
    vec![
        Arc::new(echo) as Arc<dyn deepeyes_core::Tool>,
        Arc::new(strict),
    ]
}

/// A tool call as a model writes it; `<` as a JSON escape, so the call's text spells no
/// special token while its parsed values hold exactly `value`.
fn escaped_call(name: &str, arguments: serde_json::Value) -> String {
    let call = serde_json::json!({"name": name, "arguments": arguments});
    let json = serde_json::to_string(&call)
        .unwrap()
        .replace('<', r"\u003c");
    format!("<tool_call>{json}</tool_call>{IM_END}")
}

/// The templates the property runs under: the built-in ones (whose system prompt lists the tool
/// signatures) and TinyEyes' own.
fn tinyeyes_templates() -> [PromptTemplates; 2] {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tinyeyes");
    [
        PromptTemplates::default(),
        PromptTemplates::for_bundle(assets).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever a question, a tool's output, a tool's error or a tool's description spells, an
    /// episode on TinyEyes' tokenizer runs its course: every call answered, one pad per image,
    /// the trajectory's invariants intact and every hostile text in it as its characters.
    #[test]
    fn hostile_text_anywhere_leaves_an_episode_intact(
        question in hostile_tinyeyes(),
        name in hostile_tinyeyes(),
        argument in hostile_tinyeyes(),
        tool_text in hostile_tinyeyes(),
    ) {
        let codec = tinyeyes();
        for templates in tinyeyes_templates() {
            let (name, argument) = (format!("x{name}"), argument.clone());
            let model = ScriptedModel::new(move |turn, _| match turn {
                0 => escaped_call(&name, serde_json::json!({})),
                1 => escaped_call("echo", serde_json::json!({"text": argument})),
                2 => escaped_call("strict", serde_json::json!({"bbox_2d": [argument, 1, 2, 3]})),
                _ => format!("<answer>done</answer>{IM_END}"),
            })
            .with_codec(codec.clone());
            let config = AgentConfig { max_turns: 4, ..AgentConfig::default() };
            let agent =
                Agent::new(&model, echo_and_strict_tools(tool_text.clone()), templates, config)
                    .unwrap();
            let task = Task {
                question: question.clone(),
                images: vec![Image::from_raw(56, 56, vec![90; 56 * 56 * 3]).unwrap()],
            };
            let traj = agent.run(&task, 0).unwrap();
            traj.check_invariants(agent.image_pad_id()).unwrap();
            prop_assert_eq!(traj.stop, StopReason::Answered);
            prop_assert_eq!(traj.tool_calls.len(), 3);
            let pads = traj.tokens.iter().filter(|&&t| t == agent.image_pad_id()).count();
            prop_assert_eq!((pads, traj.images.len()), (2, 2), "the input and the echo's crop");
            let text = codec.decode(&traj.tokens).unwrap();
            prop_assert!(text.contains(&agent.prompt_text(&task)));
            for outcome in traj.tool_calls.iter().map(|c| &c.outcome) {
                let shown = match outcome {
                    deepeyes_core::ToolOutcome::Ok { text, .. } => text.clone().unwrap(),
                    deepeyes_core::ToolOutcome::Error { message } => message.clone(),
                    other => panic!("{other:?}"),
                };
                prop_assert!(text.contains(&shown), "{shown:?} is not in {text:?}");
            }
        }
    }

    /// A model that writes the characters of special tokens into its own calls (a banned
    /// `<|image_pad|>` comes out as its characters; `<|im_end|>` ends its turn early) never
    /// breaks the episode either, whatever becomes of it.
    #[test]
    fn a_model_spelling_special_tokens_leaves_an_episode_intact(
        name in hostile_tinyeyes(),
        argument in hostile_tinyeyes(),
    ) {
        let codec = tinyeyes();
        let model = ScriptedModel::new(move |turn, _| match turn {
            0 => format!(r#"<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>{IM_END}"#),
            1 => format!(
                r#"<tool_call>{{"name": "strict", "arguments": {{"bbox_2d": ["{argument}", 1, 2, 3]}}}}</tool_call>{IM_END}"#
            ),
            _ => format!("<answer>done</answer>{IM_END}"),
        })
        .with_codec(codec.clone());
        let config = AgentConfig { max_turns: 3, ..AgentConfig::default() };
        let agent = Agent::new(
            &model,
            echo_and_strict_tools(String::new()),
            PromptTemplates::default(),
            config,
        )
        .unwrap();
        let task = Task {
            question: "Which colour?".into(),
            images: vec![Image::from_raw(56, 56, vec![90; 56 * 56 * 3]).unwrap()],
        };
        let traj = agent.run(&task, 0).unwrap();
        traj.check_invariants(agent.image_pad_id()).unwrap();
        let pads = traj.tokens.iter().filter(|&&t| t == agent.image_pad_id()).count();
        prop_assert_eq!(pads, traj.images.len());
    }
}

#[test]
fn a_tool_named_image_pad_is_answered_with_an_error_and_the_episode_goes_on() {
    // The model spells `<|image_pad|>` in a call's name and in a bbox value (it cannot produce
    // the token itself: the agent bans it); both errors quote it back.
    let model = ScriptedModel::new(|turn, _| match turn {
        0 => format!(r#"<tool_call>{{"name": "{IMAGE_PAD}", "arguments": {{}}}}</tool_call>{IM_END}"#),
        1 => format!(
            r#"<tool_call>{{"name": "strict", "arguments": {{"bbox_2d": ["{IMAGE_PAD}{VISION_START}", 1, 2, 3]}}}}</tool_call>{IM_END}"#
        ),
        _ => format!("<answer>two</answer>{IM_END}"),
    })
    .with_codec(tinyeyes());
    let agent = Agent::new(
        &model,
        echo_and_strict_tools(String::new()),
        PromptTemplates::default(),
        AgentConfig::default(),
    )
    .unwrap();
    let task = Task {
        question: "How many cards?".into(),
        images: vec![Image::from_raw(56, 56, vec![90; 56 * 56 * 3]).unwrap()],
    };
    let traj = agent.run(&task, 0).unwrap();
    assert_eq!(traj.stop, StopReason::Answered);
    let messages: Vec<&str> = traj
        .tool_calls
        .iter()
        .map(|c| match &c.outcome {
            deepeyes_core::ToolOutcome::Error { message } => message.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        messages[0].starts_with(&format!("unknown tool '{IMAGE_PAD}'")),
        "{messages:?}"
    );
    assert!(
        messages[1].contains(&format!("\"{IMAGE_PAD}{VISION_START}\"")),
        "{messages:?}"
    );
    let pads = traj
        .tokens
        .iter()
        .filter(|&&t| t == agent.image_pad_id())
        .count();
    assert_eq!(pads, 1, "only the input image");
    let text = tinyeyes().decode(&traj.tokens).unwrap();
    assert!(
        text.contains(messages[0]) && text.contains(messages[1]),
        "{text}"
    );
}
