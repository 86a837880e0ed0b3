//! Prompt assembly on [`OnnxModel`]: checking a context's tokens, encoding its images and
//! expanding each image pad into a [`PreparedPrompt`] ready for the decoder.

use std::sync::Arc;

use crate::image::Image;
use crate::preprocess::PixelValues;
use crate::protocol::IMAGE_PAD;
use crate::vision::{RopeIndex, rope_index};

use super::error::OnnxResult;
use super::model::OnnxModel;

/// A prompt ready for the decoder: image pads expanded, positions computed, image features
/// encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedPrompt {
    /// Token ids, each image's pad repeated to its visual token count.
    pub input_ids: Vec<u32>,
    /// Each image's patch grid `(t, h, w)`.
    pub grids: Vec<[u32; 3]>,
    /// The 3-D positions and the decode-time offset.
    pub rope: RopeIndex,
    /// Visual features `[image tokens, hidden]` (row-major), in pad order.
    pub features: Arc<Vec<f32>>,
}

impl OnnxModel {
    /// Checks `tokens` (one image pad per image) against the vocabulary and the image count.
    fn check_tokens(&self, tokens: &[u32], images: usize) -> OnnxResult<()> {
        let vocab = self.config.text.vocab_size;
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return Err(crate::Error::Model(format!(
                "token {t} at index {i} is outside the vocabulary of {vocab}"
            ))
            .into());
        }
        let pad = self.config.tokens.image_pad;
        let pads = tokens.iter().filter(|&&t| t == pad).count();
        if pads != images {
            return Err(crate::Error::Model(format!(
                "the context holds {pads} {IMAGE_PAD} tokens for {images} images (each image needs exactly one)"
            ))
            .into());
        }
        Ok(())
    }

    fn assemble(
        &self,
        tokens: &[u32],
        grids: Vec<[u32; 3]>,
        features: Vec<f32>,
    ) -> OnnxResult<PreparedPrompt> {
        let geo = self.geometry();
        let pad = self.config.tokens.image_pad;
        let mut input_ids =
            Vec::with_capacity(tokens.len() + features.len() / self.config.text.hidden_size);
        let mut next = 0usize;
        for &t in tokens {
            if t == pad {
                let count = geo.merged_tokens(grids[next]);
                input_ids.extend(std::iter::repeat_n(pad, count));
                next += 1;
            } else {
                input_ids.push(t);
            }
        }
        let rope = rope_index(&input_ids, pad, &grids, &geo)?;
        let max = self.config.text.max_positions;
        if input_ids.len() >= max {
            return Err(crate::Error::Model(format!(
                "the context is {} tokens long with images expanded; the model takes at most {max}",
                input_ids.len()
            ))
            .into());
        }
        Ok(PreparedPrompt {
            input_ids,
            grids,
            rope,
            features: Arc::new(features),
        })
    }

    /// Prepares a context whose images are already preprocessed (one pad per image in
    /// `tokens`): runs the vision encoder and expands the pads.
    pub fn prepare(&self, tokens: &[u32], images: &[PixelValues]) -> OnnxResult<PreparedPrompt> {
        self.check_tokens(tokens, images.len())?;
        let mut features = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for im in images {
            features.extend(self.encode_image(im)?);
            grids.push(im.grid_thw);
        }
        self.assemble(tokens, grids, features)
    }

    /// Prepares a context with raw images: preprocesses them (through the feature cache), runs
    /// the vision encoder and expands the pads.
    pub fn prepare_images(&self, tokens: &[u32], images: &[Image]) -> OnnxResult<PreparedPrompt> {
        self.check_tokens(tokens, images.len())?;
        let mut features = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for im in images {
            let enc = self.encode_cached(im)?;
            features.extend_from_slice(&enc.features);
            grids.push(enc.grid);
        }
        self.assemble(tokens, grids, features)
    }
}
