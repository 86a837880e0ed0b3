//! The advantage, log-prob and update phases of a step: the scored groups become per-token
//! targets, the training engine scores the trajectories, and AdamW steps on the gradient of the
//! clipped surrogate.

use std::collections::HashMap;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use deepeyes_core::preprocess::preprocess_image;
use deepeyes_core::{RewardBreakdown, Trajectory};
use ndarray::{Array2, ArrayView2, Axis};

use super::{RolledGroup, TrainError, TrainResult, Trainer};
use crate::grpo::{
    GrpoConfig, LossStats, MiniBatch, PolicyLossInput, PreparedBatch, UpdatePlan, plan_updates,
    policy_loss, prepare_batch,
};
use crate::metrics::{RolloutMetrics, ScoredTrajectory, UpdateMetrics, rollout_metrics};
use crate::network::{
    ImageInput, PolicyNetwork, ScoreOptions, Sequence, TokenScores, on_forks, tensor2, to_host,
};
use crate::schedule::grad_clip_factor;

/// The scored groups of a step, flattened: trajectory `i` belongs to group `group_ids[i]`.
pub(super) struct StepBatch<'a> {
    /// Every trajectory of the step, group by group.
    pub(super) trajectories: Vec<&'a Trajectory>,
    group_ids: Vec<usize>,
    rewards: Vec<&'a RewardBreakdown>,
    /// Each group's ground-truth boxes on its first image.
    boxes: Vec<Vec<[f64; 4]>>,
}

impl<'a> StepBatch<'a> {
    pub(super) fn new(groups: &'a [RolledGroup]) -> Self {
        let mut step = Self {
            trajectories: Vec::new(),
            group_ids: Vec::new(),
            rewards: Vec::new(),
            boxes: groups
                .iter()
                .map(|g| g.item.item.first_image_boxes())
                .collect(),
        };
        for (g, group) in groups.iter().enumerate() {
            for (traj, reward) in group.trajectories.iter().zip(&group.rewards) {
                step.trajectories.push(traj);
                step.rewards.push(reward);
                step.group_ids.push(g);
            }
        }
        step
    }

    /// Trajectories in the step.
    pub(super) fn len(&self) -> usize {
        self.trajectories.len()
    }

    /// What the step's rollouts and rewards measured.
    pub(super) fn rollout_metrics(&self) -> TrainResult<RolloutMetrics> {
        let scored: Vec<ScoredTrajectory<'_>> = (0..self.len())
            .map(|i| ScoredTrajectory {
                trajectory: self.trajectories[i],
                reward: self.rewards[i],
                group: self.group_ids[i],
                gt_boxes: &self.boxes[self.group_ids[i]],
            })
            .collect();
        Ok(rollout_metrics(&scored)?)
    }

    /// The advantage phase: group-normalised advantages and the per-token targets.
    pub(super) fn advantages(&self, config: &GrpoConfig) -> TrainResult<PreparedBatch> {
        let totals: Vec<f64> = self.rewards.iter().map(|b| b.total).collect();
        Ok(prepare_batch(
            config,
            &self.trajectories,
            &totals,
            &self.group_ids,
        )?)
    }
}

/// Log-probs that stay fixed during a step's updates, `[trajectories, width]`.
pub(super) struct FixedLogprobs {
    /// The policy's before its first update; `None` when the step takes a single optimizer
    /// step (the update's own forward pass then gives them, and the ratio is exactly 1).
    old: Option<Array2<f32>>,
    /// The frozen reference's, for the KL term; `None` without one.
    reference: Option<Array2<f32>>,
}

/// The first `width` columns of a row-major `[rows, cols]` engine buffer (zeros beyond `cols`).
fn host_grid(host: &[f32], rows: usize, cols: usize, width: usize) -> Array2<f32> {
    let mut grid = Array2::<f32>::zeros((rows, width));
    let w = width.min(cols);
    for (i, mut row) in grid.rows_mut().into_iter().enumerate() {
        row.slice_mut(ndarray::s![..w])
            .assign(&ndarray::ArrayView1::from(&host[i * cols..i * cols + w]));
    }
    grid
}

