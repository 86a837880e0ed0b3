//! The command line, as clap derive types. Each subcommand's arguments live with its
//! implementation in `commands/`.

use clap::{Args, Parser, Subcommand};

use crate::commands;

/// Make vision-language models think with images, and train them to with RL.
#[derive(Debug, Parser)]
#[command(name = "deepeyes", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
}

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// More log output (-v info, -vv debug, -vvv trace). `RUST_LOG` overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// The main job: TinyEyes learns to zoom by GRPO on SynthV* (base eval, live table, trained eval, curves, a traced episode).
    Demo(commands::demo::DemoArgs),
    /// Write SynthV* splits (PNG images and a JSONL index per split).
    Synthv(commands::synthv::SynthVArgs),
    /// Render the prompt a model sees for a question and images, with the tools listed.
    Prompt(commands::prompt::PromptArgs),
    /// Draw a training run's curves (reward, accuracy, tool calls, IoU, …) to PNG and SVG.
    Plot(commands::plot::PlotArgs),
    /// Show the resized size, grid and image-token count of an image, and dump its pixel values.
    Preprocess(commands::preprocess::PreprocessArgs),
    /// List the tools a model can call (built-ins and plugins), or run one tool call on an image.
    Tools(commands::tools::ToolsArgs),
    /// Answer a question about an image with a model bundle and the tools; print the episode.
    Run(commands::run::RunArgs),
    /// Serve a model bundle's agent over HTTP: OpenAI-compatible /v1/chat/completions with the tools run in the request.
    Serve(commands::serve::ServeArgs),
    /// Show which ONNX Runtime library is loaded, its providers, and whether a GPU is used.
    Doctor(commands::doctor::DoctorArgs),
    /// Score JSONL rows (id, data_source, question, ground_truth, response) with a reward pipeline.
    Reward(commands::reward::RewardArgs),
    /// Evaluate a model with its tools on a benchmark (V*, HR-Bench, SynthV*, JSONL); resumable.
    Eval(commands::eval::EvalArgs),
    /// Train a policy with GRPO from a TOML config; writes metrics and runnable bundles.
    Train(commands::train::TrainArgs),
    /// Keep the items zooming helps on: drop always/never-solved ones, keep those the ground-truth crop turns right.
    Select(commands::select::SelectArgs),
    /// Write the model bundle of a training checkpoint (runs in ONNX Runtime as is).
    Export(commands::export::ExportArgs),
    /// Write an untrained TinyEyes checkpoint (own tokenizer, tiny Qwen2.5-VL) from a seed.
    InitTinyeyes(commands::init_tinyeyes::InitTinyEyesArgs),
    /// Train TinyEyes' supervised base (grounding, crop perception, answer and call formats) on SynthV*.
    PretrainSynthetic(commands::pretrain::PretrainArgs),
    /// Serve one isolated tool plugin on stdin/stdout (the child process of `isolate = true`;
    /// started by deepeyes itself, not by hand).
    #[command(hide = true)]
    PluginHost,
}
