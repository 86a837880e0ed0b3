//! Architecture hyper-parameters, read from a Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::error::{ModelError, Result};

/// The vision tower's hyper-parameters (`vision_config` in Hugging Face's file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VisionConfig {
    /// Number of transformer blocks.
    pub depth: usize,
    /// Width of the blocks.
    pub hidden_size: usize,
    /// Width of the blocks' SwiGLU MLP.
    pub intermediate_size: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Input channels (3).
    pub in_channels: usize,
    /// Spatial patch side in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one language token (2).
    pub spatial_merge_size: usize,
    /// Side of an attention window in pixels (112).
    pub window_size: usize,
    /// Width of the merged features (the language model's hidden size).
    pub out_hidden_size: usize,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Base of the 2D rotary frequencies.
    pub rope_theta: f64,
    /// Epsilon of the blocks' RMSNorms.
    pub rms_norm_eps: f64,
}

/// The language model's hyper-parameters (`text_config`, or the top level of older files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the decoder.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Epsilon of the RMSNorms.
    pub rms_norm_eps: f64,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// How many rotary frequency pairs follow the temporal, height and width positions.
    pub mrope_section: [usize; 3],
}

/// Everything needed to build the Qwen2.5-VL architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Qwen25VlConfig {
    /// The language model.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// The `<|image_pad|>` token id.
    pub image_token_id: u32,
    /// The `<|video_pad|>` token id.
    pub video_token_id: u32,
    /// The `<|vision_start|>` token id.
    pub vision_start_token_id: u32,
    /// The `<|vision_end|>` token id.
    pub vision_end_token_id: u32,
    /// Whether `lm_head` shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

impl VisionConfig {
    /// The tower's geometry as the workspace's one definition of it (`deepeyes_core::vision`)
    /// takes it.
    pub fn geometry(&self) -> Result<deepeyes_core::vision::VisionGeometry> {
        let side = |name: &str, v: usize| {
            u32::try_from(v).map_err(|_| ModelError::Config {
                message: format!("vision {name} {v} is too large"),
            })
        };
        Ok(deepeyes_core::vision::VisionGeometry {
            patch_size: side("patch-size", self.patch_size)?,
            spatial_merge_size: side("spatial-merge-size", self.spatial_merge_size)?,
            window_size: side("window-size", self.window_size)?,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Length of one flattened patch: channels × temporal patch × patch × patch (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one language token (4).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str, section: &str) -> Result<&'a Value> {
    obj.get(key)
        .filter(|v| !v.is_null())
        .ok_or_else(|| ModelError::Config {
            message: format!("`{section}` has no `{key}`"),
        })
}

fn usize_of(obj: &Map<String, Value>, key: &str, section: &str) -> Result<usize> {
    let v = field(obj, key, section)?;
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ModelError::Config {
            message: format!("`{section}.{key}` must be a non-negative integer, got {v}"),
        })
}

fn usize_or(obj: &Map<String, Value>, key: &str, section: &str, default: usize) -> Result<usize> {
    if obj.get(key).is_none_or(Value::is_null) {
        Ok(default)
    } else {
        usize_of(obj, key, section)
    }
}

fn f64_or(obj: &Map<String, Value>, key: &str, section: &str, default: f64) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| ModelError::Config {
            message: format!("`{section}.{key}` must be a number, got {v}"),
        }),
    }
}

fn u32_of(obj: &Map<String, Value>, key: &str, section: &str) -> Result<u32> {
    let n = usize_of(obj, key, section)?;
    u32::try_from(n).map_err(|_| ModelError::Config {
        message: format!("`{section}.{key}` = {n} does not fit a token id"),
    })
}

/// The rope parameters of a section: `rope_parameters` (transformers 5), `rope_scaling` (4.x), or
/// none.
fn rope_params(obj: &Map<String, Value>) -> Option<&Map<String, Value>> {
    ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_object))
}

