//! `deepeyes eval`: run a model with its tools on a benchmark and score it.
//!
//! Writes `eval.json` (settings), `traces.jsonl` (one line per item) and `summary.json` into
//! `--out`, resuming an interrupted run there; prints the summary.

use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use deepeyes_core::dataset::{self, DatasetKind, LoadOptions};
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_reward::judge::Verifier;
use deepeyes_reward::{HttpJudge, JudgeConfig};
use deepeyes_rl::eval::{EvalConfig, EvalHeader, EvalSummary, Evaluator, run_eval};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `deepeyes eval`.
#[derive(Debug, Clone, Args)]
pub(crate) struct EvalArgs {
    /// The model bundle directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// The benchmark format: vstar (a folder per category), hrbench (TSV), synthv or jsonl
    /// (JSONL index), verl (parquet).
    #[arg(long, value_name = "KIND")]
    pub(crate) bench: DatasetKind,
    /// The benchmark file or folder.
    #[arg(long, value_name = "PATH")]
    pub(crate) data: PathBuf,
    /// Let the data's rows name image files outside its folder (absolute paths, or `..` above
    /// it); refused by default.
    #[arg(long)]
    pub(crate) allow_paths_outside_root: bool,
    /// Answers per item; the score is Avg@K.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub(crate) samples: usize,
    /// Seed of the option order and of sampling.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub(crate) seed: u64,
    /// A TOML file with the judge's settings (base-url, model, timeout, …), asked when the rules
    /// cannot decide.
    #[arg(long, value_name = "CONFIG")]
    pub(crate) judge: Option<PathBuf>,
    /// The output directory (traces, summary); an interrupted eval there is resumed.
    #[arg(long, default_value = "runs/eval", value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Keep the options in stored order (V* stores the answer first, which inflates scores).
    #[arg(long)]
    pub(crate) no_shuffle: bool,
    /// Evaluate at most N items.
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<usize>,
    #[command(flatten)]
    pub(crate) limits: super::AgentLimitArgs,
    #[command(flatten)]
    pub(crate) env: super::AllowEnvArgs,
    /// Sampling temperature; 0 is greedy (DeepEyes evaluates greedily).
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub(crate) temperature: f32,
    /// Items stepped together (batched generation).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub(crate) batch: usize,
    /// Threads per graph (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) threads: usize,
    /// A TOML file configuring the tools ([zoom-in], [rotate], [[plugins]]).
    #[arg(long, value_name = "FILE")]
    pub(crate) tools_config: Option<PathBuf>,
    /// A TOML file overriding the prompt templates.
    #[arg(long, value_name = "FILE")]
    pub(crate) templates: Option<PathBuf>,
}

