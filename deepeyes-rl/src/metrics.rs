//! Per-step training metrics: what they are, how they are computed from trajectories and reward
//! breakdowns, the JSONL file they go to, and the tool-collapse alarm.
//!
//! One [`StepMetrics`] is one flat JSON object per line of `metrics.jsonl` (the nested
//! `reward_terms` map aside); `deepeyes plot RUN_DIR` draws its curves.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use deepeyes_core::{RewardBreakdown, StopReason, Trajectory};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::grpo::{LossStats, group_stats};

/// Name of the reward term holding answer correctness.
pub const ACCURACY_TERM: &str = "accuracy";
/// Name of the reward term holding the format score (negative on a format error).
pub const FORMAT_TERM: &str = "format";

/// One scored trajectory of a step, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct ScoredTrajectory<'a> {
    /// The episode.
    pub trajectory: &'a Trajectory,
    /// Its reward with the terms.
    pub reward: &'a RewardBreakdown,
    /// Its prompt group.
    pub group: usize,
    /// Ground-truth boxes `[x1, y1, x2, y2]` on the item's first image, in its original pixels
    /// ([`deepeyes_core::dataset::Item::first_image_boxes`]), for grounding IoU; empty when the
    /// data carries none.
    pub gt_boxes: &'a [[f64; 4]],
}

/// A data item a step passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedItem {
    /// The item's id.
    pub id: String,
    /// Why it was skipped.
    pub cause: String,
}

/// Metrics of a step's rollouts and rewards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutMetrics {
    /// Trajectories in the step.
    pub trajectories: usize,
    /// Prompt groups in the step.
    pub groups: usize,
    /// Mean total reward.
    pub reward_mean: f64,
    /// Population standard deviation of the total reward.
    pub reward_std: f64,
    /// Smallest total reward.
    pub reward_min: f64,
    /// Largest total reward.
    pub reward_max: f64,
    /// Mean raw value of each reward term, over the trajectories that have it.
    pub reward_terms: BTreeMap<String, f64>,
    /// How many trajectories carried each reward flag (degraded scoring is never silent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reward_flags: BTreeMap<String, usize>,
    /// Mean of the `accuracy` term, when the reward has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Share of trajectories whose `format` term is negative, when the reward has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_error_rate: Option<f64>,
    /// Mean tool calls per trajectory (every executed call, failed ones included).
    pub tool_calls_mean: f64,
    /// Most tool calls in one trajectory.
    pub tool_calls_max: usize,
    /// Mean looks per trajectory: calls that returned an image to the model.
    #[serde(default)]
    pub looks_mean: f64,
    /// Share of tool calls that returned an image to the model, when there were calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_crop_rate: Option<f64>,
    /// Mean IoU of the regions the model was shown by its tool calls (as the tools reported
    /// them, in original pixels) with the best-matching ground-truth box on that image, over
    /// such calls in items that carry boxes: what `deepeyes eval` reports per call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grounding_iou: Option<f64>,
    /// Mean model-generated tokens per trajectory.
    pub response_length_mean: f64,
    /// Most model-generated tokens in one trajectory.
    pub response_length_max: usize,
    /// Mean tokens after the prompt (generated and observation, one pad per image).
    pub response_tokens_mean: f64,
    /// Share of groups (of two or more) whose rewards are all equal.
    pub zero_variance_group_share: f64,
    /// Share of trajectories that gave an answer.
    pub answered_rate: f64,
    /// Share that hit the turn cap.
    pub max_turns_rate: f64,
    /// Share cut by the per-turn or total token limit.
    pub truncated_rate: f64,
    /// Data items the step passed over (images that do not decode), each replaced by the next
    /// item of the stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_items: Vec<SkippedItem>,
}

