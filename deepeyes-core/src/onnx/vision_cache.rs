//! The vision encoder on [`OnnxModel`]: running it on preprocessed images, and the cache of
//! vision features by image content that lets a multi-turn episode re-read its images cheaply.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use ort::session::SessionInputValue;
use ort::value::TensorRef;

use crate::image::Image;
use crate::preprocess::PixelValues;
use crate::vision::vision_inputs;

use super::error::{OnnxError, OnnxResult};
use super::model::{OnnxModel, lock, run_err};

/// Vision features of one image, cached by content.
#[derive(Debug)]
pub(super) struct Encoded {
    /// The image's patch grid `(t, h, w)`.
    pub(super) grid: [u32; 3],
    /// Its features `[tokens, hidden]`, row-major.
    pub(super) features: Vec<f32>,
}

/// Recently encoded images, most recent first: (content key, dimensions, features).
#[derive(Debug, Default)]
pub(super) struct FeatureCache {
    entries: VecDeque<(u64, (u32, u32), Arc<Encoded>)>,
}

impl FeatureCache {
    /// Forgets every entry (the features of weights no longer running).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

fn image_key(image: &Image) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    image.width().hash(&mut h);
    image.height().hash(&mut h);
    image.as_raw().hash(&mut h);
    h.finish()
}

impl OnnxModel {
    /// Runs the vision encoder on one preprocessed image: `[tokens, hidden]` features, row-major.
    pub fn encode_image(&self, pixels: &PixelValues) -> OnnxResult<Vec<f32>> {
        self.encode_pixels(pixels.grid_thw, &pixels.data)
    }

    /// [`encode_image`](Self::encode_image) on pixel values held elsewhere (a reused buffer).
    fn encode_pixels(&self, grid_thw: [u32; 3], data: &[f32]) -> OnnxResult<Vec<f32>> {
        let geo = self.geometry();
        let inputs = vision_inputs(&[grid_thw], &geo)?;
        let n = inputs.patches;
        let d = self.config.vision.patch_dim();
        if data.len() != n * d {
            return Err(crate::Error::Model(format!(
                "pixel values hold {} numbers; grid {:?} needs {n} patches of {d}",
                data.len(),
                grid_thw
            ))
            .into());
        }
        let m = inputs.window_index.len();
        let pos: Vec<i64> = inputs.pos_ids.iter().flat_map(|p| *p).collect();
        let err = run_err("vision");
        let started = Instant::now();
        let mut session = lock(&self.vision);
        let outputs = session
            .run(vec![
                (
                    Cow::from("pixel_values"),
                    SessionInputValue::from(
                        TensorRef::from_array_view(([n, d], data)).map_err(&err)?,
                    ),
                ),
                (
                    "pos_ids".into(),
                    TensorRef::from_array_view(([n, 2], &pos[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "window_index".into(),
                    TensorRef::from_array_view(([m], &inputs.window_index[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "reverse_index".into(),
                    TensorRef::from_array_view(([m], &inputs.reverse_index[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "window_mask".into(),
                    TensorRef::from_array_view(([n, n], &inputs.window_mask[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "full_mask".into(),
                    TensorRef::from_array_view(([n, n], &inputs.full_mask[..]))
                        .map_err(&err)?
                        .into(),
                ),
            ])
            .map_err(&err)?;
        let (shape, data) = outputs["image_embeds"]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        let hidden = self.config.text.hidden_size;
        if shape.len() != 2 || shape[0] as usize != m || shape[1] as usize != hidden {
            return Err(OnnxError::Run {
                graph: "vision",
                message: format!("image_embeds has shape {shape:?}, expected [{m}, {hidden}]"),
            });
        }
        tracing::debug!(grid = ?grid_thw, ms = started.elapsed().as_secs_f64() * 1e3, "vision encoder");
        Ok(data.to_vec())
    }

    /// Preprocesses and encodes one image, reusing cached features of an identical image.
    pub(super) fn encode_cached(&self, image: &Image) -> OnnxResult<Arc<Encoded>> {
        let cap = self.options.image_cache;
        let key = image_key(image);
        let dims = (image.width(), image.height());
        if cap > 0 {
            let mut cache = lock(&self.cache);
            if let Some(pos) = cache
                .entries
                .iter()
                .position(|(k, d, _)| *k == key && *d == dims)
            {
                let entry = cache.entries.remove(pos).expect("index from position");
                let enc = Arc::clone(&entry.2);
                cache.entries.push_front(entry);
                return Ok(enc);
            }
        }
        let enc = {
            let mut guard = lock(&self.pixels);
            let (preprocessor, buffer) = &mut *guard;
            let grid = preprocessor.preprocess_into(std::slice::from_ref(image), buffer)?[0];
            Arc::new(Encoded {
                grid,
                features: self.encode_pixels(grid, buffer)?,
            })
        };
        if cap > 0 {
            let mut cache = lock(&self.cache);
            cache.entries.push_front((key, dims, Arc::clone(&enc)));
            cache.entries.truncate(cap);
        }
        Ok(enc)
    }
}
