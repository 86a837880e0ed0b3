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

use std::path::Path;
use std::time::Instant;

use burn::optim::AdamWConfig;
use burn::tensor::Tensor;
use deepeyes_core::preprocess::Preprocessor;
use deepeyes_core::{Image, Rng};
use deepeyes_tools::geometry::CropRect;
use tokenizers::Tokenizer;

use super::format::{COORDINATE_STEP, TinyEyesFormat};
use crate::model::{Batch, ComputeDevice, ImageInput, PadLayout, Qwen25Vl, Sequence, to_host};
use crate::schedule::{ScheduleConfig, ScheduleKind, grad_clip_factor};
use crate::synthv::{SynthVConfig, generate};
use crate::trainer::{TrainError, TrainResult, grad_norm_and_scale};

/// The grounding question.
pub const GROUND_QUESTION: &str = "Where is the small white card? Give its box.";

/// Settings of the base stage.
#[derive(Debug, Clone, PartialEq)]
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
    tokenizer: Tokenizer,
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
            Tokenizer::from_file(&tokenizer_path).map_err(|e| data_err(&tokenizer_path, e))?;
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
            let enc = tokenizer
                .encode(text, false)
                .map_err(|e| data_err(&tokenizer_path, e))?;
            match enc.get_ids() {
                [id] => Ok(*id),
                ids => Err(data_err(
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

    fn encode(&self, text: &str) -> TrainResult<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| data_err(Path::new("tokenizer.json"), e))
    }

    /// Appends `text` to `sample`, supervised or not.
    fn push(&self, sample: &mut Sample, text: &str, supervised: bool) -> TrainResult<()> {
        let ids = self.encode(text)?;
        sample
            .supervised
            .extend(std::iter::repeat_n(supervised, ids.len()));
        sample.sequence.tokens.extend(ids);
        Ok(())
    }

    fn start(&self, c: &Canvas, question: &str) -> TrainResult<Sample> {
        let mut s = Sample {
            sequence: Sequence {
                tokens: Vec::new(),
                images: vec![c.view.clone()],
            },
            supervised: Vec::new(),
            card_cell: Some(card_cell(c)),
            crop_dot: None,
        };
        self.push(&mut s, &self.format.prompt(question), false)?;
        Ok(s)
    }

    /// The colour question with shuffled options.
    fn colour_question(&self, c: &Canvas, rng: &mut Rng) -> String {
        let mut names: Vec<&str> = self
            .synthv
            .colours
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        rng.shuffle(&mut names);
        TinyEyesFormat::multiple_choice(&c.question_stem, &names)
    }

    /// Appends `<answer>colour</answer><|im_end|>`, supervised.
    fn finish(&self, s: &mut Sample, colour: usize) -> TrainResult<()> {
        let answer = TinyEyesFormat::answer(&self.synthv.colours[colour].name);
        self.push(s, &answer, true)?;
        self.push(s, deepeyes_core::protocol::IM_END, true)
    }

    /// A random box on the grid that contains the card, up to 7 bins a side (larger crops shrink
    /// the dot's fine checkerboard until its colour averages away).
    fn box_around(c: &Canvas, rng: &mut Rng) -> [u32; 4] {
        let step = COORDINATE_STEP;
        let bins = |extent: u32| extent / step;
        let axis = |lo: u32, hi: u32, extent: u32, rng: &mut Rng| {
            let (first, last) = (lo / step, hi.div_ceil(step));
            let need = (last - first).max(2);
            let side =
                need + rng.below(u64::from(MAX_PERCEPTION_BINS.saturating_sub(need) + 1)) as u32;
            let max_start = bins(extent).saturating_sub(side);
            let lo_start = last.saturating_sub(side);
            let start = (lo_start + rng.below(u64::from(first - lo_start.min(first)) + 1) as u32)
                .min(max_start);
            (start * step, ((start + side) * step).min(extent))
        };
        let (x1, x2) = axis(c.card[0], c.card[2], c.canvas.0, rng);
        let (y1, y2) = axis(c.card[1], c.card[3], c.canvas.1, rng);
        [x1, y1, x2, y2]
    }

    /// The card's box on the grid (edges rounded to the nearest bin, at least 2 bins a side).
    fn grid_box(c: &Canvas) -> [u32; 4] {
        let step = COORDINATE_STEP;
        let round = |v: u32| ((v + step / 2) / step) * step;
        let [x1, y1, x2, y2] = c.card.map(round);
        let widen = |lo: u32, hi: u32, extent: u32| {
            if hi >= lo + 2 * step {
                (lo, hi)
            } else {
                let hi = (lo + 2 * step).min(extent);
                (hi - 2 * step, hi)
            }
        };
        let (x1, x2) = widen(x1, x2, c.canvas.0);
        let (y1, y2) = widen(y1, y2, c.canvas.1);
        [x1, y1, x2, y2]
    }

    fn box_text(bbox: [u32; 4]) -> String {
        let [x1, y1, x2, y2] = bbox;
        format!("[{x1}, {y1}, {x2}, {y2}]")
    }

    fn ground_sample(&self, c: &Canvas) -> TrainResult<Sample> {
        let mut s = self.start(c, GROUND_QUESTION)?;
        let target = TinyEyesFormat::answer(&Self::box_text(Self::grid_box(c)));
        self.push(&mut s, &target, true)?;
        self.push(&mut s, deepeyes_core::protocol::IM_END, true)?;
        Ok(s)
    }

    fn perceive_sample(&mut self, ci: usize, rng: &mut Rng, held_out: bool) -> TrainResult<Sample> {
        let pool = if held_out { &self.eval } else { &self.train };
        let c = &pool[ci];
        let question = self.colour_question(c, rng);
        let bbox = Self::box_around(c, rng);
        // Training crops get a random dot colour (and that label); held-out ones keep theirs.
        let colour = if held_out {
            c.colour
        } else {
            rng.below(self.synthv.colours.len() as u64) as usize
        };
        let crop = crop_view(
            &mut self.preprocessor,
            &self.synthv,
            c,
            bbox,
            (!held_out).then_some(colour),
            rng,
        )?;
        let c = if held_out {
            &self.eval[ci]
        } else {
            &self.train[ci]
        };
        let mut s = self.start(c, &question)?;
        self.push(&mut s, &TinyEyesFormat::zoom_call(bbox), false)?;
        self.push(&mut s, &self.format.crop_returned(), false)?;
        s.crop_dot = dot_cell(c, bbox, crop.grid).map(|cell| (cell, colour));
        s.sequence.images.push(crop);
        self.finish(&mut s, colour)?;
        Ok(s)
    }

    fn act_sample(&mut self, ci: usize, rng: &mut Rng) -> TrainResult<Sample> {
        let question = self.colour_question(&self.train[ci], rng);
        let guess = rng.below(self.synthv.colours.len() as u64) as usize;
        if rng.next_f64() >= self.config.zoom_share {
            let mut s = self.start(&self.train[ci], &question)?;
            self.finish(&mut s, guess)?;
            return Ok(s);
        }
        let c = &self.train[ci];
        let shift = |v: u32, rng: &mut Rng| {
            let d = rng.range_inclusive(-1, 1) * i64::from(COORDINATE_STEP);
            (i64::from(v) + d).max(0) as u32
        };
        let mut bbox = Self::grid_box(c).map(|v| shift(v, rng));
        bbox = clamp_box(bbox, c.canvas);
        if bbox[2] < bbox[0] + 2 * COORDINATE_STEP {
            bbox[2] = bbox[0] + 2 * COORDINATE_STEP;
        }
        if bbox[3] < bbox[1] + 2 * COORDINATE_STEP {
            bbox[3] = bbox[1] + 2 * COORDINATE_STEP;
        }
        let centre = ((c.dot[0] + c.dot[2]) / 2, (c.dot[1] + c.dot[3]) / 2);
        let shows_dot =
            bbox[0] <= centre.0 && centre.0 < bbox[2] && bbox[1] <= centre.1 && centre.1 < bbox[3];
        let colour = if shows_dot { c.colour } else { guess };
        let crop = crop_view(&mut self.preprocessor, &self.synthv, c, bbox, None, rng)?;
        let mut s = self.start(&self.train[ci], &question)?;
        self.push(&mut s, &TinyEyesFormat::zoom_call(bbox), true)?;
        self.push(&mut s, &self.format.crop_returned(), false)?;
        s.crop_dot = dot_cell(c, bbox, crop.grid).map(|cell| (cell, c.colour));
        s.sequence.images.push(crop);
        self.finish(&mut s, colour)?;
        Ok(s)
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

    /// Teacher-forced evaluation on the held-out canvases (see [`BaseEval`]).
    pub fn evaluate(&mut self) -> TrainResult<BaseEval> {
        let mut rng = Rng::new(Rng::derive_seed(self.config.seed, &[2]));
        let n = self.eval.len();
        if n == 0 {
            return Ok(BaseEval::default());
        }
        let model = self.model.take().expect("the model is present");
        let image_pad = model.config.image_token_id;
        let result = (|| -> TrainResult<BaseEval> {
            let mut ground = Vec::new();
            let mut perceive = Vec::new();
            let mut first = Vec::new();
            for ci in 0..n {
                ground.push(self.ground_sample(&self.eval[ci])?);
                perceive.push(self.perceive_sample(ci, &mut rng, true)?);
                let q = self.colour_question(&self.eval[ci], &mut rng);
                first.push(self.start(&self.eval[ci], &q)?);
            }
            let mut e = BaseEval::default();
            // One pass over the grounding samples reads two things: first the token after the
            // global view's `<|vision_end|>` (finding: does it name the card's cell?), then the
            // argmax of each coordinate given the true ones before it (grounding).
            let picks = argmax_at(&model, &ground, |s| {
                let tokens = &s.sequence.tokens;
                // The prediction read at token t is made at t - 1: the vision end is pad + 1.
                let vision_end = tokens.iter().position(|&id| id == image_pad).map(|p| p + 2);
                // The four coordinates are the supervised tokens after `<answer>[`.
                let coordinates = (0..s.supervised.len())
                    .filter(|&t| s.supervised[t] && self.is_coordinate(tokens[t]));
                vision_end.into_iter().chain(coordinates).collect()
            })?;
            for (ci, pick) in picks.iter().enumerate() {
                let c = &self.eval[ci];
                let Some((cell, coordinates)) = pick.split_first() else {
                    continue;
                };
                let cells = c.view.grid[1] * c.view.grid[2] / 4;
                if *cell == self.cell_token(card_cell(c), cells) {
                    e.card_cell_acc += 1.0;
                }
                let values: Vec<Option<u32>> = coordinates
                    .iter()
                    .map(|&id| self.coordinate_value(id))
                    .collect();
                if let [Some(x1), Some(y1), Some(x2), Some(y2)] = values[..] {
                    e.ground_iou +=
                        crate::metrics::iou([x1, y1, x2, y2].map(f64::from), c.card.map(f64::from));
                    let centre = ((c.dot[0] + c.dot[2]) / 2, (c.dot[1] + c.dot[3]) / 2);
                    if x1 <= centre.0 && centre.0 < x2 && y1 <= centre.1 && centre.1 < y2 {
                        e.ground_hit += 1.0;
                    }
                }
            }
            // Detection: the view token most sure it holds the card.
            let detected = card_scores(&model, &ground, self.card_token)?;
            for (ci, scores) in detected.iter().enumerate() {
                let best = scores
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(k, _)| k);
                if best == Some(card_cell(&self.eval[ci])) {
                    e.card_token_acc += 1.0;
                }
            }
            // Perception: the colour token right after `<answer>`.
            let picks = argmax_at(&model, &perceive, |s| {
                let t = s
                    .sequence
                    .tokens
                    .iter()
                    .rposition(|&id| id == self.answer_id)
                    .map_or(0, |p| p + 1);
                vec![t]
            })?;
            for (ci, pick) in picks.iter().enumerate() {
                if pick.first() == Some(&self.colour_tokens[self.eval[ci].colour]) {
                    e.perception_acc += 1.0;
                }
            }
            // Zoom propensity: p(<tool_call>) as the first assistant token.
            e.zoom_prob = first_token_prob(&model, &first, self.tool_call_id)?;
            e.ground_iou /= n as f64;
            e.ground_hit /= n as f64;
            e.perception_acc /= n as f64;
            e.card_cell_acc /= n as f64;
            e.card_token_acc /= n as f64;
            Ok(e)
        })();
        self.model = Some(model);
        result
    }

    fn is_coordinate(&self, id: u32) -> bool {
        self.coordinate_value(id).is_some()
    }

    fn coordinate_value(&self, id: u32) -> Option<u32> {
        self.coordinate_tokens
            .iter()
            .position(|&(a, b)| a == id || b == id)
            .map(|k| k as u32 * COORDINATE_STEP)
    }

    /// Saves the run in `dir`, atomically (written beside it, then renamed): the weights as a
    /// Hugging Face checkpoint (tokenizer, configs and prompt templates copied from `source`),
    /// the AdamW state ([`BASE_OPTIMIZER_FILE`]) and the step ([`BASE_STATE_FILE`]), so
    /// [`BaseStage::resume`] continues exactly where it stopped.
    pub fn save(&self, source: &Path, dir: &Path) -> TrainResult<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        let name = dir.file_name().map_or_else(
            || "checkpoint".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let tmp = dir.with_file_name(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
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
                std::fs::copy(&from, tmp.join(file)).map_err(io(&from))?;
            }
        }
        // Keep the token ids transformers needs (save_pretrained writes the architecture only).
        let keep = std::fs::read_to_string(source.join("config.json")).ok();
        self.model().save_pretrained(&tmp)?;
        if let Some(text) = keep {
            let path = tmp.join("config.json");
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let path = tmp.join(BASE_OPTIMIZER_FILE);
        let bytes = self.optim.into_bytes().map_err(|e| TrainError::Data {
            path: path.clone(),
            reason: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        std::fs::write(&path, &bytes[..]).map_err(io(&path))?;
        let path = tmp.join(BASE_STATE_FILE);
        let state = serde_json::json!({"step": self.step, "seed": self.config.seed});
        std::fs::write(&path, state.to_string()).map_err(io(&path))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io(dir))
    }

    /// Continues a run saved by [`BaseStage::save`] in `checkpoint`: its weights, optimizer
    /// state and step. Canvases and batches are derived from the seed and the step, so the
    /// steps that follow are those of an uninterrupted run with the same `config`.
    pub fn resume(checkpoint: &Path, config: BaseStageConfig) -> TrainResult<Self> {
        let path = checkpoint.join(BASE_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| data_err(&path, e))?;
        let (Some(step), Some(seed)) = (state["step"].as_u64(), state["seed"].as_u64()) else {
            return Err(data_err(&path, "expected {\"step\": N, \"seed\": S}"));
        };
        if seed != config.seed {
            return Err(data_err(
                &path,
                format!(
                    "the run used seed {seed}, not {}; resume with --seed {seed}",
                    config.seed
                ),
            ));
        }
        let mut stage = Self::new(checkpoint, config)?;
        let path = checkpoint.join(BASE_OPTIMIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        stage.optim = stage
            .optim
            .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
            .map_err(|e| data_err(&path, format!("not an optimizer state: {e:?}")))?;
        stage.step = step;
        Ok(stage)
    }
}

/// The AdamW state inside a base-stage checkpoint.
pub const BASE_OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The step (and seed) of a base-stage checkpoint.
pub const BASE_STATE_FILE: &str = "base-state.json";

/// The crop of `bbox` as the zoom tool returns it, preprocessed, with the dot repainted in
/// `colour` (an index into `synthv.colours`) when given.
fn crop_view(
    pre: &mut Preprocessor,
    synthv: &SynthVConfig,
    c: &Canvas,
    bbox: [u32; 4],
    colour: Option<usize>,
    rng: &mut Rng,
) -> TrainResult<ImageInput> {
    let crop = crop_image(synthv, c, bbox, colour, rng)?;
    Ok(ImageInput::from(pre.preprocess(&crop)?))
}

/// The pixels of [`crop_view`], before preprocessing.
fn crop_image(
    synthv: &SynthVConfig,
    c: &Canvas,
    bbox: [u32; 4],
    colour: Option<usize>,
    rng: &mut Rng,
) -> TrainResult<Image> {
    let [x1, y1, x2, y2] = clamp_box(bbox, c.canvas);
    let (ox, oy) = c.region_origin;
    // Boxes are drawn around the card, inside the region; clamp for safety.
    let rx1 = x1.saturating_sub(ox).min(c.region.width() - 1);
    let ry1 = y1.saturating_sub(oy).min(c.region.height() - 1);
    let rx2 = x2.saturating_sub(ox).clamp(rx1 + 1, c.region.width());
    let ry2 = y2.saturating_sub(oy).clamp(ry1 + 1, c.region.height());
    let rect = CropRect::from_edges(rx1, ry1, rx2, ry2).expect("a non-empty box");
    let mut crop = deepeyes_tools::resize::crop(&c.region, rect)?;
    if let Some(colour) = colour {
        let colour = &synthv.colours[colour];
        let (a, b) = (colour.rgb, colour.partner());
        let noise = i64::from(synthv.noise);
        let (w, h) = (crop.width(), crop.height());
        let mut px = crop.as_raw().to_vec();
        for y in c.dot[1]..c.dot[3] {
            for x in c.dot[0]..c.dot[2] {
                let (Some(cx), Some(cy)) = (x.checked_sub(ox + rx1), y.checked_sub(oy + ry1))
                else {
                    continue;
                };
                if cx >= w || cy >= h {
                    continue;
                }
                let on =
                    ((x - c.dot[0]) / synthv.cell + (y - c.dot[1]) / synthv.cell).is_multiple_of(2);
                let rgb = if on { a } else { b };
                let i = ((cy * w + cx) * 3) as usize;
                for k in 0..3 {
                    px[i + k] = (i64::from(rgb[k]) + rng.range_inclusive(-noise, noise))
                        .clamp(0, 255) as u8;
                }
            }
        }
        crop = Image::from_raw(w, h, px)?;
    }
    Ok(crop)
}

/// Runs `samples` through the model in chunks and hands `visit` each sample with its row of
/// expanded token ids (every image pad spelled out) and a lookup of the next-token logits at an
/// expanded position (`None` past the row).
fn visit_rows(
    model: &Qwen25Vl,
    samples: &[Sample],
    mut visit: impl for<'r> FnMut(&Sample, &'r [u32], &'r dyn Fn(usize) -> Option<&'r [f32]>),
) -> TrainResult<()> {
    for chunk in samples.chunks(16) {
        let seqs: Vec<Sequence> = chunk.iter().map(|s| s.sequence.clone()).collect();
        let batch = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
        let logits = model.logits(&batch)?.detach();
        let [_, seq, vocab] = logits.dims();
        let host = to_host(logits);
        for (i, s) in chunk.iter().enumerate() {
            let ids = &batch.input_ids[i * batch.seq..(i + 1) * batch.seq];
            let at = |e: usize| {
                (e < seq).then(|| &host[(i * seq + e) * vocab..(i * seq + e + 1) * vocab])
            };
            visit(s, ids, &at);
        }
    }
    Ok(())
}

/// Like [`visit_rows`], with the logits looked up after an unexpanded token `t` of the sample.
fn visit_logits(
    model: &Qwen25Vl,
    samples: &[Sample],
    mut visit: impl FnMut(&Sample, &dyn Fn(usize) -> Option<Vec<f32>>),
) -> TrainResult<()> {
    let pad = model.config.image_token_id;
    visit_rows(model, samples, |s, ids, at| {
        // Each earlier image pad expands to its tokens: find token t's expanded position.
        let row = |t: usize| at(expanded_index(ids, t, pad)).map(<[f32]>::to_vec);
        visit(s, &row);
    })
}

/// For each sample, the argmax token at the positions `which` picks (token indices whose
/// prediction is read: the model's guess for token `t` given tokens `..t`).
fn argmax_at(
    model: &Qwen25Vl,
    samples: &[Sample],
    which: impl Fn(&Sample) -> Vec<usize>,
) -> TrainResult<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(samples.len());
    visit_logits(model, samples, |s, logits_after| {
        let picks = which(s)
            .into_iter()
            .filter(|&t| t > 0)
            .filter_map(|t| logits_after(t - 1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(k, _)| k as u32)
            })
            .collect();
        out.push(picks);
    })?;
    Ok(out)
}

