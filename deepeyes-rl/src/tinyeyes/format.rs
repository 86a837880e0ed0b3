//! TinyEyes' architecture and conversation format.
//!
//! TinyEyes is exactly Qwen2.5-VL (same export, ONNX backend and burn engine), shrunk: a
//! 128-wide, 4-layer language model and a 2-block vision tower, about 1.3M parameters. Every
//! image, the whole canvas and each zoomed crop alike, is resized to about 112×112 px (16
//! merged visual tokens): the global view is too coarse to read the dot of a SynthV* card, a
//! crop around the card reads it plainly. The conversation is the DeepEyes protocol with a short
//! prompt: no system prompt (the tiny model learns the tool from its base stage, not from a
//! schema it could not read), the question, then either `<answer>colour</answer>` or a zoom-in
//! call whose crop comes back as `<tool_response><image></tool_response>`.

use deepeyes_core::agent::BundleAgentDefaults;
use deepeyes_core::geometry::{CoordinateFrame, ZoomLimits};
use deepeyes_core::protocol::{
    ANSWER_END, ANSWER_START, PromptTemplates, Rendered, TOOL_CALL_END, TOOL_CALL_START,
    render_observation, render_prompt,
};
use deepeyes_core::{PreprocessConfig, Rng};

use super::tokenizer::{PROTOCOL_SPECIAL_TOKENS, ZOOM_CALL_HEAD, ZOOM_CALL_TAIL};
use crate::network::{Qwen25VlConfig, TextConfig, VisionConfig};
use crate::synthv::{QUESTIONS, SEARCH_QUESTIONS, SynthVConfig};

/// The side of TinyEyes' square view in pixels: every image becomes about 112×112.
pub const VIEW_SIDE: u32 = 112;

/// The zoom tool's settings TinyEyes is trained and run with, as its bundles carry them
/// (`tools.toml`): boxes in the `resized` frame, pixels of the image as the model sees it (the
/// smart-resized view, at most [`MAX_COORDINATE`] px a side), and DeepEyes' limits. A view token
/// in column `j` covers `x = 28 j … 28 j + 28` whatever the canvas's size and shape, so a box
/// means the same place in what the model sees on any canvas; the tool maps it back to canvas
/// pixels.
pub const TOOLS_TOML: &str =
    "[zoom-in]\nframe = \"resized\"\nmin-side = 30.0\nmax-aspect-ratio = 100.0\n";

/// The frame of TinyEyes' boxes ([`TOOLS_TOML`]'s).
pub const ZOOM_FRAME: CoordinateFrame = CoordinateFrame::Resized;

/// The zoom tool's limits ([`TOOLS_TOML`]'s, DeepEyes' rules: both sides strictly longer than
/// 30 canvas pixels, `long side / short side` at most 100).
pub const ZOOM_LIMITS: ZoomLimits = ZoomLimits {
    min_side: 30.0,
    max_aspect_ratio: 100.0,
};

/// Coordinates TinyEyes writes are multiples of this many view pixels, so each one is a token.
pub const COORDINATE_STEP: u32 = 2;

/// The largest coordinate: the long side of the view of a 2:1 canvas (140 × 56 px).
pub const MAX_COORDINATE: u32 = 140;

/// The narrowest box side TinyEyes writes, in coordinate steps (8 view px): on every canvas of
/// its distribution (512–2048 px a side, up to 2:1) that is more than the zoom tool's 30 px
/// minimum, where 2 steps are accepted on some canvases and refused on others.
pub const MIN_BOX_BINS: u32 = 4;

/// TinyEyes' architecture for a tokenizer of `vocab_size` ids, whose first ids are
/// [`PROTOCOL_SPECIAL_TOKENS`].
pub fn tinyeyes_model_config(vocab_size: usize) -> Qwen25VlConfig {
    let id = |token: &str| {
        PROTOCOL_SPECIAL_TOKENS
            .iter()
            .position(|t| *t == token)
            .expect("a protocol token") as u32
    };
    Qwen25VlConfig {
        text: TextConfig {
            vocab_size,
            hidden_size: 128,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            // head_dim 32 → 16 rotary pairs: temporal, height, width.
            mrope_section: [8, 4, 4],
        },
        // The test fixture's tower (2 blocks, 2 heads, patch 14, window 112), twice as wide.
        vision: VisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            out_hidden_size: 128,
            ..Qwen25VlConfig::tiny().vision
        },
        image_token_id: id("<|image_pad|>"),
        video_token_id: id("<|video_pad|>"),
        vision_start_token_id: id("<|vision_start|>"),
        vision_end_token_id: id("<|vision_end|>"),
        tie_word_embeddings: false,
    }
}