/// Rows `rows` of a step-wide `[trajectories, step width]` array, cut to a micro-batch's `width`
/// (the longest of its rows).
fn rows_of(all: &Array2<f32>, rows: &[usize], width: usize) -> Array2<f32> {
    all.select(Axis(0), rows)
        .slice(ndarray::s![.., ..width])
        .to_owned()
}

/// A row-major `[rows, cols]` engine buffer holding `grid` in its first columns.
fn engine_buffer(grid: ArrayView2<'_, f32>, cols: usize) -> Vec<f32> {
    let w = grid.ncols().min(cols);
    let mut out = vec![0.0f32; grid.nrows() * cols];
    for (i, row) in grid.rows().into_iter().enumerate() {
        for (slot, v) in out[i * cols..i * cols + w].iter_mut().zip(row) {
            *slot = *v;
        }
    }
    out
}

/// `model`'s log-probs of every token of `sequences`, without gradients, `[n, width]`: scored
/// in chunks of `chunk` rows, each row's values up to its own length.
fn logprobs_of<N: PolicyNetwork>(
    model: &N,
    sequences: &[Sequence],
    chunk: usize,
    width: usize,
    share_prefixes: bool,
) -> TrainResult<Array2<f32>> {
    let n = sequences.len();
    let mut out = Array2::<f32>::zeros((n, width));
    for start in (0..n).step_by(chunk.max(1)) {
        let seqs = &sequences[start..(start + chunk.max(1)).min(n)];
        let options = ScoreOptions {
            entropy: false,
            share_prefixes,
        };
        let logprobs = model.score_sequences(seqs, options)?.logprobs;
        let cols = logprobs.dims()[1];
        let host = to_host(logprobs.detach());
        for (i, seq) in seqs.iter().enumerate() {
            let len = seq.tokens.len().min(cols).min(width);
            out.row_mut(start + i)
                .slice_mut(ndarray::s![..len])
                .assign(&ndarray::ArrayView1::from(&host[i * cols..i * cols + len]));
        }
    }
    Ok(out)
}

impl<N: PolicyNetwork> Trainer<N> {
    /// How the step's `n` trajectories are split into optimizer steps and micro-batches.
    pub(super) fn update_plan(&self, n: usize) -> TrainResult<UpdatePlan> {
        let b = &self.config.batch;
        Ok(plan_updates(
            n,
            b.mini_batch_trajectories(self.config.grpo.group_size),
            b.micro_batch.max(1),
            b.epochs,
            None,
        )?)
    }

    /// The training engine's inputs: every trajectory with its images preprocessed, each
    /// image once (the samples of a group share their input image).
    pub(super) fn sequences(&self, trajectories: &[&Trajectory]) -> TrainResult<Vec<Sequence>> {
        let mut preprocessed = HashMap::new();
        trajectories
            .iter()
            .map(|t| self.sequence(t, &mut preprocessed))
            .collect()
    }

    /// The log-prob phase: the old policy's log-probs (only when the step takes more than one
    /// optimizer step) and the reference's (only with a KL term), each computed once per step.
    pub(super) fn fixed_logprobs(
        &self,
        sequences: &[Sequence],
        plan: &UpdatePlan,
        width: usize,
    ) -> TrainResult<FixedLogprobs> {
        let chunk = self.config.batch.logprob_micro_batch;
        let share = self.config.batch.share_prefixes;
        let old = if plan.optimizer_steps() == 1 {
            None
        } else {
            Some(logprobs_of(self.model(), sequences, chunk, width, share)?)
        };
        let base;
        let reference = match (&self.reference, self.config.grpo.needs_reference()) {
            (Some(r), _) => Some(r),
            (None, true) => {
                base = self.model().without_adapters();
                base.as_ref()
            }
            (None, false) => None,
        };
        let reference = match reference {
            Some(r) => Some(logprobs_of(r, sequences, chunk, width, share)?),
            None => None,
        };
        Ok(FixedLogprobs { old, reference })
    }

