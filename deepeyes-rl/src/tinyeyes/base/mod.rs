//! The supervised base stage: what the paper's base model already knew, taught to TinyEyes from
//! scratch on SynthV* canvases, and nothing more.
//!
//! Every training sample is one conversation in [`TinyEyesFormat`], with the loss on some of the
//! assistant's tokens only:
//! - **grounding**: "Where is the small white card?" → `<answer>[x1, y1, x2, y2]</answer>`, the
//!   card's box on the 16 px grid the zoom calls use;
//! - **perception**: the colour question, a zoom call on a random box around the card, the crop
//!   as the tool returns it, then `<answer>colour</answer>`, with the loss on the answer only (so
//!   it teaches reading a crop, not when to zoom). The dot is repainted with a random answer
//!   colour in every crop, and the label follows, so the model cannot memorise canvases;
//! - **action format**: most often a direct `<answer>` with a uniformly guessed colour (the
//!   global view cannot tell), sometimes a zoom call on a *noisy* card box (shifted up to one bin
//!   per edge) followed by the answer the crop supports (the true colour when the crop shows the
//!   dot, else a guess). The loss covers the call and the answer: the base learns the tool-call
//!   format and uses it rarely and imprecisely. GRPO must teach when and where to zoom.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::AdamWConfig;
use burn::tensor::Tensor;
use deepeyes_core::CropRect;
use deepeyes_core::preprocess::Preprocessor;
use deepeyes_core::protocol::Rendered;
use deepeyes_core::{HfTokenizer, Image, Rng, TokenCodec};

use super::format::{COORDINATE_STEP, TinyEyesFormat};
use crate::checkpoint::{Checkpoint, CheckpointWriter, TrainState, prune_checkpoints};
use crate::network::{Batch, ComputeDevice, ImageInput, PadLayout, Qwen25Vl, Sequence, to_host};
use crate::schedule::{ScheduleConfig, ScheduleKind, grad_clip_factor};
use crate::synthv::{SynthVConfig, generate};
use crate::trainer::{TrainError, TrainResult, grad_norm_and_scale};

mod evaluate;
mod samples;

use samples::*;

/// The grounding question.
pub const GROUND_QUESTION: &str = "Where is the small white card? Give its box.";

/// Settings of the base stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BaseStageConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Conversations per step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW, β = (0.9, 0.98), weight decay 0.01).
    pub lr: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    /// Training canvases generated up front (samples are drawn from them with fresh boxes,
    /// crops and colours every time).
    pub pool_size: usize,
    /// Held-out canvases for the evaluation printed every `eval_every` steps.
    pub eval_items: usize,
    /// Steps between evaluations (0: only at the end).
    pub eval_every: u64,
    /// Shares of grounding, perception and action-format samples.
    pub mix: [f64; 3],
    /// Share of action-format samples that zoom (the rest answer directly).
    pub zoom_share: f64,
    /// Spread of the coordinate labels in bins (a Gaussian over neighbouring coordinates);
    /// 0 keeps hard labels.
    pub soft_coordinates: f64,
    /// Seed of the canvases and of the sampling.
    pub seed: u64,
}

impl Default for BaseStageConfig {
    fn default() -> Self {
        Self {
            steps: 4000,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 100,
            grad_clip: 1.0,
            pool_size: 2000,
            eval_items: 64,
            eval_every: 100,
            mix: [0.4, 0.25, 0.35],
            zoom_share: 0.25,
            soft_coordinates: 0.0,
            seed: 0,
        }
    }
}

