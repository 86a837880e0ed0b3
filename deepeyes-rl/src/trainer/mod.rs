//! The GRPO trainer: rollouts through ONNX Runtime with the current weights, rewards, group
//! advantages, and updates of the burn model.
//!
//! One RL step ([`Trainer::train_step`]) is a sequence of phases, each a function of its own:
//! 1. **weight sync and rollout** (`rollout.rs`): publish the burn model's current weights to the
//!    rollout engine through [`deepeyes_core::WeightReceiver`] (ONNX Runtime, built once per run
//!    with [`deepeyes_core::onnx::OnnxModel::load_with_weights`], takes them in place, sessions
//!    kept), take `batch.prompts-per-step` items from the data (reshuffled every epoch with the
//!    `data` seed stream) and sample `grpo.group-size` trajectories per item with the agent loop
//!    and the tools;
//! 2. **score**: the reward function (any [`RewardFn`]) scores each trajectory; with dynamic
//!    sampling, rounds 1–2 repeat until enough groups carry a signal;
//! 3. **advantages** (`update.rs`): group advantages and the per-token targets
//!    ([`crate::grpo::prepare_batch`]);
//! 4. **log-probs**: the old policy's (only when the step takes several optimizer steps) and the
//!    KL reference's (only with a KL term), each once per step;
//! 5. **update**: for every mini-batch of the update plan, the gradient of the clipped surrogate
//!    accumulated over its micro-batches (`∂loss/∂logprob` from [`crate::grpo::policy_loss`],
//!    back-propagated through the burn model), the global norm clipped, one AdamW step;
//! 6. **log**: the step's metrics, appended to `metrics.jsonl`.
//!
//! The trainer sees tools and rewards only through core's traits ([`Tool`], [`RewardFn`]); the
//! CLI builds them from the config's `[tools]` and `[reward]` tables.
//!
//! [`Trainer::export`] writes a bundle that runs the trained weights (the source bundle's graphs
//! with a new `model.safetensors`), which `deepeyes run` and `deepeyes eval` load as is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::AdamWConfig;
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_core::{
    Image, ImageLimits, PromptTemplates, RewardBreakdown, RewardFn, Rng, Tool, Trajectory,
};

