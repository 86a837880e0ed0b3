//! `deepeyes tools`: list the tools a model can call, or run one call on an image.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use deepeyes_core::{Image, ImageLimits, PreprocessConfig, ToolContext};
use deepeyes_tools::{CoordinateFrame, PluginConfig, ToolRegistry, ToolsConfig};
use serde::Serialize;

/// Arguments of `deepeyes tools`.
#[derive(Debug, Args)]
pub(crate) struct ToolsArgs {
    #[command(subcommand)]
    action: ToolsAction,
}

#[derive(Debug, Subcommand)]
enum ToolsAction {
    /// List every registered tool as JSON: name, origin (built-in or plugin path), whether it is
    /// offered to the model, description and argument schema.
    List(ListArgs),
    /// Run one tool call on an image as the agent loop would, and print the result as JSON.
    /// Exit status: 0 on success, 2 when the tool rejected the call (the error is what the model
    /// would see), 1 on any other problem.
    Call(CallArgs),
}

/// Where the tools come from.
#[derive(Debug, Args)]
struct RegistryArgs {
    /// A TOML file configuring the tools ([zoom-in], [rotate], [[plugins]]).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Load a tool plugin from this shared library (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Debug, Args)]
struct CallArgs {
    /// The tool's name (disabled tools can be called too).
    name: String,
    /// The input image.
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// The call's arguments, a JSON object, e.g. '{"bbox_2d": [10, 20, 300, 400]}'.
    #[arg(long, value_name = "JSON")]
    args: String,
    /// Coordinate frame of image_zoom_in_tool's bbox_2d: original (default), resized, relative
    /// (0-1000) or relative-unit (0-1).
    #[arg(long, value_name = "FRAME", value_parser = parse_frame)]
    frame: Option<CoordinateFrame>,
    /// Write the tool's output image, exactly as the tool produced it, to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

fn parse_frame(s: &str) -> Result<CoordinateFrame, String> {
    s.parse()
}

fn build_registry(
    args: &RegistryArgs,
    frame: Option<CoordinateFrame>,
) -> anyhow::Result<ToolRegistry> {
    let mut config = match &args.config {
        Some(path) => ToolsConfig::from_toml_file(path)
            .with_context(|| format!("loading the tools config {}", path.display()))?,
        None => ToolsConfig::default(),
    };
    if let Some(frame) = frame {
        config.zoom_in.frame = frame;
    }
    config
        .plugins
        .extend(args.plugins.iter().map(PluginConfig::new));
    ToolRegistry::from_config(&config).context("setting up the tools")
}

/// Runs `deepeyes tools`.
pub(crate) fn run(args: ToolsArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        ToolsAction::List(list) => run_list(list),
        ToolsAction::Call(call) => run_call(call),
    }
}

#[derive(Serialize)]
struct Listing {
    tools: Vec<ListedTool>,
}

#[derive(Serialize)]
struct ListedTool {
    name: String,
    origin: String,
    enabled: bool,
    description: String,
    parameters: serde_json::Value,
}

fn run_list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let registry = build_registry(&args.registry, None)?;
    let listing = Listing {
        tools: registry
            .infos()
            .into_iter()
            .map(|info| ListedTool {
                origin: info.origin.to_string(),
                enabled: info.enabled,
                name: info.spec.name,
                description: info.spec.description,
                parameters: info.spec.parameters,
            })
            .collect(),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &listing)?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct CallSuccess {
    ok: bool,
    text: Option<String>,
    images: Vec<ImageSize>,
}

#[derive(Serialize)]
struct ImageSize {
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct CallFailure {
    ok: bool,
    error: String,
}

/// Where the `index`-th output image goes: `FILE.png`, then `FILE-1.png`, `FILE-2.png`, ….
fn output_path(base: &std::path::Path, index: usize) -> PathBuf {
    if index == 0 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = base
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}-{index}.{ext}"))
}

fn run_call(args: CallArgs) -> anyhow::Result<ExitCode> {
    let registry = build_registry(&args.registry, args.frame)?;
    let call_args: serde_json::Value = serde_json::from_str(&args.args)
        .with_context(|| format!("--args is not valid JSON: {}", args.args))?;
    let tool = registry.require(&args.name)?;
    let image = Image::open(&args.image, &ImageLimits::default())
        .with_context(|| format!("reading the input image {}", args.image.display()))?;
    let preprocess = PreprocessConfig::default();
    let images = [image];
    let ctx = ToolContext {
        original_images: &images,
        preprocess: &preprocess,
    };
    let mut stdout = std::io::stdout().lock();
    match tool.call(&call_args, &ctx) {
        Ok(output) => {
            if let Some(base) = &args.out {
                if output.images.is_empty() {
                    anyhow::bail!(
                        "{} returned no image, so there is nothing to write to {}",
                        args.name,
                        base.display()
                    );
                }
                for (i, img) in output.images.iter().enumerate() {
                    let path = output_path(base, i);
                    img.save_png(&path)
                        .with_context(|| format!("writing the output image {}", path.display()))?;
                }
            }
            let success = CallSuccess {
                ok: true,
                text: output.text,
                images: output
                    .images
                    .iter()
                    .map(|i| ImageSize {
                        width: i.width(),
                        height: i.height(),
                    })
                    .collect(),
            };
            serde_json::to_writer(&mut stdout, &success)?;
            writeln!(stdout)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            let failure = CallFailure {
                ok: false,
                error: err.message,
            };
            serde_json::to_writer(&mut stdout, &failure)?;
            writeln!(stdout)?;
            Ok(ExitCode::from(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_outputs_get_numbered_names() {
        let base = std::path::Path::new("/tmp/out/crop.png");
        assert_eq!(output_path(base, 0), base);
        assert_eq!(
            output_path(base, 2),
            std::path::Path::new("/tmp/out/crop-2.png")
        );
    }
}
