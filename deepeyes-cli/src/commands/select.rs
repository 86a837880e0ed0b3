//! `deepeyes select`: DeepEyes' tool-use-oriented data selection with a model bundle.
//!
//! Writes `selection.jsonl` (every item's counts and decision), `report.json` (the counts of each
//! stage) and, for JSONL data (SynthV* and generic), `data.jsonl`: the kept rows exactly as they
//! were in the input, readable by the same loader.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::dataset::{self, DatasetKind, LoadOptions, ReadError};
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_rl::eval::{EvalConfig, Evaluator};
use deepeyes_rl::select::{SelectionReport, select};

/// Arguments of `deepeyes select`.
#[derive(Debug, Args)]
pub(crate) struct SelectArgs {
    /// The model bundle that will be trained.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// The data format: synthv, jsonl, vstar, hrbench or verl.
    #[arg(long, default_value = "synthv", value_name = "KIND")]
    bench: DatasetKind,
    /// The data file or folder.
    #[arg(long, value_name = "IN")]
    data: PathBuf,
    /// Let the data's rows name image files outside its folder (absolute paths, or `..` above
    /// it); refused by default.
    #[arg(long)]
    allow_paths_outside_root: bool,
    /// Where to write the selection.
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
    /// Samples per item (and per item with its ground-truth crop).
    #[arg(long, default_value_t = 8, value_name = "K")]
    k: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0, value_name = "T")]
    temperature: f32,
    /// Seed of sampling and option order.
    #[arg(long, default_value_t = 0, value_name = "S")]
    seed: u64,
    #[command(flatten)]
    limits: super::AgentLimitArgs,
    /// Read at most N items.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Drop items with mixed results but no ground-truth box (default: keep them).
    #[arg(long)]
    require_box: bool,
    /// Threads per graph (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
}

/// Runs the selection and prints the counts of each stage.
pub(crate) fn run(args: SelectArgs) -> anyhow::Result<ExitCode> {
    let (_, registry) = super::load_tools(None, Some(&args.model))?;
    let agent = args.limits.agent_config(&args.model, args.temperature)?;
    let config = EvalConfig {
        samples: args.k,
        seed: args.seed,
        shuffle_options: true,
        batch_items: 4,
        limit: args.limit,
        agent,
    };
    let load = LoadOptions {
        allow_paths_outside_root: args.allow_paths_outside_root,
        ..LoadOptions::default()
    };
    let mut reader = dataset::open(args.bench, &args.data, &load)
        .with_context(|| format!("opening the {} data at {}", args.bench, args.data.display()))?;
    let mut items = Vec::new();
    for next in reader.as_mut() {
        if items.len() >= args.limit.unwrap_or(usize::MAX) {
            break;
        }
        match next {
            Ok(item) => items.push(item),
            Err(ReadError::Skipped(bad)) => tracing::warn!(row = %bad, "skipping a bad row"),
            Err(ReadError::Fatal(e)) => {
                return Err(e).with_context(|| format!("reading {}", args.data.display()));
            }
        }
    }
    let model = OnnxModel::load(
        &args.model,
        &OnnxOptions {
            threads: args.threads,
            ..OnnxOptions::default()
        },
    )
    .with_context(|| format!("loading the model bundle {}", args.model.display()))?;
    let grader = super::answer_grader(None);
    let evaluator = Evaluator::new(
        &model,
        registry.tools(),
        super::load_templates(None, Some(&args.model))?,
        config,
        &grader,
    )
    .context("setting up the selection")?;
    let lines: Vec<Option<u64>> = items.iter().map(|i| i.position.line).collect();
    let selections = select(&evaluator, items, args.require_box).context("selecting")?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut report = SelectionReport::default();
    let mut text = String::new();
    for s in &selections {
        report.add(s);
        text.push_str(&serde_json::to_string(s)?);
        text.push('\n');
    }
    let path = args.out.join("selection.jsonl");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let path = args.out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    if matches!(args.bench, DatasetKind::SynthV | DatasetKind::Jsonl) {
        let kept: HashSet<u64> = selections
            .iter()
            .zip(&lines)
            .filter(|(s, _)| s.decision.kept())
            .filter_map(|(_, l)| *l)
            .collect();
        let input = std::fs::read_to_string(&args.data)
            .with_context(|| format!("reading {}", args.data.display()))?;
        let mut out = String::new();
        for (n, line) in input.lines().enumerate() {
            if kept.contains(&(n as u64 + 1)) {
                out.push_str(line);
                out.push('\n');
            }
        }
        let path = args.out.join("data.jsonl");
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    for (name, count) in report.rows() {
        writeln!(stdout, "{:<28} {count:>6}", &name[2..])?;
    }
    writeln!(stdout, "selection in {}", args.out.display())?;
    Ok(ExitCode::SUCCESS)
}
