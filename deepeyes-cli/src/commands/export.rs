//! `deepeyes export --checkpoint DIR --out BUNDLE`: the model bundle of a training checkpoint,
//! without the optimizer and trainer state, checked by loading it in ONNX Runtime.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_rl::checkpoint::{CONFIG_FILE, MANIFEST_FILE};
use deepeyes_rl::trainer::OPTIMIZER_FILE;

/// Arguments of `deepeyes export`.
#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// A checkpoint folder written by `deepeyes train` (`checkpoints/step-NNNNNNNN` or `final`).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    /// The bundle folder to write.
    #[arg(long, value_name = "BUNDLE")]
    out: PathBuf,
}

/// Copies the bundle files and loads the result.
pub(crate) fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    if !args.checkpoint.join("model.safetensors").is_file() {
        anyhow::bail!(
            "{} is not a training checkpoint (no model.safetensors)",
            args.checkpoint.display()
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut copied = 0;
    for entry in std::fs::read_dir(&args.checkpoint)
        .with_context(|| format!("reading {}", args.checkpoint.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let not_bundle = [OPTIMIZER_FILE, MANIFEST_FILE, CONFIG_FILE];
        if not_bundle.iter().any(|n| name == *n) || !entry.path().is_file() {
            continue;
        }
        let to = args.out.join(&name);
        std::fs::copy(entry.path(), &to).with_context(|| format!("writing {}", to.display()))?;
        copied += 1;
    }
    let model = OnnxModel::load(&args.out, &OnnxOptions::default())
        .with_context(|| format!("checking the exported bundle {}", args.out.display()))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "exported {copied} files to {} (loads on {})",
        args.out.display(),
        model.device().provider
    )?;
    Ok(ExitCode::SUCCESS)
}