impl Qwen25VlConfig {
    /// Reads a Hugging Face `config.json` of a `Qwen2_5_VLForConditionalGeneration`.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&value).map_err(|e| match e {
            ModelError::Config { message } => ModelError::Config {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// Parses a Hugging Face config value. Both layouts are understood: transformers 5
    /// (`text_config` with `rope_parameters`) and the Hub's original one (text fields at the top
    /// level, `rope_scaling` with `mrope_section`).
    pub fn from_hf_json(value: &Value) -> Result<Self> {
        let top = value.as_object().ok_or_else(|| ModelError::Config {
            message: "config.json is not a JSON object".into(),
        })?;
        if let Some(mt) = top.get("model_type").and_then(Value::as_str)
            && mt != "qwen2_5_vl"
        {
            return Err(ModelError::Config {
                message: format!("model_type is `{mt}`, expected `qwen2_5_vl`"),
            });
        }
        let t = top
            .get("text_config")
            .and_then(Value::as_object)
            .filter(|t| t.contains_key("hidden_size"))
            .unwrap_or(top);
        let ts = if std::ptr::eq(t, top) {
            "config"
        } else {
            "text_config"
        };
        let v = top
            .get("vision_config")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Config {
                message: "config has no `vision_config` object".into(),
            })?;
        let vs = "vision_config";

        let trope = rope_params(t).or_else(|| rope_params(top));
        let rope_theta = match trope.and_then(|r| r.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| ModelError::Config {
                message: format!("`rope_theta` must be a number, got {v}"),
            })?,
            None => f64_or(t, "rope_theta", ts, 1_000_000.0)?,
        };
        let section =
            trope
                .and_then(|r| r.get("mrope_section"))
                .ok_or_else(|| ModelError::Config {
                    message: "no `mrope_section` in the text rope parameters".into(),
                })?;
        let section: Vec<usize> =
            serde_json::from_value(section.clone()).map_err(|_| ModelError::Config {
                message: format!("`mrope_section` must be three integers, got {section}"),
            })?;
        let mrope_section: [usize; 3] =
            section.clone().try_into().map_err(|_| ModelError::Config {
                message: format!("`mrope_section` must have 3 entries, got {section:?}"),
            })?;
        let heads = usize_of(t, "num_attention_heads", ts)?;
        let text = TextConfig {
            vocab_size: usize_of(t, "vocab_size", ts)?,
            hidden_size: usize_of(t, "hidden_size", ts)?,
            intermediate_size: usize_of(t, "intermediate_size", ts)?,
            num_hidden_layers: usize_of(t, "num_hidden_layers", ts)?,
            num_attention_heads: heads,
            num_key_value_heads: usize_or(t, "num_key_value_heads", ts, heads)?,
            rms_norm_eps: f64_or(t, "rms_norm_eps", ts, 1e-6)?,
            rope_theta,
            mrope_section,
        };
        if let Some(act) = t.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ModelError::Config {
                message: format!("`{ts}.hidden_act` is `{act}`; only `silu` is implemented"),
            });
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ModelError::Config {
                message: format!(
                    "`vision_config.hidden_act` is `{act}`; only `silu` is implemented"
                ),
            });
        }
        let vrope = rope_params(v);
        let vision = VisionConfig {
            depth: usize_of(v, "depth", vs)?,
            hidden_size: usize_of(v, "hidden_size", vs)?,
            intermediate_size: usize_of(v, "intermediate_size", vs)?,
            num_heads: usize_of(v, "num_heads", vs)?,
            in_channels: usize_or(v, "in_channels", vs, 3)?,
            patch_size: usize_or(v, "patch_size", vs, 14)?,
            temporal_patch_size: usize_or(v, "temporal_patch_size", vs, 2)?,
            spatial_merge_size: usize_or(v, "spatial_merge_size", vs, 2)?,
            window_size: usize_or(v, "window_size", vs, 112)?,
            out_hidden_size: usize_of(v, "out_hidden_size", vs)?,
            fullatt_block_indexes: match v.get("fullatt_block_indexes") {
                Some(x) => serde_json::from_value(x.clone()).map_err(|_| ModelError::Config {
                    message: format!(
                        "`vision_config.fullatt_block_indexes` must be a list of integers, got {x}"
                    ),
                })?,
                None => Vec::new(),
            },
            rope_theta: match vrope.and_then(|r| r.get("rope_theta")) {
                Some(x) => x.as_f64().ok_or_else(|| ModelError::Config {
                    message: format!("vision `rope_theta` must be a number, got {x}"),
                })?,
                None => 10_000.0,
            },
            rms_norm_eps: 1e-6,
        };
        let tie = top
            .get("tie_word_embeddings")
            .or_else(|| t.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let cfg = Self {
            text,
            vision,
            image_token_id: u32_of(top, "image_token_id", "config")?,
            video_token_id: u32_of(top, "video_token_id", "config")?,
            vision_start_token_id: u32_of(top, "vision_start_token_id", "config")?,
            vision_end_token_id: u32_of(top, "vision_end_token_id", "config")?,
            tie_word_embeddings: tie,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A `config.json` value that transformers (5.x, and 4.5x) loads as this architecture.
    pub fn to_hf_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "dtype": "float32",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": t.mrope_section,
                },
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": v.fullatt_block_indexes,
                "hidden_act": "silu",
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        })
    }

    /// Checks the shapes fit together (head sizes divide, sections sum to half a head, ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(ModelError::Config { message });
        let t = &self.text;
        let v = &self.vision;
        for (name, n) in [
            ("text vocab_size", t.vocab_size),
            ("text hidden_size", t.hidden_size),
            ("text intermediate_size", t.intermediate_size),
            ("text num_attention_heads", t.num_attention_heads),
            ("text num_key_value_heads", t.num_key_value_heads),
            ("vision hidden_size", v.hidden_size),
            ("vision intermediate_size", v.intermediate_size),
            ("vision num_heads", v.num_heads),
            ("vision patch_size", v.patch_size),
            ("vision temporal_patch_size", v.temporal_patch_size),
            ("vision spatial_merge_size", v.spatial_merge_size),
            ("vision out_hidden_size", v.out_hidden_size),
            ("vision in_channels", v.in_channels),
        ] {
            if n == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(format!(
                "text hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        let hd = t.head_dim();
        if !hd.is_multiple_of(2) || t.mrope_section.iter().sum::<usize>() != hd / 2 {
            return bad(format!(
                "mrope_section {:?} must sum to head_dim / 2 = {} (head_dim {hd})",
                t.mrope_section,
                hd / 2
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
            return bad(format!(
                "vision hidden_size {} / num_heads {} must give a head size divisible by 4",
                v.hidden_size, v.num_heads
            ));
        }
        if v.out_hidden_size != t.hidden_size {
            return bad(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, t.hidden_size
            ));
        }
        if let Some(&i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return bad(format!(
                "fullatt_block_indexes has {i}, but the vision tower has {} blocks",
                v.depth
            ));
        }
        let unit = v.spatial_merge_size * v.patch_size;
        if v.window_size < unit || !v.window_size.is_multiple_of(unit) {
            return bad(format!(
                "vision window_size {} must be a positive multiple of spatial_merge_size × patch_size = {unit}",
                v.window_size
            ));
        }
        let vocab = t.vocab_size as u64;
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("video_token_id", self.video_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
        ] {
            if u64::from(id) >= vocab {
                return bad(format!("{name} {id} is outside the vocabulary ({vocab})"));
            }
        }
        Ok(())
    }

    /// The tiny configuration the test fixtures use (see FEASIBILITY §3): vocab 1024, hidden 64,
    /// 2 layers, 4 heads, 2 KV heads, mrope_section [4,2,2]; vision depth 2, hidden 32, 2 heads.
    pub fn tiny() -> Self {
        Self {
            text: TextConfig {
                vocab_size: 1024,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: [4, 2, 2],
            },
            vision: VisionConfig {
                depth: 2,
                hidden_size: 32,
                intermediate_size: 64,
                num_heads: 2,
                in_channels: 3,
                patch_size: 14,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                window_size: 112,
                out_hidden_size: 64,
                fullatt_block_indexes: vec![1],
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
            },
            image_token_id: 1023,
            video_token_id: 1022,
            vision_start_token_id: 1021,
            vision_end_token_id: 1020,
            tie_word_embeddings: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trip() {
        let cfg = Qwen25VlConfig::tiny();
        let back = Qwen25VlConfig::from_hf_json(&cfg.to_hf_json()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn reads_hub_layout() {
        // The original Hub layout: text fields at the top level and `rope_scaling`.
        let v = json!({
            "model_type": "qwen2_5_vl",
            "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "image_token_id": 151655, "video_token_id": 151656,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "tie_word_embeddings": false,
            "vision_config": {
                "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                "temporal_patch_size": 2
            }
        });
        let cfg = Qwen25VlConfig::from_hf_json(&v).unwrap();
        assert_eq!(cfg.text.head_dim(), 128);
        assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
        assert_eq!(cfg.vision.patch_dim(), 1176);
        assert_eq!(cfg.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut v = Qwen25VlConfig::tiny().to_hf_json();
        v["text_config"]["rope_parameters"]["mrope_section"] = json!([4, 2, 3]);
        let e = Qwen25VlConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("mrope_section"), "{e}");

        let mut v = Qwen25VlConfig::tiny().to_hf_json();
        v["vision_config"]
            .as_object_mut()
            .unwrap()
            .remove("out_hidden_size");
        let e = Qwen25VlConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("out_hidden_size"), "{e}");

        let mut v = Qwen25VlConfig::tiny().to_hf_json();
        v["model_type"] = json!("llama");
        assert!(Qwen25VlConfig::from_hf_json(&v).is_err());
    }

    #[test]
    fn own_serde_form_rejects_unknown_keys() {
        let cfg = Qwen25VlConfig::tiny();
        let mut v = serde_json::to_value(&cfg).unwrap();
        assert!(serde_json::from_value::<Qwen25VlConfig>(v.clone()).is_ok());
        v["text"]["bogus-key"] = json!(1);
        let e = serde_json::from_value::<Qwen25VlConfig>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus-key"), "{e}");
    }
}
