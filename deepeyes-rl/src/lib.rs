//! GRPO for thinking-with-images agents.
//!
//! The engine-independent half of training lives in plain modules:
//! - [`grpo`]: group advantages, the clipped token-level surrogate with its analytic gradient,
//!   masking, dynamic sampling and the update plan (pure functions on `ndarray`);
//! - [`config`]: the `deepeyes train` configuration, strictly parsed and validated;
//! - [`schedule`]: learning-rate schedules and gradient-norm clipping;
//! - [`metrics`]: per-step metrics, their JSONL file and the tool-collapse alarm;
//! - [`checkpoint`]: atomic checkpoints of named blobs plus the training state;
//! - [`network`]: the trainable network in burn (Qwen2.5-VL) behind the [`network::PolicyNetwork`]
//!   trait the trainer uses;
//! - [`trainer`]: the GRPO trainer (ORT rollouts with the current weights, burn updates);
//! - [`select`]: DeepEyes' tool-use-oriented data selection;
//! - [`eval`]: benchmark evaluation with the training agent loop (resumable, Avg@K, tool stats).

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod grpo;
pub mod metrics;
pub mod network;
pub mod schedule;
pub mod select;
pub mod synthv;
pub mod tinyeyes;
pub mod trainer;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub use grpo::GrpoConfig;
