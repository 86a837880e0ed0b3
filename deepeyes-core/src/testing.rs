//! Test doubles for driving the agent loop without a real model: a character-level codec and a
//! model that replays scripted turns. For tests of tools, rewards and trainers (this workspace's
//! and a user's own); nothing in deepeyes runs them as a feature.
//!
//! ```
//! use deepeyes_core::testing::ScriptedModel;
//! use deepeyes_core::{Agent, AgentConfig, Image, PromptTemplates, Task};
//!
//! let model = ScriptedModel::from_turns(["<think>Easy.</think><answer>red</answer>"]);
//! let agent = Agent::new(&model, vec![], PromptTemplates::default(), AgentConfig::default())?;
//! let task = Task { question: "Colour?".into(), images: vec![Image::from_raw(28, 28, vec![0; 28 * 28 * 3])?] };
//! assert_eq!(agent.run(&task, 0)?.answer.as_deref(), Some("red"));
//! # Ok::<(), deepeyes_core::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::model::{FinishReason, GenerateRequest, Generation, TokenCodec, VisionLanguageModel};
use crate::protocol::{
    IM_END, IM_START, IMAGE_PAD, TOOL_CALL_END, TOOL_CALL_START, VISION_END, VISION_START,
};

/// The markers [`CharCodec`] encodes as single ids, in id order.
const SPECIALS: [&str; 7] = [
    IM_START,
    IM_END,
    VISION_START,
    IMAGE_PAD,
    VISION_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
];

/// Ids of ordinary characters start here (`id = CHAR_BASE + char`).
const CHAR_BASE: u32 = 1000;

/// A character-level codec: every protocol marker is one id, every other character its own id.
#[derive(Debug, Clone, Copy, Default)]
pub struct CharCodec;

impl TokenCodec for CharCodec {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        'outer: while let Some(c) = rest.chars().next() {
            for (id, special) in SPECIALS.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(special) {
                    ids.push(id as u32);
                    rest = after;
                    continue 'outer;
                }
            }
            ids.push(CHAR_BASE + c as u32);
            rest = &rest[c.len_utf8()..];
        }
        Ok(ids)
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.chars().map(|c| CHAR_BASE + c as u32).collect())
    }

    fn special_tokens(&self) -> Vec<String> {
        SPECIALS.iter().map(|s| (*s).to_string()).collect()
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&id| match SPECIALS.get(id as usize) {
                Some(s) => Ok((*s).to_string()),
                None => id
                    .checked_sub(CHAR_BASE)
                    .and_then(char::from_u32)
                    .map(String::from)
                    .ok_or_else(|| Error::Tokenizer(format!("bad id {id}"))),
            })
            .collect()
    }
}

/// The script of a [`ScriptedModel`]: the text of assistant turn `turn` (0-based) for a request
/// with sampling seed `seed`.
type Script = dyn Fn(usize, u64) -> String + Send + Sync;

/// Replays scripted assistant turns. The turn index is read off the context (the assistant
/// headers in it, as the protocol's templates encode them), as a stateless backend must;
/// generation stops at the request's stop sequences (kept) or its token limit. A turn is
/// encoded with the model's codec ([`CharCodec`] unless [`ScriptedModel::with_codec`] names
/// another), so the special tokens it spells are its ids, except a banned one: like a sampler
/// that may not pick it, the model writes its characters instead.
pub struct ScriptedModel {
    script: Box<Script>,
    codec: Arc<dyn TokenCodec>,
    bad_logprobs: bool,
    produce_banned: bool,
    seen: Mutex<Vec<Vec<(u32, u32)>>>,
}

impl std::fmt::Debug for ScriptedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedModel").finish_non_exhaustive()
    }
}

impl ScriptedModel {
    /// A model whose turn `turn` for seed `seed` is the text `script(turn, seed)`, as is (end it
    /// with `<|im_end|>` to end the turn as a chat model does).
    pub fn new(script: impl Fn(usize, u64) -> String + Send + Sync + 'static) -> Self {
        Self {
            script: Box::new(script),
            codec: Arc::new(CharCodec),
            bad_logprobs: false,
            produce_banned: false,
            seen: Mutex::new(Vec::new()),
        }
    }

    /// A model that plays `turns` in order, each ended with `<|im_end|>` (a turn past the last
    /// plays the last again).
    pub fn from_turns<S: Into<String>>(turns: impl IntoIterator<Item = S>) -> Self {
        let turns: Vec<String> = turns.into_iter().map(Into::into).collect();
        Self::new(move |turn, _| {
            let text = turns.get(turn).or(turns.last()).map_or("", String::as_str);
            format!("{text}{IM_END}")
        })
    }

    /// The same script over `codec` (a real tokenizer, say): contexts are read and turns
    /// written with its ids.
    #[must_use]
    pub fn with_codec(mut self, codec: Arc<dyn TokenCodec>) -> Self {
        self.codec = codec;
        self
    }

    /// The same model, returning one log-prob too many (a backend bug the agent must catch).
    #[must_use]
    pub fn with_bad_logprobs(mut self) -> Self {
        self.bad_logprobs = true;
        self
    }

    /// The same model, producing the banned tokens its script spells (a backend bug the agent
    /// must catch).
    #[must_use]
    pub fn with_banned_tokens_produced(mut self) -> Self {
        self.produce_banned = true;
        self
    }

    /// The `(width, height)` of every image each request showed the model, request by request.
    pub fn seen_images(&self) -> Vec<Vec<(u32, u32)>> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The index of the assistant turn `context` opens: its assistant headers, as ids, less one.
    /// Counting ids rather than decoded text keeps a question that spells a header from
    /// counting as one.
    fn turn_of(&self, context: &[u32]) -> Result<usize> {
        let mut header = self.codec.encode(IM_START)?;
        header.extend(self.codec.encode_plain("assistant\n")?);
        let (mut count, mut at) = (0usize, 0);
        while let Some(found) = context[at..]
            .windows(header.len())
            .position(|w| w == header)
        {
            count += 1;
            at += found + header.len();
        }
        Ok(count.saturating_sub(1))
    }

    /// The ids of `text` as the model writes it: special tokens as their ids, banned ones (unless
    /// [`with_banned_tokens_produced`](Self::with_banned_tokens_produced)) as their characters.
    fn write(&self, text: &str, banned: &[u32]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for id in self.codec.encode(text)? {
            if banned.contains(&id) && !self.produce_banned {
                ids.extend(self.codec.encode_plain(&self.codec.decode(&[id])?)?);
            } else {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

impl VisionLanguageModel for ScriptedModel {
    fn generate(&self, req: &GenerateRequest<'_>) -> Result<Generation> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(req.images.iter().map(|i| (i.width(), i.height())).collect());
        }
        let turn = self.turn_of(req.tokens)?;
        let mut tokens = self.write(&(self.script)(turn, req.seed), req.banned_tokens)?;
        let mut finish = FinishReason::Length;
        // Cut at the first stop sequence, keeping it.
        let cut = (1..=tokens.len()).find(|&end| {
            req.stop_sequences
                .iter()
                .any(|s| tokens[..end].ends_with(s))
        });
        if let Some(end) = cut {
            tokens.truncate(end);
            finish = FinishReason::Stop;
        }
        if tokens.len() > req.max_new_tokens {
            tokens.truncate(req.max_new_tokens);
            finish = FinishReason::Length;
        }
        let n = tokens.len() + usize::from(self.bad_logprobs);
        Ok(Generation {
            logprobs: vec![-0.5; n],
            tokens,
            finish,
        })
    }

    fn codec(&self) -> &dyn TokenCodec {
        self.codec.as_ref()
    }
}