/// For each sample, the log-probability of token `id` at each token of its first image.
fn card_scores(model: &Qwen25Vl, samples: &[Sample], id: u32) -> TrainResult<Vec<Vec<f32>>> {
    let pad = model.config.image_token_id;
    let mut out = Vec::with_capacity(samples.len());
    visit_rows(model, samples, |_, ids, at| {
        let start = ids.iter().position(|&t| t == pad).unwrap_or(ids.len());
        let run = ids[start..].iter().take_while(|&&t| t == pad).count();
        let scores = (start..start + run)
            .filter_map(at)
            .map(|logits| {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
                logits[id as usize] - max - z.ln()
            })
            .collect();
        out.push(scores);
    })?;
    Ok(out)
}

/// Mean probability of token `id` right after each sample's prompt.
fn first_token_prob(model: &Qwen25Vl, samples: &[Sample], id: u32) -> TrainResult<f64> {
    let mut total = 0.0;
    visit_logits(model, samples, |s, logits_after| {
        if let Some(row) = logits_after(s.sequence.tokens.len() - 1) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
            total += f64::from(row[id as usize] - max).exp() / z;
        }
    })?;
    Ok(total / samples.len().max(1) as f64)
}

/// The expanded position of unexpanded token `t` in a batch row of expanded `ids`.
fn expanded_index(ids: &[u32], t: usize, image_pad: u32) -> usize {
    // Image pads before `t` each expand to their merged tokens; the batch records the expanded
    // ids, so walk them: count unexpanded tokens until `t` is reached.
    let mut unexpanded = 0;
    let mut e = 0;
    while e < ids.len() {
        let pad_run = if ids[e] == image_pad {
            ids[e..].iter().take_while(|&&x| x == image_pad).count()
        } else {
            1
        };
        if unexpanded == t {
            return e + pad_run - 1;
        }
        unexpanded += 1;
        e += pad_run;
    }
    ids.len()
}

