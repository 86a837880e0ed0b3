//! Benchmark evaluation with the same agent loop and tools as training.
//!
//! An [`Evaluator`] runs the agent on dataset [`Item`]s and scores each answer: rules first
//! (option letter, option text, normalised exact match), then a [`Verifier`] (the LLM judge) when
//! one is given and the rules cannot decide. Options are shuffled by default with a seed derived
//! from the run seed and the item id, so the correct answer is not always `A` (DeepEyes' first V*
//! evaluation left it first, which inflates scores) and every run with the same seed shows the same
//! order. With `samples = K > 1` each item is answered K times and scored by Avg@K.
//!
//! [`run_eval`] drives a whole benchmark into an output directory: `eval.json` (the settings),
//! `traces.jsonl` (one [`ItemRecord`] per item: prompt, every turn, every zoom box, the answer and
//! the verdict) and `summary.json` ([`EvalSummary`]: overall and per-category scores, tool
//! statistics). Finished items are skipped when the same evaluation is started again, so an
//! interrupted run resumes where it stopped.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deepeyes_core::dataset::{GroundTruthBox, Item, ItemReader, ReadError, option_letter};
use deepeyes_core::protocol::extract_answer;
use deepeyes_core::{
    Agent, AgentConfig, ImageLimits, PreprocessConfig, PromptTemplates, Rng, StopReason, Task,
    Tool, ToolOutcome, Trajectory, VisionLanguageModel,
};
use deepeyes_reward::judge::{JudgeRequest, Verifier};
use deepeyes_reward::rules::{self, Verdict};
use deepeyes_tools::geometry::parse_bbox;
use deepeyes_tools::{ZoomInConfig, ZoomInTool};

use crate::metrics::iou;
use serde::{Deserialize, Serialize};

/// Name of the zoom tool whose boxes are compared with ground-truth boxes.
const ZOOM_TOOL: &str = "image_zoom_in_tool";

/// Errors of an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A setting is invalid.
    #[error("eval config: {0}")]
    Config(String),
    /// The dataset could not be read.
    #[error("dataset: {0}")]
    Dataset(String),
    /// The agent loop or the model failed.
    #[error("agent: {0}")]
    Agent(#[from] deepeyes_core::Error),
    /// Reading or writing the output directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The output directory holds an evaluation with other settings.
    #[error(
        "{path} holds an evaluation with other settings ({what} differs); resume needs the same settings, or choose another --out"
    )]
    Mismatch {
        /// The settings file.
        path: PathBuf,
        /// Which setting differs.
        what: String,
    },
    /// A trace line of an earlier run cannot be read.
    #[error("{path}:{line}: not an item record of this format ({reason})")]
    BadTrace {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result of an evaluation step.
pub type EvalResult<T> = std::result::Result<T, EvalError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How an evaluation runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct EvalConfig {
    /// Answers per item (K of Avg@K).
    pub samples: usize,
    /// The seed of option shuffling and of sampling.
    pub seed: u64,
    /// Present the options in a seeded random order (the stored order puts the answer first in
    /// V* Bench).
    pub shuffle_options: bool,
    /// Items whose episodes are stepped together (batched generation).
    pub batch_items: usize,
    /// Evaluate at most this many items.
    pub limit: Option<usize>,
    /// The agent loop's limits and sampling.
    pub agent: AgentConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        let mut agent = AgentConfig::default();
        // DeepEyes evaluates greedily.
        agent.sampling.temperature = 0.0;
        Self {
            samples: 1,
            seed: 0,
            shuffle_options: true,
            batch_items: 4,
            limit: None,
            agent,
        }
    }
}

impl EvalConfig {
    /// Checks every setting, naming the one at fault.
    pub fn validate(&self) -> EvalResult<()> {
        if self.samples == 0 {
            return Err(EvalError::Config("samples must be at least 1".into()));
        }
        if self.batch_items == 0 {
            return Err(EvalError::Config("batch-items must be at least 1".into()));
        }
        self.agent.validate()?;
        Ok(())
    }
}

