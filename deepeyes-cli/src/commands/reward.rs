//! `deepeyes reward`: score JSONL rows with a reward pipeline (DeepEyes' by default).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use deepeyes_core::reward::{RewardBreakdown, RewardInput, RewardTerm};
use deepeyes_reward::{JudgeConfig, Pipeline, PipelineConfig, Registry, flags};
use serde::{Deserialize, Serialize};

/// Arguments of `deepeyes reward`.
#[derive(Debug, Args)]
pub(crate) struct RewardArgs {
    /// A reward pipeline (TOML). Default: the built-in DeepEyes pipeline
    /// (configs/rewards/deepeyes.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Rows to score, one JSON object per line with `id`, `data_source`, `question`,
    /// `ground_truth` and `response` (the decoded response region, observation tokens included).
    /// `-` reads stdin.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the scored rows (`id`, `total`, `terms`, `flags`), in input order.
    /// Default: stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Send the judge's requests to this OpenAI-compatible server instead.
    #[arg(long, conflicts_with = "no_judge")]
    judge_url: Option<String>,
    /// Score by the rule matchers alone; answers they cannot decide score 0, flagged.
    #[arg(long)]
    no_judge: bool,
    /// Stop at the first bad row (unparseable, or failing to score) instead of reporting it with
    /// its line number and going on.
    #[arg(long)]
    fail_on_bad_row: bool,
    /// Rows scored at once. Default: the judge's `max-concurrency`, or 1 without a judge.
    #[arg(long)]
    jobs: Option<usize>,
    #[command(flatten)]
    env: super::AllowEnvArgs,
}

/// One input row.
#[derive(Debug, Deserialize)]
struct Row {
    id: serde_json::Value,
    data_source: String,
    question: String,
    ground_truth: Scalar,
    response: String,
}

/// A ground truth written as a string or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(serde_json::Number),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Number(number) => number.to_string(),
        }
    }
}

/// One output row.
#[derive(Debug, Serialize)]
struct Scored<'a> {
    id: &'a serde_json::Value,
    total: f64,
    terms: &'a [RewardTerm],
    flags: &'a [String],
}

/// A row that could not be scored.
#[derive(Debug)]
struct BadRow {
    line: usize,
    reason: String,
}

