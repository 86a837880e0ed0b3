//! `deepeyes train --config FILE.toml`: GRPO training with a live table per step.
//!
//! Metrics go to `metrics.jsonl` in the run folder; every `checkpoint.every` steps, and at the
//! end, the policy is written as a model bundle (`checkpoints/step-NNNNNNNN`, `final`) that
//! `deepeyes run` and `deepeyes eval` load as is.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use deepeyes_core::onnx::OnnxOptions;
use deepeyes_core::{RewardFn, Tool};
use deepeyes_reward::{PipelineConfig, Registry};
use deepeyes_rl::TrainConfig;
use deepeyes_rl::checkpoint::latest_intact;
use deepeyes_rl::config::RewardSource;
use deepeyes_rl::metrics::{StepMetrics, ToolCollapseDetector};
use deepeyes_rl::trainer::Trainer;
use deepeyes_tools::{ToolRegistry, ToolsConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `deepeyes train`.
#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// The training configuration (see configs/train/example.toml).
    #[arg(long, value_name = "FILE.toml")]
    config: PathBuf,
    /// Run this many steps instead of the config's `steps`.
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    /// Score by the reward's rule matchers alone (answers they cannot decide score 0, flagged),
    /// without the LLM judge the pipeline configures.
    #[arg(long)]
    no_judge: bool,
    /// Continue the run from its newest checkpoint (weights, optimizer, data position); the
    /// next steps equal those of an uninterrupted run.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start over in an output folder that holds an earlier run, deleting its checkpoints and
    /// metrics (without this, such a folder is refused).
    #[arg(long)]
    overwrite: bool,
    /// Threads per ONNX Runtime graph during rollouts (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
    #[command(flatten)]
    env: super::AllowEnvArgs,
}

/// One row of the live table.
pub(crate) fn table_row(m: &StepMetrics) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "    -".to_string(), |v| format!("{v:5.3}"));
    format!(
        "{:>5}  {:>7.3}  {}  {:>5.2}  {}  {}  {:>6.1}",
        m.step + 1,
        m.rollout.reward_mean,
        opt(m.rollout.accuracy),
        m.rollout.tool_calls_mean,
        opt(m.rollout.valid_crop_rate),
        opt(m.rollout.grounding_iou),
        m.time.time_step_s,
    )
}

/// The live table's header.
pub(crate) const TABLE_HEADER: &str = " step   reward    acc  calls  crops    iou  step s";

/// The reward pipeline configuration the training config names: its inline `[reward]` table,
/// its `reward-file`, or DeepEyes' shipped pipeline.
pub(crate) fn reward_config(config: &TrainConfig) -> anyhow::Result<PipelineConfig> {
    Ok(match config.reward_source() {
        RewardSource::Inline(table) => PipelineConfig::from_table(table, "[reward]")?,
        RewardSource::File(path) => PipelineConfig::from_toml_file(path)?,
        RewardSource::Default => PipelineConfig::deepeyes()?,
    })
}

/// The tools the training config's `[tools]` table enables; without one, those of the bundle
/// it starts from (its `tools.toml`), else the default tools.
pub(crate) fn config_tools(config: &TrainConfig) -> anyhow::Result<Vec<Arc<dyn Tool>>> {
    let tools = if config.tools.is_empty() {
        ToolsConfig::for_bundle(&config.model.bundle)
            .with_context(|| {
                format!(
                    "loading the tools config of {}",
                    config.model.bundle.display()
                )
            })?
            .unwrap_or_default()
    } else {
        ToolsConfig::from_table(&config.tools, "[tools]")?
    };
    Ok(ToolRegistry::from_config(&tools)
        .context("setting up the tools")?
        .tools())
}

