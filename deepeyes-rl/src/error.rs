//! The error type of the engine-independent parts of `deepeyes-rl`.

use std::path::PathBuf;

/// Everything that can go wrong in the GRPO math, the training config, metrics and checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reward was NaN or infinite; `trajectory` is its index in the step's batch.
    #[error("trajectory {trajectory}: reward {value} is not a finite number")]
    NonFiniteReward {
        /// Index of the trajectory in the batch.
        trajectory: usize,
        /// The offending value.
        value: f64,
    },
    /// A per-token input of the loss was NaN or infinite where the mask selects it.
    #[error("{input}[{row}, {col}] = {value} is not a finite number (mask selects it)")]
    NonFiniteInput {
        /// Which input (`logprobs`, `old_logprobs`, `advantages`, …).
        input: &'static str,
        /// Batch row (trajectory within the micro-batch).
        row: usize,
        /// Token column.
        col: usize,
        /// The offending value.
        value: f64,
    },
    /// Arrays that must agree in shape or length do not.
    #[error("shape mismatch: {what}")]
    Shape {
        /// What disagreed, with both shapes.
        what: String,
    },
    /// An argument was out of its allowed range.
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// Training configuration values are invalid; every problem found is listed.
    #[error("config {origin}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Config {
        /// The file (or `<string>`) the config came from.
        origin: String,
        /// Each invalid key with the reason.
        problems: Vec<ConfigProblem>,
    },
    /// A training configuration could not be parsed (syntax, unknown key, wrong type).
    #[error("config {origin}: {message}")]
    ConfigParse {
        /// The file (or `<string>`) the config came from.
        origin: String,
        /// The parser's message; it names the key and the line.
        message: String,
    },
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON record (manifest, metrics line) could not be read or written.
    #[error("{path}: {message}")]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong, with the line number where known.
        message: String,
    },
    /// A checkpoint is incomplete, corrupted or of another format.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            name,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn shape(what: impl std::fmt::Display) -> Self {
        Self::Shape {
            what: what.to_string(),
        }
    }
}

/// One invalid configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `grpo.clip-high`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.reason)
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
