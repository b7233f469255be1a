//! What Shrink reads from an uploaded dataset file without loading its tensors.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// File formats Shrink accepts for datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Npz,
    Safetensors,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Npz => "npz",
            Self::Safetensors => "safetensors",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "npz" => Some(Self::Npz),
            "safetensors" => Some(Self::Safetensors),
            _ => None,
        }
    }
}

/// One named tensor in a dataset file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TensorInfo {
    pub name: String,
    /// numpy-style element type name (`float32`, `int64`, ...).
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// The tensors of a dataset and how many samples (rows along axis 0) they hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DatasetSummary {
    pub format: DatasetFormat,
    pub tensors: Vec<TensorInfo>,
    pub samples: u64,
}
