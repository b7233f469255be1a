//! Parsing a model file into protobuf types without copying its weights.
use super::proto::{tensor_proto::DataLocation, GraphProto, ModelProto, TensorProto};
use crate::engine::{EngineError, Result};
use bytes::Bytes;
use prost::Message;
use std::path::Path;

/// ONNX's protobuf encoding cannot address more than 2 GiB in one file.
pub const MAX_MODEL_BYTES: u64 = 2 * 1024 * 1024 * 1024 - 1;

/// A parsed model and the bytes it came from (weights in the model point into them).
pub struct LoadedModel {
    pub proto: ModelProto,
    pub bytes: Bytes,
}

/// Memory-maps a model file and parses it; initializer data stays in the mapping, so memory does not
/// grow with the weights until they are read.
pub fn load_model_file(path: &Path) -> Result<LoadedModel> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_MODEL_BYTES {
        return Err(EngineError::InvalidModel(format!(
            "the file is {len} bytes; models over 2 GiB (which need external data) are not supported yet"
        )));
    }
    if len == 0 {
        return Err(EngineError::InvalidModel("the file is empty".into()));
    }
    // SAFETY: the files Shrink maps are its own temporary or cached copies, never modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    load_model_bytes(Bytes::from_owner(map))
}

/// Parses model bytes and checks what Shrink needs: a graph, and no external data.
pub fn load_model_bytes(bytes: Bytes) -> Result<LoadedModel> {
    let proto = ModelProto::decode(bytes.clone()).map_err(|e| {
        EngineError::InvalidModel(format!(
            "not a valid ONNX protobuf (is the file complete?): {e}"
        ))
    })?;
    let Some(graph) = proto.graph.as_ref() else {
        return Err(EngineError::InvalidModel(
            "the file has no graph (is it an ONNX model?)".into(),
        ));
    };
    if proto.ir_version.unwrap_or(0) <= 0 {
        return Err(EngineError::InvalidModel(
            "missing ir_version: this does not look like an ONNX model".into(),
        ));
    }
    if graph.node.is_empty() {
        return Err(EngineError::InvalidModel("the graph has no nodes".into()));
    }
    if graph.output.is_empty() {
        return Err(EngineError::InvalidModel("the graph has no outputs".into()));
    }
    if let Some(name) = first_external_tensor(graph) {
        return Err(EngineError::InvalidModel(format!(
            "tensor `{name}` keeps its data in an external file; models with external data are not supported yet"
        )));
    }
    Ok(LoadedModel { proto, bytes })
}

fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32) || !t.external_data.is_empty()
}

fn first_external_tensor(graph: &GraphProto) -> Option<String> {
    if let Some(t) = graph.initializer.iter().find(|t| is_external(t)) {
        return Some(t.name.clone().unwrap_or_default());
    }
    for node in &graph.node {
        for attr in &node.attribute {
            if let Some(t) = attr.t.as_ref().filter(|t| is_external(t)) {
                return Some(t.name.clone().unwrap_or_default());
            }
            if let Some(g) = attr.g.as_ref() {
                if let Some(name) = first_external_tensor(g) {
                    return Some(name);
                }
            }
        }
    }
    None
}
