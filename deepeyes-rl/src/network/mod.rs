//! The training engine's model: Qwen2.5-VL written in burn.
//!
//! * [`Qwen25Vl`] holds the vision tower ([`VisionTower`]) and the language model
//!   ([`TextModel`]) with Hugging Face parameter names, loads and saves safetensors checkpoints
//!   ([`Qwen25Vl::from_pretrained`], [`Qwen25Vl::save_pretrained`]), and runs on any burn
//!   device ([`ComputeDevice`]); on an autodiff device every parameter is trainable unless
//!   frozen ([`Qwen25Vl::freeze_vision`]).
//! * [`Batch`] prepares token sequences and their images on the host: pad expansion, the
//!   vision inputs ([`VisionInputs`]: patches, 2D positions, window permutation, window / full
//!   attention blocks), mRoPE positions and which keys each position sees ([`KeyMask`]: causal,
//!   padding, shared prefix; never a dense `[L, L]` bias). Sequences longer than the attention
//!   chunk are attended a chunk of rows at a time ([`ChunkedAttention`]). Every grid-dependent value
//!   comes from [`deepeyes_core::vision`], the geometry the ONNX Runtime backend uses too.
//! * [`Qwen25Vl::score_tokens`] returns per-token log-probs of the next token and the predictive
//!   entropy, so a GRPO loss `(weights * logprobs).sum()` back-propagates into the model.
//!
//! ```no_run
//! use deepeyes_rl::network::{Batch, ComputeDevice, PadLayout, Qwen25Vl, Sequence, tensor2};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = ComputeDevice::Flex.device(true)?;
//! let model = Qwen25Vl::from_pretrained("tests/data/tiny-qwen2_5_vl/hf", &device)?;
//! let seqs = [Sequence { tokens: vec![1, 2, 3, 4], images: vec![], score_from: 0 }];
//! let batch = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
//! let scores = model.score_tokens(&batch, false)?;
//! let weights = tensor2(vec![0.0, 1.0, 1.0, 1.0], 1, batch.score_len, &device)?;
//! let grads = (weights * scores.logprobs).sum().backward();
//! # let _ = grads;
//! # Ok(()) }
//! ```

mod attention;
mod batch;
mod config;
mod error;
mod init;
mod layers;
mod lora;
mod policy;
mod qwen;
mod text;
mod token_scores;
mod vision;
mod weights;

use burn::tensor::Device;

pub use attention::{ChunkedAttention, DEFAULT_ATTENTION_CHUNK, KeyMask};
pub use batch::{Batch, ImageInput, PadLayout, Sequence, SharedPrefixes};
pub use config::{Qwen25VlConfig, TextConfig, VisionConfig};
pub use error::{ModelError, Result};
pub use layers::{Linear, SwiGlu};
pub use lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, LoraConfig, TargetModules};
pub(crate) use policy::on_forks;
pub use policy::{Adapters, PolicyNetwork, ScoreOptions};
pub use qwen::{Qwen25Vl, TokenScores, tensor2, to_host};
pub use text::{DecoderLayer, TextAttention, TextModel};
pub use token_scores::{ChunkedTokenScores, WHOLE_LOGITS_LIMIT};
pub use vision::{
    Grid, PatchEmbed, PatchMerger, VisionAttention, VisionBlock, VisionInputs, VisionTower,
};
pub use weights::{HostParam, ParamInfo, ParamViews, param_grads};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// burn's CUDA backend, GPU `index` (needs the `cuda` cargo feature).
    Cuda(usize),
}

impl ComputeDevice {
    /// The burn device; with `autodiff`, tensors created on it record gradients.
    pub fn device(self, autodiff: bool) -> Result<Device> {
        let d = match self {
            Self::Flex => Device::flex(),
            #[cfg(feature = "cuda")]
            Self::Cuda(i) => Device::cuda(i),
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => {
                return Err(ModelError::Device {
                    name: self.to_string(),
                    message: "deepeyes-rl was built without the `cuda` feature".into(),
                });
            }
        };
        Ok(if autodiff { d.autodiff() } else { d })
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Flex => f.write_str("flex"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for ComputeDevice {
    type Err = ModelError;

    /// `flex`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || ModelError::Device {
            name: s.to_string(),
            message: "expected `flex`, `cuda` or `cuda:N`".into(),
        };
        match s {
            "flex" | "cpu" => Ok(Self::Flex),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(
            "flex".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Flex
        );
        assert_eq!(
            "cuda:2".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(2)
        );
        assert!("tpu".parse::<ComputeDevice>().is_err());
        assert_eq!(ComputeDevice::Cuda(1).to_string(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = ComputeDevice::Cuda(0).device(true).unwrap_err().to_string();
        assert!(e.contains("`cuda` feature"), "{e}");
    }
}
