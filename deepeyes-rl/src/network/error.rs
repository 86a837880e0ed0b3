//! Errors of the burn model.

use std::path::PathBuf;

/// What went wrong while building, loading, saving or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The configuration is missing a field or is inconsistent.
    #[error("model config: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A parameter the architecture needs is absent from the checkpoint.
    #[error("checkpoint {path} has no tensor `{name}`")]
    MissingTensor {
        /// The checkpoint (file or directory).
        path: PathBuf,
        /// The Hugging Face parameter name.
        name: String,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch {
        /// The Hugging Face parameter name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// The checkpoint holds tensors this architecture does not use.
    #[error("checkpoint {path} has tensors the architecture does not use: {names:?}")]
    UnexpectedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// Up to a few of the names.
        names: Vec<String>,
    },
    /// An input (tokens, images, masks, positions) is inconsistent.
    #[error("invalid model input: {message}")]
    Input {
        /// What is wrong.
        message: String,
    },
    /// A LoRA configuration or adapter is invalid.
    #[error("LoRA: {message}")]
    Lora {
        /// What is wrong.
        message: String,
    },
    /// The requested device is not compiled in.
    #[error("device `{name}` is not available: {message}")]
    Device {
        /// The device asked for.
        name: String,
        /// Why not.
        message: String,
    },
}

/// Result alias of the model module.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn input_err(message: impl Into<String>) -> ModelError {
    ModelError::Input {
        message: message.into(),
    }
}