/// Metrics of a step's policy update, from the loss statistics and the optimizer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateMetrics {
    /// Loss summed over the step's mini-batches.
    pub loss: f64,
    /// Its policy-gradient part.
    pub pg_loss: f64,
    /// Tokens that entered the loss.
    pub loss_tokens: usize,
    /// Share of tokens with a binding ratio clip.
    pub clip_fraction: f64,
    /// Share of tokens with a binding dual clip.
    pub dual_clip_fraction: f64,
    /// Mean `old − new` log-prob (verl's `ppo_kl`).
    pub approx_kl: f64,
    /// Mean importance ratio.
    pub ratio_mean: f64,
    /// Mean KL estimate to the reference, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Mean token entropy, when the engine computed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    /// Mean |old − rollout| log-prob: how far the rollout engine is from the training engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_logprob_diff: Option<f64>,
    /// Global gradient norm before clipping (mean over the step's optimizer steps).
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Optimizer steps taken.
    pub optimizer_steps: usize,
    /// Updates skipped for a non-finite gradient norm.
    pub skipped_updates: usize,
}

impl UpdateMetrics {
    /// Update metrics from the merged loss statistics of the step and the optimizer's figures.
    pub fn from_loss(
        stats: &LossStats,
        grad_norm: f64,
        lr: f64,
        optimizer_steps: usize,
        skipped_updates: usize,
    ) -> Self {
        Self {
            loss: stats.loss,
            pg_loss: stats.pg_loss,
            loss_tokens: stats.tokens,
            clip_fraction: stats.clip_fraction(),
            dual_clip_fraction: stats.dual_clip_fraction(),
            approx_kl: stats.approx_kl(),
            ratio_mean: stats.ratio_mean(),
            kl: stats.ref_kl(),
            entropy: stats.entropy(),
            rollout_logprob_diff: stats.rollout_logprob_diff(),
            grad_norm,
            lr,
            optimizer_steps,
            skipped_updates,
        }
    }
}

/// Wall-clock split of a step, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeSplit {
    /// Handing the policy's current weights to the rollout engine.
    #[serde(default)]
    pub time_weight_sync_s: f64,
    /// Sampling the trajectories (tools included).
    pub time_rollout_s: f64,
    /// Scoring them.
    pub time_reward_s: f64,
    /// Recomputing old (and reference) log-probs.
    pub time_logprob_s: f64,
    /// Forward, backward and optimizer steps.
    pub time_update_s: f64,
    /// The whole step.
    pub time_step_s: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The RL step (0-based).
    pub step: u64,
    /// Rollout and reward metrics.
    #[serde(flatten)]
    pub rollout: RolloutMetrics,
    /// Update metrics.
    #[serde(flatten)]
    pub update: UpdateMetrics,
    /// Time split.
    #[serde(flatten)]
    pub time: TimeSplit,
}

