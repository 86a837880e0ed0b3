//! The example plugin and the built-ins driven through `deepeyes_core::Agent` by a scripted model.

use std::sync::Mutex;

use deepeyes_core::protocol::{IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START};
use deepeyes_core::{
    Agent, AgentConfig, FinishReason, GenerateRequest, Generation, PromptTemplates, StopReason,
    Task, TokenCodec, ToolOutcome, VisionLanguageModel,
};
use deepeyes_tools::{CropRect, PluginConfig, ToolRegistry, ToolsConfig};

use crate::support::{pattern, plugin};

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

/// A model that plays back fixed turns and records the images it was shown.
struct ScriptedModel {
    codec: CharCodec,
    turns: Vec<String>,
    seen: Mutex<Vec<Vec<(u32, u32)>>>,
}

impl VisionLanguageModel for ScriptedModel {
    fn generate(&self, request: &GenerateRequest<'_>) -> deepeyes_core::Result<Generation> {
        let mut seen = self.seen.lock().unwrap();
        let turn = seen.len();
        seen.push(
            request
                .images
                .iter()
                .map(|i| (i.width(), i.height()))
                .collect(),
        );
        let text = format!("{}{IM_END}", self.turns[turn]);
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

#[test]
fn agent_uses_plugin_and_zoom_in() {
    let mut config = ToolsConfig::default();
    config
        .plugins
        .push(PluginConfig::new(plugin("grid-overlay-plugin")));
    let registry = ToolRegistry::from_config(&config).unwrap();
    let model = ScriptedModel {
        codec: CharCodec,
        turns: vec![
            r#"<think>I need coordinates.</think><tool_call>{"name": "image_grid_overlay_tool", "arguments": {"step": 100}}</tool_call>"#.into(),
            r#"<think>The sign is between x=200 and 400.</think><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [200, 100, 400, 250], "label": "sign"}}</tool_call>"#.into(),
            r#"<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 20, 20]}}</tool_call>"#.into(),
            "<think>Done.</think><answer>red</answer>".into(),
        ],
        seen: Mutex::new(Vec::new()),
    };
    let agent = Agent::new(
        &model,
        registry.tools(),
        PromptTemplates::default(),
        AgentConfig::default(),
    )
    .unwrap();
    let offered: Vec<&str> = agent.tool_specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(offered, ["image_zoom_in_tool", "image_grid_overlay_tool"]);

    let original = pattern(640, 480);
    let task = Task {
        question: "What colour is the sign?".into(),
        images: vec![original.clone()],
    };
    let prompt = agent.prompt_text(&task);
    for spec in registry.specs() {
        assert!(prompt.contains(&spec.signature_json()), "{prompt}");
    }
    let traj = agent.run(&task, 7).unwrap();

    assert_eq!(traj.stop, StopReason::Answered);
    assert_eq!(traj.answer.as_deref(), Some("red"));
    assert_eq!(traj.tool_calls.len(), 3);
    assert_eq!(
        traj.tool_calls[0].outcome,
        ToolOutcome::Ok {
            images: 1,
            text: Some(
                "Grid lines every 100 px over the 640×480 image: x = 100 to 600, y = 100 to 400."
                    .into()
            ),
            region: None,
        }
    );
    assert_eq!(
        traj.tool_calls[1].outcome,
        ToolOutcome::Ok {
            images: 1,
            text: None,
            // The zoom tool reports the region it cut out, in original pixels.
            region: CropRect::from_edges(200, 100, 400, 250),
        }
    );
    let ToolOutcome::Error { message } = &traj.tool_calls[2].outcome else {
        panic!(
            "the tiny box must be rejected: {:?}",
            traj.tool_calls[2].outcome
        );
    };
    assert!(message.contains("longer than 30"), "{message}");

    // Images: the input, the grid overlay, and a crop of the ORIGINAL (not of the overlay).
    assert_eq!(traj.image_sizes, [(640, 480), (640, 480), (200, 150)]);
    let want = original
        .crop(CropRect::from_edges(200, 100, 400, 250).unwrap())
        .unwrap();
    assert_eq!(traj.images[2].image, want);
    assert_ne!(traj.images[1].image, original);

    // The model saw 1, 2, 3 and again 3 images (the rejected call added none).
    let seen = model.seen.lock().unwrap();
    assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 3, 3]);
    // The error observation is in the context the model continued.
    let text = CharCodec.decode(&traj.tokens).unwrap();
    assert!(
        text.contains("Error: bbox_2d [10, 10, 20, 20] is only 10×10 px"),
        "{text}"
    );
}
