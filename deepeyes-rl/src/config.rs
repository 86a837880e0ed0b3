//! The training configuration read by `deepeyes train --config FILE.toml`.
//!
//! Every table rejects unknown keys; [`TrainConfig::from_toml_str`] parses and then validates all
//! values before any work starts, reporting every invalid key by its dotted path. Relative paths
//! are kept as written (the trainer resolves them against the working directory). See
//! `configs/train/example.toml` for a complete file.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use deepeyes_core::AgentConfig;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigProblem, Error, Result};
use crate::grpo::GrpoConfig;
use crate::network::LoraConfig;
use crate::schedule::ScheduleConfig;

/// The formats a training dataset can come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// DeepEyes' released parquet files (verl row format).
    DeepeyesParquet,
    /// A V* Bench folder.
    Vstar,
    /// An HR-Bench TSV file.
    Hrbench,
    /// The JSONL index the SynthV* generator writes.
    Synthv,
    /// Generic JSONL rows.
    Jsonl,
}

/// Where the training prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataConfig {
    /// The format of the files.
    pub kind: DatasetKind,
    /// One or more files (or folders, for `vstar`), read in order.
    pub paths: Vec<PathBuf>,
    /// Shuffle the prompts each epoch with the `seeds.data` stream (true).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Use only the first `limit` rows (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// How many items the trainer holds in memory at once (1024): the next `window` items of
    /// the epoch's order; when the draw leaves them the files are streamed again for the next
    /// window. Memory is bounded by the window, not the data's size, and the items drawn are
    /// the same for any window; a data set no larger than the window is read once.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Let rows name image files outside the data's folder (absolute paths, or `..` above it);
    /// refused by default (false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_paths_outside_root: bool,
}

fn default_window() -> usize {
    1024
}

/// Which engine samples the rollouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutEngine {
    /// ONNX Runtime, refreshed with the new weights every step (fast).
    #[default]
    Ort,
    /// The training engine itself (not implemented yet: the trainer refuses it).
    Burn,
    /// Inference servers speaking SGLang's native API (`deepeyes serve`, or SGLang itself),
    /// listed in `rollout-servers`; each step's weights are handed over as a file they load
    /// (docs/SERVE.md).
    Remote,
}

/// Where the training engine runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA GPU (needs the `cuda` feature).
    Cuda,
}

/// The policy being trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelConfig {
    /// The model bundle directory the policy starts from (also the frozen reference when
    /// `grpo.kl-coef` is not 0).
    pub bundle: PathBuf,
    /// Keep the vision tower's weights fixed (false).
    #[serde(default)]
    pub freeze_vision: bool,
    /// Which engine samples rollouts (`ort`).
    #[serde(default)]
    pub rollout_engine: RolloutEngine,
    /// Base URLs of the rollout servers, with `rollout-engine = "remote"`. They must run this
    /// bundle and read the run's `output-dir` (weight versions are written there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollout_servers: Vec<String>,
    /// Remote rollouts send each generate call whole to one server, so they equal in-process
    /// rollouts exactly (false: each call is split over the servers and runs in parallel).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollout_deterministic: bool,
    /// The environment variable holding the rollout servers' API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_api_key_env: Option<String>,
    /// Where the training engine runs (`cpu`).
    #[serde(default)]
    pub device: DeviceKind,
    /// burn's gradient checkpointing (false): element-wise results are recomputed in the
    /// backward pass instead of kept, at the same gradients; matrix products are still kept.
    /// Attention scores and the output head's logits of long sequences are never kept whole
    /// either way (`attention-chunk`; docs/LORA.md, "Activation memory").
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Query rows attended at once (512): longer sequences are attended a chunk at a time and
    /// each chunk's scores recomputed in the backward pass, so attention's memory grows
    /// linearly with the length; shorter ones are attended whole. Same results either way.
    #[serde(default = "default_attention_chunk")]
    pub attention_chunk: usize,
}

fn default_attention_chunk() -> usize {
    crate::network::DEFAULT_ATTENTION_CHUNK
}

/// Seeds of the independent random streams of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SeedsConfig {
    /// Data order (0).
    pub data: u64,
    /// Rollout sampling (0).
    pub rollout: u64,
    /// The start of LoRA adapters, with `[lora]` (0).
    pub adapters: u64,
}

