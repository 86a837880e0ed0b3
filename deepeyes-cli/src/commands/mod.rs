//! One module per subcommand.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use deepeyes_core::agent::BundleAgentDefaults;
use deepeyes_core::{AgentConfig, PromptTemplates, SamplingParams};
use deepeyes_reward::judge::{FailurePolicy, Verifier};
use deepeyes_reward::{Accuracy, HttpJudge, JudgeHandle, VisualConfig};
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
pub(crate) mod serve;
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
        Command::Serve(args) => serve::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Reward(args) => reward::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run(args),
        Command::Select(args) => select::run(args),
        Command::Export(args) => export::run(args),
        Command::InitTinyeyes(args) => init_tinyeyes::run(args),
        Command::PretrainSynthetic(args) => pretrain::run(args),
        Command::PluginHost => Ok(deepeyes_tools::plugin::host::run()),
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

/// How `run` and `serve` load a model bundle: threads, the GPU requirement, and the tools and
/// prompt templates that override the bundle's.
#[derive(Debug, clap::Args)]
pub(crate) struct BundleRunArgs {
    /// Threads per graph (0: ONNX Runtime's choice).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub(crate) threads: usize,
    /// Fail unless the model runs on a GPU.
    #[arg(long)]
    pub(crate) require_gpu: bool,
    /// A TOML file configuring the tools ([zoom-in], [rotate], [[plugins]]) [default: the
    /// bundle's tools.toml, else the built-in tools].
    #[arg(long, value_name = "FILE")]
    pub(crate) tools_config: Option<std::path::PathBuf>,
    /// A TOML file overriding the prompt templates.
    #[arg(long, value_name = "FILE")]
    pub(crate) templates: Option<std::path::PathBuf>,
}

impl BundleRunArgs {
    /// The ONNX Runtime options these arguments ask for.
    pub(crate) fn onnx_options(&self) -> deepeyes_core::onnx::OnnxOptions {
        deepeyes_core::onnx::OnnxOptions {
            threads: self.threads,
            require_gpu: self.require_gpu,
            ..deepeyes_core::onnx::OnnxOptions::default()
        }
    }

    /// The prompt templates and tools for the bundle `model`.
    pub(crate) fn templates_and_tools(
        &self,
        model: &Path,
    ) -> anyhow::Result<(PromptTemplates, ToolRegistry)> {
        let templates = load_templates(self.templates.as_deref(), Some(model))?;
        let (_, registry) = load_tools(self.tools_config.as_deref(), Some(model))?;
        Ok((templates, registry))
    }
}

/// The tools config from `path`, else the one the bundle `model` carries (the frame and limits
/// it was trained with), else the defaults; and the registry built from it.
pub(crate) fn load_tools(
    path: Option<&Path>,
    model: Option<&Path>,
) -> anyhow::Result<(ToolsConfig, ToolRegistry)> {
    let config = match (path, model) {
        (Some(path), _) => ToolsConfig::from_toml_file(path)
            .with_context(|| format!("loading the tools config {}", path.display()))?,
        (None, Some(dir)) => ToolsConfig::for_bundle(dir)
            .with_context(|| format!("loading the tools config of {}", dir.display()))?
            .unwrap_or_default(),
        (None, None) => ToolsConfig::default(),
    };
    let registry = ToolRegistry::from_config(&config).context("setting up the tools")?;
    Ok((config, registry))
}

/// Evaluation's notion of a correct answer: the accuracy term of DeepEyes' visual reward, the
/// one training pays (its rules, then `judge` for what they cannot decide; a failing judge is
/// recorded as such).
pub(crate) fn answer_grader(judge: Option<Arc<dyn Verifier>>) -> Accuracy {
    VisualConfig::default()
        .accuracy(judge.map(|j| JudgeHandle::new(j, FailurePolicy::RuleFallback)))
}

/// The start-up check of every command that uses a judge: asks it for its models. When it does
/// not answer, `judge.on-start-failure` decides: `error` (the default) stops here with `hint`,
/// `rule-fallback` warns and goes on (what it would decide is scored by the rules, flagged).
pub(crate) fn check_judge(judge: &HttpJudge, hint: &str) -> anyhow::Result<()> {
    let url = &judge.config().base_url;
    match judge.probe() {
        Ok(model) => {
            tracing::info!(url = %url, model = %model, "judge ready");
            Ok(())
        }
        Err(err) if judge.config().on_start_failure == FailurePolicy::RuleFallback => {
            tracing::warn!(
                url = %url,
                error = %err,
                "the judge does not answer; going on because judge.on-start-failure = \"rule-fallback\": undecided answers are scored by the rules, flagged judge_unavailable_rule_fallback"
            );
            Ok(())
        }
        Err(err) => Err(anyhow::Error::new(err).context(format!(
            "the judge at {url} does not answer; {hint}, or set judge.on-start-failure = \"rule-fallback\" to start without it"
        ))),
    }
}

/// `--allow-env NAME`: environment variables `judge.api-key-env` may name besides those
/// starting with `DEEPEYES_JUDGE_`.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct AllowEnvArgs {
    /// Let `judge.api-key-env` read this environment variable (its value is sent to the
    /// judge's URL as a bearer token). Names starting with DEEPEYES_JUDGE_ are always allowed;
    /// repeat for more.
    #[arg(long = "allow-env", value_name = "NAME")]
    pub(crate) allow_env: Vec<String>,
}

/// The agent-loop limits of the commands that run a model (`run`, `eval`, `select`). Each one
/// left out comes from the model bundle's `agent.toml` (the limits it was trained under), else
/// from the command's default.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct AgentLimitArgs {
    /// Most model turns (tool calls happen between turns) [default: the bundle's agent.toml,
    /// else 5]
    #[arg(long, value_name = "N")]
    pub(crate) max_turns: Option<usize>,
    /// Most tokens the model may generate per turn [default: the bundle's agent.toml, else
    /// 2048]
    #[arg(long, value_name = "N")]
    pub(crate) max_new_tokens: Option<usize>,
    /// End a turn at `</tool_call>` and run the call; `--stop-at-tool-call-end false` overrides
    /// a bundle that turns it on [default: the bundle's agent.toml, else off]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) stop_at_tool_call_end: Option<bool>,
}

/// Turns per episode when neither the command line nor the bundle says.
const DEFAULT_MAX_TURNS: usize = 5;
/// Tokens per turn when neither the command line nor the bundle says.
const DEFAULT_MAX_NEW_TOKENS: usize = 2048;

impl AgentLimitArgs {
    /// The agent loop's settings for `bundle`: the command line's limits, else the bundle's
    /// `agent.toml`, else the defaults; sampling at `temperature`.
    pub(crate) fn agent_config(
        &self,
        bundle: &Path,
        temperature: f32,
    ) -> anyhow::Result<AgentConfig> {
        let defaults = AgentConfig::default();
        let command = AgentConfig {
            max_turns: DEFAULT_MAX_TURNS,
            max_new_tokens: DEFAULT_MAX_NEW_TOKENS,
            sampling: SamplingParams {
                temperature,
                ..defaults.sampling
            },
            ..defaults
        };
        let from_bundle = BundleAgentDefaults::for_bundle(bundle)
            .with_context(|| format!("reading the agent limits of {}", bundle.display()))?;
        let given = BundleAgentDefaults {
            max_turns: self.max_turns,
            max_images: None,
            max_new_tokens: self.max_new_tokens,
            stop_at_tool_call_end: self.stop_at_tool_call_end,
        };
        Ok(given.apply(from_bundle.apply(command)))
    }
}