impl BaseStageConfig {
    /// Checks the values, naming the first one at fault.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |name: &'static str, reason: &str| {
            Err(crate::Error::InvalidArgument {
                name,
                reason: reason.to_string(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch-size", "must be at least 1");
        }
        if self.pool_size == 0 {
            return bad("pool-size", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", "must be a positive number");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip > 0.0) {
            return bad("grad-clip", "must be a positive number");
        }
        let mix_ok = self.mix.iter().all(|m| m.is_finite() && *m >= 0.0)
            && self.mix.iter().sum::<f64>() > 0.0;
        if !mix_ok {
            return bad("mix", "needs three non-negative shares, not all zero");
        }
        if !(0.0..=1.0).contains(&self.zoom_share) {
            return bad("zoom-share", "must lie in [0, 1]");
        }
        if !(self.soft_coordinates.is_finite() && self.soft_coordinates >= 0.0) {
            return bad(
                "soft-coordinates",
                "must be 0 (hard labels) or a positive spread",
            );
        }
        Ok(())
    }
}

/// One canvas, kept small: its global view (already preprocessed), and the pixels around the
/// card that every crop is cut from.
struct Canvas {
    view: ImageInput,
    /// The canvas pixels within [`REGION`] px of the card, and where they sit on the canvas.
    region: Image,
    region_origin: (u32, u32),
    canvas: (u32, u32),
    card: [u32; 4],
    dot: [u32; 4],
    colour: usize,
    question_stem: String,
}

/// The widest perception crop, in bins (112 px: the crop reaches the model at full scale, so the
/// dot's 2 px checkerboard stays sharp).
const MAX_PERCEPTION_BINS: u32 = 7;

/// How far around the card crops may reach (the widest crop plus a bin of slack).
const REGION: u32 = (MAX_PERCEPTION_BINS + 1) * COORDINATE_STEP;

/// The teacher-forced quality of the base, on held-out canvases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BaseEval {
    /// Mean IoU of the grounding box (argmax coordinates) with the card.
    pub ground_iou: f64,
    /// Share of grounding boxes that contain the dot's centre.
    pub ground_hit: f64,
    /// Accuracy of the answer after a crop that contains the card.
    pub perception_acc: f64,
    /// Mean probability of `<tool_call>` as the first token of a colour question.
    pub zoom_prob: f64,
    /// Share of global views whose `<|vision_end|>` names the merged cell holding the card (the
    /// auxiliary target): whether the model finds the card at all, before placing a box on it.
    pub card_cell_acc: f64,
    /// Share of global views whose token most likely to say ` card` is the one over the card.
    pub card_token_acc: f64,
}

/// One step's numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseStep {
    /// Step index (from 0).
    pub step: u64,
    /// Mean negative log-likelihood per supervised token.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step.
    pub seconds: f64,
}

/// A sample: the sequence and which of its tokens carry the loss.
struct Sample {
    sequence: Sequence,
    supervised: Vec<bool>,
    /// The merged cell of the global view that holds the card (raster order).
    card_cell: Option<usize>,
    /// For a crop that shows the dot: the crop's merged cell holding the dot centre, and the
    /// dot's colour (an index into the SynthV* colours).
    crop_dot: Option<(usize, usize)>,
}

/// The word the global-view token over the card predicts in the auxiliary objective.
const CARD_WORD: &str = " card";

/// Weight of the auxiliary objectives relative to the main loss.
const AUX_WEIGHT: f32 = 1.0;

/// The base stage in progress.
pub struct BaseStage {
    config: BaseStageConfig,
    synthv: SynthVConfig,
    format: TinyEyesFormat,
    tokenizer: HfTokenizer,
    preprocessor: Preprocessor,
    model: Option<Qwen25Vl>,
    optim: burn::optim::ModuleOptimizer,
    train: Vec<Canvas>,
    eval: Vec<Canvas>,
    step: u64,
    colour_tokens: Vec<u32>,
    /// ` card`: what the global-view token holding the card predicts (an auxiliary target).
    card_token: u32,
    coordinate_tokens: Vec<(u32, u32)>,
    /// `<answer>` and `<tool_call>` in the tokenizer.
    answer_id: u32,
    tool_call_id: u32,
}

impl std::fmt::Debug for BaseStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseStage")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

