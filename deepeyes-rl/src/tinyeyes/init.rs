//! A freshly initialised TinyEyes checkpoint, written as a Hugging Face directory.
//!
//! The directory holds what `scripts/export_qwen2_5_vl.py SRC OUT` needs to build the ONNX
//! bundle (once: afterwards trained weights flow into that bundle without Python, see
//! `docs/BUNDLE.md`), and what the burn engine loads with `Qwen25Vl::from_pretrained`.

use std::path::Path;

use serde_json::json;

use super::format::{TinyEyesFormat, tinyeyes_model_config};
use super::tokenizer::{PROTOCOL_SPECIAL_TOKENS, TokenizerTraining, train_tokenizer};
use crate::network::{ComputeDevice, Qwen25VlConfig};
use crate::synthv::SynthVConfig;
use crate::trainer::{TrainError, TrainResult};

/// Conversations the tokenizer is trained on.
pub const TOKENIZER_CORPUS_SIZE: usize = 4000;

fn write_json(path: &Path, value: &serde_json::Value) -> TrainResult<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n";
    std::fs::write(path, text).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes an untrained TinyEyes checkpoint into `dir` (created if needed): `tokenizer.json`
/// (trained on [`TinyEyesFormat::tokenizer_corpus`]), `config.json` and `model.safetensors`
/// (random weights from `seed`), `preprocessor_config.json` (every image ≈112×112),
/// `generation_config.json`, `tokenizer_config.json`, `templates.toml`, `agent.toml` and
/// `tools.toml` (the prompts and agent-loop limits of [`TinyEyesFormat`] and the zoom frame of
/// [`super::format::TOOLS_TOML`], which
/// bundles exported from it carry).
/// The same seed gives the same files.
pub fn init_checkpoint(dir: &Path, seed: u64) -> TrainResult<Qwen25VlConfig> {
    std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let format = TinyEyesFormat::default();
    let corpus = format.tokenizer_corpus(&SynthVConfig::default(), seed, TOKENIZER_CORPUS_SIZE);
    let tokenizer = train_tokenizer(&corpus, &TokenizerTraining::default())?;
    let tokenizer_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| TrainError::Data {
            path: tokenizer_path.clone(),
            reason: e.to_string(),
        })?;
    let config = tinyeyes_model_config(tokenizer.get_vocab_size(true));
    let device = ComputeDevice::Flex.device(false)?;
    let model = crate::network::Qwen25Vl::random(&config, seed, &device)?;
    model.save_pretrained(dir)?;
    // transformers fills missing token ids with Qwen's (151643…), outside this vocabulary; name
    // TinyEyes' own: <|endoftext|> (0) begins and pads, <|im_end|> (2) ends.
    let config_path = dir.join("config.json");
    let mut hf = config.to_hf_json();
    for scope in [Some("text_config"), None] {
        let target = match scope {
            Some(key) => &mut hf[key],
            None => &mut hf,
        };
        target["bos_token_id"] = json!(0);
        target["eos_token_id"] = json!(2);
        target["pad_token_id"] = json!(0);
    }
    write_json(&config_path, &hf)?;

    let pre = &format.preprocess;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": pre.min_pixels,
            "max_pixels": pre.max_pixels,
            "patch_size": pre.patch_size,
            "temporal_patch_size": pre.temporal_patch_size,
            "merge_size": pre.merge_size,
            "image_mean": pre.image_mean,
            "image_std": pre.image_std,
            "rescale_factor": 1.0 / 255.0,
            "do_resize": true,
            "do_rescale": true,
            "do_normalize": true,
            "do_convert_rgb": true,
            "resample": 3,
        }),
    )?;
    // <|im_end|> ends a turn; <|endoftext|> is the padding.
    write_json(
        &dir.join("generation_config.json"),
        &json!({"eos_token_id": [2, 0], "pad_token_id": 0}),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 4096,
            "eos_token": PROTOCOL_SPECIAL_TOKENS[2],
            "pad_token": PROTOCOL_SPECIAL_TOKENS[0],
            "additional_special_tokens": &PROTOCOL_SPECIAL_TOKENS[1..],
        }),
    )?;
    for (file, text) in [
        (
            deepeyes_core::protocol::BUNDLE_TEMPLATES_FILE,
            format.templates.to_toml_string(),
        ),
        (
            deepeyes_core::agent::BUNDLE_AGENT_FILE,
            format.agent.to_toml_string(),
        ),
        (
            deepeyes_core::tool::BUNDLE_TOOLS_FILE,
            super::format::TOOLS_TOML.to_string(),
        ),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(|source| TrainError::Io { path, source })?;
    }
    let params: usize = model
        .params()
        .iter()
        .map(|p| p.shape.iter().product::<usize>())
        .sum();
    tracing::info!(dir = %dir.display(), seed, params, vocab = config.text.vocab_size, "initialised TinyEyes");
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_loadable_reproducible_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let cfg = init_checkpoint(&a, 3).unwrap();
        init_checkpoint(&b, 3).unwrap();
        for file in ["tokenizer.json", "config.json", "model.safetensors"] {
            assert!(
                std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
                "{file} differs between two runs with the same seed"
            );
        }
        // The core tokenizer wrapper reads it, with the ids the model config expects.
        let tok = deepeyes_core::HfTokenizer::from_file(a.join("tokenizer.json")).unwrap();
        // Bundles exported from it carry the prompts it is trained with.
        let templates = deepeyes_core::PromptTemplates::for_bundle(&a).unwrap();
        assert_eq!(templates, TinyEyesFormat::default().templates);
        // ... and the agent-loop limits.
        let agent = deepeyes_core::agent::BundleAgentDefaults::for_bundle(&a).unwrap();
        assert_eq!(agent, TinyEyesFormat::default().agent);
        // ... and the frame its boxes are in.
        let tools = deepeyes_tools::ToolsConfig::for_bundle(&a)
            .unwrap()
            .unwrap();
        assert_eq!(tools.zoom_in.frame, super::super::format::ZOOM_FRAME);
        let limits = super::super::format::ZOOM_LIMITS;
        assert_eq!(tools.zoom_in.min_side, limits.min_side);
        assert_eq!(tools.zoom_in.max_aspect_ratio, limits.max_aspect_ratio);
        assert_eq!(tok.token_id("<|image_pad|>"), Some(cfg.image_token_id));
        // The burn engine loads it back with the same architecture.
        let device = ComputeDevice::Flex.device(false).unwrap();
        let model = crate::network::Qwen25Vl::from_pretrained(&a, &device).unwrap();
        let params: usize = model
            .params()
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        assert!(
            (1_000_000..=5_000_000).contains(&params),
            "{params} parameters"
        );
    }
}
