//! `bundle.json`: what a model bundle holds and the model dimensions the runtime needs.
//!
//! The layout and every graph's inputs and outputs are documented in `docs/BUNDLE.md`;
//! `scripts/export_qwen2_5_vl.py` writes bundles.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::preprocess::PreprocessConfig;
use crate::vision::VisionGeometry;

use super::error::OnnxError;

/// The `format` value of a bundle.
pub const BUNDLE_FORMAT: &str = "deepeyes-qwen2_5_vl-onnx";
/// The bundle format version this runtime reads.
pub const BUNDLE_VERSION: u32 = 1;
/// The name of the config file inside a bundle directory.
pub const BUNDLE_FILE: &str = "bundle.json";

/// The whole `bundle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BundleConfig {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// The format version ([`BUNDLE_VERSION`]).
    pub version: u32,
    /// File names of the three graphs, relative to the bundle directory.
    pub graphs: GraphFiles,
    /// File name of the Hugging Face `tokenizer.json`.
    pub tokenizer: String,
    /// The weights' data type in the graphs (informational: graph inputs and outputs other than
    /// the KV cache are always `float32`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Whether the graphs keep their weights in external `.data` files (informational).
    #[serde(default)]
    pub external_data: bool,
    /// The language model's dimensions.
    pub text: TextConfig,
    /// The vision tower's dimensions.
    pub vision: VisionConfig,
    /// Image preprocessing.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// Special token ids.
    pub tokens: TokenIds,
}

fn default_dtype() -> String {
    "float32".into()
}

/// File names of the graphs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GraphFiles {
    /// The vision encoder.
    pub vision: String,
    /// The token embedding.
    pub embed: String,
    /// The decoder with KV cache.
    pub decoder: String,
}

/// The language model's dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TextConfig {
    /// Vocabulary size (logits per position).
    pub vocab_size: usize,
    /// Embedding width.
    pub hidden_size: usize,
    /// Decoder layers (each has one key and one value cache).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// How the rotary frequencies are split between the temporal, height and width axes (sums
    /// to `head-dim / 2`).
    pub mrope_section: Vec<usize>,
    /// Most positions the model was trained for.
    pub max_positions: usize,
    /// RMSNorm epsilon (informational).
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
}

fn default_eps() -> f64 {
    1e-6
}

/// The vision tower's dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the blocks.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Width of one merged visual token (equals the language model's hidden size).
    pub out_hidden_size: usize,
    /// Image channels (3).
    pub in_channels: usize,
    /// Side of one patch in pixels.
    pub patch_size: u32,
    /// Patches merged per side into one language token.
    pub spatial_merge_size: u32,
    /// Frames per temporal patch.
    pub temporal_patch_size: u32,
    /// Side of one attention window in pixels.
    pub window_size: u32,
    /// Blocks with full (whole-image) attention; the others attend within windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Temporal positions per second of video (unused for still images).
    #[serde(default = "default_tps")]
    pub tokens_per_second: u32,
    /// Rotary base of the vision tower.
    #[serde(default = "default_vision_theta")]
    pub rope_theta: f64,
}

fn default_tps() -> u32 {
    2
}

fn default_vision_theta() -> f64 {
    10000.0
}

impl VisionConfig {
    /// The geometry the data-dependent vision inputs are computed from.
    pub fn geometry(&self) -> VisionGeometry {
        VisionGeometry {
            patch_size: self.patch_size,
            spatial_merge_size: self.spatial_merge_size,
            window_size: self.window_size,
        }
    }

    /// Values per patch row of `pixel_values`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size as usize * (self.patch_size as usize).pow(2)
    }
}

/// Special token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenIds {
    /// `<|image_pad|>`.
    pub image_pad: u32,
    /// `<|video_pad|>`.
    pub video_pad: u32,
    /// `<|vision_start|>`.
    pub vision_start: u32,
    /// `<|vision_end|>`.
    pub vision_end: u32,
    /// The filler of padded batch rows (never attended to).
    pub pad: u32,
    /// End-of-sequence tokens: generation stops after producing one (it is kept).
    pub eos: Vec<u32>,
}

impl BundleConfig {
    /// Reads and validates `dir/bundle.json`.
    pub fn load(dir: &Path) -> Result<Self, OnnxError> {
        let path = dir.join(BUNDLE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| OnnxError::Bundle {
            path: path.clone(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "not found: is this a model bundle written by scripts/export_qwen2_5_vl.py?".into()
            } else {
                e.to_string()
            },
        })?;
        let config = Self::from_json(&text, &path)?;
        config.validate(&path)?;
        Ok(config)
    }

