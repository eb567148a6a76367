//! The error type of moe-model.
//!
//! Every error that comes from a file names the file, and every error about a tensor names the tensor, so that an
//! operator can tell which part of a published checkpoint is wrong without reading code.

use std::path::PathBuf;

/// Errors of the model engine.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, generation_config.json, the shard index, ...) is not valid or lacks a field.
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    /// config.json names a model family this engine does not implement.
    #[error("{path}: unknown model_type {model_type:?} (supported: qwen3_next, qwen3_5_moe, qwen3_5_moe_text)")]
    UnknownModelType { path: PathBuf, model_type: String },
    /// config.json has values that do not describe a consistent model.
    #[error("{path}: invalid config: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    /// A safetensors file whose header or layout is corrupt or truncated.
    #[error("{path}: corrupt safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// A weight that is NaN or infinite: no trained checkpoint holds one, so the file's data is corrupt.
    #[error("{path}: tensor {tensor:?} holds a non-finite weight at element {index}: the file's data is corrupt")]
    NonFiniteWeight { path: PathBuf, tensor: String, index: usize },
    /// A tensor the model needs is in no file of the checkpoint.
    #[error("{dir}: tensor {tensor:?} is missing from the checkpoint")]
    MissingTensor { dir: PathBuf, tensor: String },
    /// A tensor whose shape is not what config.json implies.
    #[error("{path}: tensor {tensor:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<usize>, actual: Vec<usize> },
    /// A tensor stored in a dtype the engine does not read.
    #[error("{path}: tensor {tensor:?} has unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    /// The tokenizer or the chat template could not be loaded or applied.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A request that does not fit the model (token id out of range, empty prompt, bad sampling parameter).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The experts seam failed (for instance a remote expert node did not answer).
    #[error("experts of layer {layer}: {message}")]
    Experts { layer: usize, message: String },
}

impl ModelError {
    /// Returns whether retrying the same operation may succeed. Only failures of the experts seam can be
    /// transient (a remote node that restarts); every other error describes bad files or bad input.
    pub fn is_retryable(&self) -> bool {
        match self {
            ModelError::Experts { .. } => true,
            ModelError::Io { .. }
            | ModelError::Json { .. }
            | ModelError::UnknownModelType { .. }
            | ModelError::InvalidConfig { .. }
            | ModelError::Safetensors { .. }
            | ModelError::NonFiniteWeight { .. }
            | ModelError::MissingTensor { .. }
            | ModelError::ShapeMismatch { .. }
            | ModelError::UnsupportedDtype { .. }
            | ModelError::Tokenizer { .. }
            | ModelError::InvalidInput(_) => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        ModelError::Json { path: path.into(), message: message.to_string() }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
