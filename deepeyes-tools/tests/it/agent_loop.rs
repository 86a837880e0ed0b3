//! The example plugin and the built-ins driven through `deepeyes_core::Agent` by a scripted model.

use deepeyes_core::testing::{CharCodec, ScriptedModel};
use deepeyes_core::{
    Agent, AgentConfig, PromptTemplates, StopReason, Task, TokenCodec, ToolOutcome,
};
use deepeyes_tools::{CropRect, PluginConfig, ToolRegistry, ToolsConfig};

use crate::support::{pattern, plugin};

#[test]
fn agent_uses_plugin_and_zoom_in() {
    let mut config = ToolsConfig::default();
    config
        .plugins
        .push(PluginConfig::new(plugin("grid-overlay-plugin")));
    let registry = ToolRegistry::from_config(&config).unwrap();
    let model = ScriptedModel::from_turns([
        r#"<think>I need coordinates.</think><tool_call>{"name": "image_grid_overlay_tool", "arguments": {"step": 100}}</tool_call>"#,
        r#"<think>The sign is between x=200 and 400.</think><tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [200, 100, 400, 250], "label": "sign"}}</tool_call>"#,
        r#"<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 20, 20]}}</tool_call>"#,
        "<think>Done.</think><answer>red</answer>",
    ]);
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
    let seen = model.seen_images();
    assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2, 3, 3]);
    // The error observation is in the context the model continued.
    let text = CharCodec.decode(&traj.tokens).unwrap();
    assert!(
        text.contains("Error: bbox_2d [10, 10, 20, 20] is only 10×10 px"),
        "{text}"
    );
}

#[test]
fn a_crashing_isolated_plugin_is_a_tool_error_and_the_episode_goes_on() {
    crate::support::use_test_host();
    let mut plugin_config = PluginConfig::new(plugin("crashing-plugin"));
    plugin_config.isolate = true;
    let mut config = ToolsConfig::default();
    config.plugins.push(plugin_config);
    let registry = ToolRegistry::from_config(&config).unwrap();
    let model = ScriptedModel::from_turns([
        r#"<tool_call>{"name": "crashing_tool", "arguments": {"mode": "segfault"}}</tool_call>"#,
        r#"<tool_call>{"name": "crashing_tool", "arguments": {"mode": "ok"}}</tool_call>"#,
        "<answer>red</answer>",
    ]);
    let agent = Agent::new(
        &model,
        registry.tools(),
        PromptTemplates::default(),
        AgentConfig::default(),
    )
    .unwrap();
    let task = Task {
        question: "What colour is the sign?".into(),
        images: vec![pattern(64, 48)],
    };
    let traj = agent.run(&task, 1).unwrap();
    assert_eq!(traj.stop, StopReason::Answered);
    assert_eq!(traj.tool_calls.len(), 2);
    assert_eq!(
        traj.tool_calls[0].outcome,
        ToolOutcome::Error {
            message: "crashing_tool crashed: its plugin process was killed by signal 11 (SIGSEGV); it is restarted for the next call".into()
        }
    );
    let ToolOutcome::Ok {
        text: Some(text), ..
    } = &traj.tool_calls[1].outcome
    else {
        panic!("{:?}", traj.tool_calls[1].outcome);
    };
    assert!(text.starts_with("call 1 in process"), "{text}");
}
