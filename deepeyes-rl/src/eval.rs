//! Benchmark evaluation with the same agent loop and tools as training.
//!
//! An [`Evaluator`] runs the agent on dataset [`Item`]s and grades each answer with an
//! [`AnswerGrader`]: the training reward's accuracy term (`deepeyes-reward`'s `Accuracy`: its
//! rules first, then the LLM judge when one is given and the rules cannot decide), so an answer
//! is correct in evaluation exactly when it is in training. Options are shuffled by default with a seed derived
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

use deepeyes_core::dataset::{Item, ItemReader, PreparedItem, ReadError, prepare_item};
use deepeyes_core::protocol::extract_answer;
use deepeyes_core::{
    Agent, AgentConfig, AnswerGrader, CropRect, Grade, GradeInput, GradedBy, ImageLimits,
    PromptTemplates, StopReason, Task, Tool, ToolOutcome, Trajectory, VisionLanguageModel,
};
use serde::{Deserialize, Serialize};

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

/// One tool call as the trace records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The turn it was made in (0-based).
    pub turn: usize,
    /// The raw text inside `<tool_call>`.
    pub raw: String,
    /// The tool name, when the call parsed.
    pub tool: Option<String>,
    /// The region of the input image the model was shown, in original pixels, as the tool
    /// reported it.
    pub crop: Option<CropRect>,
    /// IoU of that region with the item's best-matching ground-truth box on that image.
    pub iou: Option<f64>,
    /// Whether that region holds the centre of a ground-truth box (the look found what the
    /// question is about), where the item has boxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit: Option<bool>,
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
    pub verdict: Grade,
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
    /// Why the item could not be evaluated (an image that does not decode, an episode that
    /// failed), when it could not: it has no samples and no score, and a resumed evaluation
    /// does not try it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Runs the agent on items and scores them.
pub struct Evaluator<'a> {
    agent: Agent<'a>,
    grader: &'a dyn AnswerGrader,
    config: EvalConfig,
    limits: ImageLimits,
}