/// The prompts and image sizes TinyEyes is trained and run with.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyEyesFormat {
    /// The agent's prompt templates.
    pub templates: PromptTemplates,
    /// Image preprocessing: every image resized to about [`VIEW_SIDE`]².
    pub preprocess: PreprocessConfig,
    /// The agent-loop limits TinyEyes is trained and run under, written into its bundles
    /// (`agent.toml`): three turns (two looks, then the answer) of at most 24 tokens, each ending
    /// at `</tool_call>` (the model is never taught what follows a call).
    pub agent: BundleAgentDefaults,
}

impl Default for TinyEyesFormat {
    fn default() -> Self {
        let view = u64::from(VIEW_SIDE * VIEW_SIDE);
        Self {
            templates: PromptTemplates {
                system: String::new(),
                user: "{images}{question}".into(),
                tool_response: "<tool_response>{images}{text}</tool_response>".into(),
                tool_error: "<tool_response>{error}</tool_response>".into(),
            },
            preprocess: PreprocessConfig {
                min_pixels: view,
                max_pixels: view,
                ..PreprocessConfig::default()
            },
            agent: BundleAgentDefaults {
                max_turns: Some(3),
                max_images: Some(3),
                max_new_tokens: Some(24),
                stop_at_tool_call_end: Some(true),
            },
        }
    }
}

impl TinyEyesFormat {
    /// The prompt of a question about one image, up to the assistant's first token, as the
    /// agent renders it (the question is outside text).
    pub fn prompt(&self, question: &str) -> Rendered {
        render_prompt(
            &self.templates.render_system(&[]),
            &self.templates.render_user(question, 1),
        )
    }

    /// A multiple-choice question with its options lettered A, B, …, exactly as
    /// `deepeyes_core::dataset::prepare_item` renders a SynthV* item for training and evaluation.
    pub fn multiple_choice(stem: &str, options: &[&str]) -> String {
        let listed: Vec<String> = options
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{}. {n}", (b'A' + i as u8) as char))
            .collect();
        format!("Question: {stem}\nOptions:\n{}", listed.join("\n"))
    }

    /// A zoom-in call on `bbox` (in the frame of [`TOOLS_TOML`]), as TinyEyes writes it.
    pub fn zoom_call(bbox: [u32; 4]) -> String {
        let [x1, y1, x2, y2] = bbox;
        format!(
            "{TOOL_CALL_START}{ZOOM_CALL_HEAD}{x1}, {y1}, {x2}, {y2}{ZOOM_CALL_TAIL}{TOOL_CALL_END}"
        )
    }

    /// A final answer.
    pub fn answer(text: &str) -> String {
        format!("{ANSWER_START}{text}{ANSWER_END}")
    }

    /// What follows a zoom call whose crop came back: the observation turn and the next
    /// assistant header.
    pub fn crop_returned(&self) -> Rendered {
        render_observation(&self.templates.render_tool_response(1, None), true)
    }

    /// What follows a rejected zoom call.
    pub fn call_rejected(&self, error: &str) -> Rendered {
        render_observation(&self.templates.render_tool_error(error), true)
    }

    /// Text to train the tokenizer on: `count` conversations in this format over the SynthV*
    /// questions and colours (direct answers, one or two zooms with their crops, rejected zooms,
    /// grounding answers), drawn from `seed`, with every box in the frame of [`TOOLS_TOML`] on the
    /// [`COORDINATE_STEP`] grid, so that each coordinate becomes one token. Only text is
    /// generated; no image is drawn.
    pub fn tokenizer_corpus(&self, synthv: &SynthVConfig, seed: u64, count: usize) -> Vec<String> {
        let mut rng = Rng::new(seed);
        let colours: Vec<&str> = synthv.colours.iter().map(|c| c.name.as_str()).collect();
        let stems: Vec<&str> = QUESTIONS.iter().chain(&SEARCH_QUESTIONS).copied().collect();
        (0..count)
            .map(|_| {
                let mut names = colours.clone();
                rng.shuffle(&mut names);
                let stem = stems[rng.below(stems.len() as u64) as usize];
                let question = Self::multiple_choice(stem, &names);
                let mut text = self.prompt(&question).into_text();
                let answer = Self::answer(names[rng.below(names.len() as u64) as usize]);
                match rng.below(5) {
                    0 => text.push_str(&answer),
                    4 => {
                        let [x1, y1, x2, y2] = corpus_box(&mut rng);
                        text = self.prompt(super::base::GROUND_QUESTION).into_text();
                        text.push_str(&Self::answer(&format!("[{x1}, {y1}, {x2}, {y2}]")));
                    }
                    kind => {
                        for _ in 0..(if kind == 3 { 2 } else { 1 }) {
                            text.push_str(&Self::zoom_call(corpus_box(&mut rng)));
                            text.push_str(self.crop_returned().text());
                        }
                        if kind == 2 {
                            text.push_str(&Self::zoom_call(corpus_box(&mut rng)));
                            let error = "the box's shorter side must be longer than 30 px";
                            text.push_str(self.call_rejected(error).text());
                        }
                        text.push_str(&answer);
                    }
                }
                text.push_str(deepeyes_core::protocol::IM_END);
                text
            })
            .collect()
    }
}

