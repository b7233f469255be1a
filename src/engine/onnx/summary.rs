//! The summary users see at upload: signature, opset, operator counts, parameters.
use super::proto::{tensor_shape_proto::dimension, type_proto, ModelProto, ValueInfoProto};
use super::{dtype, params};
use crate::domain::model::{Dim, ModelSummary, OpsetImport, TensorSignature};
use std::collections::BTreeMap;

pub fn summarize(model: &ModelProto) -> ModelSummary {
    let graph = model.graph.clone().unwrap_or_default();
    let initializers: std::collections::HashSet<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let mut op_counts = BTreeMap::new();
    for node in &graph.node {
        let domain = node.domain.as_deref().unwrap_or("");
        let op = node.op_type.clone().unwrap_or_default();
        let key = if domain.is_empty() || domain == "ai.onnx" {
            op
        } else {
            format!("{domain}.{op}")
        };
        *op_counts.entry(key).or_insert(0u64) += 1;
    }
    let opset_imports: Vec<OpsetImport> = model
        .opset_import
        .iter()
        .map(|o| OpsetImport {
            domain: o.domain.clone().unwrap_or_default(),
            version: o.version.unwrap_or(0),
        })
        .collect();
    let opset = opset_imports
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    ModelSummary {
        ir_version: model.ir_version.unwrap_or(0),
        opset,
        opset_imports,
        producer: format!(
            "{} {}",
            model.producer_name.as_deref().unwrap_or(""),
            model.producer_version.as_deref().unwrap_or("")
        )
        .trim()
        .to_string(),
        // Older exporters list initializers among the inputs; they are not something a user feeds.
        inputs: graph
            .input
            .iter()
            .filter(|v| !initializers.contains(v.name.as_deref().unwrap_or("")))
            .map(signature)
            .collect(),
        outputs: graph.output.iter().map(signature).collect(),
        op_counts,
        node_count: graph.node.len() as u64,
        parameters: params::weight_tensors(&graph)
            .into_iter()
            .map(params::element_count)
            .sum(),
        // What training can run is the trainer's to say: see `engine::inspect`.
        untrainable_ops: Default::default(),
    }
}

pub(crate) fn signature(v: &ValueInfoProto) -> TensorSignature {
    let (elem, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(dimension::Value::DimValue(n)) => Dim::Fixed(*n),
                            Some(dimension::Value::DimParam(p)) if !p.is_empty() => {
                                Dim::Symbolic(p.clone())
                            }
                            _ => Dim::Symbolic("?".into()),
                        })
                        .collect()
                })
                .unwrap_or_default();
            (dtype::name(t.elem_type.unwrap_or(0)), dims)
        }
        Some(other) => (
            format!("{other:?}")
                .split('(')
                .next()
                .unwrap_or("non-tensor")
                .to_lowercase(),
            vec![],
        ),
        None => ("unknown".into(), vec![]),
    };
    TensorSignature {
        name: v.name.clone().unwrap_or_default(),
        dtype: elem,
        shape,
    }
}