    /// The update phase: for each mini-batch of `plan`, the gradient accumulated over its
    /// micro-batches, clipped, and one AdamW step.
    pub(super) fn update(
        &mut self,
        sequences: &[Sequence],
        batch: &PreparedBatch,
        plan: &UpdatePlan,
        fixed: &FixedLogprobs,
    ) -> TrainResult<UpdateMetrics> {
        let lr = self
            .config
            .schedule
            .lr(self.config.optimizer.lr, self.step, self.config.steps);
        let mut stats: Option<LossStats> = None;
        let (mut grad_norm, mut skipped, mut optimizer_steps) = (0.0, 0, 0);
        let at_once = self.config.batch.concurrent_micro_batches.max(1);
        for mini in plan.epochs.iter().flatten() {
            let job = GradientJob {
                grpo: &self.config.grpo,
                options: self.score_options(),
                engine_micro_batch: self.config.batch.engine_micro_batch.max(1),
                sequences,
                batch,
                mini,
                fixed,
            };
            let mut accumulator = GradientsAccumulator::<N>::new();
            for group in mini.micro_batches.chunks(at_once) {
                // In micro-batch order, whichever finished first: the sum is the same bit for
                // bit as one micro-batch after the other.
                for (micro_stats, grads) in job.gradients(self.model(), group)? {
                    match &mut stats {
                        Some(s) => s.merge(&micro_stats),
                        None => stats = Some(micro_stats),
                    }
                    accumulator.accumulate(self.model(), grads);
                }
            }
            let mut grads = accumulator.grads();
            grad_norm = grad_norm_and_scale(self.model(), &mut grads, None);
            if !grad_norm.is_finite() {
                skipped += 1;
                tracing::warn!(step = self.step, "non-finite gradient norm; update skipped");
                continue;
            }
            let factor = grad_clip_factor(grad_norm, self.config.optimizer.grad_clip)?;
            if factor < 1.0 {
                grad_norm_and_scale(self.model(), &mut grads, Some(factor));
            }
            let model = self.model.take().expect("the model is present");
            self.model = Some(self.optim.step(lr, model, grads));
            optimizer_steps += 1;
        }
        Ok(UpdateMetrics::from_loss(
            &stats.unwrap_or_default(),
            grad_norm,
            lr,
            optimizer_steps,
            skipped,
        ))
    }

    /// How the engine scores the step's trajectories.
    fn score_options(&self) -> ScoreOptions {
        ScoreOptions {
            entropy: self.config.grpo.needs_entropy(),
            share_prefixes: self.config.batch.share_prefixes,
        }
    }

    /// The training engine's view of a trajectory: its tokens (one pad per image) and images,
    /// each image preprocessed once per `cache` (keyed by its pixel buffer, which the
    /// trajectories of a step keep alive).
    fn sequence(
        &self,
        traj: &Trajectory,
        cache: &mut std::collections::HashMap<usize, ImageInput>,
    ) -> TrainResult<Sequence> {
        let mut images = Vec::with_capacity(traj.images.len());
        for im in &traj.images {
            let input = match cache.entry(im.image.buffer_id()) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(e) => e
                    .insert(ImageInput::from(preprocess_image(
                        &im.image,
                        &self.preprocess,
                    )?))
                    .clone(),
            };
            images.push(input);
        }
        Ok(Sequence {
            score_from: traj.prompt_len,
            tokens: traj.tokens.clone(),
            images,
        })
    }
}

/// A step's update as an independent implementation needs it to redo the same work (the
/// side-by-side benchmark's PyTorch run, `scripts/bench_update.sh`): the trajectories as the
/// engine sees them, the per-token weights whose log-prob sum is the surrogate, and the
/// micro-batches.
#[derive(Debug, Clone)]
pub struct UpdateRecord {
    /// Every trajectory of the step: tokens (one pad per image) and preprocessed images.
    pub sequences: Vec<Sequence>,
    /// `[trajectories, width]`: `∂loss/∂logprob` of every token at the step's weights, where
    /// the ratio to the rollout policy is 1, so that `Σ weights · logprobs` has the loss's
    /// gradient (0 where a token is not trained on).
    pub weights: Array2<f32>,
    /// The rows of each micro-batch, in order; one optimizer step over all of them.
    pub micro_batches: Vec<Vec<usize>>,
    /// The learning rate of the step.
    pub lr: f64,
}

