//! Builders shared by the tests.

use deepeyes_core::model::FinishReason;
use deepeyes_core::trajectory::TurnRecord;
use deepeyes_core::{StopReason, ToolCall, ToolCallRecord, ToolOutcome, Trajectory};

/// A trajectory with `prompt` prompt tokens, then the given segments: `(generated, observation)`
/// token counts per turn, stopping for `stop`, with `calls` tool calls.
pub(crate) fn trajectory(
    prompt: usize,
    turns: &[(usize, usize)],
    stop: StopReason,
    calls: Vec<ToolCallRecord>,
) -> Trajectory {
    let mut tokens = vec![1u32; prompt];
    let mut mask = vec![0u8; prompt];
    let mut logprobs = vec![0.0f32; prompt];
    let mut records = Vec::new();
    for (i, &(generated, observation)) in turns.iter().enumerate() {
        records.push(TurnRecord {
            context_len: tokens.len(),
            context_images: 0,
            generated,
            text: String::new(),
            finish: FinishReason::Stop,
            seed: i as u64,
        });
        for k in 0..generated {
            tokens.push(10 + k as u32);
            mask.push(1);
            logprobs.push(-0.1 - 0.01 * k as f32);
        }
        tokens.extend(std::iter::repeat_n(2u32, observation));
        mask.extend(std::iter::repeat_n(0u8, observation));
        logprobs.extend(std::iter::repeat_n(0.0f32, observation));
    }
    Trajectory {
        tokens,
        mask,
        logprobs,
        prompt_len: prompt,
        images: Vec::new(),
        image_sources: Vec::new(),
        image_sizes: Vec::new(),
        tool_calls: calls,
        turns: records,
        answer: (stop == StopReason::Answered).then(|| "a".to_string()),
        stop,
    }
}

/// A zoom call with `bbox_2d = bbox` (original frame) that returned the crop of that region
/// (`ok`) or failed.
pub(crate) fn zoom_call(turn: usize, bbox: [f64; 4], ok: bool) -> ToolCallRecord {
    ToolCallRecord {
        turn,
        raw: String::new(),
        call: Some(ToolCall {
            name: "image_zoom_in_tool".into(),
            arguments: serde_json::json!({ "bbox_2d": bbox }),
        }),
        outcome: if ok {
            ToolOutcome::Ok {
                images: 1,
                text: None,
                region: deepeyes_core::CropRect::from_edges(
                    bbox[0] as u32,
                    bbox[1] as u32,
                    bbox[2] as u32,
                    bbox[3] as u32,
                ),
            }
        } else {
            ToolOutcome::Error {
                message: "ZOOM IN ARGUMENTS ARE INVALID".into(),
            }
        },
    }
}
