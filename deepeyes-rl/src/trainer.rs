//! The GRPO trainer: rollouts through ONNX Runtime with the current weights, rewards, group
//! advantages, and updates of the burn model.
//!
//! One RL step:
//! 1. take `batch.prompts-per-step` items from the data (reshuffled every epoch with the `data`
//!    seed stream);
//! 2. hand the burn model's current weights to ONNX Runtime
//!    ([`deepeyes_core::onnx::OnnxModel::load_with_weights`]) and sample `grpo.group-size`
//!    trajectories per item with the agent loop and the tools;
//! 3. score each trajectory with the reward pipeline;
//! 4. compute group advantages and the per-token targets ([`crate::grpo::prepare_batch`]);
//! 5. recompute the old log-probs with the training engine, then for every mini-batch of the
//!    update plan accumulate the gradient of the clipped surrogate over its micro-batches
//!    (`∂loss/∂logprob` from [`crate::grpo::policy_loss`], back-propagated through the burn
//!    model), clip the global gradient norm and take one AdamW step;
//! 6. write the step's metrics.
//!
//! [`Trainer::export`] writes a bundle that runs the trained weights (the source bundle's graphs
//! with a new `model.safetensors`), which `deepeyes run` and `deepeyes eval` load as is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use deepeyes_core::dataset::{self, Item, LoadOptions, ReadError};
use deepeyes_core::onnx::{HostTensor, OnnxModel, OnnxOptions, Weights};
use deepeyes_core::preprocess::preprocess_image;
use deepeyes_core::{
    Agent, ImageLimits, PromptTemplates, RewardBreakdown, RewardFn, RewardInput, Rng, Task,
    Trajectory, VisionLanguageModel,
};
use deepeyes_reward::{Pipeline, PipelineConfig, Registry};
use deepeyes_tools::{ToolRegistry, ToolsConfig};
use ndarray::Array2;

use crate::config::{DatasetKind, DeviceKind, RewardSource, TrainConfig};
use crate::eval::{PreparedItem, prepare_item};
use crate::grpo::{
    DynamicSampler, PolicyLossInput, SamplerState, plan_updates, policy_loss, prepare_batch,
};
use crate::metrics::{
    JsonlWriter, RolloutMetrics, ScoredTrajectory, StepMetrics, TimeSplit, UpdateMetrics,
    rollout_metrics,
};
use crate::model::{
    Batch, ComputeDevice, ImageInput, ModelError, PadLayout, Qwen25Vl, Sequence, tensor2, to_host,
};
use crate::schedule::grad_clip_factor;

