//! Engine errors. The kind tells the worker whether a retry could help (it never can for bad input).
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// The model cannot be used (not ONNX, truncated, unsupported feature).
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// The dataset does not fit the model or is unreadable; names the tensor.
    #[error("invalid dataset: tensor `{tensor}`: {problem}")]
    InvalidDataset { tensor: String, problem: String },
    /// A dataset file that cannot be read at all.
    #[error("invalid dataset file: {0}")]
    UnreadableDataset(String),
    /// The job spec asks for something this model cannot do (e.g. an output it lacks).
    #[error("invalid option `{option}`: {problem}")]
    InvalidOption { option: String, problem: String },
    /// The ONNX Runtime library is missing or failed to load.
    #[error("ONNX Runtime is unavailable: {0}")]
    RuntimeUnavailable(String),
    /// ONNX Runtime rejected the model or failed while running it.
    #[error("ONNX Runtime failed: {0}")]
    Runtime(String),
    /// The caller asked to stop.
    #[error("cancelled")]
    Cancelled,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl EngineError {
    /// Whether the cause is in the user's input rather than in the infrastructure.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::InvalidModel(_)
                | Self::InvalidDataset { .. }
                | Self::UnreadableDataset(_)
                | Self::InvalidOption { .. }
                | Self::Runtime(_)
        )
    }
}

impl From<ort::Error> for EngineError {
    fn from(e: ort::Error) -> Self {
        Self::Runtime(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
