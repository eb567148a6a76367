//! The planner's one error type: every variant is a sentence an operator can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("hardware file {path}: {message}")]
    Hardware { path: PathBuf, message: String },
    #[error("calibration file {path}: {message}")]
    Calibration { path: PathBuf, message: String },
    #[error("{0}")]
    Model(#[from] moe_model::ModelError),
    #[error("--{flag}: {message}")]
    Argument { flag: &'static str, message: String },
    /// No configuration in the search space meets the SLO at the load: the closest one and what it misses by.
    #[error("{0}")]
    Infeasible(String),
}

impl PlanError {
    pub(crate) fn argument(flag: &'static str, message: impl Into<String>) -> Self {
        PlanError::Argument { flag, message: message.into() }
    }

    /// Whether trying again unchanged could succeed: only reading a file; every other error is about the inputs.
    pub fn is_retryable(&self) -> bool {
        match self {
            PlanError::Io { .. } => true,
            PlanError::Hardware { .. }
            | PlanError::Calibration { .. }
            | PlanError::Model(_)
            | PlanError::Argument { .. }
            | PlanError::Infeasible(_) => false,
        }
    }
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;