fn data_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl BaseStage {
    /// Loads the checkpoint in `dir` (from `init-tinyeyes`, or an earlier base stage) and
    /// generates the canvases.
    pub fn new(dir: &Path, config: BaseStageConfig) -> TrainResult<Self> {
        config.validate()?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer =
            HfTokenizer::from_file(&tokenizer_path).map_err(|e| data_err(&tokenizer_path, e))?;
        let device = ComputeDevice::Flex.device(true)?;
        let model = Qwen25Vl::from_pretrained(dir, &device)?;
        let format = TinyEyesFormat::default();
        let synthv = SynthVConfig::default();
        let mut preprocessor = Preprocessor::new(format.preprocess)?;
        let started = Instant::now();
        let make = |split: &str, n: usize, pre: &mut Preprocessor| {
            let seed = crate::synthv::split_seed(config.seed, split);
            (0..n as u64)
                .map(|i| canvas(&synthv, seed, i, split, pre))
                .collect::<TrainResult<Vec<_>>>()
        };
        let train = make("base-train", config.pool_size, &mut preprocessor)?;
        let eval = make("base-eval", config.eval_items, &mut preprocessor)?;
        tracing::info!(
            train = train.len(),
            eval = eval.len(),
            seconds = started.elapsed().as_secs_f64(),
            "generated base-stage canvases"
        );
        let single = |text: &str| -> TrainResult<u32> {
            let ids = tokenizer
                .encode(text)
                .map_err(|e| data_err(&tokenizer_path, e))?;
            match ids[..] {
                [id] => Ok(id),
                ref ids => Err(data_err(
                    &tokenizer_path,
                    format!("{text:?} is {} tokens, expected one", ids.len()),
                )),
            }
        };
        let colour_tokens = synthv
            .colours
            .iter()
            .map(|c| single(&c.name))
            .collect::<TrainResult<Vec<_>>>()?;
        // Coordinates follow `[` (a left or top edge, no space: at most 2 bins from the far side) or `, `
        // (with a space).
        let last = 1024 / COORDINATE_STEP;
        let coordinate_tokens = (0..=last)
            .map(|k| {
                let v = k * COORDINATE_STEP;
                let bare = if k + 2 <= last {
                    single(&v.to_string())?
                } else {
                    u32::MAX
                };
                Ok((bare, single(&format!(" {v}"))?))
            })
            .collect::<TrainResult<Vec<_>>>()?;
        let card_token = single(CARD_WORD)?;
        let answer_id = single(deepeyes_core::protocol::ANSWER_START)?;
        let tool_call_id = single(deepeyes_core::protocol::TOOL_CALL_START)?;
        let optim = AdamWConfig::new()
            .with_beta_2(0.98)
            .with_weight_decay(0.01)
            .init();
        Ok(Self {
            config,
            synthv,
            format,
            tokenizer,
            preprocessor,
            model: Some(model),
            optim,
            train,
            eval,
            step: 0,
            colour_tokens,
            card_token,
            coordinate_tokens,
            answer_id,
            tool_call_id,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Qwen25Vl {
        self.model
            .as_ref()
            .expect("the model is present between steps")
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One optimizer step on a fresh batch.
    pub fn train_step(&mut self) -> TrainResult<BaseStep> {
        let started = Instant::now();
        let mut rng = Rng::new(Rng::derive_seed(self.config.seed, &[1, self.step]));
        let mut samples = Vec::with_capacity(self.config.batch_size);
        let total: f64 = self.config.mix.iter().sum();
        let [g, p, _] = self.config.mix.map(|m| m / total);
        for _ in 0..self.config.batch_size {
            let ci = rng.below(self.train.len() as u64) as usize;
            let r = rng.next_f64();
            let sample = if r < g {
                self.ground_sample(&self.train[ci])?
            } else if r < g + p {
                self.perceive_sample(ci, &mut rng, false)?
            } else {
                self.act_sample(ci, &mut rng)?
            };
            samples.push(sample);
        }
        let schedule = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: self.config.warmup_steps,
            min_lr_ratio: 0.1,
        };
        let lr = schedule.lr(self.config.lr, self.step, self.config.steps);
        let model = self
            .model
            .take()
            .expect("the model is present between steps");
        let seqs: Vec<Sequence> = samples.iter().map(|s| s.sequence.clone()).collect();
        let batch = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
        // The supervised tokens: `batch.targets` says which expanded position predicts each.
        let mut picks = Vec::new();
        let mut weights = Vec::new();
        let cols = batch.score_len;
        let mut supervised = 0usize;
        for &(cell, position, token) in &batch.targets {
            let (i, t) = (cell / cols, cell % cols);
            if !samples[i].supervised.get(t).copied().unwrap_or(false) {
                continue;
            }
            supervised += 1;
            // A coordinate's target is spread over its neighbours (soft labels) when asked.
            for (token, weight) in self.soft_targets(token) {
                picks.push((position, token));
                weights.push(weight);
            }
        }
        let main = supervised.max(1) as f32;
        weights.iter_mut().for_each(|w| *w /= main);
        // Auxiliary objectives on the global view (base stage only; they read the image tokens'
        // hidden states through the language-model head, at positions that never generate).
        let aux = self.aux_picks(&batch, &samples, model.config.image_token_id);
        let aux_weight = AUX_WEIGHT / aux.len().max(1) as f32;
        weights.extend(std::iter::repeat_n(aux_weight, aux.len()));
        picks.extend(aux);
        let logp = model.score_positions(&batch, &picks)?;
        let w = Tensor::<1>::from_data(
            burn::tensor::TensorData::new(weights, [picks.len()]),
            &model.device(),
        );
        let nll: Tensor<1> = (w * logp).sum().neg();
        let loss = f64::from(to_host(nll.clone().detach())[0]);
        let grads = nll.backward();
        let mut grads = burn::optim::GradientsParams::from_grads(grads, &model);
        let grad_norm = grad_norm_and_scale(&model, &mut grads, None);
        let model = if grad_norm.is_finite() {
            let factor = grad_clip_factor(grad_norm, Some(self.config.grad_clip))?;
            if factor < 1.0 {
                grad_norm_and_scale(&model, &mut grads, Some(factor));
            }
            self.optim.step(lr, model, grads)
        } else {
            tracing::warn!(step = self.step, "non-finite gradient norm; update skipped");
            model
        };
        self.model = Some(model);
        let out = BaseStep {
            step: self.step,
            loss,
            lr,
            grad_norm,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.step += 1;
        Ok(out)
    }

    /// The auxiliary targets of a batch, as `(flat expanded position, token)`: the merged token
    /// of the global view over the card predicts ` card`, every other one its own cell index `k`
    /// (as the coordinate token of `64·k`), teaching the image tokens what and where they are;
    /// the `<|vision_end|>` after the view predicts the index of the cell holding the card,
    /// teaching the model to carry the card's place to the text.
    fn aux_picks(&self, batch: &Batch, samples: &[Sample], pad: u32) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            let row = &batch.input_ids[i * batch.seq..(i + 1) * batch.seq];
            let Some(start) = row.iter().position(|&id| id == pad) else {
                continue;
            };
            let run = row[start..].iter().take_while(|&&id| id == pad).count();
            for k in 0..run {
                // The token over the card says so (a local detector: finding the card needs no
                // routing then); the others name their cell.
                let token = if s.card_cell == Some(k) {
                    self.card_token
                } else {
                    self.cell_token(k, run)
                };
                out.push((i * batch.seq + start + k, token));
            }
            if let Some(cell) = s.card_cell {
                let end = start + run;
                if end < batch.seq {
                    out.push((i * batch.seq + end, self.cell_token(cell, run)));
                }
            }
            // The crop: the token over the dot, and the `<|vision_end|>` after the crop, name
            // the dot's colour.
            if let Some((cell, colour)) = s.crop_dot {
                let after = start + run;
                let Some(second) = row[after..].iter().position(|&id| id == pad) else {
                    continue;
                };
                let second = after + second;
                let run = row[second..].iter().take_while(|&&id| id == pad).count();
                let token = self.colour_tokens[colour];
                if cell < run {
                    out.push((i * batch.seq + second + cell, token));
                }
                if second + run < batch.seq {
                    out.push((i * batch.seq + second + run, token));
                }
            }
        }
        out
    }

    /// The training targets of a supervised token with their weights (summing to 1): the token
    /// itself, or for a coordinate with `soft_coordinates = σ > 0`, a Gaussian over the
    /// coordinates within 2σ bins in the same form (bare or after a space).
    fn soft_targets(&self, token: u32) -> Vec<(u32, f32)> {
        let sigma = self.config.soft_coordinates;
        let found = self
            .coordinate_tokens
            .iter()
            .enumerate()
            .find_map(|(k, &(bare, spaced))| {
                (token == bare)
                    .then_some((k, false))
                    .or((token == spaced).then_some((k, true)))
            });
        let Some((k, spaced)) = found.filter(|_| sigma > 0.0) else {
            return vec![(token, 1.0)];
        };
        let reach = (2.0 * sigma).ceil() as i64;
        let mut out: Vec<(u32, f32)> = (-reach..=reach)
            .filter_map(|d| {
                let j = usize::try_from(k as i64 + d).ok()?;
                let &(bare, with_space) = self.coordinate_tokens.get(j)?;
                let id = if spaced { with_space } else { bare };
                (id != u32::MAX)
                    .then(|| (id, (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32))
            })
            .collect();
        let total: f32 = out.iter().map(|(_, w)| w).sum();
        out.iter_mut().for_each(|(_, w)| *w /= total);
        out
    }

    /// The coordinate token naming cell `k` of `cells`: `64·k` on the 16-cell view.
    fn cell_token(&self, k: usize, cells: usize) -> u32 {
        let last = self.coordinate_tokens.len() - 1;
        let idx = (k * last / cells.max(1)).min(last);
        self.coordinate_tokens[idx].1
    }

    /// Saves the run as checkpoint `root/step-NNNNNNNN` in the one checkpoint format
    /// ([`crate::checkpoint`]: fsynced, hashed in a manifest with the resolved settings,
    /// published by one rename): the weights as a Hugging Face checkpoint (tokenizer, configs
    /// and prompt templates copied from `source`) and the AdamW state
    /// ([`BASE_OPTIMIZER_FILE`]); the manifest's state holds the step and seed, so
    /// [`BaseStage::resume`] continues exactly where it stopped. The two newest checkpoints are
    /// kept, so a damaged one has a fallback.
    pub fn save(&self, source: &Path, root: &Path) -> TrainResult<PathBuf> {
        let mut writer = CheckpointWriter::begin(root, self.step)?;
        let dir = writer.dir().to_path_buf();
        let mut files = Vec::new();
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
            "generation_config.json",
            deepeyes_core::protocol::BUNDLE_TEMPLATES_FILE,
            deepeyes_core::agent::BUNDLE_AGENT_FILE,
        ] {
            let from = source.join(file);
            if from.is_file() {
                std::fs::copy(&from, dir.join(file)).map_err(io_at(&from))?;
                files.push(file);
            }
        }
        // Keep the token ids transformers needs (save_pretrained writes the architecture only).
        let keep = std::fs::read_to_string(source.join("config.json")).ok();
        self.model().save_pretrained(&dir)?;
        if let Some(text) = keep {
            let path = dir.join("config.json");
            std::fs::write(&path, text).map_err(io_at(&path))?;
        }
        for file in files
            .into_iter()
            .chain(["config.json", "model.safetensors"])
        {
            writer.adopt(file)?;
        }
        let bytes = self.optim.into_bytes().map_err(|e| TrainError::Data {
            path: root.to_path_buf(),
            reason: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        writer.add_bytes(BASE_OPTIMIZER_FILE, &bytes[..])?;
        let mut state = TrainState::new(self.step);
        state.extra = serde_json::json!({ "seed": self.config.seed });
        let settings = toml::to_string(&self.config)
            .map_err(|e| data_err(root, format!("cannot write the settings: {e}")))?;
        let saved = writer.commit(&state, &settings)?;
        prune_checkpoints(root, 2)?;
        Ok(saved)
    }

    /// Continues the run saved by [`BaseStage::save`] in `checkpoint` (the newest intact one,
    /// as [`crate::checkpoint::latest_intact`] finds it): its weights, optimizer state and step.
    /// Canvases and batches are derived from the seed and the step, so the steps that follow
    /// are those of an uninterrupted run with the same `config`.
    pub fn resume(checkpoint: &Checkpoint, config: BaseStageConfig) -> TrainResult<Self> {
        let state = checkpoint.state();
        let seed = state.extra["seed"].as_u64();
        if seed != Some(config.seed) {
            return Err(data_err(
                checkpoint.dir(),
                format!(
                    "the run used seed {seed:?}, not {}; resume with the run's settings",
                    config.seed
                ),
            ));
        }
        let mut stage = Self::new(checkpoint.dir(), config)?;
        let bytes = checkpoint.read_blob(BASE_OPTIMIZER_FILE)?;
        stage.optim = stage
            .optim
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| data_err(checkpoint.dir(), format!("not an optimizer state: {e:?}")))?;
        stage.step = state.step;
        Ok(stage)
    }
}

/// The AdamW state inside a base-stage checkpoint.
pub const BASE_OPTIMIZER_FILE: &str = "optimizer.bpk";

/// An I/O error at `path`.
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canvases(n: u64) -> Vec<Canvas> {
        let synthv = SynthVConfig::default();
        let mut pre = Preprocessor::new(TinyEyesFormat::default().preprocess).unwrap();
        (0..n)
            .map(|i| canvas(&synthv, 9, i, "test", &mut pre).unwrap())
            .collect()
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            (
                "batch-size",
                BaseStageConfig {
                    batch_size: 0,
                    ..BaseStageConfig::default()
                },
            ),
            (
                "pool-size",
                BaseStageConfig {
                    pool_size: 0,
                    ..BaseStageConfig::default()
                },
            ),
            (
                "lr",
                BaseStageConfig {
                    lr: f64::NAN,
                    ..BaseStageConfig::default()
                },
            ),
            (
                "mix",
                BaseStageConfig {
                    mix: [0.0; 3],
                    ..BaseStageConfig::default()
                },
            ),
            (
                "soft-coordinates",
                BaseStageConfig {
                    soft_coordinates: -1.0,
                    ..BaseStageConfig::default()
                },
            ),
        ];
        for (name, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
        BaseStageConfig::default().validate().unwrap();
    }

    #[test]
    fn the_view_is_sixteen_cells_and_the_card_cell_holds_the_card() {
        for c in canvases(6) {
            assert_eq!(c.view.grid, [1, 8, 8]);
            let cell = card_cell(&c);
            let (cx, cy) = ((c.card[0] + c.card[2]) / 2, (c.card[1] + c.card[3]) / 2);
            assert_eq!(
                cell,
                (cy / 256 * 4 + cx / 256) as usize,
                "card at {cx},{cy}"
            );
        }
    }

    #[test]
    fn perception_crops_show_the_repainted_dot_in_its_cell() {
        let synthv = SynthVConfig::default();
        let mut rng = Rng::new(4);
        for c in canvases(6) {
            let grid = BaseStage::grid_box(&c);
            for colour in 0..synthv.colours.len() {
                let crop = crop_image(&synthv, &c, grid, Some(colour), &mut rng).unwrap();
                let (a, b) = (synthv.colours[colour].rgb, synthv.colours[colour].partner());
                // Both checkerboard colours appear (within the noise) and no other answer's.
                let near = |rgb: [u8; 3]| {
                    crop.as_raw()
                        .chunks_exact(3)
                        .filter(|p| {
                            p.iter()
                                .zip(rgb)
                                .all(|(&v, w)| (i32::from(v) - i32::from(w)).abs() <= 14)
                        })
                        .count()
                };
                assert!(
                    near(a) >= 8 && near(b) >= 8,
                    "colour {colour}: {} / {}",
                    near(a),
                    near(b)
                );
                let cell = dot_cell(&c, grid, [1, 8, 8]).expect("the card box shows the dot");
                assert!(cell < 16);
            }
        }
    }

    #[test]
    fn boxes_around_the_card_contain_it_on_the_grid() {
        let mut rng = Rng::new(2);
        for c in canvases(6) {
            for _ in 0..20 {
                let b = BaseStage::box_around(&c, &mut rng);
                assert!(
                    b[0] <= c.card[0] && c.card[2] <= b[2],
                    "{b:?} vs {:?}",
                    c.card
                );
                assert!(
                    b[1] <= c.card[1] && c.card[3] <= b[3],
                    "{b:?} vs {:?}",
                    c.card
                );
                assert!(b.iter().all(|v| v % COORDINATE_STEP == 0));
                let bins = (
                    (b[2] - b[0]) / COORDINATE_STEP,
                    (b[3] - b[1]) / COORDINATE_STEP,
                );
                assert!((2..=MAX_PERCEPTION_BINS).contains(&bins.0), "{bins:?}");
                assert!((2..=MAX_PERCEPTION_BINS).contains(&bins.1), "{bins:?}");
            }
        }
    }
}
