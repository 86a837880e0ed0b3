//! The error type of `deepeyes-reward`.

use std::path::PathBuf;

use crate::judge::JudgeError;

/// Everything that can go wrong while building or running a reward.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reward configuration was invalid; `origin` names the file or the key at fault.
    #[error("config {origin}: {reason}")]
    Config {
        /// The file, table or key at fault.
        origin: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No reward is routed for a sample's `data_source`.
    #[error("no reward is configured for data_source {data_source:?} (configured: {known})")]
    UnknownSource {
        /// The data source of the sample.
        data_source: String,
        /// The configured sources, comma-separated.
        known: String,
    },
    /// A pipeline or route names a reward that does not exist.
    #[error("unknown reward {name:?} (known: {known})")]
    UnknownReward {
        /// The missing name.
        name: String,
        /// The names that exist, comma-separated.
        known: String,
    },
    /// A component needs a term that no earlier component produced (for example a tool bonus
    /// placed before the accuracy it depends on).
    #[error("{component} needs the term {term:?}, which no earlier component produced")]
    MissingTerm {
        /// The component that looked for the term.
        component: String,
        /// The term it looked for.
        term: String,
    },
    /// The judge failed and the configured policy is to fail.
    #[error("judge: {0}")]
    Judge(#[from] JudgeError),
    /// A reward function registered by embedding code failed.
    #[error("reward {name:?}: {source}")]
    Custom {
        /// The registered name.
        name: String,
        /// Its error.
        #[source]
        source: deepeyes_core::Error,
    },
}

impl Error {
    /// An [`Error::Config`] naming `origin`.
    pub fn config(origin: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Config {
            origin: origin.into(),
            reason: reason.to_string(),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// The message of `err` followed by the messages of its sources, joined by `": "`.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = next.source();
    }
    text
}

impl From<Error> for deepeyes_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Config { origin, reason } => deepeyes_core::Error::Config { origin, reason },
            // A registered function's own error passes through unchanged.
            Error::Custom { source, .. } => source,
            other => deepeyes_core::Error::Reward(chain(&other)),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_error_keeps_the_whole_chain() {
        let err = Error::UnknownSource {
            data_source: "geo".into(),
            known: "chart, vstar".into(),
        };
        let core: deepeyes_core::Error = err.into();
        let text = core.to_string();
        assert!(text.contains("\"geo\""), "{text}");
        assert!(text.contains("chart, vstar"), "{text}");
    }

    #[test]
    fn config_errors_stay_config_errors() {
        let core: deepeyes_core::Error = Error::config("rewards.toml", "bad").into();
        assert!(matches!(core, deepeyes_core::Error::Config { .. }));
    }
}
