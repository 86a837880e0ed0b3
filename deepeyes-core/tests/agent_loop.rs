//! The agent loop driven by a scripted test model: every stop reason, observations, budgets,
//! determinism and invariant checks.

use std::sync::Arc;

use deepeyes_core::model::FinishReason;
use deepeyes_core::protocol::{IM_END, IMAGE_PAD, TOOL_CALL_END};
use deepeyes_core::testing::{CharCodec, ScriptedModel};
use deepeyes_core::{
    Agent, AgentConfig, Error, FnTool, Image, ImageSource, PromptTemplates, StopReason, Task,
    TokenCodec, Tool, ToolError, ToolOutcome, ToolOutput, ToolSpec,
};

fn image(w: u32, h: u32) -> Image {
    Image::from_rgb(image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
    }))
    .unwrap()
}

/// A crop tool for the tests: `bbox_2d` in original pixels, no validation beyond bounds.
fn crop_tool() -> Arc<dyn Tool> {
    Arc::new(FnTool::new(
        ToolSpec {
            name: "image_zoom_in_tool".into(),
            description: "Crop a region of the original image.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"bbox_2d": {"type": "array"}}, "required": ["bbox_2d"]}),
        },
        |args, ctx| {
            let b: Vec<u32> = serde_json::from_value(args["bbox_2d"].clone())
                .map_err(|e| ToolError::new(format!("bad bbox_2d: {e}")))?;
            let img = &ctx.original_images[0];
            if b.len() != 4
                || b[2] <= b[0]
                || b[3] <= b[1]
                || b[2] > img.width()
                || b[3] > img.height()
            {
                return Err(ToolError::new("ZOOM IN ARGUMENTS ARE INVALID"));
            }
            let crop = image::imageops::crop_imm(img.rgb(), b[0], b[1], b[2] - b[0], b[3] - b[1])
                .to_image();
            Ok(ToolOutput::image(Image::from_rgb(crop).unwrap()))
        },
    ))
}

fn zoom(b: [u32; 4]) -> String {
    format!(
        "<think>too small</think>\n<tool_call>\n{{\"name\": \"image_zoom_in_tool\", \"arguments\": {{\"bbox_2d\": [{}, {}, {}, {}]}}}}\n</tool_call>{IM_END}",
        b[0], b[1], b[2], b[3]
    )
}

fn task() -> Task {
    Task {
        question: "What colour is the dot?".into(),
        images: vec![image(224, 168)],
    }
}

fn templates() -> PromptTemplates {
    PromptTemplates {
        system: "Tools:\n<tools>\n{tools}\n</tools>".into(),
        ..PromptTemplates::default()
    }
}

fn agent(model: &ScriptedModel, config: AgentConfig) -> Agent<'_> {
    Agent::new(model, vec![crop_tool()], templates(), config).unwrap()
}

fn decode(tokens: &[u32]) -> String {
    CharCodec.decode(tokens).unwrap()
}

/// The conversation with observation tokens bracketed, so a snapshot shows the mask too.
fn render_with_mask(traj: &deepeyes_core::Trajectory) -> String {
    let mut out = String::new();
    let mut i = traj.prompt_len;
    out.push_str(&decode(&traj.tokens[..i]));
    while i < traj.tokens.len() {
        let m = traj.mask[i];
        let start = i;
        while i < traj.tokens.len() && traj.mask[i] == m {
            i += 1;
        }
        let text = decode(&traj.tokens[start..i]);
        if m == 1 {
            out.push_str(&format!("[[model]]{text}[[/model]]"));
        } else {
            out.push_str(&format!("[[observation]]{text}[[/observation]]"));
        }
    }
    out
}

#[test]
fn two_zooms_then_answer() {
    let model = ScriptedModel::new(|turn, _| match turn {
        0 => zoom([0, 0, 112, 84]),
        1 => zoom([100, 50, 200, 150]),
        _ => format!("<think>it is red</think>\n<answer>red</answer>{IM_END}"),
    });
    let traj = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    assert_eq!(traj.stop, StopReason::Answered);
    assert_eq!(traj.answer.as_deref(), Some("red"));
    assert_eq!(traj.turns.len(), 3);
    assert_eq!(traj.tool_calls.len(), 2);
    assert_eq!(traj.successful_image_calls(), 2);
    assert_eq!(
        traj.image_sources,
        vec![
            ImageSource::Input { index: 0 },
            ImageSource::ToolCall { call: 0 },
            ImageSource::ToolCall { call: 1 }
        ]
    );
    assert_eq!(traj.image_sizes[1], (112, 84));
    assert_eq!(traj.image_sizes[2], (100, 100));
    // Generated tokens carry log-probs; observations and prompt are masked out.
    for i in 0..traj.tokens.len() {
        assert_eq!(traj.logprobs[i] != 0.0, traj.mask[i] == 1);
    }
    let generated: String = traj.turns.iter().map(|t| t.text.as_str()).collect();
    let masked: Vec<u32> = (0..traj.tokens.len())
        .filter(|&i| traj.mask[i] == 1)
        .map(|i| traj.tokens[i])
        .collect();
    assert_eq!(decode(&masked), generated);
    traj.check_invariants(3).unwrap();
    insta::assert_snapshot!("two_observations", render_with_mask(&traj));
}

