//! `deepeyes export`: what a training checkpoint or a LoRA adapter is worth outside the trainer.
//!
//! * `--checkpoint DIR --out BUNDLE`: the model bundle of a full-update checkpoint, without the
//!   optimizer and trainer state.
//! * `--checkpoint DIR --out ADAPTER`: a LoRA run's adapter as PEFT writes it (what PEFT, vLLM
//!   and SGLang load); with `--merge`, the bundle with the adapter merged into the weights.
//! * `--adapter DIR --bundle BASE --merge --out BUNDLE`: any PEFT LoRA adapter of the base
//!   bundle's model merged into a new bundle.
//!
//! Every bundle written is checked by loading it in ONNX Runtime.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
use deepeyes_rl::checkpoint::{CONFIG_FILE, MANIFEST_FILE};
use deepeyes_rl::network::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, ComputeDevice, Qwen25Vl};
use deepeyes_rl::trainer::{OPTIMIZER_FILE, export_bundle};

/// Arguments of `deepeyes export`.
#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// A checkpoint folder written by `deepeyes train` (`checkpoints/step-NNNNNNNN` or `final`).
    #[arg(long, value_name = "DIR", required_unless_present = "adapter")]
    checkpoint: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (`adapter_config.json`, `adapter_model.safetensors`) of the
    /// model of `--bundle`; needs `--merge`.
    #[arg(long, value_name = "DIR", conflicts_with = "checkpoint", requires_all = ["bundle", "merge"])]
    adapter: Option<PathBuf>,
    /// The bundle `--adapter` was trained on.
    #[arg(long, value_name = "BUNDLE", requires = "adapter")]
    bundle: Option<PathBuf>,
    /// Merge the adapter into the weights and write a bundle (for a LoRA checkpoint, or with
    /// `--adapter`).
    #[arg(long)]
    merge: bool,
    /// The folder to write.
    #[arg(long, value_name = "OUT")]
    out: PathBuf,
}

/// Writes what the arguments ask for and checks it.
pub(crate) fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut stdout = std::io::stdout().lock();
    let message = match (&args.checkpoint, &args.adapter, &args.bundle) {
        (Some(checkpoint), _, _) => export_checkpoint(checkpoint, &args.out, args.merge)?,
        (None, Some(adapter), Some(bundle)) => merge_adapter(adapter, bundle, &args.out)?,
        _ => anyhow::bail!("give --checkpoint, or --adapter with --bundle and --merge"),
    };
    writeln!(stdout, "{message}")?;
    Ok(ExitCode::SUCCESS)
}

/// A checkpoint's bundle, or its adapter folder when it holds one and `merge` is off.
fn export_checkpoint(checkpoint: &Path, out: &Path, merge: bool) -> anyhow::Result<String> {
    if !checkpoint.join("model.safetensors").is_file() {
        anyhow::bail!(
            "{} is not a training checkpoint (no model.safetensors)",
            checkpoint.display()
        );
    }
    let lora = checkpoint.join(ADAPTER_CONFIG).is_file();
    let wanted = |name: &std::ffi::OsStr| {
        let is_adapter = name == ADAPTER_CONFIG || name == ADAPTER_WEIGHTS;
        let state = [OPTIMIZER_FILE, MANIFEST_FILE, CONFIG_FILE]
            .iter()
            .any(|n| name == *n);
        if lora && !merge {
            is_adapter
        } else {
            !is_adapter && !state
        }
    };
    let mut copied = 0;
    for entry in std::fs::read_dir(checkpoint)
        .with_context(|| format!("reading {}", checkpoint.display()))?
    {
        let entry = entry?;
        if !wanted(&entry.file_name()) || !entry.path().is_file() {
            continue;
        }
        let to = out.join(entry.file_name());
        std::fs::copy(entry.path(), &to).with_context(|| format!("writing {}", to.display()))?;
        copied += 1;
    }
    if lora && !merge {
        return Ok(format!(
            "exported the LoRA adapter (PEFT format, {copied} files) to {}; --merge writes a \
             bundle with it merged",
            out.display()
        ));
    }
    checked_bundle(out, copied)
}

/// `adapter` merged into `bundle`'s weights, written as a bundle in `out`.
fn merge_adapter(adapter: &Path, bundle: &Path, out: &Path) -> anyhow::Result<String> {
    let device = ComputeDevice::Flex.device(false)?;
    let model = Qwen25Vl::from_pretrained(bundle, &device)
        .with_context(|| format!("loading the base bundle {}", bundle.display()))?
        .load_adapter(adapter)?
        .merged();
    export_bundle(&model, bundle, out)?;
    let files = std::fs::read_dir(out)?.count();
    checked_bundle(out, files)
}

/// Loads the bundle in `out` in ONNX Runtime and says what was written.
fn checked_bundle(out: &Path, files: usize) -> anyhow::Result<String> {
    let model = OnnxModel::load(out, &OnnxOptions::default())
        .with_context(|| format!("checking the exported bundle {}", out.display()))?;
    Ok(format!(
        "exported {files} files to {} (loads on {})",
        out.display(),
        model.device().provider
    ))
}