/// An item ready to be asked: its options in the order shown and the prompt question.
#[derive(Debug, Clone)]
pub struct PreparedItem {
    /// The dataset item.
    pub item: Item,
    /// `order[k]` is the stored index of the option shown as letter `k`.
    pub order: Vec<usize>,
    /// The correct letter in the shown order (multiple-choice items).
    pub correct_letter: Option<char>,
    /// The question as the model sees it, options included.
    pub question: String,
    /// The base seed of this item's samples.
    pub seed: u64,
}

/// FNV-1a, a stable hash so that an item's seed depends on its id, not on its position.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Orders `item`'s options (shuffled when `shuffle`) and writes the question with them as
/// `Question: …\nOptions:\nA. …` lines, DeepEyes' layout.
pub fn prepare_item(item: Item, seed: u64, shuffle: bool) -> PreparedItem {
    let item_seed = Rng::derive_seed(seed, &[stable_hash(&item.id)]);
    let mut order: Vec<usize> = (0..item.options.len()).collect();
    if shuffle {
        Rng::new(Rng::derive_seed(item_seed, &[0])).shuffle(&mut order);
    }
    let correct_letter = item
        .correct_option
        .and_then(|c| order.iter().position(|&o| o == c))
        .and_then(option_letter);
    let mut question = if item.options.is_empty() {
        item.question.clone()
    } else {
        format!("Question: {}\nOptions:", item.question)
    };
    for (k, &o) in order.iter().enumerate() {
        if let Some(letter) = option_letter(k) {
            question.push_str(&format!("\n{letter}. {}", item.options[o]));
        }
    }
    PreparedItem {
        item,
        order,
        correct_letter,
        question,
        seed: Rng::derive_seed(item_seed, &[1]),
    }
}

/// How an answer was scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoredBy {
    /// A rule decided.
    Rule,
    /// The judge decided.
    Judge,
    /// The rules could not decide and no judge was configured: counted wrong, and reported.
    Undecided,
    /// The judge failed: counted wrong, and reported with its error.
    JudgeFailed,
    /// The model gave no answer at all.
    NoAnswer,
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Whether it counts as correct.
    pub correct: bool,
    /// Who decided.
    pub by: ScoredBy,
    /// The judge's raw reply or error, when the judge was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_reply: Option<String>,
}

/// The text inside the last `\boxed{…}`, if any (balanced braces).
fn boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Scores `prediction` for `prepared`: rules first, then `judge` when they cannot decide.
pub fn score_answer(
    prediction: Option<&str>,
    prepared: &PreparedItem,
    judge: Option<&dyn Verifier>,
) -> Scored {
    let Some(prediction) = prediction.map(str::trim).filter(|p| !p.is_empty()) else {
        return Scored {
            correct: false,
            by: ScoredBy::NoAnswer,
            judge_reply: None,
        };
    };
    let prediction = boxed(prediction).unwrap_or(prediction).trim();
    let item = &prepared.item;
    let shown: Vec<(char, String)> = prepared
        .order
        .iter()
        .enumerate()
        .filter_map(|(k, &o)| option_letter(k).map(|l| (l, item.options[o].clone())))
        .collect();
    let (verdict, reference) = match prepared.correct_letter {
        Some(letter) => (
            rules::choice(prediction, &letter.to_string(), &shown),
            format!("{letter}. {}", item.answer),
        ),
        None => {
            let exact = rules::normalize_text(prediction) == rules::normalize_text(&item.answer);
            let verdict = if exact {
                Verdict::Match
            } else {
                rules::yes_no(prediction, &item.answer)
            };
            (verdict, item.answer.clone())
        }
    };
    if let Some(accuracy) = verdict.accuracy() {
        return Scored {
            correct: accuracy > 0.5,
            by: ScoredBy::Rule,
            judge_reply: None,
        };
    }
    let Some(judge) = judge else {
        return Scored {
            correct: false,
            by: ScoredBy::Undecided,
            judge_reply: None,
        };
    };
    let request = JudgeRequest {
        prompt: "visual",
        question: &prepared.question,
        reference: &reference,
        prediction,
    };
    match judge.verify(&request) {
        Ok(v) => Scored {
            correct: v.correct,
            by: ScoredBy::Judge,
            judge_reply: Some(v.raw_reply),
        },
        Err(e) => {
            tracing::warn!(item = %item.id, error = %e, "the judge failed; the answer counts as wrong");
            Scored {
                correct: false,
                by: ScoredBy::JudgeFailed,
                judge_reply: Some(e.to_string()),
            }
        }
    }
}