/// Everything that can stop training, naming the part at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration, the GRPO math or the metrics files.
    #[error(transparent)]
    Rl(#[from] crate::Error),
    /// The training engine.
    #[error("training engine: {0}")]
    Model(#[from] ModelError),
    /// The rollout engine.
    #[error("rollout engine: {0}")]
    Onnx(#[from] deepeyes_core::onnx::OnnxError),
    /// The agent loop, images or tokenizer.
    #[error(transparent)]
    Core(#[from] deepeyes_core::Error),
    /// The reward pipeline.
    #[error("reward: {0}")]
    Reward(#[from] deepeyes_reward::Error),
    /// The tools.
    #[error("tools: {0}")]
    Tools(#[from] deepeyes_tools::Error),
    /// The training data.
    #[error("data {path}: {reason}")]
    Data {
        /// The file or folder at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the run folder.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Result of a training operation.
pub type TrainResult<T> = std::result::Result<T, TrainError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every good item of the configured data; bad rows are logged and skipped.
pub fn load_items(config: &TrainConfig) -> TrainResult<Vec<Item>> {
    let kind = match config.data.kind {
        DatasetKind::DeepeyesParquet => dataset::DatasetKind::Verl,
        DatasetKind::Vstar => dataset::DatasetKind::VStar,
        DatasetKind::Hrbench => dataset::DatasetKind::HrBench,
        DatasetKind::Synthv => dataset::DatasetKind::SynthV,
        DatasetKind::Jsonl => dataset::DatasetKind::Jsonl,
    };
    let limit = config.data.limit.unwrap_or(usize::MAX);
    let mut items = Vec::new();
    for path in &config.data.paths {
        let mut reader =
            dataset::open(kind, path, &LoadOptions::default()).map_err(|e| TrainError::Data {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        for next in &mut reader {
            if items.len() >= limit {
                break;
            }
            match next {
                Ok(item) => items.push(item),
                Err(ReadError::Skipped(bad)) => tracing::warn!(row = %bad, "skipping a bad row"),
                Err(ReadError::Fatal(e)) => {
                    return Err(TrainError::Data {
                        path: path.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    if items.is_empty() {
        return Err(TrainError::Data {
            path: config.data.paths.first().cloned().unwrap_or_default(),
            reason: "no usable items".into(),
        });
    }
    Ok(items)
}

/// The reward pipeline configuration the training config names: its inline `[reward]` table,
/// its `reward-file`, or DeepEyes' shipped pipeline.
pub fn reward_config(config: &TrainConfig) -> TrainResult<PipelineConfig> {
    Ok(match config.reward_source() {
        RewardSource::Inline(table) => {
            let text = toml::to_string(table)
                .map_err(|e| TrainError::Rl(crate::Error::invalid("reward", e.to_string())))?;
            PipelineConfig::from_toml_str(&text, "[reward]")?
        }
        RewardSource::File(path) => PipelineConfig::from_toml_file(path)?,
        RewardSource::Default => PipelineConfig::deepeyes()?,
    })
}

/// Builds the reward pipeline the config names, with `registry` providing any custom reward
/// functions.
pub fn reward_pipeline(config: &TrainConfig, registry: &Registry) -> TrainResult<Pipeline> {
    Ok(reward_config(config)?.build(registry)?)
}

/// The model's parameters as the rollout engine takes them.
fn rollout_weights(model: &Qwen25Vl) -> Weights {
    model
        .hf_tensors()
        .into_iter()
        .map(|(name, (shape, data))| (name, HostTensor { shape, data }))
        .collect()
}

/// The ground truth a reward function sees: the correct option's letter as shown, or the
/// answer text of an open question.
fn ground_truth(p: &PreparedItem) -> String {
    p.correct_letter
        .map_or_else(|| p.item.answer.clone(), |l| l.to_string())
}

/// Global L2 norm of accumulated gradients, and the same gradients scaled by `factor`.
pub(crate) fn grad_norm_and_scale(
    model: &Qwen25Vl,
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

/// A GRPO training run.
pub struct Trainer {
    config: TrainConfig,
    items: Vec<Item>,
    pipeline: Pipeline,
    tools: ToolRegistry,
    templates: PromptTemplates,
    model: Option<Qwen25Vl>,
    reference: Option<Qwen25Vl>,
    /// The bundle's image preprocessing, read once (the engine must see what ORT saw).
    preprocess: deepeyes_core::PreprocessConfig,
    optim: burn::optim::ModuleOptimizer,
    onnx: OnnxOptions,
    data_rng: Rng,
    order: Vec<usize>,
    cursor: usize,
    step: u64,
    metrics: JsonlWriter,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("items", &self.items.len())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Sets up a run: data, tools, rewards (custom reward functions from `rewards`), the burn
    /// model from the bundle's `model.safetensors`, the optimizer and the metrics file.
    pub fn new(config: TrainConfig, rewards: &Registry) -> TrainResult<Self> {
        config.validate("train config")?;
        let pipeline = reward_pipeline(&config, rewards)?;
        Self::with_pipeline(config, pipeline)
    }

    /// Like [`Trainer::new`], with a reward pipeline built by the caller (e.g. without its
    /// judge).
    pub fn with_pipeline(config: TrainConfig, pipeline: Pipeline) -> TrainResult<Self> {
        Self::build(config, pipeline, None)
    }

    /// Continues the run saved in `checkpoint` (a folder written by
    /// [`Trainer::save_checkpoint`]): weights, optimizer state, data order and position, step.
    /// Metrics of later steps (logged by a run killed after the checkpoint) are dropped, so the
    /// next step is exactly the one an uninterrupted run would take.
    pub fn resume(config: TrainConfig, pipeline: Pipeline, checkpoint: &Path) -> TrainResult<Self> {
        Self::build(config, pipeline, Some(checkpoint))
    }

    fn build(
        config: TrainConfig,
        pipeline: Pipeline,
        checkpoint: Option<&Path>,
    ) -> TrainResult<Self> {
        config.validate("train config")?;
        if config.model.rollout_engine != crate::config::RolloutEngine::Ort {
            return Err(TrainError::Rl(crate::Error::invalid(
                "model.rollout-engine",
                "only \"ort\" is implemented (rollouts through ONNX Runtime with the current weights)",
            )));
        }
        let items = load_items(&config)?;
        let preprocess = deepeyes_core::onnx::BundleConfig::load(&config.model.bundle)?.preprocess;
        let tools_text = toml::to_string(&config.tools)
            .map_err(|e| TrainError::Rl(crate::Error::invalid("tools", e.to_string())))?;
        let tools =
            ToolRegistry::from_config(&ToolsConfig::from_toml_str(&tools_text, "[tools]")?)?;
        let device = match config.model.device {
            DeviceKind::Cpu => ComputeDevice::Flex,
            DeviceKind::Cuda => ComputeDevice::Cuda(0),
        }
        .device(true)?;
        let weights_dir = checkpoint.unwrap_or(&config.model.bundle);
        let mut model = Qwen25Vl::from_pretrained(weights_dir, &device)?;
        // The frozen reference of the KL term is the starting policy (the bundle's weights),
        // on a device that records no gradients.
        let reference = if config.grpo.needs_reference() {
            let plain = match config.model.device {
                DeviceKind::Cpu => ComputeDevice::Flex,
                DeviceKind::Cuda => ComputeDevice::Cuda(0),
            }
            .device(false)?;
            Some(Qwen25Vl::from_pretrained(&config.model.bundle, &plain)?)
        } else {
            None
        };
        if config.model.freeze_vision {
            model = model.freeze_vision();
        }
        let o = &config.optimizer;
        let mut optim = AdamWConfig::new()
            .with_beta_1(o.betas[0] as f32)
            .with_beta_2(o.betas[1] as f32)
            .with_epsilon(o.eps as f32)
            .with_weight_decay(o.weight_decay as f32)
            .init();
        std::fs::create_dir_all(&config.output_dir).map_err(io_err(&config.output_dir))?;
        let metrics_path = config.metrics_path();
        let state = match checkpoint {
            Some(dir) => {
                let path = dir.join(OPTIMIZER_FILE);
                let bytes = std::fs::read(&path).map_err(io_err(&path))?;
                optim = optim
                    .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
                    .map_err(|e| TrainError::Data {
                        path: path.clone(),
                        reason: format!("not an optimizer state: {e:?}"),
                    })?;
                let path = dir.join(STATE_FILE);
                let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
                let state: TrainerState =
                    serde_json::from_str(&text).map_err(|e| TrainError::Data {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if state.order.len() != items.len() {
                    return Err(TrainError::Data {
                        path,
                        reason: format!(
                            "the checkpoint's data has {} items, the configured data {}",
                            state.order.len(),
                            items.len()
                        ),
                    });
                }
                Some(state)
            }
            None => None,
        };
        let metrics = match &state {
            Some(s) => JsonlWriter::resume(&metrics_path, s.step.checked_sub(1))?,
            None => JsonlWriter::create(&metrics_path)?,
        };
        let fresh = state.is_none();
        let state = state.unwrap_or_else(|| TrainerState {
            step: 0,
            data_rng: Rng::new(config.seeds.data),
            order: (0..items.len()).collect(),
            cursor: usize::MAX,
        });
        // The prompts the starting bundle was trained with (its templates.toml), if it says.
        let templates = PromptTemplates::for_bundle(&config.model.bundle)?;
        let mut trainer = Self {
            config,
            items,
            pipeline,
            tools,
            templates,
            model: Some(model),
            reference,
            preprocess,
            optim,
            onnx: OnnxOptions::default(),
            data_rng: state.data_rng,
            order: state.order,
            cursor: state.cursor,
            step: state.step,
            metrics,
        };
        if fresh {
            trainer.new_epoch();
        }
        Ok(trainer)
    }

    /// Overrides the prompt templates.
    pub fn with_templates(mut self, templates: PromptTemplates) -> Self {
        self.templates = templates;
        self
    }

    /// Overrides how the rollout engine runs (threads, providers).
    pub fn with_onnx_options(mut self, options: OnnxOptions) -> Self {
        self.onnx = options;
        self
    }

    /// RL steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The policy being trained.
    pub fn model(&self) -> &Qwen25Vl {
        self.model
            .as_ref()
            .expect("the model is only taken during an update")
    }

    fn new_epoch(&mut self) {
        self.cursor = 0;
        if self.config.data.shuffle {
            self.data_rng.shuffle(&mut self.order);
        }
    }

    fn next_items(&mut self) -> Vec<PreparedItem> {
        let n = self.config.batch.prompts_per_step;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.cursor >= self.order.len() {
                self.new_epoch();
            }
            let item = self.items[self.order[self.cursor]].clone();
            self.cursor += 1;
            out.push(prepare_item(
                item,
                Rng::derive_seed(self.config.seeds.data, &[self.step]),
                true,
            ));
        }
        out
    }

    /// Runs one RL step and returns its metrics (also appended to the metrics file).
    pub fn train_step(&mut self) -> TrainResult<StepMetrics> {
        let started = Instant::now();
        let group = self.config.grpo.group_size;

        // Rollouts with the current weights, scored.
        let rollout_model = OnnxModel::load_with_weights(
            &self.config.model.bundle,
            &self.onnx,
            &rollout_weights(self.model()),
        )?;
        let tools: Vec<Arc<dyn deepeyes_core::Tool>> = self.tools.tools();
        let agent = Agent::new(
            &rollout_model,
            tools,
            self.templates.clone(),
            self.config.rollout.clone(),
        )?;
        let (mut time_rollout_s, mut time_reward_s) = (0.0, 0.0);
        let dynamic = self.config.grpo.dynamic_sampling.clone();
        let rolled: Vec<RolledGroup> = if dynamic.enabled {
            // DAPO: drop groups whose rewards are all equal (no advantage, no gradient) and
            // sample more prompts until the step has its full count, within max-rounds.
            let mut sampler =
                DynamicSampler::new(self.config.batch.prompts_per_step, dynamic.max_rounds)?;
            let mut round = 0;
            loop {
                let groups = self.roll_round(
                    &agent,
                    &rollout_model,
                    round,
                    &mut time_rollout_s,
                    &mut time_reward_s,
                )?;
                for g in groups {
                    let totals: Vec<f64> = g.rewards.iter().map(|b| b.total).collect();
                    sampler.offer(g, &totals)?;
                }
                round += 1;
                if !matches!(sampler.end_round(), SamplerState::NeedMore { .. }) {
                    break;
                }
            }
            tracing::debug!(
                rounds = sampler.rounds(),
                dropped = sampler.dropped(),
                "dynamic sampling"
            );
            sampler.into_groups()
        } else {
            self.roll_round(
                &agent,
                &rollout_model,
                0,
                &mut time_rollout_s,
                &mut time_reward_s,
            )?
        };
        let prepared: Vec<&PreparedItem> = rolled.iter().map(|g| &g.item).collect();
        let mut trajectories: Vec<&Trajectory> = Vec::with_capacity(rolled.len() * group);
        let mut group_ids = Vec::with_capacity(rolled.len() * group);
        let mut breakdowns: Vec<&RewardBreakdown> = Vec::with_capacity(rolled.len() * group);
        for (g, r) in rolled.iter().enumerate() {
            for (traj, reward) in r.trajectories.iter().zip(&r.rewards) {
                trajectories.push(traj);
                breakdowns.push(reward);
                group_ids.push(g);
            }
        }
        let rewards: Vec<f64> = breakdowns.iter().map(|b| b.total).collect();
        let boxes: Vec<Vec<[f64; 4]>> = prepared
            .iter()
            .map(|p| p.item.boxes.iter().map(|b| b.bbox).collect())
            .collect();
        let scored: Vec<ScoredTrajectory<'_>> = trajectories
            .iter()
            .zip(breakdowns.iter().copied())
            .zip(&group_ids)
            .map(|((t, r), &g)| ScoredTrajectory {
                trajectory: t,
                reward: r,
                group: g,
                gt_boxes: &boxes[g],
            })
            .collect();
        let rollout: RolloutMetrics = rollout_metrics(&scored)?;

        // Advantages and targets.
        let batch = prepare_batch(&self.config.grpo, &trajectories, &rewards, &group_ids)?;
        // The samples of a group share their input image: preprocess each image once a step.
        let mut preprocessed = std::collections::HashMap::new();
        let sequences: Vec<Sequence> = trajectories
            .iter()
            .map(|t| self.sequence(t, &mut preprocessed))
            .collect::<TrainResult<_>>()?;

        let n = trajectories.len();
        let width = batch.targets.mask.ncols();
        let micro = self.config.batch.micro_batch.max(1);
        let plan = plan_updates(
            n,
            self.config.batch.mini_batch_trajectories(group),
            micro,
            self.config.batch.epochs,
            None,
        )?;
        // Old log-probs, recomputed by the training engine. With a single optimizer step the
        // policy does not change before every micro-batch has been scored, so the log-probs of
        // the update's own forward pass are the old ones (the ratio is exactly 1) and the
        // separate pass is skipped.
        let t = Instant::now();
        let single_update = plan.optimizer_steps() == 1;
        let mut old = Array2::<f32>::zeros((n, width));
        if !single_update {
            for rows in (0..n)
                .collect::<Vec<_>>()
                .chunks(self.config.batch.logprob_micro_batch.max(1))
            {
                let seqs: Vec<Sequence> = rows.iter().map(|&r| sequences[r].clone()).collect();
                let b = Batch::new(&self.model().config, &seqs, PadLayout::OnePerImage)?;
                let scores = self.model().score_tokens(&b, false)?;
                let host = to_host(scores.logprobs.detach());
                for (i, &r) in rows.iter().enumerate() {
                    let len = sequences[r].tokens.len().min(b.score_len);
                    for j in 0..len {
                        old[(r, j)] = host[i * b.score_len + j];
                    }
                }
            }
        }
        let time_logprob_s = t.elapsed().as_secs_f64();

        // Updates.
        let t = Instant::now();
        let lr = self
            .config
            .schedule
            .lr(self.config.optimizer.lr, self.step, self.config.steps);
        let mut stats: Option<crate::grpo::LossStats> = None;
        let mut grad_norm = 0.0;
        let mut skipped = 0;
        let mut optimizer_steps = 0;
        for epoch in &plan.epochs {
            for mini in epoch {
                let mut accumulator = GradientsAccumulator::<Qwen25Vl>::new();
                for rows in &mini.micro_batches {
                    let targets = batch.targets.select(rows)?;
                    let scale = batch
                        .targets
                        .loss_scale(self.config.grpo.loss_normalization, mini)?;
                    let seqs: Vec<Sequence> = rows.iter().map(|&r| sequences[r].clone()).collect();
                    let model = self.model();
                    let b = Batch::new(&model.config, &seqs, PadLayout::OnePerImage)?;
                    let scores = model.score_tokens(&b, self.config.grpo.needs_entropy())?;
                    let w = targets.mask.ncols();
                    let cols = b.score_len;
                    // `[rows, w]` host copy of a `[rows, cols]` engine tensor.
                    let grid = |host: Vec<f32>| {
                        let mut a = Array2::<f32>::zeros((rows.len(), w));
                        for i in 0..rows.len() {
                            for j in 0..w.min(cols) {
                                a[(i, j)] = host[i * cols + j];
                            }
                        }
                        a
                    };
                    let logp = grid(to_host(scores.logprobs.clone().detach()));
                    let old_rows = if single_update {
                        logp.clone()
                    } else {
                        let mut a = Array2::<f32>::zeros((rows.len(), w));
                        for (i, &r) in rows.iter().enumerate() {
                            for j in 0..w {
                                a[(i, j)] = old[(r, j)];
                            }
                        }
                        a
                    };
                    let entropy = scores
                        .entropy
                        .as_ref()
                        .map(|e| grid(to_host(e.clone().detach())));
                    let reference = match &self.reference {
                        Some(r) => {
                            let rb = Batch::new(&r.config, &seqs, PadLayout::OnePerImage)?;
                            Some(grid(to_host(r.score_tokens(&rb, false)?.logprobs)))
                        }
                        None => None,
                    };
                    let out = policy_loss(
                        &self.config.grpo,
                        &PolicyLossInput {
                            logprobs: logp.view(),
                            old_logprobs: old_rows.view(),
                            advantages: targets.advantages.view(),
                            mask: targets.mask.view(),
                            ref_logprobs: reference.as_ref().map(|a| a.view()),
                            entropy: entropy.as_ref().map(|a| a.view()),
                            rollout_logprobs: Some(targets.rollout_logprobs.view()),
                        },
                        scale,
                    )?;
                    match &mut stats {
                        Some(s) => s.merge(&out.stats),
                        None => stats = Some(out.stats.clone()),
                    }
                    // d loss / d logprob as per-token weights on the engine's log-probs.
                    let mut weights = vec![0.0f32; rows.len() * cols];
                    for i in 0..rows.len() {
                        for j in 0..w.min(cols) {
                            weights[i * cols + j] = out.grad_logprobs[(i, j)];
                        }
                    }
                    let weights = tensor2(weights, rows.len(), cols, &model.device())?;
                    let mut surrogate: Tensor<1> = (weights * scores.logprobs).sum();
                    if let (Some(grad), Some(ent)) = (&out.grad_entropy, scores.entropy) {
                        let mut we = vec![0.0f32; rows.len() * cols];
                        for i in 0..rows.len() {
                            for j in 0..w.min(cols) {
                                we[i * cols + j] = grad[(i, j)];
                            }
                        }
                        let we = tensor2(we, rows.len(), cols, &model.device())?;
                        surrogate = surrogate + (we * ent).sum();
                    }
                    let grads = surrogate.backward();
                    let grads = GradientsParams::from_grads(grads, model);
                    accumulator.accumulate(model, grads);
                }
                let mut grads = accumulator.grads();
                let norm = grad_norm_and_scale(self.model(), &mut grads, None);
                grad_norm = norm;
                if !norm.is_finite() {
                    skipped += 1;
                    tracing::warn!(step = self.step, "non-finite gradient norm; update skipped");
                    continue;
                }
                let factor = grad_clip_factor(norm, self.config.optimizer.grad_clip)?;
                if factor < 1.0 {
                    grad_norm_and_scale(self.model(), &mut grads, Some(factor));
                }
                let model = self.model.take().expect("the model is present");
                self.model = Some(self.optim.step(lr, model, grads));
                optimizer_steps += 1;
            }
        }
        let time_update_s = t.elapsed().as_secs_f64();
        let stats = stats.unwrap_or_default();
        let metrics = StepMetrics {
            step: self.step,
            rollout,
            update: UpdateMetrics::from_loss(&stats, grad_norm, lr, optimizer_steps, skipped),
            time: TimeSplit {
                time_rollout_s,
                time_reward_s,
                time_logprob_s,
                time_update_s,
                time_step_s: started.elapsed().as_secs_f64(),
            },
        };
        self.metrics.write(&metrics)?;
        self.step += 1;
        Ok(metrics)
    }

    /// Samples one group per next item and scores it; round `r > 0` (dynamic sampling) draws
    /// from its own seed stream.
    fn roll_round(
        &mut self,
        agent: &Agent<'_>,
        rollout_model: &OnnxModel,
        round: u64,
        time_rollout_s: &mut f64,
        time_reward_s: &mut f64,
    ) -> TrainResult<Vec<RolledGroup>> {
        let t = Instant::now();
        let prepared = self.next_items();
        let limits = ImageLimits::default();
        let mut tasks = Vec::with_capacity(prepared.len());
        for p in &prepared {
            tasks.push(Task {
                question: p.question.clone(),
                images: p.item.decode_images(&limits)?,
            });
        }
        let path: &[u64] = if round == 0 {
            &[self.step]
        } else {
            &[self.step, round]
        };
        let seed = Rng::derive_seed(self.config.seeds.rollout, path);
        let groups = agent.run_batch(&tasks, self.config.grpo.group_size, seed)?;
        *time_rollout_s += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let codec = rollout_model.codec();
        let mut out = Vec::with_capacity(prepared.len());
        for (p, trajectories) in prepared.into_iter().zip(groups) {
            let truth = ground_truth(&p);
            let mut rewards = Vec::with_capacity(trajectories.len());
            for traj in &trajectories {
                let response = codec.decode(traj.response_tokens())?;
                let input = RewardInput {
                    data_source: &p.item.data_source,
                    question: &p.question,
                    ground_truth: &truth,
                    response: &response,
                    trajectory: Some(traj),
                };
                rewards.push(self.pipeline.score(&input)?);
            }
            out.push(RolledGroup {
                item: p,
                trajectories,
                rewards,
            });
        }
        *time_reward_s += t.elapsed().as_secs_f64();
        Ok(out)
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
            tokens: traj.tokens.clone(),
            images,
        })
    }

    /// Writes a checkpoint of the run after the steps done so far into
    /// `checkpoint.dir/step-NNNNNN`: a bundle that runs the current weights (so any checkpoint can
    /// be evaluated), the optimizer state and the trainer state. It is written in a temporary
    /// folder renamed into place, so a kill never leaves a half-written checkpoint; older ones
    /// beyond `checkpoint.keep-last` are removed.
    pub fn save_checkpoint(&self) -> TrainResult<PathBuf> {
        let root = self.config.checkpoint_dir();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let name = format!("step-{:06}", self.step);
        let dir = root.join(&name);
        let tmp = root.join(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        export_bundle(self.model(), &self.config.model.bundle, &tmp)?;
        let bytes = self.optim.into_bytes().map_err(|e| TrainError::Data {
            path: tmp.join(OPTIMIZER_FILE),
            reason: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        let path = tmp.join(OPTIMIZER_FILE);
        std::fs::write(&path, &bytes[..]).map_err(io_err(&path))?;
        let state = TrainerState {
            step: self.step,
            data_rng: self.data_rng.clone(),
            order: self.order.clone(),
            cursor: self.cursor,
        };
        let path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state).expect("the state serialises");
        std::fs::write(&path, text).map_err(io_err(&path))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let keep = self.config.checkpoint.keep_last;
        if keep > 0 {
            let all = checkpoints(&root)?;
            for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
                std::fs::remove_dir_all(old).map_err(io_err(old))?;
            }
        }
        Ok(dir)
    }

    /// Writes a bundle that runs the current weights into `out`: the source bundle's graphs,
    /// tokenizer and maps, with the model's `config.json` and `model.safetensors`.
    pub fn export(&self, out: &Path) -> TrainResult<PathBuf> {
        export_bundle(self.model(), &self.config.model.bundle, out)
    }
}

/// One prompt's sampled group with its rewards.
#[derive(Debug)]
struct RolledGroup {
    item: PreparedItem,
    trajectories: Vec<Trajectory>,
    rewards: Vec<RewardBreakdown>,
}

/// The optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer-state.json";

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    /// RL steps completed.
    step: u64,
    /// The data-order stream.
    data_rng: Rng,
    /// The current epoch's item order.
    order: Vec<usize>,
    /// The next position in `order`.
    cursor: usize,
}

/// The complete checkpoints in `root`, oldest first, with their step.
pub fn checkpoints(root: &Path) -> TrainResult<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `model`'s weights as a bundle in `out`, next to copies of the files of `source` (a
/// bundle with a weight map).
pub fn export_bundle(model: &Qwen25Vl, source: &Path, out: &Path) -> TrainResult<PathBuf> {
    if !source
        .join(deepeyes_core::onnx::weights::WEIGHT_MAP_FILE)
        .is_file()
    {
        return Err(TrainError::Data {
            path: source.to_path_buf(),
            reason: "the bundle has no weights.json, so it cannot run new weights; re-export it"
                .into(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let entries = std::fs::read_dir(source).map_err(io_err(source))?;
    for entry in entries {
        let entry = entry.map_err(io_err(source))?;
        let name = entry.file_name();
        if name == "model.safetensors" || name == "config.json" || !entry.path().is_file() {
            continue;
        }
        let to = out.join(&name);
        std::fs::copy(entry.path(), &to).map_err(io_err(&to))?;
    }
    model.save_pretrained(out)?;
    // The copied graphs hold the source's weights, not these: they must be replaced at load.
    if let Some(mut map) = deepeyes_core::onnx::WeightMap::load(out)?
        && map.graphs_current
    {
        map.graphs_current = false;
        map.save(out)?;
    }
    Ok(out.to_path_buf())
}