/// The merged cell (raster order) of the crop of `bbox`, preprocessed to `grid`, that holds the
/// dot's centre; `None` when the crop does not show it.
fn dot_cell(c: &Canvas, bbox: [u32; 4], grid: [usize; 3]) -> Option<usize> {
    let [x1, y1, x2, y2] = clamp_box(bbox, c.canvas);
    let (cx, cy) = ((c.dot[0] + c.dot[2]) / 2, (c.dot[1] + c.dot[3]) / 2);
    if !(x1 <= cx && cx < x2 && y1 <= cy && cy < y2) {
        return None;
    }
    let (mh, mw) = (grid[1] / 2, grid[2] / 2);
    let fx = f64::from(cx - x1) / f64::from(x2 - x1);
    let fy = f64::from(cy - y1) / f64::from(y2 - y1);
    let col = ((fx * mw as f64) as usize).min(mw.saturating_sub(1));
    let row = ((fy * mh as f64) as usize).min(mh.saturating_sub(1));
    Some(row * mw + col)
}

/// The merged cell of the global view (raster order over its grid) that holds the card centre.
fn card_cell(c: &Canvas) -> usize {
    let [_, gh, gw] = c.view.grid;
    let (mh, mw) = (gh / 2, gw / 2);
    let cx = f64::from(c.card[0] + c.card[2]) / 2.0 / f64::from(c.canvas.0);
    let cy = f64::from(c.card[1] + c.card[3]) / 2.0 / f64::from(c.canvas.1);
    let col = ((cx * mw as f64) as usize).min(mw - 1);
    let row = ((cy * mh as f64) as usize).min(mh - 1);
    row * mw + col
}