fn mean(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for x in xs {
        sum += x;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Computes the rollout metrics of a step. Errors on an empty batch or a non-finite reward
/// (naming the trajectory).
pub fn rollout_metrics(batch: &[ScoredTrajectory<'_>]) -> Result<RolloutMetrics> {
    if batch.is_empty() {
        return Err(Error::invalid("batch", "no trajectories to measure"));
    }
    let n = batch.len() as f64;
    let rewards: Vec<f64> = batch.iter().map(|s| s.reward.total).collect();
    let groups: Vec<usize> = batch.iter().map(|s| s.group).collect();
    let stats = group_stats(&rewards, &groups)?;
    let reward_mean = rewards.iter().sum::<f64>() / n;
    let reward_std = (rewards
        .iter()
        .map(|r| (r - reward_mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();

    let mut term_values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut reward_flags: BTreeMap<String, usize> = BTreeMap::new();
    for s in batch {
        for t in &s.reward.terms {
            term_values.entry(t.name.clone()).or_default().push(t.value);
        }
        for f in &s.reward.flags {
            *reward_flags.entry(f.clone()).or_default() += 1;
        }
    }
    let reward_terms: BTreeMap<String, f64> = term_values
        .iter()
        .filter_map(|(k, v)| mean(v.iter().copied()).map(|m| (k.clone(), m)))
        .collect();
    let accuracy = reward_terms.get(ACCURACY_TERM).copied();
    let format_error_rate = term_values
        .get(FORMAT_TERM)
        .and_then(|v| mean(v.iter().map(|&x| f64::from(u8::from(x < 0.0)))));

    let calls: Vec<usize> = batch
        .iter()
        .map(|s| s.trajectory.tool_calls.len())
        .collect();
    let total_calls: usize = calls.iter().sum();
    let good_calls: usize = batch
        .iter()
        .map(|s| s.trajectory.successful_image_calls())
        .sum();
    let ious: Vec<f64> = batch
        .iter()
        .flat_map(|s| {
            s.trajectory
                .tool_calls
                .iter()
                .filter_map(|c| c.outcome.shown_region()?.best_iou(s.gt_boxes))
        })
        .collect();
    let generated: Vec<usize> = batch
        .iter()
        .map(|s| s.trajectory.generated_count())
        .collect();
    let share = |pred: &dyn Fn(StopReason) -> bool| {
        batch.iter().filter(|s| pred(s.trajectory.stop)).count() as f64 / n
    };
    let multi_groups = stats.iter().filter(|g| g.size > 1).count();

    Ok(RolloutMetrics {
        trajectories: batch.len(),
        groups: stats.len(),
        reward_mean,
        reward_std,
        reward_min: rewards.iter().copied().fold(f64::INFINITY, f64::min),
        reward_max: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        reward_terms,
        reward_flags,
        accuracy,
        format_error_rate,
        tool_calls_mean: total_calls as f64 / n,
        tool_calls_max: calls.iter().copied().max().unwrap_or(0),
        looks_mean: good_calls as f64 / n,
        valid_crop_rate: (total_calls > 0).then(|| good_calls as f64 / total_calls as f64),
        grounding_iou: mean(ious),
        response_length_mean: generated.iter().sum::<usize>() as f64 / n,
        response_length_max: generated.iter().copied().max().unwrap_or(0),
        response_tokens_mean: batch
            .iter()
            .map(|s| {
                s.trajectory
                    .tokens
                    .len()
                    .saturating_sub(s.trajectory.prompt_len) as f64
            })
            .sum::<f64>()
            / n,
        zero_variance_group_share: if multi_groups == 0 {
            0.0
        } else {
            stats.iter().filter(|g| g.zero_variance).count() as f64 / multi_groups as f64
        },
        answered_rate: share(&|s| s == StopReason::Answered),
        max_turns_rate: share(&|s| s == StopReason::MaxTurns),
        truncated_rate: share(&|s| matches!(s, StopReason::TurnLength | StopReason::TokenBudget)),
        skipped_items: Vec::new(),
    })
}

/// Raised when tool use has collapsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCollapseWarning {
    /// The step at which the alarm fired.
    pub step: u64,
    /// Tool calls per trajectory at that step.
    pub tool_calls_mean: f64,
    /// Consecutive steps below the threshold.
    pub consecutive_steps: usize,
    /// The threshold.
    pub threshold: f64,
}

impl std::fmt::Display for ToolCollapseWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tool use collapsed: {:.3} tool calls per trajectory at step {}, under {} for {} \
             consecutive steps (DeepEyes issues #55/#78: check the judge and the tool bonus)",
            self.tool_calls_mean, self.step, self.threshold, self.consecutive_steps
        )
    }
}

/// Watches tool calls per trajectory and warns once when they stay under a threshold for a
/// number of consecutive steps; it re-arms after a step at or above the threshold. Serialisable,
/// so a resumed run keeps its count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCollapseDetector {
    threshold: f64,
    steps: usize,
    below: usize,
    fired: bool,
}

impl ToolCollapseDetector {
    /// A detector for `steps` consecutive steps under `threshold`; `steps = 0` never fires.
    pub fn new(threshold: f64, steps: usize) -> Self {
        Self {
            threshold,
            steps,
            below: 0,
            fired: false,
        }
    }

    /// Records one step; returns the warning (also logged) the step it fires.
    pub fn observe(&mut self, step: u64, tool_calls_mean: f64) -> Option<ToolCollapseWarning> {
        if self.steps == 0 {
            return None;
        }
        if tool_calls_mean >= self.threshold {
            self.below = 0;
            self.fired = false;
            return None;
        }
        self.below += 1;
        if self.below >= self.steps && !self.fired {
            self.fired = true;
            let w = ToolCollapseWarning {
                step,
                tool_calls_mean,
                consecutive_steps: self.below,
                threshold: self.threshold,
            };
            tracing::warn!(step, tool_calls_mean, consecutive = self.below, "{w}");
            return Some(w);
        }
        None
    }

    /// Consecutive steps under the threshold so far.
    pub fn consecutive_below(&self) -> usize {
        self.below
    }
}

/// An event worth keeping beside the metrics (`events.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Tool use collapsed.
    ToolCollapse(ToolCollapseWarning),
    /// An update was skipped because the gradient norm was not finite.
    SkippedUpdate {
        /// The RL step.
        step: u64,
        /// Why.
        reason: String,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// The RL step.
        step: u64,
        /// Its folder.
        path: PathBuf,
    },
}

/// Appends one JSON object per line to a file, flushed after every record.
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Creates (or truncates) `path`, creating its parent folder.
    pub fn create(path: &Path) -> Result<Self> {
        Self::open(path, true)
    }

    /// Opens `path` for appending, creating it if needed.
    pub fn append(path: &Path) -> Result<Self> {
        Self::open(path, false)
    }

    fn open(path: &Path, truncate: bool) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true);
        if truncate {
            opts.write(true).truncate(true);
        } else {
            opts.append(true);
        }
        let file = opts.open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Reopens a run's metrics for a resumed run: keeps only the records with `step ≤
    /// last_step` (a killed run may have logged steps the checkpoint does not hold, or a torn
    /// last line), rewrites the file atomically, and appends from there.
    pub fn resume(path: &Path, last_step: Option<u64>) -> Result<Self> {
        if path.exists() {
            let kept: Vec<String> = read_lines(path)?
                .into_iter()
                .filter(|(_, v)| {
                    let step = v.get("step").and_then(serde_json::Value::as_u64);
                    matches!((step, last_step), (Some(s), Some(l)) if s <= l)
                })
                .map(|(line, _)| line)
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            crate::checkpoint::write_file_atomic(path, text.as_bytes())?;
        }
        Self::append(path)
    }

    /// Writes one record as a line and flushes it.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| Error::Json {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every complete line of a JSONL file with its parsed value. A torn final line (no newline,