impl<N: PolicyNetwork> Trainer<N> {
    /// The update of `scored` as an [`UpdateRecord`]. Only for steps that take one optimizer
    /// step without KL or entropy terms (the demo's), whose surrogate is exactly
    /// `Σ weights · logprobs`.
    pub fn update_record(&self, scored: &super::ScoredStep) -> TrainResult<UpdateRecord> {
        let grpo = &self.config.grpo;
        let step = StepBatch::new(&scored.groups);
        let plan = self.update_plan(step.len())?;
        if plan.optimizer_steps() != 1 || grpo.needs_reference() || grpo.needs_entropy() {
            return Err(TrainError::Rl(crate::Error::invalid(
                "update record",
                "needs one optimizer step per update and no KL or entropy term",
            )));
        }
        let batch = step.advantages(grpo)?;
        let mini = &plan.epochs[0][0];
        let mut weights = Array2::<f32>::zeros(batch.targets.mask.dim());
        for rows in &mini.micro_batches {
            let targets = batch.targets.select(rows)?;
            let at_rollout = targets.rollout_logprobs.view();
            let out = policy_loss(
                grpo,
                &PolicyLossInput {
                    logprobs: at_rollout,
                    old_logprobs: at_rollout,
                    advantages: targets.advantages.view(),
                    mask: targets.mask.view(),
                    ref_logprobs: None,
                    entropy: None,
                    rollout_logprobs: None,
                },
                batch.targets.loss_scale(grpo.loss_normalization, mini)?,
            )?;
            for (i, &r) in rows.iter().enumerate() {
                weights
                    .row_mut(r)
                    .slice_mut(ndarray::s![..out.grad_logprobs.ncols()])
                    .assign(&out.grad_logprobs.row(i));
            }
        }
        Ok(UpdateRecord {
            sequences: self.sequences(&step.trajectories)?,
            weights,
            micro_batches: mini.micro_batches.clone(),
            lr: self
                .config
                .schedule
                .lr(self.config.optimizer.lr, self.step, self.config.steps),
        })
    }
}

/// What every micro-batch of a mini-batch needs to compute its gradient, shared by the threads
/// that compute several at once (`batch.concurrent-micro-batches`).
struct GradientJob<'a> {
    grpo: &'a GrpoConfig,
    options: ScoreOptions,
    engine_micro_batch: usize,
    sequences: &'a [Sequence],
    batch: &'a PreparedBatch,
    mini: &'a MiniBatch,
    fixed: &'a FixedLogprobs,
}

impl GradientJob<'_> {
    /// The loss statistics and gradients of the micro-batches `group`, in order, computed side
    /// by side on forks of `model` ([`on_forks`]).
    fn gradients<N: PolicyNetwork + Send>(
        &self,
        model: &N,
        group: &[Vec<usize>],
    ) -> TrainResult<Vec<(LossStats, GradientsParams)>> {
        on_forks(model, group, |model, rows| self.micro_batch(model, rows))
            .into_iter()
            .collect()
    }

    /// The loss statistics and parameter gradients of one micro-batch (`rows` of the step):
    /// `∂loss/∂logprob` from [`policy_loss`], back-propagated through the engine's log-probs.
    fn micro_batch<N: PolicyNetwork>(
        &self,
        model: &N,
        rows: &[usize],
    ) -> TrainResult<(LossStats, GradientsParams)> {
        let (grpo, batch, mini) = (self.grpo, self.batch, self.mini);
        let targets = batch.targets.select(rows)?;
        let scale = batch.targets.loss_scale(grpo.loss_normalization, mini)?;
        let passes = self.engine_passes(model, rows)?;
        let width = targets.mask.ncols();
        let logp = host_scores(&passes, width, |s| Some(&s.logprobs)).expect("always computed");
        let entropy = host_scores(&passes, width, |s| s.entropy.as_ref());
        let old = match &self.fixed.old {
            Some(old) => rows_of(old, rows, width),
            None => logp.clone(),
        };
        let reference = self
            .fixed
            .reference
            .as_ref()
            .map(|r| rows_of(r, rows, width));
        let out = policy_loss(
            grpo,
            &PolicyLossInput {
                logprobs: logp.view(),
                old_logprobs: old.view(),
                advantages: targets.advantages.view(),
                mask: targets.mask.view(),
                ref_logprobs: reference.as_ref().map(|a| a.view()),
                entropy: entropy.as_ref().map(|a| a.view()),
                rollout_logprobs: Some(targets.rollout_logprobs.view()),
            },
            scale,
        )?;
        let surrogate = surrogate(passes, &out.grad_logprobs, out.grad_entropy.as_ref())?;
        let grads = GradientsParams::from_grads(surrogate.backward(), model);
        Ok((out.stats, grads))
    }

    /// The engine's scores of a micro-batch's `rows`, in passes of at most
    /// `batch.engine-micro-batch` rows (their autodiff graphs kept for one backward pass).
    fn engine_passes<N: PolicyNetwork>(&self, model: &N, rows: &[usize]) -> TrainResult<Vec<Pass>> {
        let mut passes = Vec::new();
        let mut start = 0;
        for chunk in rows.chunks(self.engine_micro_batch) {
            let seqs: Vec<Sequence> = chunk.iter().map(|&r| self.sequences[r].clone()).collect();
            let scores = model.score_sequences(&seqs, self.options)?;
            passes.push(Pass {
                start,
                rows: chunk.len(),
                scores,
            });
            start += chunk.len();
        }
        Ok(passes)
    }
}

