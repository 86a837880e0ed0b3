//! The error type of the ONNX Runtime backend.

use std::path::PathBuf;

/// Everything that can go wrong while finding ONNX Runtime, loading a bundle or running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// No usable ONNX Runtime library was found; the message lists every place tried and the
    /// command that fixes it.
    #[error("{0}")]
    RuntimeNotFound(String),
    /// The library loaded but the ONNX Runtime environment could not be created.
    #[error("ONNX Runtime ({library}): {message}")]
    Runtime {
        /// The library in use.
        library: PathBuf,
        /// What failed.
        message: String,
    },
    /// A bundle file is missing or invalid.
    #[error("model bundle {path}: {reason}")]
    Bundle {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A graph could not be loaded into a session.
    #[error("loading {path}: {message}")]
    Session {
        /// The graph file.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
    /// A graph failed at run time.
    #[error("running the {graph} graph: {message}")]
    Run {
        /// `vision`, `embed` or `decoder`.
        graph: &'static str,
        /// What failed.
        message: String,
    },
    /// A GPU was required but cannot be used.
    #[error("a GPU was required (require-gpu) but {0}")]
    GpuUnavailable(String),
    /// Bad input from the caller (tokens, images, options).
    #[error(transparent)]
    Core(#[from] crate::Error),
}

impl From<OnnxError> for crate::Error {
    fn from(e: OnnxError) -> Self {
        match e {
            OnnxError::Core(inner) => inner,
            other => crate::Error::Model(other.to_string()),
        }
    }
}

/// `Result` with [`OnnxError`].
pub type OnnxResult<T> = std::result::Result<T, OnnxError>;