/// Deletes what a run in `config`'s output folder wrote (checkpoints, metrics, final bundle),
/// for `--overwrite`.
pub(crate) fn discard_run(config: &TrainConfig) -> anyhow::Result<()> {
    for dir in [config.checkpoint_dir(), config.output_dir.join("final")] {
        if dir.is_dir() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    let metrics = config.metrics_path();
    if metrics.is_file() {
        std::fs::remove_file(&metrics)
            .with_context(|| format!("removing {}", metrics.display()))?;
    }
    Ok(())
}

/// Trains and writes the final bundle.
pub(crate) fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = TrainConfig::load(&args.config)
        .with_context(|| format!("loading the training config {}", args.config.display()))?;
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    let steps = config.steps;
    let every = config.checkpoint.every;
    let checkpoint_root = config.checkpoint_dir();
    let out = config.output_dir.clone();
    let collapse = ToolCollapseDetector::new(
        config.metrics.tool_collapse_threshold,
        config.metrics.tool_collapse_steps,
    );
    let mut rewards = reward_config(&config).context("reading the reward pipeline")?;
    if args.no_judge {
        rewards.judge = None;
    }
    if let Some(judge) = rewards.judge.as_mut() {
        judge.allowed_env.extend(args.env.allow_env.iter().cloned());
    }
    let pipeline = rewards
        .build(&Registry::new())
        .context("building the reward pipeline")?;
    let tools = config_tools(&config)?;
    let resume_from = if args.resume {
        let (checkpoint, skipped) =
            latest_intact(&checkpoint_root).context("listing checkpoints")?;
        let Some(checkpoint) = checkpoint else {
            let why: String = skipped
                .iter()
                .map(|s| format!("\n  {}: {}", s.dir.display(), s.reason))
                .collect();
            anyhow::bail!(
                "--resume: no intact checkpoint in {}{why}\nstart without --resume (with \
                 --overwrite if the folder holds an earlier run)",
                checkpoint_root.display()
            );
        };
        Some(checkpoint)
    } else {
        None
    };
    // After the cheap checks, before the model loads: a dead judge is found in seconds, not
    // after the first rollout.
    if let Some(judge) = pipeline.judge() {
        super::check_judge(
            judge,
            "start it, fix the reward config's [judge] base-url, pass --no-judge",
        )?;
    }
    let reward: Arc<dyn RewardFn> = Arc::new(pipeline);
    let trainer = if let Some(checkpoint) = resume_from {
        tracing::info!(step = checkpoint.state().step, path = %checkpoint.dir().display(), "resuming");
        Trainer::resume(config, tools, reward, &checkpoint)
            .with_context(|| format!("resuming from {}", checkpoint.dir().display()))?
    } else {
        if args.overwrite {
            discard_run(&config)?;
        }
        Trainer::new(config, tools, reward).context("setting up training")?
    };
    let mut trainer = trainer.with_onnx_options(OnnxOptions {
        threads: args.threads,
        ..OnnxOptions::default()
    });
    train_loop(&mut trainer, steps, every, collapse)?;
    let final_dir = trainer
        .export(&out.join("final"))
        .context("writing the final bundle")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "trained {steps} steps; metrics in {}, policy bundle in {}",
        out.join("metrics.jsonl").display(),
        final_dir.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `steps` steps, printing the table and writing checkpoints.
pub(crate) fn train_loop(
    trainer: &mut Trainer,
    steps: u64,
    every: u64,
    mut collapse: ToolCollapseDetector,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} step {pos}/{len}  {elapsed_precise} < {eta_precise}",
        )
        .expect("the template is valid"),
    );
    bar.set_position(trainer.step_count());
    bar.reset_eta();
    // The table goes to stdout, the bar to stderr; the bar steps aside while a row prints.
    let print = |line: &str| -> std::io::Result<()> {
        bar.suspend(|| {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{line}")?;
            stdout.flush()
        })
    };
    print(TABLE_HEADER)?;
    while trainer.step_count() < steps {
        let m = trainer
            .train_step()
            .with_context(|| format!("training step {}", trainer.step_count() + 1))?;
        print(&table_row(&m))?;
        bar.set_position(trainer.step_count());
        if let Some(w) = collapse.observe(m.step, m.rollout.tool_calls_mean) {
            tracing::warn!(
                ?w,
                "tool use collapsed: tool calls per trajectory stayed low"
            );
        }
        let done = trainer.step_count();
        if (every > 0 && done.is_multiple_of(every)) || done == steps {
            let dir = trainer
                .save_checkpoint()
                .with_context(|| format!("writing the checkpoint of step {done}"))?;
            tracing::info!(path = %dir.display(), "checkpoint written");
        }
    }
    bar.finish_and_clear();
    Ok(())
}
