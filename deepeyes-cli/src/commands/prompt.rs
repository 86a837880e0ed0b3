//! `deepeyes prompt`: print the exact prompt text a model receives.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::PromptTemplates;
use deepeyes_core::protocol::render_prompt;

/// Arguments of `deepeyes prompt`.
#[derive(Debug, Args)]
pub(crate) struct PromptArgs {
    /// The question.
    #[arg(long)]
    question: String,
    /// How many input images the prompt holds.
    #[arg(long, default_value_t = 1)]
    images: usize,
    /// A TOML file overriding the prompt templates.
    #[arg(long)]
    templates: Option<PathBuf>,
}

/// Renders and prints the prompt.
pub(crate) fn run(args: PromptArgs) -> anyhow::Result<ExitCode> {
    let templates = match &args.templates {
        Some(path) => PromptTemplates::from_toml_file(path)
            .with_context(|| format!("loading prompt templates from {}", path.display()))?,
        None => PromptTemplates::default(),
    };
    let tools = Vec::new();
    let text = render_prompt(
        &templates.render_system(&tools),
        &templates.render_user(&args.question, args.images),
    )
    .into_text();
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