/// Batch sizes of one RL step. Defaults are DeepEyes' 7B run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BatchConfig {
    /// Prompts per RL step (256); each is sampled `grpo.group-size` times.
    pub prompts_per_step: usize,
    /// Prompts per optimizer step (256: the whole batch, one update per step).
    pub mini_batch_prompts: usize,
    /// Trajectories per forward/backward pass; gradients are accumulated over a mini-batch (4).
    pub micro_batch: usize,
    /// Trajectories per forward pass when recomputing old log-probs (8).
    pub logprob_micro_batch: usize,
    /// Trajectories per forward/backward pass of the training engine (16). A larger
    /// micro-batch runs in several passes whose gradients add up (its loss is still normalised
    /// as one micro-batch, so the update is the same): on a CPU, passes whose activations stay in
    /// cache are faster.
    pub engine_micro_batch: usize,
    /// Micro-batches whose gradients are computed at the same time, each on its own thread
    /// (1). On a CPU a small model's passes keep about one core busy; 2 keeps two busy, for
    /// twice the activations in memory. Gradients are added in micro-batch order, so the
    /// update is the same bit for bit.
    pub concurrent_micro_batches: usize,
    /// Passes over the step's trajectories (1).
    pub epochs: usize,
    /// Shuffle trajectories before cutting mini-batches (false, as verl).
    pub shuffle: bool,
    /// Run the prompt (and image) that the samples of a group share once per micro-batch
    /// instead of once per sample (true); the log-probs and gradients are the same.
    pub share_prefixes: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            prompts_per_step: 256,
            mini_batch_prompts: 256,
            micro_batch: 4,
            logprob_micro_batch: 8,
            engine_micro_batch: 16,
            concurrent_micro_batches: 1,
            epochs: 1,
            shuffle: false,
            share_prefixes: true,
        }
    }
}

impl BatchConfig {
    /// Trajectories per mini-batch for groups of `group_size`.
    pub fn mini_batch_trajectories(&self, group_size: usize) -> usize {
        self.mini_batch_prompts * group_size
    }

    /// Micro-batches accumulated per optimizer step for groups of `group_size`.
    pub fn accumulation_steps(&self, group_size: usize) -> usize {
        self.mini_batch_trajectories(group_size)
            .div_ceil(self.micro_batch.max(1))
    }

    /// Optimizer steps per RL step.
    pub fn optimizer_steps_per_step(&self) -> usize {
        self.epochs
            * self
                .prompts_per_step
                .div_ceil(self.mini_batch_prompts.max(1))
    }
}

/// AdamW settings. Defaults are DeepEyes'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OptimizerConfig {
    /// Base learning rate (1e-6).
    pub lr: f64,
    /// Decoupled weight decay (0.01).
    pub weight_decay: f64,
    /// Adam's β₁, β₂ ([0.9, 0.999]).
    pub betas: [f64; 2],
    /// Adam's ε (1e-8).
    pub eps: f64,
    /// Clip the global gradient norm to this (1.0); `false` disables clipping.
    #[serde(with = "off_or_number")]
    pub grad_clip: Option<f64>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            weight_decay: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            grad_clip: Some(1.0),
        }
    }
}

/// When and where checkpoints are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CheckpointConfig {
    /// Write one every this many RL steps (8, DeepEyes' `save_freq`); 0 writes only the last.
    pub every: u64,
    /// Keep only the newest this many (0 keeps all).
    pub keep_last: usize,
    /// Folder, relative to `output-dir` unless absolute (`checkpoints`).
    pub dir: PathBuf,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 8,
            keep_last: 0,
            dir: PathBuf::from("checkpoints"),
        }
    }
}

/// Metrics output and the tool-collapse alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MetricsConfig {
    /// Per-step JSONL file, relative to `output-dir` unless absolute (`metrics.jsonl`).
    pub file: PathBuf,
    /// Warn when tool calls per trajectory stay below this … (0.1)
    pub tool_collapse_threshold: f64,
    /// … for this many consecutive steps (5); 0 disables the alarm.
    pub tool_collapse_steps: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            file: PathBuf::from("metrics.jsonl"),
            tool_collapse_threshold: 0.1,
            tool_collapse_steps: 5,
        }
    }
}