    /// Parses `bundle.json` text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, OnnxError> {
        serde_json::from_str(text).map_err(|e| OnnxError::Bundle {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks the values are consistent with each other; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<(), OnnxError> {
        let bad = |reason: String| {
            Err(OnnxError::Bundle {
                path: path.to_path_buf(),
                reason,
            })
        };
        if self.format != BUNDLE_FORMAT {
            return bad(format!(
                "format is '{}', expected '{BUNDLE_FORMAT}'",
                self.format
            ));
        }
        if self.version != BUNDLE_VERSION {
            return bad(format!(
                "format version {} is not supported (this deepeyes reads version {BUNDLE_VERSION}); re-export the model",
                self.version
            ));
        }
        let t = &self.text;
        if t.vocab_size == 0 || t.hidden_size == 0 || t.num_layers == 0 || t.num_kv_heads == 0 {
            return bad(
                "text: vocab-size, hidden-size, num-layers and num-kv-heads must be positive"
                    .into(),
            );
        }
        if t.head_dim * t.num_heads != t.hidden_size {
            return bad(format!(
                "text: head-dim {} × num-heads {} ≠ hidden-size {}",
                t.head_dim, t.num_heads, t.hidden_size
            ));
        }
        if t.mrope_section.len() != 3 || t.mrope_section.iter().sum::<usize>() * 2 != t.head_dim {
            return bad(format!(
                "text: mrope-section {:?} must be three numbers summing to head-dim / 2 = {}",
                t.mrope_section,
                t.head_dim / 2
            ));
        }
        let v = &self.vision;
        if v.out_hidden_size != t.hidden_size {
            return bad(format!(
                "vision: out-hidden-size {} ≠ text hidden-size {}",
                v.out_hidden_size, t.hidden_size
            ));
        }
        v.geometry().validate().or_else(|e| bad(e.to_string()))?;
        if let Some(&i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return bad(format!(
                "vision: fullatt-block-indexes holds {i}, but depth is {}",
                v.depth
            ));
        }
        let p = &self.preprocess;
        p.validate("preprocess").or_else(|e| bad(e.to_string()))?;
        if (p.patch_size, p.merge_size, p.temporal_patch_size)
            != (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        {
            return bad(format!(
                "preprocess patch/merge/temporal sizes ({}, {}, {}) differ from the vision tower's ({}, {}, {})",
                p.patch_size,
                p.merge_size,
                p.temporal_patch_size,
                v.patch_size,
                v.spatial_merge_size,
                v.temporal_patch_size
            ));
        }
        if v.in_channels != 3 {
            return bad(format!(
                "vision: in-channels is {}, only RGB (3) is supported",
                v.in_channels
            ));
        }
        let ids = &self.tokens;
        for (name, id) in [
            ("image-pad", ids.image_pad),
            ("video-pad", ids.video_pad),
            ("vision-start", ids.vision_start),
            ("vision-end", ids.vision_end),
            ("pad", ids.pad),
        ]
        .into_iter()
        .chain(ids.eos.iter().map(|&e| ("eos", e)))
        {
            if id as usize >= t.vocab_size {
                return bad(format!(
                    "tokens: {name} id {id} is outside the vocabulary of {}",
                    t.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// The path of a file named in the bundle.
    pub fn file(&self, dir: &Path, name: &str) -> PathBuf {
        dir.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../../tests/data/tiny-qwen2_5_vl/bundle/bundle.json");

    #[test]
    fn the_tiny_bundle_config_parses_and_validates() {
        let c = BundleConfig::from_json(TINY, Path::new("bundle.json")).unwrap();
        c.validate(Path::new("bundle.json")).unwrap();
        assert_eq!(c.text.num_layers, 2);
        assert_eq!(c.vision.fullatt_block_indexes, vec![1]);
        assert_eq!(c.preprocess.patch_size, 14);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v["text"]["surprise"] = 1.into();
        let err = BundleConfig::from_json(&v.to_string(), Path::new("b.json")).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v["extra"] = 1.into();
        assert!(BundleConfig::from_json(&v.to_string(), Path::new("b.json")).is_err());
    }

    #[test]
    fn inconsistent_values_are_rejected() {
        let base = BundleConfig::from_json(TINY, Path::new("b.json")).unwrap();
        let check = |f: &dyn Fn(&mut BundleConfig), needle: &str| {
            let mut c = base.clone();
            f(&mut c);
            let err = c.validate(Path::new("b.json")).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        };
        check(&|c| c.version = 99, "version 99");
        check(&|c| c.text.mrope_section = vec![4, 4, 4], "mrope-section");
        check(&|c| c.text.head_dim = 8, "head-dim");
        check(&|c| c.tokens.image_pad = 5000, "image-pad");
        check(&|c| c.vision.fullatt_block_indexes = vec![7], "fullatt");
        check(&|c| c.preprocess.merge_size = 3, "differ");
        check(&|c| c.format = "x".into(), "format");
    }
}