/// One engine pass over rows `start..start + rows` of a micro-batch.
struct Pass {
    start: usize,
    rows: usize,
    scores: TokenScores,
}

/// The micro-batch's `[rows, width]` host grid of one score (`None` when not computed).
fn host_scores(
    passes: &[Pass],
    width: usize,
    pick: impl Fn(&TokenScores) -> Option<&Tensor<2>>,
) -> Option<Array2<f32>> {
    let total = passes.last().map_or(0, |p| p.start + p.rows);
    let mut out = Array2::<f32>::zeros((total, width));
    for p in passes {
        let t = pick(&p.scores)?;
        let cols = t.dims()[1];
        let part = host_grid(&to_host(t.clone().detach()), p.rows, cols, width);
        out.slice_mut(ndarray::s![p.start..p.start + p.rows, ..])
            .assign(&part);
    }
    Some(out)
}

/// `Σ grad_logprobs · logprobs (+ Σ grad_entropy · entropy)` over the passes: `∂loss/∂logprob`
/// (and `∂loss/∂entropy`) as per-token weights on the engine's outputs, so that backward gives
/// the loss's parameter gradient.
fn surrogate(
    passes: Vec<Pass>,
    grad_logprobs: &Array2<f32>,
    grad_entropy: Option<&Array2<f32>>,
) -> TrainResult<Tensor<1>> {
    let mut total: Option<Tensor<1>> = None;
    for p in passes {
        let cols = p.scores.logprobs.dims()[1];
        let device = p.scores.logprobs.device();
        let weights = |g: &Array2<f32>| {
            let g = g.slice(ndarray::s![p.start..p.start + p.rows, ..]);
            tensor2(engine_buffer(g, cols), p.rows, cols, &device)
        };
        let mut term = (weights(grad_logprobs)? * p.scores.logprobs).sum();
        if let (Some(grad), Some(ent)) = (grad_entropy, p.scores.entropy) {
            term = term + (weights(grad)? * ent).sum();
        }
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    Ok(total.expect("a micro-batch has rows"))
}

/// Global L2 norm of accumulated gradients, and the same gradients scaled by `factor`.
pub(crate) fn grad_norm_and_scale<N: PolicyNetwork>(
    model: &N,
    grads: &mut GradientsParams,
    factor: Option<f64>,
) -> f64 {
    fn visit<const D: usize>(
        grads: &mut GradientsParams,
        id: burn::module::ParamId,
        factor: Option<f64>,
    ) -> f64 {
        let Some(g) = grads.remove::<D>(id) else {
            return 0.0;
        };
        let sq = f64::from(to_host(g.clone().powf_scalar(2.0).sum())[0]);
        let g = match factor {
            Some(f) => g.mul_scalar(f),
            None => g,
        };
        grads.register::<D>(id, g);
        sq
    }
    let mut total = 0.0;
    for p in model.params().iter().filter(|p| p.trainable) {
        total += match p.shape.len() {
            1 => visit::<1>(grads, p.id, factor),
            2 => visit::<2>(grads, p.id, factor),
            3 => visit::<3>(grads, p.id, factor),
            4 => visit::<4>(grads, p.id, factor),
            _ => visit::<5>(grads, p.id, factor),
        };
    }
    total.sqrt()
}