#[test]
fn error_observation_continues_the_episode() {
    let model = ScriptedModel::new(|turn, _| match turn {
        0 => format!(
            "<tool_call>{{\"name\": \"image_zoom_in_tool\", \"arguments\": {{\"bbox_2d\": [5, 5]}}}}</tool_call>{IM_END}"
        ),
        1 => format!("<tool_call>{{oops</tool_call>{IM_END}"),
        2 => {
            format!("<tool_call>{{\"name\": \"magnify\", \"arguments\": {{}}}}</tool_call>{IM_END}")
        }
        _ => format!("<answer>blue</answer>{IM_END}"),
    });
    let traj = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    assert_eq!(traj.stop, StopReason::Answered);
    assert_eq!(traj.successful_image_calls(), 0);
    let messages: Vec<String> = traj
        .tool_calls
        .iter()
        .map(|c| match &c.outcome {
            ToolOutcome::Error { message } => message.clone(),
            other => panic!("expected an error, got {other:?}"),
        })
        .collect();
    assert_eq!(messages[0], "ZOOM IN ARGUMENTS ARE INVALID");
    assert!(messages[1].contains("not valid JSON"), "{}", messages[1]);
    assert!(
        messages[2].contains("unknown tool 'magnify'"),
        "{}",
        messages[2]
    );
    assert_eq!(traj.images.len(), 1);
    let first_obs_end = traj.turns[1].context_len;
    let first_obs_start = traj.turns[0].context_len + traj.turns[0].generated;
    insta::assert_snapshot!(
        "error_observation",
        decode(&traj.tokens[first_obs_start..first_obs_end])
    );
}

#[test]
fn no_action_ends_the_episode() {
    let model = ScriptedModel::new(|_, _| format!("I am not sure.{IM_END}"));
    let traj = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    assert_eq!(traj.stop, StopReason::NoAction);
    assert_eq!(traj.turns.len(), 1);
    assert!(traj.answer.is_none());
}

#[test]
fn turn_length_ends_the_episode() {
    let model = ScriptedModel::new(|_, _| "<think>".to_string() + &"la ".repeat(50));
    let config = AgentConfig {
        max_new_tokens: 20,
        ..AgentConfig::default()
    };
    let traj = agent(&model, config).run(&task(), 1).unwrap();
    assert_eq!(traj.stop, StopReason::TurnLength);
    assert_eq!(traj.turns[0].generated, 20);
    assert_eq!(traj.turns[0].finish, FinishReason::Length);
}

#[test]
fn max_turns_leaves_no_trailing_observation() {
    let model = ScriptedModel::new(|_, _| zoom([0, 0, 112, 84]));
    let traj = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    assert_eq!(traj.stop, StopReason::MaxTurns);
    assert_eq!(traj.turns.len(), 5);
    // Five turns, at most four observations: the last call is recorded but never executed.
    assert_eq!(traj.successful_image_calls(), 4);
    assert!(matches!(
        traj.tool_calls[4].outcome,
        ToolOutcome::Dropped { .. }
    ));
    assert_eq!(
        *traj.mask.last().unwrap(),
        1,
        "the trajectory must end on model tokens"
    );
}

#[test]
fn observation_over_the_token_budget_is_dropped() {
    let model = ScriptedModel::new(|_, _| zoom([0, 0, 224, 168]));
    let probe = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    // Room for the prompt and the first turn, not for the 48-token crop observation.
    let prompt_expanded = probe.prompt_len - 1 + 48;
    let config = AgentConfig {
        max_total_tokens: prompt_expanded + probe.turns[0].generated + 10,
        ..AgentConfig::default()
    };
    let traj = agent(&model, config).run(&task(), 1).unwrap();
    assert_eq!(traj.stop, StopReason::TokenBudget);
    assert_eq!(traj.images.len(), 1);
    assert!(matches!(
        traj.tool_calls[0].outcome,
        ToolOutcome::Dropped { .. }
    ));
    assert_eq!(traj.successful_image_calls(), 0);
}

#[test]
fn image_cap_drops_the_observation() {
    let model = ScriptedModel::new(|_, _| zoom([0, 0, 112, 84]));
    let config = AgentConfig {
        max_images: 2,
        ..AgentConfig::default()
    };
    let traj = agent(&model, config).run(&task(), 1).unwrap();
    assert_eq!(traj.stop, StopReason::ImageLimit);
    assert_eq!(traj.images.len(), 2);
}