/// not valid JSON) is dropped with a warning; any other bad line is an error naming it.
fn read_lines(path: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = buf.ends_with('\n');
        let line = buf.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => out.push((line.to_string(), v)),
            Err(_) if !complete => {
                tracing::warn!(path = %path.display(), line = lineno, "dropping a torn last line");
            }
            Err(e) => {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    message: format!("line {lineno}: {e}"),
                });
            }
        }
    }
    Ok(out)
}

/// Reads every record of a JSONL file (see [`JsonlWriter`]); errors name the line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    read_lines(path)?
        .into_iter()
        .enumerate()
        .map(|(i, (_, v))| {
            serde_json::from_value(v).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: format!("record {}: {e}", i + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_fires_once_and_rearms() {
        let mut d = ToolCollapseDetector::new(0.1, 3);
        let fired: Vec<bool> = [0.5, 0.05, 0.0, 0.02, 0.01, 0.0, 0.3, 0.0, 0.0, 0.0]
            .iter()
            .enumerate()
            .map(|(i, &x)| d.observe(i as u64, x).is_some())
            .collect();
        assert_eq!(
            fired,
            [
                false, false, false, true, false, false, false, false, false, true
            ]
        );
        let mut off = ToolCollapseDetector::new(0.1, 0);
        assert!((0..10).all(|i| off.observe(i, 0.0).is_none()));
    }
}