/// Where the reward pipeline's configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RewardSource<'a> {
    /// The `[reward]` table of the training config.
    Inline(&'a toml::Table),
    /// A separate TOML file (`reward-file`).
    File(&'a Path),
    /// Neither was given: the shipped DeepEyes pipeline.
    Default,
}

/// Everything `deepeyes train` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainConfig {
    /// Run folder: metrics, checkpoints and logs go here.
    pub output_dir: PathBuf,
    /// RL steps to run (80, as DeepEyes trained).
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// A reward pipeline file; mutually exclusive with `[reward]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_file: Option<PathBuf>,
    /// Random seeds.
    #[serde(default)]
    pub seeds: SeedsConfig,
    /// Training data.
    pub data: DataConfig,
    /// The policy.
    pub model: ModelConfig,
    /// Train LoRA adapters on a frozen base instead of every weight (absent: full updates).
    /// Checkpoints then hold the adapter as PEFT writes it next to the merged bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Tool registry configuration, passed as is to the tools crate (empty: the default tools).
    #[serde(default)]
    pub tools: toml::Table,
    /// Inline reward pipeline, passed as is to the reward crate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<toml::Table>,
    /// Rollout limits and sampling: the agent loop's configuration.
    #[serde(default)]
    pub rollout: AgentConfig,
    /// Batch sizes.
    #[serde(default)]
    pub batch: BatchConfig,
    /// The GRPO algorithm.
    #[serde(default)]
    pub grpo: GrpoConfig,
    /// AdamW.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule over RL steps.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

fn default_steps() -> u64 {
    80
}

fn yes() -> bool {
    true
}

/// Collects invalid values with their keys.
#[derive(Debug, Default)]
pub(crate) struct ConfigErrors(Vec<ConfigProblem>);

impl ConfigErrors {
    pub(crate) fn push(&mut self, key: impl Into<String>, reason: impl Display) {
        self.0.push(ConfigProblem {
            key: key.into(),
            reason: reason.to_string(),
        });
    }

    pub(crate) fn into_result(self, origin: &str) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Config {
                origin: origin.to_string(),
                problems: self.0,
            })
        }
    }
}

