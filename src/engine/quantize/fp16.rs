//! Half precision: float32 weights, constants, casts and activations become float16. With
//! `keep_io_types` the graph keeps float32 inputs and outputs behind Cast nodes, so callers need
//! no change. Inputs that ONNX requires in float32 (Resize/Upsample scales and roi) stay float32.
use crate::engine::onnx::proto::{
    tensor_proto::DataType, type_proto, GraphProto, ModelProto, NodeProto, TensorProto,
    ValueInfoProto,
};
use crate::engine::onnx::rewrite::{int_attr, node};
use crate::engine::onnx::tensor::f32_view;
use crate::engine::{EngineError, Result};
use bytes::Bytes;
use std::collections::HashSet;

const FLOAT: i32 = DataType::Float as i32;
const FLOAT16: i32 = DataType::Float16 as i32;

/// Converts `model` to float16; returns the model and how many tensors were converted.
pub fn convert_fp16(model: &ModelProto, keep_io_types: bool) -> Result<(ModelProto, usize)> {
    let mut out = model.clone();
    let graph = out.graph.as_mut().expect("loaded models have a graph");
    if graph.node.iter().any(|n| {
        matches!(
            n.op_type.as_deref(),
            Some("QuantizeLinear" | "DequantizeLinear" | "DynamicQuantizeLinear")
        )
    }) {
        return Err(EngineError::InvalidModel(
            "the model is already quantized; convert to fp16 before quantizing".into(),
        ));
    }
    let keep = float32_only(graph);
    let mut converted = 0;
    for t in graph.initializer.iter_mut() {
        if t.name.as_deref().is_some_and(|n| !keep.contains(n)) && to_fp16(t) {
            converted += 1;
        }
    }
    for n in graph.node.iter_mut() {
        let keeps = n.output.iter().any(|o| keep.contains(o.as_str()));
        for a in n.attribute.iter_mut() {
            match (n.op_type.as_deref(), a.name.as_deref()) {
                (Some("Constant" | "ConstantOfShape"), Some("value")) if !keeps => {
                    if let Some(t) = a.t.as_mut() {
                        converted += to_fp16(t) as usize;
                    }
                }
                (Some("Cast"), Some("to")) if a.i == Some(FLOAT as i64) && !keeps => {
                    a.i = Some(FLOAT16 as i64);
                }
                _ => {}
            }
        }
    }
    graph.value_info.retain(|v| elem_type(v) != Some(FLOAT));
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for v in graph
        .input
        .iter_mut()
        .filter(|v| elem_type(v) == Some(FLOAT))
    {
        let name = v.name.clone().unwrap_or_default();
        if keep_io_types {
            let half = format!("{name}_fp16");
            rename_reads(&mut graph.node, &name, &half);
            head.push(node(
                "Cast",
                format!("{name}_to_fp16"),
                vec![name],
                half,
                vec![int_attr("to", FLOAT16 as i64)],
            ));
        } else {
            set_elem_type(v, FLOAT16);
        }
    }
    for v in graph
        .output
        .iter_mut()
        .filter(|v| elem_type(v) == Some(FLOAT))
    {
        let name = v.name.clone().unwrap_or_default();
        if keep_io_types {
            let half = format!("{name}_fp16");
            for n in graph.node.iter_mut() {
                for o in n.output.iter_mut().filter(|o| **o == name) {
                    *o = half.clone();
                }
            }
            rename_reads(&mut graph.node, &name, &half);
            tail.push(node(
                "Cast",
                format!("{name}_to_fp32"),
                vec![half],
                name,
                vec![int_attr("to", FLOAT as i64)],
            ));
        } else {
            set_elem_type(v, FLOAT16);
        }
    }
    let body = std::mem::take(&mut graph.node);
    graph.node = head.into_iter().chain(body).chain(tail).collect();
    Ok((out, converted))
}

/// Values ONNX types as float32 whatever the model's precision.
fn float32_only(graph: &GraphProto) -> HashSet<String> {
    let mut keep = HashSet::new();
    for n in &graph.node {
        let slots: &[usize] = match n.op_type.as_deref() {
            Some("Resize") => &[1, 2],
            Some("Upsample") => &[1],
            _ => &[],
        };
        for &s in slots {
            if let Some(x) = n.input.get(s).filter(|x| !x.is_empty()) {
                keep.insert(x.clone());
            }
        }
    }
    keep
}

fn rename_reads(nodes: &mut [NodeProto], from: &str, to: &str) {
    for n in nodes.iter_mut() {
        for i in n.input.iter_mut().filter(|i| *i == from) {
            *i = to.to_string();
        }
    }
}

/// Rewrites a float32 tensor in place as float16 (values beyond ±65504 saturate).
fn to_fp16(t: &mut TensorProto) -> bool {
    let Some(values) = f32_view(t).map(|v| v.into_owned()) else {
        return false;
    };
    let raw: Vec<u8> = values
        .iter()
        .flat_map(|v| half::f16::from_f32(v.clamp(-65504.0, 65504.0)).to_le_bytes())
        .collect();
    t.data_type = Some(FLOAT16);
    t.float_data.clear();
    t.raw_data = Some(Bytes::from(raw));
    true
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

fn set_elem_type(v: &mut ValueInfoProto, ty: i32) {
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = Some(ty);
    }
}
