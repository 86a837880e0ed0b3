//! The error type of `deepeyes-tools`.

use std::path::PathBuf;

use crate::plugin::PluginError;

/// Everything that can go wrong while building a registry or processing images outside a tool
/// call. (A failed tool call is a [`deepeyes_core::ToolError`]: its text goes to the model.)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Two tools share a name.
    #[error(
        "a tool named '{name}' is already registered ({existing}); cannot add it again from {new}"
    )]
    DuplicateName {
        /// The name.
        name: String,
        /// Where the registered tool came from.
        existing: String,
        /// Where the second one came from.
        new: String,
    },
    /// A name was not found in the registry.
    #[error("no tool named '{name}' (registered: {available})")]
    UnknownTool {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        available: String,
    },
    /// A tool name is not usable in a prompt.
    #[error("invalid tool name '{name}': {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// A configuration file or value was invalid. `origin` names the file and/or the key.
    #[error("config {origin}: {reason}")]
    Config {
        /// The file or key at fault.
        origin: String,
        /// What was wrong.
        reason: String,
    },
    /// An image operation got arguments it cannot honour.
    #[error("{op}: {reason}")]
    Image {
        /// The operation (`crop`, `resize`, …).
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from `deepeyes-core`.
    #[error(transparent)]
    Core(#[from] deepeyes_core::Error),
}

impl Error {
    /// An [`Error::Config`].
    pub fn config(origin: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Config {
            origin: origin.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn image(op: &'static str, reason: impl Into<String>) -> Self {
        Self::Image {
            op,
            reason: reason.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
