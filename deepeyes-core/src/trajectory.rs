//! A finished (or failed) episode, recorded token by token.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::{CropRect, Image};
use crate::model::FinishReason;
use crate::tool::ToolCall;

/// Where an image of a trajectory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSource {
    /// The `index`-th input image of the task.
    Input {
        /// Index among the task's images.
        index: usize,
    },
    /// Returned by the `call`-th tool call of the trajectory.
    ToolCall {
        /// Index into [`Trajectory::tool_calls`].
        call: usize,
    },
}

/// An image held by a trajectory, in the order of its `<|image_pad|>` tokens.
#[derive(Debug, Clone)]
pub struct TrajectoryImage {
    /// The image as given to the model (before model preprocessing).
    pub image: Image,
    /// Where it came from.
    pub source: ImageSource,
}

/// What happened when a tool call was executed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ToolOutcome {
    /// The tool ran and its output was appended.
    Ok {
        /// How many images it returned.
        images: usize,
        /// The text it returned, if any.
        text: Option<String>,
        /// The region of the first input image its image shows, as the tool reported it
        /// ([`crate::ToolOutput::region`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<CropRect>,
    },
    /// The call failed; `message` is the error text the model saw.
    Error {
        /// The error text.
        message: String,
    },
    /// The tool ran but its observation did not fit the token or image budget and was dropped.
    Dropped {
        /// Why.
        reason: String,
    },
}

impl ToolOutcome {
    /// Whether the model actually received at least one image from this call.
    pub fn returned_image(&self) -> bool {
        matches!(self, Self::Ok { images, .. } if *images > 0)
    }

    /// The region of the first input image the model was shown by this call: set only when the
    /// tool reported one and its image reached the model.
    pub fn shown_region(&self) -> Option<CropRect> {
        match self {
            Self::Ok { images, region, .. } if *images > 0 => *region,
            _ => None,
        }
    }
}

/// One tool call of a trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// The turn (0-based) that made it.
    pub turn: usize,
    /// The text between `<tool_call>` and `</tool_call>`.
    pub raw: String,
    /// The parsed call, if it parsed.
    pub call: Option<ToolCall>,
    /// What happened.
    pub outcome: ToolOutcome,
}

/// One model turn of a trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// Length of the context (in unexpanded tokens) the model continued: the turn's input is
    /// `tokens[..context_len]`.
    pub context_len: usize,
    /// How many images the context held.
    pub context_images: usize,
    /// How many tokens the model generated this turn (they follow the context).
    pub generated: usize,
    /// The decoded generated text.
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
    /// The sampling seed of this turn.
    pub seed: u64,
}

/// Why an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model gave an `<answer>`.
    Answered,
    /// The model's turn had neither an answer nor a tool call.
    NoAction,
    /// The model hit the per-turn token limit without answering.
    TurnLength,
    /// The turn cap was reached without an answer.
    MaxTurns,
    /// The total token budget was reached (an observation that would not fit was dropped).
    TokenBudget,
    /// The image cap was reached (the observation was dropped).
    ImageLimit,
}

/// A finished episode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    /// Every token id: prompt, generated and observation tokens, with one `<|image_pad|>` per
    /// image.
    pub tokens: Vec<u32>,
    /// 1 for model-generated tokens, 0 for prompt and observation tokens.
    pub mask: Vec<u8>,
    /// The sampling log-prob of each generated token; 0 where `mask` is 0.
    pub logprobs: Vec<f32>,
    /// Number of prompt tokens at the start of `tokens`.
    pub prompt_len: usize,
    /// The images, in the order of their pad tokens.
    #[serde(skip)]
    pub images: Vec<TrajectoryImage>,
    /// Where each image came from, in pad order (kept when images are not serialised).
    pub image_sources: Vec<ImageSource>,
    /// Sizes `(width, height)` of the images, in pad order.
    pub image_sizes: Vec<(u32, u32)>,
    /// Each tool call made.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Each model turn.
    pub turns: Vec<TurnRecord>,
    /// The final answer text, if the model gave one.
    pub answer: Option<String>,
    /// Why the episode ended.
    pub stop: StopReason,
}

impl Trajectory {
    /// The response region: everything after the prompt.
    pub fn response_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Number of model-generated tokens.
    pub fn generated_count(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }

    /// How many tool calls returned at least one image to the model.
    pub fn successful_image_calls(&self) -> usize {
        self.tool_calls
            .iter()
            .filter(|c| c.outcome.returned_image())
            .count()
    }

    /// Checks the structural invariants; `image_pad` is the id of `<|image_pad|>`.
    pub fn check_invariants(&self, image_pad: u32) -> Result<()> {
        let n = self.tokens.len();
        if self.mask.len() != n || self.logprobs.len() != n {
            return Err(Error::Invariant(format!(
                "{n} tokens but {} mask entries and {} log-probs",
                self.mask.len(),
                self.logprobs.len()
            )));
        }
        if self.mask[..self.prompt_len.min(n)].iter().any(|&m| m != 0) {
            return Err(Error::Invariant(
                "a prompt token is marked generated".into(),
            ));
        }
        if let Some(i) = (0..n).find(|&i| self.mask[i] == 0 && self.logprobs[i] != 0.0) {
            return Err(Error::Invariant(format!(
                "observation token {i} carries a log-prob"
            )));
        }
        let pads = self.tokens.iter().filter(|&&t| t == image_pad).count();
        if pads != self.image_sources.len() || self.images.len() > self.image_sources.len() {
            return Err(Error::Invariant(format!(
                "{pads} image pads for {} images",
                self.image_sources.len()
            )));
        }
        if let Some(i) = (0..n).find(|&i| self.tokens[i] == image_pad && self.mask[i] != 0) {
            return Err(Error::Invariant(format!(
                "image pad at {i} is marked as generated"
            )));
        }
        let generated: usize = self.turns.iter().map(|t| t.generated).sum();
        if generated != self.generated_count() {
            return Err(Error::Invariant(format!(
                "turns generated {generated} tokens but the mask marks {}",
                self.generated_count()
            )));
        }
        Ok(())
    }
}
