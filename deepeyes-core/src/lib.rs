//! # deepeyes-core
//!
//! The foundation of deepeyes, a toolkit that makes vision-language models "think with images":
//! while reasoning about an image, the model may call a tool such as `image_zoom_in_tool`, see the
//! crop it returns, and go on until it answers.
//!
//! This crate holds what every other crate shares and nothing heavy:
//! - [`image`]: an RGB image type with hard decode limits;
//! - [`preprocess`]: the Qwen2.5-VL image geometry (smart resize, visual token counts);
//! - [`geometry`]: zoom boxes: their coordinate frames and DeepEyes' clamping and validity
//!   rules, shared by the zoom tool and by anything that must predict its crops (the RL crate's
//!   base stage);
//! - [`tool`], [`model`], [`reward`]: the three small traits a user implements to plug in a tool,
//!   a model backend or a reward function;
//! - [`protocol`]: ChatML rendering, prompt templates and the parser of one assistant turn;
//! - [`trajectory`]: an episode recorded token by token, with the mask RL needs;
//! - [`agent`]: the multi-turn loop that ties them together;
//! - [`rng`]: the seedable generator every random choice derives from.
//!
//! It builds without ONNX Runtime, burn, clap or indicatif (see `docs/ARCHITECTURE.md`).

pub mod agent;
pub mod dataset;
pub mod error;
pub mod geometry;
pub mod image;
pub mod message;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod preprocess;
pub mod protocol;
#[cfg(feature = "remote")]
pub mod remote;
pub mod reward;
pub mod rng;
pub mod sampling;
#[cfg(feature = "serve")]
pub mod serve;
pub mod testing;
pub mod tool;
pub mod trajectory;
pub mod vision;
pub mod weights;

pub use agent::{Agent, AgentConfig, Episode, Task};
pub use error::{Error, Result};
pub use image::{CropRect, Image, ImageLimits, read_image_file};
pub use message::{ContentPart, Conversation, Message, Role};
pub use model::{
    FinishReason, GenerateRequest, Generation, HfTokenizer, SamplingParams, TokenCodec,
    VisionLanguageModel,
};
pub use preprocess::PreprocessConfig;
pub use protocol::{CallSelection, PromptTemplates};
pub use reward::{
    AnswerGrader, Grade, GradeInput, GradedBy, RewardBreakdown, RewardFn, RewardInput, RewardTerm,
};
pub use rng::Rng;
pub use tool::{FnTool, Tool, ToolCall, ToolContext, ToolError, ToolOutput, ToolSpec};
pub use trajectory::{ImageSource, StopReason, ToolCallRecord, ToolOutcome, Trajectory};
pub use weights::{
    HostTensor, RolloutEngine, TensorView, WeightReceiver, WeightSource, WeightUpdate, Weights,
};
