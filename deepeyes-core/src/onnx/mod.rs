//! The ONNX Runtime backend: Qwen2.5-VL-family models (DeepEyes-7B's architecture) exported to
//! ONNX by `scripts/export_qwen2_5_vl.py`, run through `ort`, on CUDA when available.
//!
//! - [`runtime`]: finding and loading the ONNX Runtime library (no build-time linking);
//! - [`config`]: the bundle's `bundle.json` (layout in `docs/BUNDLE.md`);
//! - [`weights`]: the weight map that lets a bundle run the weights stored beside it;
//! - [`OnnxModel`]: the loaded bundle, implementing [`crate::VisionLanguageModel`], with a
//!   lower-level API (vision features, prefill, decode steps with logits) for scoring and tests.
//!
//! Enabled by the `onnx` feature (on by default); the `cuda` feature adds the CUDA execution
//! provider.

mod batch;
pub mod config;
mod decode;
mod error;
mod generate;
mod in_place;
mod model;
mod prompt;
mod provider;
pub mod runtime;
mod vision_cache;
pub mod weights;

pub use config::BundleConfig;
pub use decode::{DecodeState, LogitsOf};
pub use error::{OnnxError, OnnxResult};
pub use model::OnnxModel;
pub use prompt::PreparedPrompt;
pub use provider::{DeviceReport, OnnxOptions, Provider, probe_gpu};
pub use runtime::{RuntimeInfo, runtime};
pub use weights::{HostTensor, WeightMap, Weights};
