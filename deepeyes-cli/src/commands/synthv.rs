//! `deepeyes synthv --out DIR`: write SynthV* splits (PNG images and a JSONL index per split,
//! in the row format `deepeyes eval --bench synthv` and `deepeyes train` read).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use deepeyes_rl::synthv::{SynthVConfig, write_split};

/// Arguments of `deepeyes synthv`.
#[derive(Debug, Args)]
pub(crate) struct SynthVArgs {
    /// The directory to write (`images/`, `train.jsonl`, `test.jsonl`).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Training items.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub(crate) train: u64,
    /// Held-out test items (drawn from a seed stream disjoint from training's).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub(crate) test: u64,
    /// Seed of both splits.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// The generator's settings, a TOML file of `deepeyes_rl::synthv::SynthVConfig`'s keys
    /// (`configs/synthv/`: other canvas sizes and shapes, decoys); the defaults without it.
    #[arg(long, value_name = "TOML")]
    pub(crate) config: Option<PathBuf>,
}

/// The generator settings `args` name.
fn generator_config(args: &SynthVArgs) -> anyhow::Result<SynthVConfig> {
    let Some(path) = &args.config else {
        return Ok(SynthVConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the SynthV* settings {}", path.display()))?;
    let config: SynthVConfig =
        toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    config
        .validate()
        .with_context(|| format!("in {}", path.display()))?;
    Ok(config)
}

/// Writes both splits and returns their index paths.
pub(crate) fn write(args: &SynthVArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    write_with(&generator_config(args)?, args)
}

/// Writes both splits drawn with `config` (instead of the one `args` names) and returns their
/// index paths.
pub(crate) fn write_with(
    config: &SynthVConfig,
    args: &SynthVArgs,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut paths = Vec::new();
    for (split, count) in [("train", args.train), ("test", args.test)] {
        let path = write_split(config, &args.out, split, count, args.seed)
            .with_context(|| format!("writing the {split} split into {}", args.out.display()))?;
        paths.push(path);
    }
    let test = paths.pop().expect("two splits");
    let train = paths.pop().expect("two splits");
    Ok((train, test))
}

/// Writes the splits and says where.
pub(crate) fn run(args: SynthVArgs) -> anyhow::Result<ExitCode> {
    let (train, test) = write(&args)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "wrote {} training items to {} and {} test items to {}",
        args.train,
        train.display(),
        args.test,
        test.display()
    )?;
    Ok(ExitCode::SUCCESS)
}