#[test]
fn stopping_at_tool_call_end_closes_the_turn() {
    // The model would run on past its call; the stop sequence cuts it there.
    let model = ScriptedModel::new(|turn, _| match turn {
        0 => format!(
            "{}<answer>guess</answer>{IM_END}",
            zoom([0, 0, 112, 84]).trim_end_matches(IM_END)
        ),
        _ => format!("<answer>red</answer>{IM_END}"),
    });
    let config = AgentConfig {
        stop_at_tool_call_end: true,
        ..AgentConfig::default()
    };
    let traj = agent(&model, config).run(&task(), 1).unwrap();
    assert_eq!(traj.answer.as_deref(), Some("red"));
    assert!(traj.turns[0].text.ends_with(TOOL_CALL_END));
    let obs = decode(
        &traj.tokens
            [traj.turns[0].context_len + traj.turns[0].generated..traj.turns[1].context_len],
    );
    assert!(
        obs.starts_with(&format!("{IM_END}\n<|im_start|>user\n<tool_response>")),
        "{obs}"
    );
    // Without the stop sequence the answer in the same turn wins.
    let traj = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap();
    assert_eq!(traj.answer.as_deref(), Some("guess"));
    assert_eq!(traj.tool_calls.len(), 0);
}

#[test]
fn groups_are_deterministic_per_seed() {
    let model = ScriptedModel::new(|turn, seed| match (turn, seed % 3) {
        (0, 0) => zoom([0, 0, 112, 84]),
        (_, 1) => format!("<answer>red</answer>{IM_END}"),
        _ => format!("<answer>{}</answer>{IM_END}", seed % 7),
    });
    let a = agent(&model, AgentConfig::default());
    let tasks = vec![task(), task()];
    let run1 = a.run_batch(&tasks, 4, 42).unwrap();
    let run2 = a.run_batch(&tasks, 4, 42).unwrap();
    let run3 = a.run_batch(&tasks, 4, 43).unwrap();
    let tokens = |r: &Vec<Vec<deepeyes_core::Trajectory>>| -> Vec<Vec<u32>> {
        r.iter().flatten().map(|t| t.tokens.clone()).collect()
    };
    assert_eq!(run1.len(), 2);
    assert!(run1.iter().all(|g| g.len() == 4));
    assert_eq!(tokens(&run1), tokens(&run2));
    assert_ne!(tokens(&run1), tokens(&run3));
    // Samples of a group draw different seeds.
    let seeds: std::collections::HashSet<u64> =
        run1.iter().flatten().map(|t| t.turns[0].seed).collect();
    assert_eq!(seeds.len(), 8);
    // A single run equals the first sample of a batch with the same seed.
    let single = a.run(&task(), 42).unwrap();
    assert_eq!(single.tokens, run1[0][0].tokens);
}

#[test]
fn broken_backends_fail_loudly() {
    let model =
        ScriptedModel::new(|_, _| format!("<answer>x</answer>{IM_END}")).with_bad_logprobs();
    let err = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap_err();
    assert!(matches!(err, Error::Invariant(_)), "{err}");

    let model = ScriptedModel::new(|_, _| format!("{IMAGE_PAD}<answer>x</answer>{IM_END}"))
        .with_banned_tokens_produced();
    let err = agent(&model, AgentConfig::default())
        .run(&task(), 1)
        .unwrap_err();
    assert!(err.to_string().contains("image_pad"), "{err}");
}

#[test]
fn bad_setups_are_rejected() {
    let model = ScriptedModel::new(|_, _| String::new());
    let err = Agent::new(
        &model,
        vec![crop_tool(), crop_tool()],
        templates(),
        AgentConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("image_zoom_in_tool"), "{err}");
    let err = Agent::new(
        &model,
        vec![],
        templates(),
        AgentConfig {
            max_turns: 0,
            ..AgentConfig::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("max-turns"), "{err}");
    let no_images = PromptTemplates {
        user: "{question}".into(),
        ..templates()
    };
    let a = Agent::new(&model, vec![], no_images, AgentConfig::default()).unwrap();
    let err = a.run(&task(), 0).unwrap_err();
    assert!(err.to_string().contains("image pads"), "{err}");
}

#[test]
fn agent_config_is_strict() {
    let err = toml::from_str::<AgentConfig>("max-turns = 3\nmax-turn = 4").unwrap_err();
    assert!(err.to_string().contains("max-turn"), "{err}");
    let cfg: AgentConfig = toml::from_str("max-turns = 3\n[sampling]\ntemperature = 0.5").unwrap();
    assert_eq!(cfg.max_turns, 3);
    assert_eq!(cfg.sampling.temperature, 0.5);
}