/// Scores the rows and writes the results.
pub(crate) fn run(args: RewardArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => PipelineConfig::from_toml_file(path)
            .with_context(|| format!("loading the reward config {}", path.display()))?,
        None => {
            PipelineConfig::deepeyes().context("loading the built-in DeepEyes reward config")?
        }
    };
    if args.no_judge {
        config.judge = None;
    } else if let Some(url) = &args.judge_url {
        match config.judge.as_mut() {
            Some(judge) => judge.base_url.clone_from(url),
            None => config.judge = Some(JudgeConfig::new(url.clone())),
        }
    }
    if let Some(judge) = config.judge.as_mut() {
        judge.allowed_env.extend(args.env.allow_env.iter().cloned());
    }
    let pipeline = config
        .build(&Registry::new())
        .context("building the reward pipeline")?;
    if let Some(judge) = pipeline.judge() {
        super::check_judge(
            judge,
            "start it, point --judge-url elsewhere, pass --no-judge",
        )?;
    }

    let (rows, mut bad) = read_rows(&args)?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| pipeline.judge().map_or(1, |j| j.config().max_concurrency))
        .max(1);
    let scored = score_rows(&pipeline, &rows, jobs, args.fail_on_bad_row);

    let mut results = Vec::with_capacity(rows.len());
    for ((line, row), outcome) in rows.iter().zip(scored) {
        match outcome {
            Some(Ok(breakdown)) => results.push((row, breakdown)),
            Some(Err(reason)) => bad.push(BadRow {
                line: *line,
                reason,
            }),
            // Not scored: an earlier row already failed under --fail-on-bad-row.
            None => {}
        }
    }
    bad.sort_by_key(|b| b.line);
    if args.fail_on_bad_row
        && let Some(first) = bad.first()
    {
        bail!(
            "{} line {}: {}",
            input_name(&args),
            first.line,
            first.reason
        );
    }
    for row in &bad {
        tracing::error!(
            "{} line {}: {} (row skipped)",
            input_name(&args),
            row.line,
            row.reason
        );
    }

    write_rows(&args, &results)?;
    let fallbacks = results
        .iter()
        .filter(|(_, b)| b.flags.iter().any(|f| f == flags::JUDGE_FALLBACK))
        .count();
    tracing::info!(
        scored = results.len(),
        skipped = bad.len(),
        judge_fallback = fallbacks,
        "reward scoring finished"
    );
    if let Some(judge) = pipeline.judge() {
        let stats = judge.stats();
        tracing::info!(
            requests = stats.requests,
            verdicts = stats.verdicts,
            cache_hits = stats.cache_hits,
            retries = stats.retries,
            failures = stats.failures,
            short_circuited = stats.short_circuited,
            "judge usage"
        );
        if fallbacks > 0 {
            tracing::warn!(
                rows = fallbacks,
                "the judge decided none of these rows: they are written scored by the rules, flagged {}",
                flags::JUDGE_FALLBACK
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn input_name(args: &RewardArgs) -> String {
    args.input.display().to_string()
}

/// Rows with their 1-based line numbers.
type Numbered = Vec<(usize, Row)>;

/// The parsed rows, and the lines that did not parse.
fn read_rows(args: &RewardArgs) -> anyhow::Result<(Numbered, Vec<BadRow>)> {
    let reader: Box<dyn Read> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            File::open(&args.input)
                .with_context(|| format!("opening the input {}", args.input.display()))?,
        )
    };
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (index, line) in BufReader::new(reader).lines().enumerate() {
        let number = index + 1;
        let line =
            line.with_context(|| format!("reading {} line {number}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Row>(&line) {
            Ok(row) => rows.push((number, row)),
            Err(err) => {
                let reason = format!("not a valid row: {err}");
                if args.fail_on_bad_row {
                    bail!("{} line {number}: {reason}", args.input.display());
                }
                bad.push(BadRow {
                    line: number,
                    reason,
                });
            }
        }
    }
    Ok((rows, bad))
}

/// The outcome of one row: its breakdown or why it failed; `None` when it was not scored.
type Outcome = Option<Result<RewardBreakdown, String>>;

/// Scores every row on `jobs` threads; `None` for rows skipped after a failure under
/// `stop_on_error`.
fn score_rows(
    pipeline: &Pipeline,
    rows: &[(usize, Row)],
    jobs: usize,
    stop_on_error: bool,
) -> Vec<Outcome> {
    let results: Mutex<Vec<Outcome>> = Mutex::new((0..rows.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(rows.len().max(1)) {
            scope.spawn(|| {
                loop {
                    if stop_on_error && failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, row)) = rows.get(index) else {
                        break;
                    };
                    let truth = row.ground_truth.text();
                    let input = RewardInput {
                        data_source: &row.data_source,
                        question: &row.question,
                        ground_truth: &truth,
                        response: &row.response,
                        trajectory: None,
                    };
                    let outcome = pipeline.evaluate(&input).map_err(|err| {
                        failed.store(true, Ordering::Relaxed);
                        format!("{:#}", anyhow::Error::new(err))
                    });
                    if let Ok(mut results) = results.lock() {
                        results[index] = Some(outcome);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_rows(args: &RewardArgs, results: &[(&Row, RewardBreakdown)]) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => {
            Box::new(BufWriter::new(File::create(path).with_context(|| {
                format!("creating the output {}", path.display())
            })?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let target = args
        .output
        .as_ref()
        .map_or_else(|| "stdout".to_string(), |p| p.display().to_string());
    for (row, breakdown) in results {
        let scored = Scored {
            id: &row.id,
            total: breakdown.total,
            terms: &breakdown.terms,
            flags: &breakdown.flags,
        };
        serde_json::to_writer(&mut out, &scored).with_context(|| format!("writing to {target}"))?;
        out.write_all(b"\n")
            .with_context(|| format!("writing to {target}"))?;
    }
    out.flush()
        .with_context(|| format!("writing to {target}"))?;
    Ok(())
}
