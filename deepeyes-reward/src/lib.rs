//! # deepeyes-reward
//!
//! Reward functions for thinking-with-images RL, built on
//! [`deepeyes_core::reward::RewardFn`]:
//!
//! - [`DeepEyesVisual`] and [`DeepEyesMath`]: DeepEyes' rewards (arXiv 2505.14362) with its exact
//!   format rules ([`format`]) and the conditional tool bonus ([`ToolBonus`]): paid only for a
//!   correct answer *and* a crop that was really returned.
//! - [`rules`]: rule matchers usable alone (multiple choice, yes/no, numbers, normalised exact
//!   match, math equivalence); each says match, no match, or cannot decide.
//! - [`judge`]: an LLM judge over any OpenAI-compatible server, consulted only when the rules
//!   cannot decide, with retries, a concurrency limit, a verdict cache and a failure policy.
//! - [`config`] and [`Pipeline`]: reward pipelines from TOML, routed by `data_source`, with a
//!   [`Registry`] for reward functions written in Rust. [`PipelineConfig::deepeyes`] is the
//!   shipped DeepEyes pipeline.
//!
//! Every reward returns a [`RewardBreakdown`](deepeyes_core::RewardBreakdown): each term with its
//! weight, and flags for anything degraded (a judge that fell back to the rules, an undecided
//! answer with no judge), so nothing scores zero silently.
//!
//! ```
//! use deepeyes_core::reward::{RewardFn, RewardInput};
//! use deepeyes_reward::{PipelineConfig, Registry};
//!
//! let mut config = PipelineConfig::deepeyes().unwrap();
//! config.judge = None; // rules only
//! let pipeline = config.build(&Registry::new()).unwrap();
//! let input = RewardInput {
//!     data_source: "vstar",
//!     question: "Is the light on?",
//!     ground_truth: "yes",
//!     response: "<think>looks lit</think><answer>Yes</answer>",
//!     trajectory: None,
//! };
//! let score = pipeline.score(&input).unwrap();
//! assert_eq!(score.term("accuracy"), Some(1.0));
//! assert_eq!(score.term("tool"), Some(0.0)); // no crop was returned
//! assert!((score.total - 0.8).abs() < 1e-12);
//! ```

pub mod components;
pub mod config;
pub mod deepeyes;
pub mod error;
pub mod format;
pub mod judge;
pub mod pipeline;
pub mod rules;

pub use components::{
    Accuracy, AnswerStyle, Bounds, Component, Custom, Format, JudgeHandle, Sum, ToolBonus, flags,
};
pub use config::{CONFIG_VERSION, DEEPEYES_TOML, PipelineConfig, RewardSpec};
pub use deepeyes::{DeepEyesMath, DeepEyesVisual, MathConfig, VisualConfig};
pub use error::{Error, Result};
pub use judge::{FailurePolicy, HttpJudge, JudgeConfig, Verifier};
pub use pipeline::{Pipeline, Registry};
