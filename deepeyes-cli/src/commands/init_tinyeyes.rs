//! `deepeyes init-tinyeyes --out DIR [--seed S]`: an untrained TinyEyes checkpoint (its own
//! tokenizer, the tiny Qwen2.5-VL with random weights) as a Hugging Face directory, ready for the
//! base stage in burn and for `scripts/export_qwen2_5_vl.py DIR BUNDLE`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

/// Arguments of `deepeyes init-tinyeyes`.
#[derive(Debug, Args)]
pub(crate) struct InitTinyEyesArgs {
    /// The directory to write (created if missing; existing checkpoint files are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Seed of the tokenizer's training text and of the weights; the same seed gives the same
    /// files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Writes the checkpoint and says what it holds.
pub(crate) fn run(args: InitTinyEyesArgs) -> anyhow::Result<ExitCode> {
    let config = deepeyes_rl::tinyeyes::init_checkpoint(&args.out, args.seed)
        .with_context(|| format!("initialising TinyEyes in {}", args.out.display()))?;
    let text = &config.text;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "wrote an untrained TinyEyes checkpoint to {} (seed {}): vocabulary {}, {} layers of \
         width {}, vision tower {} blocks of width {}",
        args.out.display(),
        args.seed,
        text.vocab_size,
        text.num_hidden_layers,
        text.hidden_size,
        config.vision.depth,
        config.vision.hidden_size,
    )?;
    Ok(ExitCode::SUCCESS)
}