impl std::fmt::Debug for Evaluator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<'a> Evaluator<'a> {
    /// An evaluator of `model` with `tools`, grading answers with `grader` (the training
    /// reward's accuracy term, so that "correct" means the same in both).
    pub fn new(
        model: &'a dyn VisionLanguageModel,
        tools: Vec<Arc<dyn Tool>>,
        templates: PromptTemplates,
        config: EvalConfig,
        grader: &'a dyn AnswerGrader,
    ) -> EvalResult<Self> {
        config.validate()?;
        let agent = Agent::new(model, tools, templates, config.agent.clone())?;
        Ok(Self {
            agent,
            grader,
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

    /// Answers and scores a batch of items (all their samples stepped together). An item whose
    /// images do not decode, or whose episodes fail, comes back as a failed record with the
    /// cause; the other items are answered as usual.
    pub fn evaluate(&self, items: &[PreparedItem]) -> EvalResult<Vec<ItemRecord>> {
        let mut records: Vec<Option<ItemRecord>> = vec![None; items.len()];
        let (mut good, mut images) = (Vec::new(), Vec::new());
        for (k, p) in items.iter().enumerate() {
            match p.item.decode_images(&self.limits) {
                Ok(decoded) => {
                    good.push(k);
                    images.push(decoded);
                }
                Err(e) => records[k] = Some(failed_record(p, &e.to_string())),
            }
        }
        let chosen: Vec<PreparedItem> = good.iter().map(|&k| items[k].clone()).collect();
        let answered = match self.evaluate_with_images(&chosen, images.clone()) {
            Ok(answered) => answered,
            Err(_) if chosen.is_empty() => Vec::new(),
            // One item's failure must not cost the others: answer them one at a time.
            Err(_) if chosen.len() > 1 => chosen
                .iter()
                .zip(images)
                .map(|(p, im)| {
                    self.evaluate_with_images(std::slice::from_ref(p), vec![im])
                        .map(|mut r| r.remove(0))
                        .unwrap_or_else(|e| failed_record(p, &e.to_string()))
                })
                .collect(),
            Err(e) => vec![failed_record(&chosen[0], &e.to_string())],
        };
        for (k, record) in good.into_iter().zip(answered) {
            records[k] = Some(record);
        }
        Ok(records.into_iter().flatten().collect())
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
            .map(|(p, images)| p.task(images))
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
            .map(|(s, traj)| self.sample_record(p, s, traj))
            .collect();
        let correct = samples.iter().filter(|s| s.verdict.correct).count();
        ItemRecord {
            prompt: self.agent.prompt_text(task),
            score: correct as f64 / samples.len().max(1) as f64,
            samples,
            ..ItemRecord::of(p)
        }
    }

    fn sample_record(&self, p: &PreparedItem, sample: usize, traj: &Trajectory) -> SampleRecord {
        let boxes = p.item.first_image_boxes();
        let calls = traj
            .tool_calls
            .iter()
            .map(|c| {
                let crop = c.outcome.shown_region();
                CallRecord {
                    turn: c.turn,
                    raw: c.raw.clone(),
                    tool: c.call.as_ref().map(|call| call.name.clone()),
                    crop,
                    iou: crop.and_then(|r| r.best_iou(&boxes)),
                    hit: crop.and_then(|r| r.holds_centre_of(&boxes)),
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
        let verdict = match prediction.as_deref() {
            None => Grade::no_answer(),
            Some(prediction) => self.grader.grade(&GradeInput {
                data_source: &p.item.data_source,
                question: &p.question,
                ground_truth: &p.ground_truth(),
                prediction,
            }),
        };
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
}

impl ItemRecord {
    /// The record of `p` before it is answered: what the item says, no samples, no score.
    fn of(p: &PreparedItem) -> Self {
        Self {
            id: p.item.id.clone(),
            category: p.item.category.clone(),
            data_source: p.item.data_source.clone(),
            question: p.question.clone(),
            order: p.order.clone(),
            correct_letter: p.correct_letter,
            answer: p.item.answer.clone(),
            prompt: String::new(),
            samples: Vec::new(),
            score: 0.0,
            failed: None,
        }
    }
}

/// The record of an item that could not be evaluated, and why.
fn failed_record(p: &PreparedItem, cause: &str) -> ItemRecord {
    tracing::warn!(item = %p.item.id, cause, "item not evaluated");
    ItemRecord {
        failed: Some(cause.to_string()),
        ..ItemRecord::of(p)
    }
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
    /// Answers and their accuracy by the number of looks (calls that returned an image) they
    /// took, in order of that number.
    #[serde(default)]
    pub by_looks: Vec<LookCount>,
    /// Of the answers whose first look found the ground-truth box's centre, the share that
    /// called a tool again (`None` without such answers).
    #[serde(default)]
    pub look_again_after_hit: Option<f64>,
    /// Of the answers whose first look missed it, the share that called a tool again.
    #[serde(default)]
    pub look_again_after_miss: Option<f64>,
}

/// Answers that took a number of looks, and how many of them were right.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LookCount {
    /// Calls that returned an image.
    pub looks: usize,
    /// Answers that took that many.
    pub answers: usize,
    /// Their accuracy.
    pub accuracy: f64,
}

/// Tallies of [`ToolStats`]' look statistics while summarising.
#[derive(Debug, Default)]
struct LookTally {
    /// `(answers, correct)` by looks.
    by_looks: BTreeMap<usize, (usize, usize)>,
    /// `(answers, looked again)` after a first look that hit, and one that missed.
    after_hit: (usize, usize),
    after_miss: (usize, usize),
}

impl LookTally {
    fn add(&mut self, s: &SampleRecord) {
        let looks = s
            .calls
            .iter()
            .filter(|c| c.outcome.returned_image())
            .count();
        let entry = self.by_looks.entry(looks).or_default();
        entry.0 += 1;
        entry.1 += usize::from(s.verdict.correct);
        let first = s.calls.iter().position(|c| c.outcome.returned_image());
        if let Some(i) = first
            && let Some(hit) = s.calls[i].hit
        {
            let again = usize::from(s.calls.len() > i + 1);
            let tally = if hit {
                &mut self.after_hit
            } else {
                &mut self.after_miss
            };
            tally.0 += 1;
            tally.1 += again;
        }
    }

    fn by_looks(&self) -> Vec<LookCount> {
        self.by_looks
            .iter()
            .map(|(&looks, &(answers, correct))| LookCount {
                looks,
                answers,
                accuracy: correct as f64 / answers as f64,
            })
            .collect()
    }
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
    pub scored_by: BTreeMap<GradedBy, usize>,
    /// Tool use.
    pub tools: ToolStats,
    /// Answers per stop reason.
    pub stops: BTreeMap<String, usize>,
    /// Dataset rows skipped as unreadable, over all runs of this evaluation.
    pub skipped_rows: u64,
    /// Items that could not be evaluated (their ids and causes are in `traces.jsonl`); they
    /// count in no score.
    #[serde(default)]
    pub failed_items: usize,
}

/// Summarises item records; `bench` picks the overall rule.
pub fn summarize(bench: &str, all: &[ItemRecord], skipped_rows: u64) -> EvalSummary {
    let records: Vec<&ItemRecord> = all.iter().filter(|r| r.failed.is_none()).collect();
    let mut categories: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    let mut scored_by = BTreeMap::new();
    let mut stops = BTreeMap::new();
    let (mut samples, mut calls, mut with_calls, mut returned) = (0usize, 0usize, 0usize, 0usize);
    let (mut iou_sum, mut iou_n) = (0.0, 0usize);
    let mut looks = LookTally::default();
    for r in &records {
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
            looks.add(s);
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
            by_looks: looks.by_looks(),
            look_again_after_hit: (looks.after_hit.0 > 0)
                .then(|| share(looks.after_hit.1, looks.after_hit.0)),
            look_again_after_miss: (looks.after_miss.0 > 0)
                .then(|| share(looks.after_miss.1, looks.after_miss.0)),
        },
        stops,
        skipped_rows,
        failed_items: all.len() - records.len(),
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
            failed: None,
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
