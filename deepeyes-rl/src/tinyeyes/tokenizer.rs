//! TinyEyes' own byte-level BPE tokenizer, trained with the `tokenizers` crate on the text the
//! model will read and write.
//!
//! The protocol's markers (ChatML, vision markers, `<tool_call>`, `<answer>`, …) are special
//! tokens with fixed ids `0..PROTOCOL_SPECIAL_TOKENS.len()`, so each is exactly one id whatever
//! the training text. The fixed head of a zoom-in call (`{"name": "image_zoom_in_tool",
//! "arguments": {"bbox_2d": [`) and its tail (`]}}`) are added as whole tokens too: a tiny policy
//! then spends its sampling decisions on the four coordinates, not on JSON punctuation. Numbers
//! are pre-tokenized whole (GPT-2's split), so frequent coordinates become single tokens.

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The protocol's special tokens, in id order: id `i` is `PROTOCOL_SPECIAL_TOKENS[i]`. The
/// order matches Qwen-style bundles: end-of-text (also the padding) first, then ChatML, the
/// vision markers, and the DeepEyes tags.
pub const PROTOCOL_SPECIAL_TOKENS: [&str; 15] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_response>",
    "</tool_response>",
];

/// The fixed text before a zoom-in call's coordinates, as TinyEyes writes it.
pub const ZOOM_CALL_HEAD: &str = r#"{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": ["#;
/// The fixed text after a zoom-in call's coordinates.
pub const ZOOM_CALL_TAIL: &str = "]}}";

/// How to train the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerTraining {
    /// Target vocabulary size, special and added tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are not merged.
    pub min_frequency: u64,
}

impl Default for TokenizerTraining {
    fn default() -> Self {
        Self {
            vocab_size: 768,
            min_frequency: 2,
        }
    }
}

fn tokenizer_error(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument {
        name: what,
        reason: format!("TinyEyes tokenizer: {e}"),
    }
}

/// Trains a byte-level BPE tokenizer on `corpus` (one document per item). Deterministic: the
/// same corpus and settings give the same `tokenizer.json`.
pub fn train_tokenizer(corpus: &[String], training: &TokenizerTraining) -> Result<Tokenizer> {
    let reserved = PROTOCOL_SPECIAL_TOKENS.len() + 2 + ByteLevel::alphabet().len();
    if training.vocab_size <= reserved {
        return Err(tokenizer_error(
            "vocab-size",
            format!(
                "{} leaves no room for merges (special tokens, the two call tokens and the \
                 256-byte alphabet already take {reserved})",
                training.vocab_size
            ),
        ));
    }
    if corpus.iter().all(|d| d.trim().is_empty()) {
        return Err(tokenizer_error("corpus", "the training text is empty"));
    }
    let specials: Vec<AddedToken> = PROTOCOL_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(training.vocab_size - 2)
            .min_frequency(training.min_frequency)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build(),
    );
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_normalizer(Some(NFC))
        .map_err(|e| tokenizer_error("normalizer", e))?
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| tokenizer_error("training", e))?;
    // Register the specials as added tokens (they hold ids 0..15 from training) so they are
    // matched before pre-tokenization, then the two call fragments as plain added tokens.
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| tokenizer_error("special tokens", e))?;
    tokenizer
        .add_tokens([
            AddedToken::from(ZOOM_CALL_HEAD, false),
            AddedToken::from(ZOOM_CALL_TAIL, false),
        ])
        .map_err(|e| tokenizer_error("call tokens", e))?;
    for (id, token) in PROTOCOL_SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(tokenizer_error(
                "special tokens",
                format!("{token} did not get id {id}"),
            ));
        }
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut docs = Vec::new();
        for i in 0..64u32 {
            let (x, y) = (16 * i, 16 * ((i * 7) % 64));
            docs.push(format!(
                "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is \
                 the dot?<|im_end|>\n<|im_start|>assistant\n<tool_call>{ZOOM_CALL_HEAD}{x}, {y}, \
                 {}, {}{ZOOM_CALL_TAIL}</tool_call><|im_end|>\n<answer>red</answer>",
                x + 64,
                y + 64
            ));
        }
        docs
    }

    #[test]
    fn specials_and_call_fragments_are_single_ids() {
        let tok = train_tokenizer(&corpus(), &TokenizerTraining::default()).unwrap();
        for (id, token) in PROTOCOL_SPECIAL_TOKENS.iter().enumerate() {
            let enc = tok.encode(*token, false).unwrap();
            assert_eq!(enc.get_ids(), &[id as u32], "{token}");
        }
        for fragment in [ZOOM_CALL_HEAD, ZOOM_CALL_TAIL] {
            assert_eq!(tok.encode(fragment, false).unwrap().len(), 1, "{fragment}");
        }
        // A whole call: tags, head, four coordinates with their separators, tail.
        let call =
            format!("<tool_call>{ZOOM_CALL_HEAD}448, 320, 512, 384{ZOOM_CALL_TAIL}</tool_call>");
        let enc = tok.encode(call.as_str(), false).unwrap();
        assert!(enc.len() <= 12, "{:?}", enc.get_tokens());
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), call);
    }

    #[test]
    fn training_is_deterministic_and_round_trips_any_text() {
        let a = train_tokenizer(&corpus(), &TokenizerTraining::default()).unwrap();
        let b = train_tokenizer(&corpus(), &TokenizerTraining::default()).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        // Byte-level: text never seen in training still round-trips.
        let text = "Zebra crossing ≠ 42 — ünïcödé\n\ttabs";
        let ids = a.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(a.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let err = train_tokenizer(
            &corpus(),
            &TokenizerTraining {
                vocab_size: 100,
                ..TokenizerTraining::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("vocab-size"), "{err}");
        let err = train_tokenizer(&[String::new()], &TokenizerTraining::default()).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