fn clamp_box(b: [u32; 4], (w, h): (u32, u32)) -> [u32; 4] {
    [b[0].min(w - 1), b[1].min(h - 1), b[2].min(w), b[3].min(h)]
}

/// Generates canvas `i` of a split and keeps only what the base stage needs.
fn canvas(
    synthv: &SynthVConfig,
    seed: u64,
    i: u64,
    split: &str,
    pre: &mut Preprocessor,
) -> TrainResult<Canvas> {
    let item = generate(synthv, seed, i, split)?;
    let (w, h) = (item.image.width(), item.image.height());
    let view = ImageInput::from(pre.preprocess(&item.image)?);
    let [x1, y1, x2, y2] = item.card_box;
    let region = CropRect::from_edges(
        x1.saturating_sub(REGION),
        y1.saturating_sub(REGION),
        (x2 + REGION).min(w),
        (y2 + REGION).min(h),
    )
    .expect("the card lies inside the canvas");
    let name = &item.options[item.answer_index];
    let colour = synthv
        .colours
        .iter()
        .position(|c| &c.name == name)
        .expect("the answer is a colour");
    let stem = item
        .question
        .split('\n')
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Canvas {
        view,
        region: deepeyes_tools::resize::crop(&item.image, region)?,
        region_origin: (region.x, region.y),
        canvas: (w, h),
        card: item.card_box,
        dot: item.dot_box,
        colour,
        question_stem: stem,
    })
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