fn empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl TrainConfig {
    /// Parses and validates a TOML document; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::ConfigParse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The config as TOML (what a checkpoint stores).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::ConfigParse {
            origin: "<serialise>".into(),
            message: e.to_string(),
        })
    }

    /// Checks every value; the error lists each invalid key.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let mut errs = ConfigErrors::default();
        if empty_path(&self.output_dir) {
            errs.push("output-dir", "must not be empty");
        }
        if self.steps == 0 {
            errs.push("steps", "must be at least 1");
        }
        if self.reward.is_some() && self.reward_file.is_some() {
            errs.push(
                "reward-file",
                "give either `reward-file` or a `[reward]` table, not both",
            );
        }
        if self.reward_file.as_deref().is_some_and(empty_path) {
            errs.push("reward-file", "must not be empty");
        }

        if self.data.paths.is_empty() {
            errs.push("data.paths", "needs at least one path");
        }
        for (i, p) in self.data.paths.iter().enumerate() {
            if empty_path(p) {
                errs.push(format!("data.paths[{i}]"), "must not be empty");
            }
        }
        if self.data.window == 0 {
            errs.push("data.window", "must be at least 1 item");
        }
        if self.data.limit == Some(0) {
            errs.push("data.limit", "must be at least 1 (omit it to use all rows)");
        }
        match self.model.rollout_engine {
            RolloutEngine::Remote if self.model.rollout_servers.is_empty() => errs.push(
                "model.rollout-servers",
                "rollout-engine = \"remote\" needs at least one server URL",
            ),
            RolloutEngine::Remote => {
                for (i, url) in self.model.rollout_servers.iter().enumerate() {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        errs.push(
                            format!("model.rollout-servers[{i}]"),
                            format!("'{url}' is not an http(s) URL"),
                        );
                    }
                }
            }
            _ if !self.model.rollout_servers.is_empty() => errs.push(
                "model.rollout-servers",
                "only taken with rollout-engine = \"remote\"",
            ),
            _ => {}
        }
        if self.model.attention_chunk == 0 {
            errs.push("model.attention-chunk", "must be at least 1 query row");
        }
        if empty_path(&self.model.bundle) {
            errs.push("model.bundle", "must not be empty");
        }
        if let Some(Err(e)) = self.lora.as_ref().map(LoraConfig::validate) {
            errs.push("lora", e);
        }

        if let Err(e) = self.rollout.validate() {
            match e {
                deepeyes_core::Error::Config { origin, reason } => {
                    errs.push(origin.replacen("agent.", "rollout.", 1), reason)
                }
                other => errs.push("rollout", other),
            }
        }

        let b = &self.batch;
        let group = self.grpo.group_size;
        for (key, v) in [
            ("batch.prompts-per-step", b.prompts_per_step),
            ("batch.mini-batch-prompts", b.mini_batch_prompts),
            ("batch.micro-batch", b.micro_batch),
            ("batch.logprob-micro-batch", b.logprob_micro_batch),
            ("batch.engine-micro-batch", b.engine_micro_batch),
            ("batch.concurrent-micro-batches", b.concurrent_micro_batches),
            ("batch.epochs", b.epochs),
        ] {
            if v == 0 {
                errs.push(key, "must be at least 1");
            }
        }
        if b.mini_batch_prompts > 0 && !b.prompts_per_step.is_multiple_of(b.mini_batch_prompts) {
            errs.push(
                "batch.mini-batch-prompts",
                format!(
                    "{} does not divide batch.prompts-per-step = {}",
                    b.mini_batch_prompts, b.prompts_per_step
                ),
            );
        }
        if b.micro_batch > 0
            && group > 0
            && !b
                .mini_batch_trajectories(group)
                .is_multiple_of(b.micro_batch)
        {
            errs.push(
                "batch.micro-batch",
                format!(
                    "{} does not divide the {} trajectories of a mini-batch \
                     (mini-batch-prompts × grpo.group-size)",
                    b.micro_batch,
                    b.mini_batch_trajectories(group)
                ),
            );
        }

        self.grpo.check("grpo", &mut errs);

        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            errs.push("optimizer.lr", "must be a positive number");
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            errs.push("optimizer.weight-decay", "must be a finite number ≥ 0");
        }
        for (i, beta) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(beta) {
                errs.push(format!("optimizer.betas[{i}]"), "must be in [0, 1)");
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            errs.push("optimizer.eps", "must be a positive number");
        }
        if let Some(c) = o.grad_clip
            && !(c > 0.0 && c.is_finite())
        {
            errs.push(
                "optimizer.grad-clip",
                "must be a positive number, or false to disable clipping",
            );
        }

        self.schedule.check("schedule", self.steps, &mut errs);

        if empty_path(&self.checkpoint.dir) {
            errs.push("checkpoint.dir", "must not be empty");
        }
        if empty_path(&self.metrics.file) {
            errs.push("metrics.file", "must not be empty");
        }
        let t = self.metrics.tool_collapse_threshold;
        if !(t >= 0.0 && t.is_finite()) {
            errs.push(
                "metrics.tool-collapse-threshold",
                "must be a finite number ≥ 0",
            );
        }
        errs.into_result(origin)
    }

    /// Checks that the input paths exist (data files, model bundle, reward file), so a run fails
    /// before any work instead of after the first rollout.
    pub fn check_paths(&self, origin: &str) -> Result<()> {
        let mut errs = ConfigErrors::default();
        for (i, p) in self.data.paths.iter().enumerate() {
            if !p.exists() {
                errs.push(
                    format!("data.paths[{i}]"),
                    format!("{} does not exist", p.display()),
                );
            }
        }
        if !self.model.bundle.is_dir() {
            errs.push(
                "model.bundle",
                format!("{} is not a directory", self.model.bundle.display()),
            );
        }
        if let Some(p) = &self.reward_file
            && !p.is_file()
        {
            errs.push("reward-file", format!("{} is not a file", p.display()));
        }
        errs.into_result(origin)
    }

    /// Where the reward pipeline's configuration comes from.
    pub fn reward_source(&self) -> RewardSource<'_> {
        match (&self.reward, &self.reward_file) {
            (Some(t), _) => RewardSource::Inline(t),
            (None, Some(p)) => RewardSource::File(p),
            (None, None) => RewardSource::Default,
        }
    }

    /// The checkpoint folder (`checkpoint.dir` under `output-dir` unless absolute).
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.output_dir.join(&self.checkpoint.dir)
    }

    /// The metrics file (`metrics.file` under `output-dir` unless absolute).
    pub fn metrics_path(&self) -> PathBuf {
        self.output_dir.join(&self.metrics.file)
    }
}

/// Serde adapter: `false` ↔ `None`, a number ↔ `Some`.
pub(crate) mod off_or_number {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        Flag(bool),
        Number(f64),
    }

    pub(crate) fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_f64(*x),
            None => s.serialize_bool(false),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Wire::deserialize(d)? {
            Wire::Number(x) => Ok(Some(x)),
            Wire::Flag(false) => Ok(None),
            Wire::Flag(true) => Err(serde::de::Error::custom(
                "expected a number or `false`; `true` does not say which value to use",
            )),
        }
    }
}
