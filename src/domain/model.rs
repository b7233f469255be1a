//! What Shrink reads from an ONNX graph without running it.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// One dimension of a tensor's declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbolic size such as `batch`; unnamed unknown sizes are `"?"`.
    Symbolic(String),
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TensorSignature {
    pub name: String,
    /// numpy-style element type name (`float32`, `int64`, ...).
    pub dtype: String,
    pub shape: Vec<Dim>,
}

/// An operator set the model imports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpsetImport {
    /// Empty for the default `ai.onnx` domain.
    pub domain: String,
    pub version: i64,
}

/// Summary of an ONNX model, read from its graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelSummary {
    pub ir_version: i64,
    /// Version of the default (`ai.onnx`) operator set.
    pub opset: i64,
    pub opset_imports: Vec<OpsetImport>,
    pub producer: String,
    pub inputs: Vec<TensorSignature>,
    pub outputs: Vec<TensorSignature>,
    /// Count of nodes per operator type (domain-qualified when not `ai.onnx`).
    #[schema(value_type = Object)]
    pub op_counts: BTreeMap<String, u64>,
    pub node_count: u64,
    /// Elements in initializers and weight-carrying `Constant` nodes.
    pub parameters: u64,
    /// Per output, the operators feeding it that training (the `distill` stage) cannot run;
    /// outputs training can run are not listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub untrainable_ops: BTreeMap<String, Vec<String>>,
}

impl ModelSummary {
    /// The batch size pinned by a fixed leading input dimension (common in exported vision models).
    pub fn fixed_batch(&self) -> Option<usize> {
        self.inputs.iter().find_map(|i| match i.shape.first() {
            Some(Dim::Fixed(n)) if *n > 0 => Some(*n as usize),
            _ => None,
        })
    }
}
