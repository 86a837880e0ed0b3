//! The supervised base stage: what the paper's base model already knew, taught to TinyEyes from
//! scratch on SynthV* canvases, and nothing more.
//!
//! Canvases come from TinyEyes' distribution ([`SynthVConfig::tinyeyes`]: any size and shape,
//! 0–2 decoy cards), after a first phase of 1024 × 1024 single-card canvases
//! (`square-steps`); every box is in the zoom tool's `resized` frame
//! ([`super::format::TOOLS_TOML`]), pixels of the view the model sees.
//!
//! Every training sample is one conversation in [`TinyEyesFormat`], with the loss on some of the
//! assistant's tokens only:
//! - **grounding**: "Where is the small white card?" → `<answer>[x1, y1, x2, y2]</answer>`, the
//!   leftmost card's box (one right answer whatever the number of cards), [`MIN_BOX_BINS`]
//!   steps a side centred on it;
//! - **perception**: the colour question, a zoom call on a random box around the dotted card
//!   (on half the canvases with decoys, a decoy's crop before or after it), the crops as the
//!   tool returns them, then `<answer>colour</answer>`, with the loss on the answer only (so it
//!   teaches reading a crop, not when to zoom), weighted `perception-weight`. The dot is
//!   repainted with a random answer colour in every crop, and the label follows, so the model
//!   cannot memorise canvases;
//! - **action format**: most often a direct `<answer>` with a uniformly guessed colour (the
//!   global view cannot tell), sometimes a zoom call on a *noisy* box of the leftmost card
//!   (moved up to a step) and, on canvases with decoys and whatever the first crop showed, a
//!   second call on the next card to the right (`second-look-share` of them), followed by the
//!   answer the crops support. The loss covers
//!   the calls and the answer: the base learns the format of a look and of a second look, and
//!   uses them rarely and imprecisely. GRPO must teach when and where to look.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use deepeyes_core::CropRect;
use deepeyes_core::preprocess::Preprocessor;
use deepeyes_core::protocol::Rendered;
use deepeyes_core::{HfTokenizer, Image, Rng, TokenCodec};

use super::format::{
    COORDINATE_STEP, MAX_COORDINATE, MIN_BOX_BINS, TinyEyesFormat, ZOOM_FRAME, ZOOM_LIMITS,
};
use crate::checkpoint::{Checkpoint, CheckpointWriter, TrainState, prune_checkpoints};
use crate::network::{
    Batch, ComputeDevice, ImageInput, PadLayout, Qwen25Vl, Sequence, on_forks, to_host,
};
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
    /// Weight of a perception sample's supervised tokens in the token-mean loss (the colour
    /// word is one token of hundreds a batch; at 1 perception stayed at chance).
    pub perception_weight: f64,
    /// Steps drawn from 1024 × 1024 single-card canvases (SynthV*'s defaults) before TinyEyes'
    /// distribution: finding one card at one scale first.
    pub square_steps: u64,
    /// Share of action-format samples that zoom (the rest answer directly).
    pub zoom_share: f64,
    /// Share of those zooms, on canvases with a card right of the first one looked at, that
    /// look again at that card whatever the first crop showed (the format of a second look;
    /// at 0.5 the base sampled one on a tenth of its looks only).
    pub second_look_share: f64,
    /// Most looks in the action format's left-to-right scan (2: the leftmost card and the one
    /// right of it). The bundle's `agent.toml` must allow one turn more than this.
    pub max_looks: u32,
    /// Spread of the coordinate labels in bins (a Gaussian over neighbouring coordinates);
    /// 0 keeps hard labels.
    pub soft_coordinates: f64,
    /// Seed of the canvases and of the sampling.
    pub seed: u64,
}

