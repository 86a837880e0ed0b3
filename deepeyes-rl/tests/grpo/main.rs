//! Integration tests of the engine-independent half of deepeyes-rl: GRPO loss and advantages,
//! the training config, metrics and checkpoints.

mod checkpoint;
mod common;
mod config;
mod loss;
mod metrics;
