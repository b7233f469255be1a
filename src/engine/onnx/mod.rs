//! ONNX model files: the protobuf types, loading, summaries, a graph view, and the graph
//! rewriting that quantization, pruning and channel surgery share.
pub mod dtype;
pub mod graph;
pub mod load;
pub mod params;
pub mod rewrite;
pub mod summary;
pub mod tensor;

/// prost-generated ONNX protobuf types (from the vendored `proto/onnx.proto`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use load::{load_model_bytes, load_model_file, LoadedModel};
pub use summary::summarize;