/// One tool call as the trace records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The turn it was made in (0-based).
    pub turn: usize,
    /// The raw text inside `<tool_call>`.
    pub raw: String,
    /// The tool name, when the call parsed.
    pub tool: Option<String>,
    /// The box the model gave, in the tool's frame.
    pub bbox: Option<[f64; 4]>,
    /// The region cropped, in original pixels `[left, top, right, bottom]`.
    pub crop: Option<[f64; 4]>,
    /// IoU of the cropped region with the item's ground-truth box.
    pub iou: Option<f64>,
    /// What happened.
    pub outcome: ToolOutcome,
}

/// One answer to an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Which of the K samples.
    pub sample: usize,
    /// The model's turns, as generated.
    pub turns: Vec<String>,
    /// Every tool call.
    pub calls: Vec<CallRecord>,
    /// The `<answer>` text, if the model gave one.
    pub answer: Option<String>,
    /// What was scored: the answer, or the last turn when there was none (as DeepEyes does).
    pub prediction: Option<String>,
    /// The verdict.
    pub verdict: Scored,
    /// Why the episode ended.
    pub stop: StopReason,
    /// Tokens the model generated.
    pub generated_tokens: usize,
}

/// Everything recorded about one item: one line of `traces.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// The item id.
    pub id: String,
    /// Its category, if any.
    pub category: Option<String>,
    /// Its data source.
    pub data_source: String,
    /// The question as shown, options included.
    pub question: String,
    /// `order[k]` = stored index of the option shown as letter `k`.
    pub order: Vec<usize>,
    /// The correct letter in shown order.
    pub correct_letter: Option<char>,
    /// The reference answer text.
    pub answer: String,
    /// The full prompt text of the first turn.
    pub prompt: String,
    /// The answers.
    pub samples: Vec<SampleRecord>,
    /// The share of correct samples (Avg@K for this item).
    pub score: f64,
}

/// Runs the agent on items and scores them.
pub struct Evaluator<'a> {
    agent: Agent<'a>,
    zoom: ZoomInTool,
    preprocess: PreprocessConfig,
    judge: Option<&'a dyn Verifier>,
    config: EvalConfig,
    limits: ImageLimits,
}

impl std::fmt::Debug for Evaluator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("config", &self.config)
            .field("judge", &self.judge.map(|j| j.describe()))
            .finish()
    }
}