/// A random box of the tokenizer corpus: inside [`MAX_COORDINATE`], on the grid, at least
/// [`MIN_BOX_BINS`] a side.
fn corpus_box(rng: &mut Rng) -> [u32; 4] {
    let bins = MAX_COORDINATE / COORDINATE_STEP;
    let mut edge = || {
        let start = rng.below(u64::from(bins - MIN_BOX_BINS + 1)) as u32;
        let end =
            start + MIN_BOX_BINS + rng.below(u64::from(bins - start - MIN_BOX_BINS + 1)) as u32;
        (start * COORDINATE_STEP, end * COORDINATE_STEP)
    };
    let (x1, x2) = edge();
    let (y1, y2) = edge();
    [x1, y1, x2, y2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tinyeyes::tokenizer::{TokenizerTraining, train_tokenizer};

    #[test]
    fn model_config_is_valid_and_small() {
        let cfg = tinyeyes_model_config(768);
        cfg.validate().unwrap();
        assert_eq!(cfg.image_token_id, 5);
        assert_eq!(cfg.vision_start_token_id, 3);
        let text = &cfg.text;
        assert_eq!(
            text.mrope_section.iter().sum::<usize>() * 2,
            text.head_dim(),
            "mRoPE sections cover the head"
        );
    }

    #[test]
    fn every_view_is_sixteen_tokens() {
        let f = TinyEyesFormat::default();
        // The canvas and crops from the tool's smallest box to the whole canvas.
        for (h, w) in [(1024, 1024), (32, 32), (48, 64), (300, 200), (1024, 40)] {
            let (rh, rw) = f.preprocess.smart_resize(h, w).unwrap();
            let tokens = (rh / 28) * (rw / 28);
            assert!(
                (12..=20).contains(&tokens),
                "{w}×{h} → {rw}×{rh}: {tokens} tokens"
            );
        }
    }

    #[test]
    fn base_stage_pieces_keep_the_ids_the_raw_tokenizer_gave_them() {
        // The shipped TinyEyes learnt from each piece encoded whole by its tokenizer; the pieces
        // now go through `Rendered::encode`, as the agent's context does, with the same ids.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/tinyeyes/tokenizer.json");
        let codec = deepeyes_core::HfTokenizer::from_file(path).unwrap();
        let f = TinyEyesFormat::default();
        let question = TinyEyesFormat::multiple_choice(QUESTIONS[0], &["red", "green", "blue"]);
        let pieces = [
            f.prompt(&question),
            f.prompt(crate::tinyeyes::base::GROUND_QUESTION),
            f.crop_returned(),
            f.call_rejected("the box's shorter side must be longer than 30 px"),
            Rendered::trusted(&TinyEyesFormat::zoom_call([56, 40, 64, 48])),
            Rendered::trusted(&TinyEyesFormat::answer("red")),
            Rendered::trusted(deepeyes_core::protocol::IM_END),
        ];
        for piece in pieces {
            let raw = deepeyes_core::TokenCodec::encode(&codec, piece.text()).unwrap();
            assert_eq!(piece.encode(&codec).unwrap(), raw, "{}", piece.text());
        }
    }

    #[test]
    fn a_zoom_conversation_is_short_once_tokenized() {
        let f = TinyEyesFormat::default();
        let corpus = f.tokenizer_corpus(&SynthVConfig::default(), 7, 400);
        let tok = train_tokenizer(&corpus, &TokenizerTraining::default()).unwrap();
        let call = TinyEyesFormat::zoom_call([56, 40, 64, 132]);
        let ids = tok.encode(call.as_str(), false).unwrap();
        // <tool_call>, head, 4 coordinates, 3 separators, tail, </tool_call>.
        assert_eq!(ids.len(), 11, "{:?}", ids.get_tokens());
        let answer = tok
            .encode(TinyEyesFormat::answer("black").as_str(), false)
            .unwrap();
        assert_eq!(answer.len(), 3, "{:?}", answer.get_tokens());
        // A whole zoom episode (prompt with one image pad per image, call, crop, answer).
        let episode = format!(
            "{}{call}{}{}",
            f.prompt(
                "What colour is the dot on the small white card?\nOptions:\nA. red\nB. \
                      green\nC. blue\nD. black"
            )
            .text(),
            f.crop_returned().text(),
            TinyEyesFormat::answer("red")
        );
        let n = tok.encode(episode.as_str(), false).unwrap().len();
        // 70 today: the question with its options is 30, the protocol markers most of the rest
        // (BPE never merges across the pre-tokenizer's word boundaries).
        let toks = tok.encode(episode.as_str(), false).unwrap();
        assert!(n <= 72, "{n} tokens: {:?}", toks.get_tokens());
    }
}
