//! The model side: a tokenizer and a vision-language model that continues a token context.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::image::Image;
use crate::preprocess::PreprocessConfig;

/// Turns text into token ids and back. Special tokens of the protocol (`<|im_start|>`,
/// `<|image_pad|>`, `<tool_call>`, …) must each encode to their single id and decode to their
/// text.
pub trait TokenCodec: Send + Sync {
    /// Encodes `text`, recognising special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decodes `ids`, keeping special tokens as text.
    fn decode(&self, ids: &[u32]) -> Result<String>;

    /// Encodes `text` with no special token recognised: the spelling of one becomes ordinary
    /// tokens. Text from outside the templates (questions, tool outputs) is encoded this way
    /// ([`crate::protocol::Rendered::encode`]). The default suits codecs whose `encode`
    /// recognises no special tokens in text; a codec that does must override it.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text)
    }

    /// The spellings of the special tokens `encode` recognises in text (a template may place
    /// any of them). The default names none; the protocol's own markers are always known.
    fn special_tokens(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; `1` disables it.
    pub top_p: f32,
    /// Keep only the `k` most likely tokens; `0` disables it.
    pub top_k: usize,
}

impl Default for SamplingParams {
    /// DeepEyes' rollout sampling: temperature 1, no truncation.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// One request: continue `tokens` (which hold one `<|image_pad|>` per image in `images`, in
/// order) until a stop sequence, the end-of-sequence token or `max_new_tokens`.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    /// The context, with a single `<|image_pad|>` per image; the backend expands each pad to the
    /// image's visual token count.
    pub tokens: &'a [u32],
    /// The images of the context, raw (the backend preprocesses them).
    pub images: &'a [Image],
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Seed of this request's sampling stream.
    pub seed: u64,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token sequences that end generation; the matched sequence is kept in the output.
    pub stop_sequences: &'a [Vec<u32>],
    /// Tokens the model must never produce (the agent bans `<|image_pad|>`, which only
    /// observations may contain).
    pub banned_tokens: &'a [u32],
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop sequence was produced (it is included in the tokens).
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

/// The continuation produced for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token under the sampling distribution's model
    /// (temperature-scaled logits, before top-p/top-k truncation).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// A vision-language model that continues token contexts with images.
pub trait VisionLanguageModel: Send + Sync {
    /// Continues one context.
    fn generate(&self, request: &GenerateRequest<'_>) -> Result<Generation>;

    /// The model's tokenizer.
    fn codec(&self) -> &dyn TokenCodec;

    /// Continues several contexts; backends that batch override this. The default runs them one
    /// by one. Results are in request order.
    fn generate_batch(&self, requests: &[GenerateRequest<'_>]) -> Vec<Result<Generation>> {
        requests.iter().map(|r| self.generate(r)).collect()
    }

    /// The model's image preprocessing (used for token budgets and coordinate frames).
    fn preprocess_config(&self) -> PreprocessConfig {
        PreprocessConfig::default()
    }
}

/// A [`TokenCodec`] backed by a Hugging Face `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens encoded as text, for [`TokenCodec::encode_plain`].
    plain: tokenizers::Tokenizer,
    /// The spellings of its special tokens.
    specials: Vec<String>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

impl HfTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| crate::Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self::new(inner))
    }

    /// Wraps an already built tokenizer.
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        let specials = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        Self {
            inner,
            plain,
            specials,
        }
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The id of a token string (special tokens included), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

impl TokenCodec for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| crate::Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| crate::Error::Tokenizer(format!("decode: {e}")))
    }

    fn special_tokens(&self) -> Vec<String> {
        self.specials.clone()
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .plain
            .encode(text, false)
            .map_err(|e| crate::Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }
}
