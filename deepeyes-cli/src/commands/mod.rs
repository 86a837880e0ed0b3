//! One module per subcommand.

use std::process::ExitCode;

use crate::cli::Command;

pub(crate) mod doctor;
pub(crate) mod eval;
pub(crate) mod export;
pub(crate) mod plot;
pub(crate) mod preprocess;
pub(crate) mod prompt;
pub(crate) mod reward;
pub(crate) mod run;
pub(crate) mod select;
pub(crate) mod tools;
pub(crate) mod train;

/// Runs the chosen subcommand.
pub(crate) fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
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
    }
}