use crate::checkpoint::{Checkpoint, list_checkpoints};
use crate::config::{DeviceKind, TrainConfig};
use crate::metrics::{JsonlWriter, SkippedItem, StepMetrics, TimeSplit};
use crate::network::{
    ADAPTER_CONFIG, Adapters, ComputeDevice, LoraConfig, ModelError, PolicyNetwork, Qwen25Vl,
};
use deepeyes_core::dataset::{PreparedItem, prepare_item};

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
    /// The agent loop, images, tokenizer or reward function.
    #[error(transparent)]
    Core(#[from] deepeyes_core::Error),
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

/// The policy (from `checkpoint`, else the bundle) on an autodiff device, and the frozen KL
/// reference (the bundle's weights, on a plain device) when the loss has a KL term.
fn networks<N: PolicyNetwork>(
    config: &TrainConfig,
    checkpoint: Option<&Path>,
) -> TrainResult<(N, Option<N>)> {
    let compute = match config.model.device {
        DeviceKind::Cpu => ComputeDevice::Flex,
        DeviceKind::Cuda => ComputeDevice::Cuda(0),
    };
    let mut device = compute.device(true)?;
    if config.model.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    if let Some(dir) = checkpoint {
        check_adapter_kind(config, dir)?;
    }
    let mut model = match (&config.lora, checkpoint) {
        (None, _) => N::from_pretrained(checkpoint.unwrap_or(&config.model.bundle), &device)?,
        // A LoRA run's checkpoint holds the adapter; the base is the bundle's, unchanged.
        (Some(lora), dir) => {
            let base = N::from_pretrained(&config.model.bundle, &device)?;
            base.adapt(match dir {
                Some(dir) => Adapters::Saved(dir),
                None => Adapters::Fresh {
                    config: lora,
                    seed: config.seeds.adapters,
                },
            })?
        }
    };
    if config.model.freeze_vision {
        model = model.freeze_vision();
    }
    let chunk = config.model.attention_chunk;
    model = model.with_attention_chunk(chunk);
    // A LoRA run's reference is its own base with the adapters off (`fixed_logprobs`).
    let reference = if config.grpo.needs_reference() && config.lora.is_none() {
        Some(
            N::from_pretrained(&config.model.bundle, &compute.device(false)?)?
                .with_attention_chunk(chunk),
        )
    } else {
        None
    };
    Ok((model, reference))
}

/// A checkpoint continues only the kind of run that wrote it: full updates without `[lora]`, or
/// adapters of the same layers, rank and scale as the config's `[lora]`.
fn check_adapter_kind(config: &TrainConfig, dir: &Path) -> TrainResult<()> {
    let refuse = |reason: String| {
        Err(TrainError::Data {
            path: dir.to_path_buf(),
            reason,
        })
    };
    let saved = dir
        .join(ADAPTER_CONFIG)
        .is_file()
        .then(|| LoraConfig::of_adapter(dir))
        .transpose()?;
    match (&config.lora, saved) {
        (None, None) => Ok(()),
        (Some(_), None) => refuse(
            "was written by a run that trains every weight; the config's [lora] table cannot \
             continue it (remove [lora], or start a new run with --overwrite)"
                .into(),
        ),
        (None, Some(_)) => refuse(
            "holds a LoRA adapter, and the config has no [lora] table (restore the run's [lora] \
             table to continue it)"
                .into(),
        ),
        (Some(want), Some(saved)) if !want.same_adapters(&saved) => refuse(format!(
            "holds adapters of rank {}, alpha {}, target-modules {:?}, rsLoRA {}; the config's \
             [lora] asks for rank {}, alpha {}, target-modules {:?}, rsLoRA {}",
            saved.rank,
            saved.alpha,
            saved.target_modules,
            saved.use_rslora,
            want.rank,
            want.alpha,
            want.target_modules,
            want.use_rslora
        )),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// A fresh run must not overwrite another run's results: refuses an output folder that holds
/// checkpoints or metrics (resume that run, or remove them first: `deepeyes train --overwrite`).
fn refuse_earlier_run(config: &TrainConfig) -> TrainResult<()> {
    let checkpoints = list_checkpoints(&config.checkpoint_dir())?;
    let metrics = config.metrics_path();
    let has_metrics = std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0);
    if checkpoints.is_empty() && !has_metrics {
        return Ok(());
    }
    Err(TrainError::Data {
        path: config.output_dir.clone(),
        reason: format!(
            "holds an earlier run ({} checkpoints{}); resume it (`deepeyes train --resume`) or \
             start over and discard it (`--overwrite`)",
            checkpoints.len(),
            if has_metrics { ", metrics.jsonl" } else { "" }
        ),
    })
}

/// AdamW with the configured betas, epsilon and weight decay.
fn optimizer(config: &TrainConfig) -> burn::optim::ModuleOptimizer {
    let o = &config.optimizer;
    AdamWConfig::new()
        .with_beta_1(o.betas[0] as f32)
        .with_beta_2(o.betas[1] as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .init()
}

/// A GRPO training run of a network of family `N` (Qwen2.5-VL by default).
pub struct Trainer<N: PolicyNetwork = Qwen25Vl> {
    config: TrainConfig,
    data: DataWindow,
    reward: Arc<dyn RewardFn>,
    tools: Vec<Arc<dyn Tool>>,
    templates: PromptTemplates,
    model: Option<N>,
    reference: Option<N>,
    /// The bundle's image preprocessing, read once (the engine must see what ORT saw).
    preprocess: deepeyes_core::PreprocessConfig,
    optim: burn::optim::ModuleOptimizer,
    onnx: OnnxOptions,
    /// The rollout engine, built at the first rollout and kept: each step hands it the new
    /// weights in place (`rollout.rs`).
    engine: Option<Arc<OnnxModel>>,
    /// The remote rollout servers' client, with `rollout-engine = "remote"`.
    remote: Option<Arc<deepeyes_core::remote::RemoteModel>>,
    data_rng: Rng,
    order: Vec<usize>,
    cursor: usize,
    step: u64,
    metrics: JsonlWriter,
    /// Items skipped this step because their images do not decode.
    skipped: Vec<SkippedItem>,
}

impl<N: PolicyNetwork> std::fmt::Debug for Trainer<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("items", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Sets up a run of a Qwen2.5-VL policy: the data, the burn model from the bundle's
    /// `model.safetensors`, the optimizer and the metrics file. Refuses an output folder that
    /// holds another run's checkpoints or metrics. The policy may call `tools`;
    /// `reward` scores its trajectories. (The CLI builds both from the config's `[tools]` and
    /// `[reward]` tables.)
    pub fn new(
        config: TrainConfig,
        tools: Vec<Arc<dyn Tool>>,
        reward: Arc<dyn RewardFn>,
    ) -> TrainResult<Self> {
        Self::for_network(config, tools, reward, None)
    }

    /// Continues the run saved in `checkpoint` (written by [`Trainer::save_checkpoint`]):
    /// weights, optimizer state, data order and position, step. Metrics of later steps (logged
    /// by a run killed after the checkpoint) are dropped, so the next step is exactly the one an
    /// uninterrupted run would take. Take the checkpoint from
    /// [`crate::checkpoint::latest_intact`], which has checked every file against its manifest
    /// (so the weights are hashed once, not again here).
    pub fn resume(
        config: TrainConfig,
        tools: Vec<Arc<dyn Tool>>,
        reward: Arc<dyn RewardFn>,
        checkpoint: &Checkpoint,
    ) -> TrainResult<Self> {
        Self::for_network(config, tools, reward, Some(checkpoint))
    }
}

impl<N: PolicyNetwork> Trainer<N> {
    /// [`Trainer::new`] (or, with a `checkpoint`, [`Trainer::resume`]) for any network family.
    pub fn for_network(
        config: TrainConfig,
        tools: Vec<Arc<dyn Tool>>,
        reward: Arc<dyn RewardFn>,
        checkpoint: Option<&Checkpoint>,
    ) -> TrainResult<Self> {
        config.validate("train config")?;
        if config.model.rollout_engine == crate::config::RolloutEngine::Burn {
            return Err(TrainError::Rl(crate::Error::invalid(
                "model.rollout-engine",
                "\"burn\" is not implemented: use \"ort\" (ONNX Runtime in process) or \"remote\"",
            )));
        }
        if checkpoint.is_none() {
            refuse_earlier_run(&config)?;
        }
        let data = DataWindow::open(&config)?;
        let preprocess = deepeyes_core::onnx::BundleConfig::load(&config.model.bundle)?.preprocess;
        let (model, reference) = networks(&config, checkpoint.map(Checkpoint::dir))?;
        let mut optim = optimizer(&config);
        std::fs::create_dir_all(&config.output_dir).map_err(io_err(&config.output_dir))?;
        let metrics_path = config.metrics_path();
        let position = match checkpoint {
            Some(c) => {
                let (restored, position) = checkpoint::restore(c, optim, data.len())?;
                optim = restored;
                Some(position)
            }
            None => None,
        };
        let metrics = match &position {
            Some(p) => JsonlWriter::resume(&metrics_path, p.step.checked_sub(1))?,
            None => JsonlWriter::create(&metrics_path)?,
        };
        let fresh = position.is_none();
        let state = position.unwrap_or_else(|| RunPosition {
            step: 0,
            data_rng: Rng::new(config.seeds.data),
            order: (0..data.len()).collect(),
            cursor: usize::MAX,
        });
        // The prompts the starting bundle was trained with (its templates.toml), if it says.
        let templates = PromptTemplates::for_bundle(&config.model.bundle)?;
        let mut trainer = Self {
            config,
            data,
            reward,
            tools,
            templates,
            model: Some(model),
            reference,
            preprocess,
            optim,
            onnx: OnnxOptions::default(),
            engine: None,
            remote: None,
            data_rng: state.data_rng,
            order: state.order,
            cursor: state.cursor,
            step: state.step,
            metrics,
            skipped: Vec::new(),
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
        self.engine = None;
        self
    }

    /// How many data items the trainer holds in memory now (at most `data.window`).
    pub fn items_in_memory(&self) -> usize {
        self.data.held()
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
    pub fn model(&self) -> &N {
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

    /// The next `batch.prompts-per-step` items of the data stream with their decoded images.
    /// An item whose images do not decode is skipped (logged, and recorded in the step's
    /// metrics) and the next one taken in its place, so a resumed run skips it at the same
    /// point; a stream in which no item decodes is an error.
    fn next_items(&mut self) -> TrainResult<Vec<(PreparedItem, Vec<Image>)>> {
        let n = self.config.batch.prompts_per_step;
        let limits = ImageLimits::default();
        let mut out = Vec::with_capacity(n);
        let mut failed_in_a_row = 0;
        while out.len() < n {
            if self.cursor >= self.order.len() {
                self.new_epoch();
            }
            let item = self.data.item(&self.order, self.cursor)?;
            self.cursor += 1;
            match item.decode_images(&limits) {
                Ok(images) => {
                    failed_in_a_row = 0;
                    let seed = Rng::derive_seed(self.config.seeds.data, &[self.step]);
                    out.push((prepare_item(item.clone(), seed, true), images));
                }
                Err(e) => {
                    tracing::warn!(item = %item.id, cause = %e, "skipping an item whose images do not decode");
                    self.skipped.push(SkippedItem {
                        id: item.id.clone(),
                        cause: e.to_string(),
                    });
                    failed_in_a_row += 1;
                    if failed_in_a_row >= self.data.len() {
                        return Err(TrainError::Data {
                            path: self.config.data.paths.first().cloned().unwrap_or_default(),
                            reason: "no item's images decode".into(),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Runs one RL step and returns its metrics (also appended to the metrics file): the
    /// rollout half ([`Trainer::rollout_step`]) then the update half ([`Trainer::update_step`]).
    pub fn train_step(&mut self) -> TrainResult<StepMetrics> {
        let scored = self.rollout_step()?;
        self.update_step(&scored)
    }

    /// The first half of a step: weight sync, rollouts and rewards ([`Trainer::rollout`]).
    pub fn rollout_step(&mut self) -> TrainResult<ScoredStep> {
        let started = Instant::now();
        let (groups, time) = self.rollout()?;
        Ok(ScoredStep {
            groups,
            time,
            skipped: std::mem::take(&mut self.skipped),
            started,
        })
    }

    /// The second half of a step, on the rollouts of [`Trainer::rollout_step`]: advantages
    /// ([`StepBatch::advantages`]), fixed log-probs ([`Trainer::fixed_logprobs`]), the update
    /// ([`Trainer::update`]) and the log line; the step count advances.
    pub fn update_step(&mut self, scored: &ScoredStep) -> TrainResult<StepMetrics> {
        let mut time = scored.time.clone();
        let step = StepBatch::new(&scored.groups);
        let mut rollout = step.rollout_metrics()?;
        rollout.skipped_items = scored.skipped.clone();
        let batch = step.advantages(&self.config.grpo)?;
        let plan = self.update_plan(step.len())?;

        let t = Instant::now();
        let sequences = self.sequences(&step.trajectories)?;
        let fixed = self.fixed_logprobs(&sequences, &plan, batch.targets.mask.ncols())?;
        time.time_logprob_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let update = self.update(&sequences, &batch, &plan, &fixed)?;
        time.time_update_s = t.elapsed().as_secs_f64();

        time.time_step_s = scored.started.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: self.step,
            rollout,
            update,
            time,
        };
        self.metrics.write(&metrics)?;
        self.step += 1;
        Ok(metrics)
    }

    /// Writes a bundle that runs the current weights into `out`: the source bundle's graphs,
    /// tokenizer and maps, with the model's `config.json` and `model.safetensors`, and the tools
    /// configuration training used (the config's `[tools]`, else the source bundle's).
    pub fn export(&self, out: &Path) -> TrainResult<PathBuf> {
        self.export_into(out)?;
        Ok(out.to_path_buf())
    }

    /// [`Trainer::export`] into `out`.
    fn export_into(&self, out: &Path) -> TrainResult<()> {
        export_bundle(self.model(), &self.config.model.bundle, out)?;
        if !self.config.tools.is_empty() {
            checkpoint::write_tools_table(&self.config.tools, out)?;
        }
        Ok(())
    }
}

mod checkpoint;
mod data;
mod rollout;
mod update;

use checkpoint::RunPosition;
pub use checkpoint::{OPTIMIZER_FILE, export_bundle, write_tools_table};
use data::DataWindow;
use update::StepBatch;
pub use update::UpdateRecord;
pub(crate) use update::grad_norm_and_scale;

/// The rollout half of a step ([`Trainer::rollout_step`]): every group sampled with the step's
/// weights and scored, ready for [`Trainer::update_step`].
#[derive(Debug)]
pub struct ScoredStep {
    groups: Vec<RolledGroup>,
    time: TimeSplit,
    skipped: Vec<SkippedItem>,
    started: Instant,
}

impl ScoredStep {
    /// Every trajectory of the step, group by group.
    pub fn trajectories(&self) -> impl Iterator<Item = &Trajectory> {
        self.groups.iter().flat_map(|g| &g.trajectories)
    }
}

/// One prompt's sampled group with its rewards.
#[derive(Debug)]
struct RolledGroup {
    item: PreparedItem,
    trajectories: Vec<Trajectory>,
    rewards: Vec<RewardBreakdown>,
}