impl<'a> Evaluator<'a> {
    /// An evaluator of `model` with `tools`. `zoom` must be the zoom tool's settings (its
    /// coordinate frame maps boxes back to original pixels for IoU).
    pub fn new(
        model: &'a dyn VisionLanguageModel,
        tools: Vec<Arc<dyn Tool>>,
        zoom: &ZoomInConfig,
        templates: PromptTemplates,
        config: EvalConfig,
        judge: Option<&'a dyn Verifier>,
    ) -> EvalResult<Self> {
        config.validate()?;
        let zoom = ZoomInTool::new(zoom).map_err(|e| EvalError::Config(e.to_string()))?;
        let preprocess = model.preprocess_config();
        let agent = Agent::new(model, tools, templates, config.agent.clone())?;
        Ok(Self {
            agent,
            zoom,
            preprocess,
            judge,
            config,
            limits: ImageLimits::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &EvalConfig {
        &self.config
    }

    /// Orders `item`'s options and writes its question, as this evaluator asks it.
    pub fn prepare(&self, item: Item) -> PreparedItem {
        prepare_item(item, self.config.seed, self.config.shuffle_options)
    }

    /// Answers and scores a batch of items (all their samples stepped together).
    pub fn evaluate(&self, items: &[PreparedItem]) -> EvalResult<Vec<ItemRecord>> {
        let mut images = Vec::with_capacity(items.len());
        for p in items {
            images.push(p.item.decode_images(&self.limits)?);
        }
        self.evaluate_with_images(items, images)
    }

    /// Like [`Evaluator::evaluate`], with the images given instead of the items' own (e.g. a
    /// crop of the ground-truth region, for data selection).
    pub fn evaluate_with_images(
        &self,
        items: &[PreparedItem],
        images: Vec<Vec<deepeyes_core::Image>>,
    ) -> EvalResult<Vec<ItemRecord>> {
        if images.len() != items.len() {
            return Err(EvalError::Config(format!(
                "{} image lists for {} items",
                images.len(),
                items.len()
            )));
        }
        let tasks: Vec<Task> = items
            .iter()
            .zip(images)
            .map(|(p, images)| Task {
                question: p.question.clone(),
                images,
            })
            .collect();
        let seeds: Vec<u64> = items.iter().map(|p| p.seed).collect();
        let groups = self
            .agent
            .run_batch_seeded(&tasks, self.config.samples, &seeds)?;
        Ok(items
            .iter()
            .zip(&tasks)
            .zip(groups)
            .map(|((p, task), group)| self.record(p, task, &group))
            .collect())
    }

    fn record(&self, p: &PreparedItem, task: &Task, group: &[Trajectory]) -> ItemRecord {
        let samples: Vec<SampleRecord> = group
            .iter()
            .enumerate()
            .map(|(s, traj)| self.sample_record(p, task, s, traj))
            .collect();
        let correct = samples.iter().filter(|s| s.verdict.correct).count();
        ItemRecord {
            id: p.item.id.clone(),
            category: p.item.category.clone(),
            data_source: p.item.data_source.clone(),
            question: p.question.clone(),
            order: p.order.clone(),
            correct_letter: p.correct_letter,
            answer: p.item.answer.clone(),
            prompt: self.agent.prompt_text(task),
            score: correct as f64 / samples.len().max(1) as f64,
            samples,
        }
    }

    fn sample_record(
        &self,
        p: &PreparedItem,
        task: &Task,
        sample: usize,
        traj: &Trajectory,
    ) -> SampleRecord {
        let calls = traj
            .tool_calls
            .iter()
            .map(|c| {
                let tool = c.call.as_ref().map(|call| call.name.clone());
                let bbox = c
                    .call
                    .as_ref()
                    .filter(|call| call.name == ZOOM_TOOL)
                    .and_then(|call| parse_bbox(&call.arguments).ok());
                let crop = bbox
                    .filter(|_| c.outcome.returned_image())
                    .and_then(|b| self.crop_of(b, task));
                let iou = crop.and_then(|r| best_iou(r, &p.item.boxes));
                CallRecord {
                    turn: c.turn,
                    raw: c.raw.clone(),
                    tool,
                    bbox,
                    crop,
                    iou,
                    outcome: c.outcome.clone(),
                }
            })
            .collect();
        let turns: Vec<String> = traj.turns.iter().map(|t| t.text.clone()).collect();
        let answer = traj
            .answer
            .clone()
            .or_else(|| turns.last().and_then(|t| extract_answer(t)));
        let prediction = answer.clone().or_else(|| {
            turns
                .last()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let verdict = score_answer(prediction.as_deref(), p, self.judge);
        SampleRecord {
            sample,
            turns,
            calls,
            answer,
            prediction,
            verdict,
            stop: traj.stop,
            generated_tokens: traj.generated_count(),
        }
    }

    /// The region of the first image a zoom box selects, in original pixels.
    fn crop_of(&self, bbox: [f64; 4], task: &Task) -> Option<[f64; 4]> {
        let image = task.images.first()?;
        let resolved = self
            .zoom
            .resolve(bbox, image.width(), image.height(), &self.preprocess)
            .ok()?;
        let r = resolved.rect;
        Some([
            f64::from(r.x),
            f64::from(r.y),
            r.right() as f64,
            r.bottom() as f64,
        ])
    }
}

/// The best IoU of `crop` with the boxes on the first image.
fn best_iou(crop: [f64; 4], boxes: &[GroundTruthBox]) -> Option<f64> {
    boxes
        .iter()
        .filter(|b| b.image == 0)
        .map(|b| iou(crop, b.bbox))
        .reduce(f64::max)
}

/// Scores of one category (or of everything).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CategoryScore {
    /// Items scored.
    pub items: usize,
    /// Mean item score (Avg@K), in [0, 1].
    pub accuracy: f64,
}

/// Tool-use statistics over all samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolStats {
    /// Tool calls per answer.
    pub calls_per_sample: f64,
    /// Answers with at least one call, as a share.
    pub samples_with_calls: f64,
    /// Calls that returned an image, as a share of all calls (`None` without calls).
    pub valid_crop_rate: Option<f64>,
    /// Mean IoU of returned zoom crops with the ground-truth box, where items have boxes.
    pub mean_iou: Option<f64>,
    /// Returned zoom crops that could be compared with a ground-truth box.
    pub crops_with_box: usize,
}

/// The result of a whole evaluation: `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// The benchmark kind.
    pub bench: String,
    /// Items scored.
    pub items: usize,
    /// Answers per item.
    pub samples: usize,
    /// The overall score: the micro-average over items, except HR-Bench, whose overall is the
    /// mean of its `single` and `cross` categories.
    pub overall: f64,
    /// How the overall score was computed.
    pub overall_rule: String,
    /// Scores per category.
    pub categories: BTreeMap<String, CategoryScore>,
    /// Answers per way of scoring.
    pub scored_by: BTreeMap<ScoredBy, usize>,
    /// Tool use.
    pub tools: ToolStats,
    /// Answers per stop reason.
    pub stops: BTreeMap<String, usize>,
    /// Dataset rows skipped as unreadable, over all runs of this evaluation.
    pub skipped_rows: u64,
}

/// Summarises item records; `bench` picks the overall rule.
pub fn summarize(bench: &str, records: &[ItemRecord], skipped_rows: u64) -> EvalSummary {
    let mut categories: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    let mut scored_by = BTreeMap::new();
    let mut stops = BTreeMap::new();
    let (mut samples, mut calls, mut with_calls, mut returned) = (0usize, 0usize, 0usize, 0usize);
    let (mut iou_sum, mut iou_n) = (0.0, 0usize);
    for r in records {
        let name = r.category.clone().unwrap_or_else(|| "all".into());
        let entry = categories.entry(name).or_default();
        entry.0 += 1;
        entry.1 += r.score;
        for s in &r.samples {
            samples += 1;
            *scored_by.entry(s.verdict.by).or_insert(0) += 1;
            let stop = serde_json::to_value(s.stop)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{:?}", s.stop));
            *stops.entry(stop).or_insert(0) += 1;
            calls += s.calls.len();
            with_calls += usize::from(!s.calls.is_empty());
            for c in &s.calls {
                returned += usize::from(c.outcome.returned_image());
                if let Some(v) = c.iou {
                    iou_sum += v;
                    iou_n += 1;
                }
            }
        }
    }
    let categories: BTreeMap<String, CategoryScore> = categories
        .into_iter()
        .map(|(k, (n, sum))| {
            (
                k,
                CategoryScore {
                    items: n,
                    accuracy: sum / n as f64,
                },
            )
        })
        .collect();
    let micro = if records.is_empty() {
        0.0
    } else {
        records.iter().map(|r| r.score).sum::<f64>() / records.len() as f64
    };
    let (overall, overall_rule) = match (bench, categories.get("single"), categories.get("cross")) {
        ("hrbench", Some(single), Some(cross)) => (
            (single.accuracy + cross.accuracy) / 2.0,
            "mean of the single and cross categories (HR-Bench)".to_string(),
        ),
        _ => (micro, "mean over items".to_string()),
    };
    let share = |n: usize, d: usize| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    EvalSummary {
        bench: bench.to_string(),
        items: records.len(),
        samples: records.first().map_or(0, |r| r.samples.len()),
        overall,
        overall_rule,
        categories,
        scored_by,
        tools: ToolStats {
            calls_per_sample: share(calls, samples),
            samples_with_calls: share(with_calls, samples),
            valid_crop_rate: (calls > 0).then(|| share(returned, calls)),
            mean_iou: (iou_n > 0).then(|| iou_sum / iou_n as f64),
            crops_with_box: iou_n,
        },
        stops,
        skipped_rows,
    }
}

/// What identifies an evaluation, stored as `eval.json`; resuming requires the same header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalHeader {
    /// The benchmark kind (`vstar`, `hrbench`, `synthv`, `jsonl`, `verl`).
    pub bench: String,
    /// The data path.
    pub data: PathBuf,
    /// The model (a bundle directory or a description).
    pub model: String,
    /// The settings.
    pub config: EvalConfig,
    /// Whether a judge scores what the rules cannot.
    pub judge: bool,
}

/// Progress of [`run_eval`], for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Items finished, resumed ones included.
    pub done: usize,
    /// Items that were already finished by an earlier run.
    pub resumed: usize,
    /// Mean score so far.
    pub accuracy: f64,
}