/// Runs the evaluation and prints its summary.
pub(crate) fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let summary = evaluate(&args)?;
    let mut out = std::io::stdout().lock();
    out.write_all(render(&summary, &args.out.display().to_string()).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the evaluation (with a progress bar) and returns its summary.
pub(crate) fn evaluate(args: &EvalArgs) -> anyhow::Result<EvalSummary> {
    let templates = super::load_templates(args.templates.as_deref(), Some(&args.model))?;
    let (_, registry) = super::load_tools(args.tools_config.as_deref(), Some(&args.model))?;
    let judge = match &args.judge {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the judge config {}", path.display()))?;
            let config: JudgeConfig = toml::from_str(&text)
                .with_context(|| format!("parsing the judge config {}", path.display()))?;
            let config = config.allow_env(args.env.allow_env.iter().cloned());
            let judge = HttpJudge::new(config)
                .with_context(|| format!("setting up the judge of {}", path.display()))?;
            super::check_judge(&judge, "start it, leave out --judge")?;
            Some(Arc::new(judge))
        }
        None => None,
    };
    let agent = args.limits.agent_config(&args.model, args.temperature)?;
    let config = EvalConfig {
        samples: args.samples,
        seed: args.seed,
        shuffle_options: !args.no_shuffle,
        batch_items: args.batch,
        limit: args.limit,
        agent,
    };
    config.validate().context("checking the eval settings")?;
    let load = LoadOptions {
        allow_paths_outside_root: args.allow_paths_outside_root,
        ..LoadOptions::default()
    };
    let mut reader = dataset::open(args.bench, &args.data, &load)
        .with_context(|| format!("opening the {} data at {}", args.bench, args.data.display()))?;
    let options = OnnxOptions {
        threads: args.threads,
        ..OnnxOptions::default()
    };
    let model = OnnxModel::load(&args.model, &options)
        .with_context(|| format!("loading the model bundle {}", args.model.display()))?;
    let grader = super::answer_grader(judge.clone().map(|j| j as Arc<dyn Verifier>));
    let evaluator = Evaluator::new(&model, registry.tools(), templates, config.clone(), &grader)
        .context("setting up the evaluation")?;
    let header = EvalHeader {
        bench: args.bench.to_string(),
        data: args.data.clone(),
        model: args.model.display().to_string(),
        config,
        judge: judge.is_some(),
    };
    // Rows, not items: bad rows and the items of an earlier run count towards the total, so
    // the bar can end short of it; the ETA is what a user waits on.
    let total = reader
        .len_hint()
        .map(|rows| args.limit.map_or(rows, |l| rows.min(l as u64)));
    let bar = match total {
        Some(n) => {
            let bar = ProgressBar::new(n);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} items  {elapsed_precise} < {eta_precise}  {msg}",
                )
                .expect("the template is valid"),
            );
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {pos} items  {elapsed_precise}  {msg}")
                    .expect("the template is valid"),
            );
            bar
        }
    };
    let summary = run_eval(&evaluator, reader.as_mut(), &args.out, &header, &mut |p| {
        bar.set_position(p.done as u64);
        if p.done == p.resumed {
            // Items finished by an earlier run say nothing about this run's speed.
            bar.reset_eta();
        }
        bar.set_message(format!("accuracy {:.3}", p.accuracy));
    })
    .with_context(|| format!("evaluating into {}", args.out.display()))?;
    bar.finish_and_clear();
    Ok(summary)
}

/// The summary as a short table.
fn render(s: &EvalSummary, out: &str) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{}: {} items × {} samples, overall {:.2}% ({})",
        s.bench,
        s.items,
        s.samples,
        100.0 * s.overall,
        s.overall_rule
    );
    for (name, c) in &s.categories {
        let _ = writeln!(
            text,
            "  {name:<24} {:>6.2}%  ({} items)",
            100.0 * c.accuracy,
            c.items
        );
    }
    let _ = writeln!(
        text,
        "tool calls per answer {:.2}, answers with a call {:.1}%, valid crops {}, mean IoU {}",
        s.tools.calls_per_sample,
        100.0 * s.tools.samples_with_calls,
        s.tools
            .valid_crop_rate
            .map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
        s.tools.mean_iou.map_or("-".into(), |v| format!("{v:.3}")),
    );
    if s.tools.calls_per_sample > 0.0 {
        let looks: Vec<String> = s
            .tools
            .by_looks
            .iter()
            .map(|l| {
                format!(
                    "{} look{}: {} answers, {:.1}% right",
                    l.looks,
                    if l.looks == 1 { "" } else { "s" },
                    l.answers,
                    100.0 * l.accuracy
                )
            })
            .collect();
        let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v));
        let _ = writeln!(
            text,
            "{}; looked again after a first look that hit {}, that missed {}",
            looks.join(", "),
            pct(s.tools.look_again_after_hit),
            pct(s.tools.look_again_after_miss),
        );
    }
    let by: Vec<String> = s
        .scored_by
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: {v}",
                serde_json::to_value(k).map_or_else(
                    |_| format!("{k:?}"),
                    |j| j.as_str().unwrap_or("?").to_string()
                )
            )
        })
        .collect();
    let _ = writeln!(text, "scored by {}", by.join(", "));
    if s.skipped_rows > 0 {
        let _ = writeln!(
            text,
            "{} dataset rows skipped as unreadable",
            s.skipped_rows
        );
    }
    if s.failed_items > 0 {
        let _ = writeln!(
            text,
            "{} items could not be evaluated (their causes are in traces.jsonl) and count in no score",
            s.failed_items
        );
    }
    let _ = writeln!(text, "traces and summary.json in {out}");
    text
}
