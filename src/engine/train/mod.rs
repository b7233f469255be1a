//! Training on candle: an ONNX graph evaluated with candle tensors whose float initializers are
//! trainable variables, so the engine can distill, fine-tune and train with fake quantization on
//! the uploaded ONNX itself and write the trained weights back into it.
//!
//! Every op is composed from candle operations that have a backward pass (the fused
//! `softmax_last_dim` / `layer_norm` kernels drop gradients, and candle's pooling backward only
//! covers kernel == stride, so neither is used).
pub mod depth;
pub mod distill;
pub mod fake_quant;
pub mod fit;
pub mod graph;
pub mod loss;
mod ops;
mod tensors;
pub mod units;

pub use graph::{Mode, TrainGraph, ValueHook};
pub use tensors::feeds;

use crate::engine::EngineError;

/// The operators the trainable evaluator runs.
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "ConvTranspose",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "Log",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Mul",
    "Neg",
    "Pow",
    "Range",
    "ReduceL2",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
];

pub(crate) fn candle_error(context: &str, e: candle_core::Error) -> EngineError {
    EngineError::InvalidModel(format!("{context}: {e}"))
}