/// The files of an evaluation directory.
#[derive(Debug, Clone)]
pub struct EvalPaths {
    /// `eval.json`.
    pub header: PathBuf,
    /// `traces.jsonl`.
    pub traces: PathBuf,
    /// `summary.json`.
    pub summary: PathBuf,
}

impl EvalPaths {
    /// The files inside `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            header: dir.join("eval.json"),
            traces: dir.join("traces.jsonl"),
            summary: dir.join("summary.json"),
        }
    }
}

/// Reads the records of an earlier run and cuts off a last line left half-written by a kill.
fn load_records(path: &Path) -> EvalResult<Vec<ItemRecord>> {
    let Ok(file) = File::open(path) else {
        return Ok(Vec::new());
    };
    let mut records = Vec::new();
    let mut good_len = 0u64;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        number += 1;
        if !line.ends_with('\n') {
            tracing::warn!(path = %path.display(), line = number, "dropping a half-written trace line");
            break;
        }
        let record: ItemRecord =
            serde_json::from_str(line.trim_end()).map_err(|e| EvalError::BadTrace {
                path: path.to_path_buf(),
                line: number,
                reason: e.to_string(),
            })?;
        records.push(record);
        good_len += n as u64;
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    file.set_len(good_len).map_err(io_err(path))?;
    Ok(records)
}