impl Default for BaseStageConfig {
    fn default() -> Self {
        Self {
            steps: 3400,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 100,
            grad_clip: 1.0,
            pool_size: 2000,
            eval_items: 64,
            eval_every: 100,
            mix: [0.45, 0.30, 0.25],
            perception_weight: 3.0,
            square_steps: 1800,
            zoom_share: 0.25,
            second_look_share: 1.0,
            max_looks: 2,
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
        if !(self.perception_weight.is_finite() && self.perception_weight > 0.0) {
            return bad("perception-weight", "must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.zoom_share) {
            return bad("zoom-share", "must lie in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.second_look_share) {
            return bad("second-look-share", "must lie in [0, 1]");
        }
        if !(1..=MAX_SCAN_LOOKS).contains(&self.max_looks) {
            return bad("max-looks", &format!("must lie in [1, {MAX_SCAN_LOOKS}]"));
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

/// The most looks the action format's scan may take ([`BaseStageConfig::max_looks`]).
const MAX_SCAN_LOOKS: u32 = 8;

/// The widest perception crop, in coordinate steps (10 view px, about twice a card): a wider
/// crop of a large canvas is shrunk to the view and blurs the dot's checkerboard.
const MAX_PERCEPTION_BINS: u32 = 5;

/// The batch's gradient is computed in this many parts at once, each on its own fork of the
/// model (burn's backward pass holds its graph's lock throughout, so one graph uses one core).
const GRADIENT_PARTS: usize = 4;

/// The teacher-forced quality of the base, on held-out canvases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BaseEval {
    /// Mean IoU of the grounding box (argmax coordinates, mapped to the canvas) with the
    /// nearest white card.
    pub ground_iou: f64,
    /// Share of grounding boxes that hold a white card's centre.
    pub ground_hit: f64,
    /// Accuracy of the answer after a crop that contains the dotted card.
    pub perception_acc: f64,
    /// Mean probability of `<tool_call>` as the first token of a colour question.
    pub zoom_prob: f64,
    /// Share of global views whose `<|vision_end|>` names the merged cell holding the leftmost
    /// card (the auxiliary target): whether the model finds the card it must ground, before
    /// placing a box on it.
    pub card_cell_acc: f64,
    /// Share of global views whose token most likely to say ` card` is over a card.
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
    /// The weight of each supervised token in the loss.
    weight: f32,
    /// The merged cells of the global view (raster order) that hold a card.
    card_cells: Vec<usize>,
    /// The merged cell of the card the grounding question is answered with.
    ground_cell: Option<usize>,
    /// Merged columns of the global view.
    merged_width: usize,
    /// For each crop that shows the dot: the image's index in the sequence, its merged cell
    /// holding the dot's centre, and the dot's colour (an index into the SynthV* colours).
    crop_dots: Vec<(usize, usize, usize)>,
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
    /// 1024 × 1024 single-card canvases of the first `square-steps` steps.
    squares: Vec<Arc<Canvas>>,
    train: Vec<Arc<Canvas>>,
    eval: Vec<Arc<Canvas>>,
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
        let synthv = SynthVConfig::tinyeyes();
        let mut preprocessor = Preprocessor::new(format.preprocess)?;
        let started = Instant::now();
        let make = |synthv: &SynthVConfig, split: &str, n: usize, pre: &mut Preprocessor| {
            let seed = crate::synthv::split_seed(config.seed, split);
            (0..n as u64)
                .map(|i| canvas(synthv, seed, i, split, pre).map(Arc::new))
                .collect::<TrainResult<Vec<_>>>()
        };
        let squares = if config.square_steps > 0 {
            let square = SynthVConfig::default();
            make(&square, "base-square", config.pool_size, &mut preprocessor)?
        } else {
            Vec::new()
        };
        let train = make(&synthv, "base-train", config.pool_size, &mut preprocessor)?;
        let eval = make(&synthv, "base-eval", config.eval_items, &mut preprocessor)?;
        tracing::info!(
            squares = squares.len(),
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
        // Coordinates follow `[` (a left edge, no space: at least a box's width from the far
        // side) or `, ` (with a space).
        let last = MAX_COORDINATE / COORDINATE_STEP;
        let coordinate_tokens = (0..=last)
            .map(|k| {
                let v = k * COORDINATE_STEP;
                let bare = if k + MIN_BOX_BINS <= last {
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
            squares,
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
        let samples = self.draw_batch()?;
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
        let gradients = self.gradients(&model, &samples);
        let (loss, mut grads) = match gradients {
            Ok(v) => v,
            Err(e) => {
                self.model = Some(model);
                return Err(e);
            }
        };
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

    /// The step's samples, drawn from its seed: square canvases in the first `square-steps`
    /// steps, TinyEyes' distribution after.
    fn draw_batch(&mut self) -> TrainResult<Vec<Sample>> {
        let mut rng = Rng::new(Rng::derive_seed(self.config.seed, &[1, self.step]));
        let total: f64 = self.config.mix.iter().sum();
        let [g, p, _] = self.config.mix.map(|m| m / total);
        let square = self.step < self.config.square_steps && !self.squares.is_empty();
        let mut samples = Vec::with_capacity(self.config.batch_size);
        for _ in 0..self.config.batch_size {
            let pool = if square { &self.squares } else { &self.train };
            let c = Arc::clone(&pool[rng.below(pool.len() as u64) as usize]);
            let r = rng.next_f64();
            samples.push(if r < g {
                self.ground_sample(&c)?
            } else if r < g + p {
                self.perceive_sample(c, &mut rng, false)?
            } else {
                self.act_sample(c, &mut rng)?
            });
        }
        Ok(samples)
    }

    /// The loss of `samples` (mean negative log-likelihood per supervised token, each weighted
    /// by its sample's weight, plus the auxiliary objectives) and its gradients, computed in
    /// [`GRADIENT_PARTS`] parts at once: each part's loss is its share of the whole batch's, so
    /// the parts' gradients add up to the batch's.
    fn gradients(
        &self,
        model: &Qwen25Vl,
        samples: &[Sample],
    ) -> TrainResult<(f64, GradientsParams)> {
        let per_part = samples.len().div_ceil(GRADIENT_PARTS).max(1);
        let mut parts = Vec::new();
        for chunk in samples.chunks(per_part) {
            parts.push(self.part_terms(model, chunk)?);
        }
        let main: f32 = parts.iter().map(|p| p.supervised).sum::<f32>().max(1.0);
        let aux: usize = parts.iter().map(|p| p.aux).sum::<usize>().max(1);
        let scale = |p: &mut PartTerms| {
            for (w, is_aux) in p.weights.iter_mut().zip(&p.is_aux) {
                *w /= if *is_aux {
                    aux as f32 / AUX_WEIGHT
                } else {
                    main
                };
            }
        };
        parts.iter_mut().for_each(scale);
        let results = on_forks(model, &parts, |model, part| part.backward(model));
        let mut accumulator = GradientsAccumulator::<Qwen25Vl>::new();
        let mut loss = 0.0;
        for result in results {
            let (part_loss, grads) = result?;
            loss += part_loss;
            accumulator.accumulate(model, grads);
        }
        Ok((loss, accumulator.grads()))
    }

    /// A part's batch and what its loss reads: the supervised tokens (a coordinate's target
    /// spread over its neighbours with soft labels) and the auxiliary targets, with unscaled
    /// weights.
    fn part_terms(&self, model: &Qwen25Vl, samples: &[Sample]) -> TrainResult<PartTerms> {
        let seqs: Vec<Sequence> = samples.iter().map(|s| s.sequence.clone()).collect();
        let batch = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
        let mut picks = Vec::new();
        let mut weights = Vec::new();
        let mut supervised = 0.0;
        let cols = batch.score_len;
        // `batch.targets` says which expanded position predicts each token.
        for &(cell, position, token) in &batch.targets {
            let (i, t) = (cell / cols, cell % cols);
            if !samples[i].supervised.get(t).copied().unwrap_or(false) {
                continue;
            }
            let weight = samples[i].weight;
            supervised += weight;
            for (token, share) in self.soft_targets(token) {
                picks.push((position, token));
                weights.push(weight * share);
            }
        }
        let mut is_aux = vec![false; picks.len()];
        // Auxiliary objectives (base stage only; they read the image tokens' hidden states
        // through the language-model head, at positions that never generate).
        let aux = self.aux_picks(&batch, samples, model.config.image_token_id);
        is_aux.extend(std::iter::repeat_n(true, aux.len()));
        weights.extend(std::iter::repeat_n(1.0, aux.len()));
        let aux_count = aux.len();
        picks.extend(aux);
        Ok(PartTerms {
            batch,
            picks,
            weights,
            is_aux,
            supervised,
            aux: aux_count,
        })
    }

    /// The auxiliary targets of a batch, as `(flat expanded position, token)`: the merged tokens
    /// of the global view over a card predict ` card`, every other one its cell code (a local
    /// detector and a sense of place for the image tokens); the `<|vision_end|>` after the view
    /// predicts the code of the cell holding the leftmost card, carrying the place the grounding
    /// answer needs to the text; in a crop that shows the dot, the token over it and the
    /// `<|vision_end|>` after the crop name its colour.
    fn aux_picks(&self, batch: &Batch, samples: &[Sample], pad: u32) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            let row = &batch.input_ids[i * batch.seq..(i + 1) * batch.seq];
            let runs = pad_runs(row, pad);
            let Some(&(start, run)) = runs.first() else {
                continue;
            };
            let at = |e: usize| i * batch.seq + e;
            for k in 0..run {
                let token = if s.card_cells.contains(&k) {
                    self.card_token
                } else {
                    self.cell_token(k, s.merged_width)
                };
                out.push((at(start + k), token));
            }
            if let Some(cell) = s.ground_cell
                && start + run < batch.seq
            {
                out.push((at(start + run), self.cell_token(cell, s.merged_width)));
            }
            for &(image, cell, colour) in &s.crop_dots {
                let Some(&(start, run)) = runs.get(image) else {
                    continue;
                };
                let token = self.colour_tokens[colour];
                if cell < run {
                    out.push((at(start + cell), token));
                }
                if start + run < batch.seq {
                    out.push((at(start + run), token));
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

    /// The token naming merged cell `k` (raster order) of a view `merged_width` cells wide:
    /// the coordinate token at index `column × 8 + row`, a code that grows with x as the
    /// coordinates do, whatever the view's shape.
    fn cell_token(&self, k: usize, merged_width: usize) -> u32 {
        let width = merged_width.max(1);
        let code = (k % width) * 8 + k / width;
        let last = self.coordinate_tokens.len() - 1;
        self.coordinate_tokens[code.min(last)].1
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
            deepeyes_core::tool::BUNDLE_TOOLS_FILE,
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

/// One part of a batch's loss ([`BaseStage::gradients`]).
struct PartTerms {
    batch: Batch,
    /// `(flat expanded position, target token)`.
    picks: Vec<(usize, u32)>,
    /// Each pick's weight: unscaled when built, then divided by the batch's totals.
    weights: Vec<f32>,
    is_aux: Vec<bool>,
    /// The summed weights of the part's supervised tokens.
    supervised: f32,
    /// The part's auxiliary targets.
    aux: usize,
}

impl PartTerms {
    /// The part's loss and its gradients on `model`.
    fn backward(&self, model: &Qwen25Vl) -> TrainResult<(f64, GradientsParams)> {
        let logp = model.score_positions(&self.batch, &self.picks)?;
        let w = Tensor::<1>::from_data(
            burn::tensor::TensorData::new(self.weights.clone(), [self.picks.len()]),
            &model.device(),
        );
        let nll: Tensor<1> = (w * logp).sum().neg();
        let loss = f64::from(to_host(nll.clone().detach())[0]);
        let grads = GradientsParams::from_grads(nll.backward(), model);
        Ok((loss, grads))
    }
}

/// The runs of `pad` in a batch row, as `(start, length)`: one per image, in order.
fn pad_runs(row: &[u32], pad: u32) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut e = 0;
    while e < row.len() {
        if row[e] == pad {
            let run = row[e..].iter().take_while(|&&id| id == pad).count();
            runs.push((e, run));
            e += run;
        } else {
            e += 1;
        }
    }
    runs
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

    fn canvases_of(synthv: &SynthVConfig, n: u64) -> Vec<Canvas> {
        let mut pre = Preprocessor::new(TinyEyesFormat::default().preprocess).unwrap();
        (0..n)
            .map(|i| canvas(synthv, 9, i, "test", &mut pre).unwrap())
            .collect()
    }

    fn canvases(n: u64) -> Vec<Canvas> {
        canvases_of(&SynthVConfig::tinyeyes(), n)
    }

    static TEST_CANVASES: std::sync::LazyLock<Vec<Canvas>> =
        std::sync::LazyLock::new(|| canvases(40));

    use crate::tinyeyes::format::TOOLS_TOML;

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
                "second-look-share",
                BaseStageConfig {
                    second_look_share: 1.5,
                    ..BaseStageConfig::default()
                },
            ),
            (
                "max-looks",
                BaseStageConfig {
                    max_looks: 0,
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
    fn a_search_from_the_leftmost_card_rightwards_visits_every_card_once_in_order() {
        let mut several = 0;
        for c in TEST_CANVASES.iter() {
            let mut seen = vec![c.leftmost()];
            while let Some(next) = c.right_of(*seen.last().unwrap()) {
                assert!(!seen.contains(&next), "card {next} twice on {:?}", c.canvas);
                seen.push(next);
            }
            assert_eq!(seen.len(), c.cards.len(), "cards missed on {:?}", c.canvas);
            let centres: Vec<u32> = seen
                .iter()
                .map(|&k| c.cards[k].doubled_centre_x())
                .collect();
            assert!(centres.is_sorted(), "{centres:?}");
            several += usize::from(c.cards.len() > 1);
        }
        assert!(several >= 10, "only {several} canvases with decoys");
    }

    #[test]
    fn the_action_scan_takes_at_most_max_looks_in_the_search_order() {
        let mut rng = Rng::new(3);
        let mut three = 0;
        for c in TEST_CANVASES.iter() {
            let mut order = vec![c.leftmost()];
            while let Some(next) = c.right_of(*order.last().unwrap()) {
                order.push(next);
            }
            for max_looks in 1..=4 {
                let looks = c.scan(max_looks, 1.0, &mut rng);
                let n = (max_looks as usize).min(c.cards.len());
                assert_eq!(looks, order[..n], "max-looks {max_looks} on {:?}", c.canvas);
            }
            assert_eq!(c.scan(4, 0.0, &mut rng), [c.leftmost()]);
            three += usize::from(c.cards.len() >= 3);
        }
        assert!(three >= 5, "only {three} canvases with three cards");
    }

    #[test]
    fn a_square_view_is_sixteen_cells_and_the_card_cell_holds_the_card() {
        for c in canvases_of(&SynthVConfig::default(), 6) {
            assert_eq!(c.view.grid, [1, 8, 8]);
            assert_eq!(c.view_size, (112, 112));
            let [x1, y1, x2, y2] = c.cards[0].bbox;
            let (cx, cy) = ((x1 + x2) / 2, (y1 + y2) / 2);
            assert_eq!(
                c.card_cell(0),
                (cy / 256 * 4 + cx / 256) as usize,
                "card at {cx},{cy}"
            );
        }
    }

    #[test]
    fn perception_crops_show_the_repainted_dot_in_its_cell() {
        let synthv = SynthVConfig::tinyeyes();
        let mut rng = Rng::new(4);
        for c in canvases(8) {
            let rect = c.resolve(BaseStage::card_box(&c, 0)).unwrap();
            assert!(c.shows_dot(rect), "{:?} on {:?}", rect, c.canvas);
            for colour in 0..synthv.colours.len() {
                let crop = crop_image(&synthv, &c, 0, rect, Some(colour), &mut rng).unwrap();
                let (a, b) = (synthv.colours[colour].rgb, synthv.colours[colour].partner());
                // Both checkerboard colours appear (within the noise).
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
                assert!(dot_cell(&c, rect, [1, 8, 8]) < 16);
            }
        }
    }

    #[test]
    fn boxes_around_a_card_hold_it_and_the_tool_accepts_every_box_the_base_writes() {
        let mut rng = Rng::new(2);
        for c in canvases(12) {
            for k in 0..c.cards.len() {
                for _ in 0..20 {
                    let b = BaseStage::box_around(&c, k, &mut rng);
                    let rect = c.resolve(b).unwrap();
                    let card = c.cards[k].bbox;
                    assert!(
                        rect.x <= card[0] && card[2] <= rect.x + rect.width,
                        "{b:?} → {rect:?} vs {card:?} on {:?}",
                        c.canvas
                    );
                    assert!(
                        rect.y <= card[1] && card[3] <= rect.y + rect.height,
                        "{b:?} → {rect:?} vs {card:?} on {:?}",
                        c.canvas
                    );
                    assert!(b.iter().all(|v| v % COORDINATE_STEP == 0));
                    assert!(b[2] <= c.view_size.0 && b[3] <= c.view_size.1, "{b:?}");
                    // The action format's imprecise boxes are accepted too.
                    c.resolve(BaseStage::noisy_card_box(&c, k, &mut rng))
                        .unwrap();
                    let bins = (
                        (b[2] - b[0]) / COORDINATE_STEP,
                        (b[3] - b[1]) / COORDINATE_STEP,
                    );
                    assert!(
                        bins.0 <= MAX_PERCEPTION_BINS && bins.1 <= MAX_PERCEPTION_BINS,
                        "{bins:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn grounding_boxes_are_one_width_and_hold_the_leftmost_card() {
        for c in canvases(24) {
            let k = c.leftmost();
            assert!(
                c.cards
                    .iter()
                    .all(|d| d.bbox[0] + d.bbox[2] >= c.cards[k].bbox[0] + c.cards[k].bbox[2])
            );
            let b = BaseStage::card_box(&c, k);
            assert_eq!(b[2] - b[0], MIN_BOX_BINS * COORDINATE_STEP, "{b:?}");
            assert_eq!(b[3] - b[1], MIN_BOX_BINS * COORDINATE_STEP, "{b:?}");
            let (iou, hit) = evaluate::box_against_cards(&c, b);
            assert!(hit && iou > 0.15, "{b:?} on {:?}: IoU {iou}", c.canvas);
            c.resolve(b).unwrap();
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The base resolves a box to the crop the zoom tool cuts, rejections included.
        #[test]
        fn boxes_resolve_as_the_zoom_tool_resolves_them(
            i in 0u64..40,
            x in 0u32..72,
            y in 0u32..72,
            bw in 1u32..30,
            bh in 1u32..30,
        ) {
            let c = &TEST_CANVASES[i as usize];
            let bbox = [x, y, x + bw, y + bh].map(|v| v * COORDINATE_STEP);
            let tools: deepeyes_tools::ToolsConfig = toml::from_str(TOOLS_TOML).unwrap();
            let tool = deepeyes_tools::geometry::resolve_bbox(
                bbox.map(f64::from),
                tools.zoom_in.frame,
                c.canvas.0,
                c.canvas.1,
                &TinyEyesFormat::default().preprocess,
                &deepeyes_tools::ZoomLimits {
                    min_side: tools.zoom_in.min_side,
                    max_aspect_ratio: tools.zoom_in.max_aspect_ratio,
                },
            );
            match (c.resolve(bbox), tool) {
                (Ok(ours), Ok(tool)) => proptest::prop_assert_eq!(ours, tool.rect),
                (Err(_), Err(_)) => {}
                (ours, tool) => proptest::prop_assert!(false, "{bbox:?} on {:?}: {ours:?} vs {tool:?}", c.canvas),
            }
        }

        /// The base's box width is accepted by the zoom tool on every canvas of TinyEyes'
        /// distribution: both sides of [`MIN_BOX_BINS`] steps, mapped to the canvas, exceed the
        /// tool's minimum, anywhere in the view.
        #[test]
        fn the_base_box_width_is_accepted_on_every_canvas(
            w in 512u32..=2048,
            h in 512u32..=2048,
            at in 0.0f64..1.0,
        ) {
            proptest::prop_assume!(f64::from(w.max(h)) <= 2.0 * f64::from(w.min(h)));
            let pre = TinyEyesFormat::default().preprocess;
            let (rh, rw) = pre.smart_resize(h, w).unwrap();
            proptest::prop_assert!(rw <= MAX_COORDINATE && rh <= MAX_COORDINATE);
            let side = MIN_BOX_BINS * COORDINATE_STEP;
            let place = |extent: u32| {
                let steps = (extent - side) / COORDINATE_STEP;
                (f64::from(steps) * at) as u32 * COORDINATE_STEP
            };
            let (x, y) = (place(rw), place(rh));
            let bbox = [x, y, x + side, y + side].map(f64::from);
            let resolved = deepeyes_tools::geometry::resolve_bbox(
                bbox,
                deepeyes_tools::CoordinateFrame::Resized,
                w,
                h,
                &pre,
                &deepeyes_tools::ZoomLimits::default(),
            );
            proptest::prop_assert!(resolved.is_ok(), "{w}×{h} ({rw}×{rh}): {:?}", resolved);
        }
    }
}
