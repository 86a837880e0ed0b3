//! One module per subcommand.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use deepeyes_core::{AgentConfig, PromptTemplates, SamplingParams};
use deepeyes_tools::{ToolRegistry, ToolsConfig};

use crate::cli::Command;

pub(crate) mod demo;
pub(crate) mod doctor;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod init_tinyeyes;
pub(crate) mod plot;
pub(crate) mod preprocess;
pub(crate) mod pretrain;
pub(crate) mod prompt;
pub(crate) mod reward;
pub(crate) mod run;
pub(crate) mod select;
pub(crate) mod synthv;
pub(crate) mod tools;
pub(crate) mod train;

/// Runs the chosen subcommand.
pub(crate) fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Demo(args) => demo::run(args),
        Command::Synthv(args) => synthv::run(args),
        Command::Prompt(args) => prompt::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Tools(args) => tools::run(args),
        Command::Run(args) => run::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Reward(args) => reward::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(args),
        Command::Select(args) => select::run(args),
        Command::Export(args) => export::run(args),
        Command::InitTinyeyes(args) => init_tinyeyes::run(args),
        Command::PretrainSynthetic(args) => pretrain::run(args),
    }
}

/// The prompt templates from `path`; else those the model bundle `model` was trained with
/// (its `templates.toml`); else the built-in ones.
pub(crate) fn load_templates(
    path: Option<&Path>,
    model: Option<&Path>,
) -> anyhow::Result<PromptTemplates> {
    match (path, model) {
        (Some(path), _) => PromptTemplates::from_toml_file(path)
            .with_context(|| format!("loading prompt templates from {}", path.display())),
        (None, Some(dir)) => PromptTemplates::for_bundle(dir)
            .with_context(|| format!("loading the prompt templates of {}", dir.display())),
        (None, None) => Ok(PromptTemplates::default()),
    }
}

/// The tools config from `path` (or the defaults) and the registry built from it.
pub(crate) fn load_tools(path: Option<&Path>) -> anyhow::Result<(ToolsConfig, ToolRegistry)> {
    let config = match path {
        Some(path) => ToolsConfig::from_toml_file(path)
            .with_context(|| format!("loading the tools config {}", path.display()))?,
        None => ToolsConfig::default(),
    };
    let registry = ToolRegistry::from_config(&config).context("setting up the tools")?;
    Ok((config, registry))
}

/// The agent loop's defaults with the limits and temperature given on the command line.
pub(crate) fn agent_config(
    max_turns: usize,
    max_new_tokens: usize,
    temperature: f32,
    stop_at_tool_call_end: bool,
) -> AgentConfig {
    let defaults = AgentConfig::default();
    AgentConfig {
        max_turns,
        max_new_tokens,
        stop_at_tool_call_end,
        sampling: SamplingParams {
            temperature,
            ..defaults.sampling
        },
        ..defaults
    }
}