/// Evaluates every item of `reader` into `dir`, resuming a run with the same `header`.
/// `progress` is called after every batch.
pub fn run_eval(
    evaluator: &Evaluator<'_>,
    reader: &mut dyn ItemReader,
    dir: &Path,
    header: &EvalHeader,
    progress: &mut dyn FnMut(Progress),
) -> EvalResult<EvalSummary> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let paths = EvalPaths::new(dir);
    if let Ok(text) = fs::read_to_string(&paths.header) {
        let old: EvalHeader = serde_json::from_str(&text).map_err(|e| EvalError::Mismatch {
            path: paths.header.clone(),
            what: format!("the file format ({e})"),
        })?;
        let differs = [
            ("bench", old.bench != header.bench),
            ("data", old.data != header.data),
            ("model", old.model != header.model),
            ("the eval settings", old.config != header.config),
            ("judge", old.judge != header.judge),
        ];
        if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
            return Err(EvalError::Mismatch {
                path: paths.header.clone(),
                what: (*what).to_string(),
            });
        }
    } else {
        let text = serde_json::to_string_pretty(header).expect("the header serialises");
        fs::write(&paths.header, text + "\n").map_err(io_err(&paths.header))?;
    }
    let mut records = load_records(&paths.traces)?;
    let resumed = records.len();
    let finished: HashSet<String> = records.iter().map(|r| r.id.clone()).collect();
    if resumed > 0 {
        tracing::info!(items = resumed, "resuming: finished items are skipped");
    }
    let mut traces = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.traces)
        .map_err(io_err(&paths.traces))?;
    let config = evaluator.config();
    let limit = config.limit.unwrap_or(usize::MAX);
    let mut seen = resumed;
    let mut batch: Vec<PreparedItem> = Vec::with_capacity(config.batch_items);
    let mut report = |records: &[ItemRecord]| {
        let accuracy = if records.is_empty() {
            0.0
        } else {
            records.iter().map(|r| r.score).sum::<f64>() / records.len() as f64
        };
        progress(Progress {
            done: records.len(),
            resumed,
            accuracy,
        });
    };
    report(&records);
    let mut flush = |batch: &mut Vec<PreparedItem>,
                     records: &mut Vec<ItemRecord>,
                     traces: &mut File|
     -> EvalResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        for record in evaluator.evaluate(batch)? {
            let line = serde_json::to_string(&record).expect("records serialise");
            // One write per line, flushed, so a kill leaves at most one partial line.
            traces
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| traces.flush())
                .map_err(io_err(&paths.traces))?;
            records.push(record);
        }
        batch.clear();
        report(records);
        Ok(())
    };
    for next in &mut *reader {
        if seen >= limit {
            break;
        }
        let item = match next {
            Ok(item) => item,
            Err(ReadError::Skipped(bad)) => {
                tracing::warn!(row = %bad, "skipping a bad dataset row");
                continue;
            }
            Err(ReadError::Fatal(e)) => return Err(EvalError::Dataset(e.to_string())),
        };
        if finished.contains(&item.id) {
            continue;
        }
        seen += 1;
        batch.push(evaluator.prepare(item));
        if batch.len() >= config.batch_items {
            flush(&mut batch, &mut records, &mut traces)?;
        }
    }
    flush(&mut batch, &mut records, &mut traces)?;
    let summary = summarize(&header.bench, &records, reader.summary().skipped_total());
    let text = serde_json::to_string_pretty(&summary).expect("the summary serialises");
    let tmp = paths.summary.with_extension("json.tmp");
    fs::write(&tmp, text + "\n").map_err(io_err(&tmp))?;
    fs::rename(&tmp, &paths.summary).map_err(io_err(&paths.summary))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepeyes_core::dataset::Position;

    fn mc_item(id: &str) -> Item {
        Item {
            id: id.into(),
            data_source: "vstar".into(),
            question: "What is the colour of the cup?".into(),
            options: vec!["red".into(), "blue".into(), "green".into(), "white".into()],
            correct_option: Some(0),
            answer: "red".into(),
            images: vec![],
            boxes: vec![],
            category: Some("direct_attributes".into()),
            prompt: vec![],
            extra: serde_json::Map::new(),
            position: Position::file("x"),
        }
    }

    #[test]
    fn shuffling_is_seeded_by_id_and_tracks_the_answer() {
        let a = prepare_item(mc_item("one"), 7, true);
        let again = prepare_item(mc_item("one"), 7, true);
        assert_eq!(a.order, again.order);
        let letter = a.correct_letter.unwrap();
        let shown = a.order[(letter as u8 - b'A') as usize];
        assert_eq!(shown, 0, "the correct letter points at the stored answer");
        assert!(a.question.contains(&format!("{letter}. red")));
        // Across ids the answer lands on different letters.
        let letters: HashSet<char> = (0..40)
            .map(|i| {
                prepare_item(mc_item(&format!("id{i}")), 7, true)
                    .correct_letter
                    .unwrap()
            })
            .collect();
        assert!(letters.len() >= 3, "{letters:?}");
        let fixed = prepare_item(mc_item("one"), 7, false);
        assert_eq!(fixed.order, vec![0, 1, 2, 3]);
        assert_eq!(fixed.correct_letter, Some('A'));
        assert!(fixed.question.starts_with("Question: What is"));
    }

    #[test]
    fn rules_score_letters_texts_and_boxed_answers() {
        let p = prepare_item(mc_item("x"), 0, false);
        let score = |s: &str| score_answer(Some(s), &p, None);
        assert!(score("A").correct);
        assert!(score("A. red").correct);
        assert!(score("red").correct);
        assert!(score("\\boxed{A}").correct);
        assert!(!score("B").correct);
        assert_eq!(score("B").by, ScoredBy::Rule);
        let unsure = score("it looks reddish to me");
        assert!(!unsure.correct);
        assert_eq!(unsure.by, ScoredBy::Undecided);
        assert_eq!(score_answer(None, &p, None).by, ScoredBy::NoAnswer);
    }

    #[test]
    fn the_judge_decides_what_rules_cannot_and_its_failure_is_recorded() {
        use deepeyes_reward::judge::{JudgeError, JudgeVerdict};
        let p = prepare_item(mc_item("x"), 0, false);
        let yes = |r: &JudgeRequest<'_>| -> Result<JudgeVerdict, JudgeError> {
            assert_eq!(r.reference, "A. red");
            Ok(JudgeVerdict::fresh(true, "Judgement: 1"))
        };
        let s = score_answer(Some("reddish"), &p, Some(&yes));
        assert!(s.correct);
        assert_eq!(s.by, ScoredBy::Judge);
        // Rules come first: a wrong letter never reaches the judge.
        assert!(!score_answer(Some("C"), &p, Some(&yes)).correct);
        let down = |_: &JudgeRequest<'_>| -> Result<JudgeVerdict, JudgeError> {
            Err(JudgeError::Other("connection refused".into()))
        };
        let s = score_answer(Some("reddish"), &p, Some(&down));
        assert_eq!(s.by, ScoredBy::JudgeFailed);
        assert!(s.judge_reply.unwrap().contains("connection refused"));
    }

    #[test]
    fn iou_of_boxes() {
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]), 1.0);
        assert_eq!(iou([0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]), 0.0);
        let v = iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]);
        assert!((v - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou([0.0; 4], [0.0; 4]), 0.0);
    }

    fn record(category: &str, score: f64) -> ItemRecord {
        ItemRecord {
            id: format!("{category}{score}"),
            category: Some(category.into()),
            data_source: "hrbench".into(),
            question: String::new(),
            order: vec![],
            correct_letter: None,
            answer: String::new(),
            prompt: String::new(),
            samples: vec![],
            score,
        }
    }

    #[test]
    fn hrbench_overall_is_the_mean_of_single_and_cross() {
        let records = [
            record("single", 1.0),
            record("single", 1.0),
            record("single", 1.0),
            record("cross", 0.0),
        ];
        let s = summarize("hrbench", &records, 0);
        assert_eq!(s.overall, 0.5);
        assert_eq!(summarize("vstar", &records, 0).overall, 0.75);
    }
}
