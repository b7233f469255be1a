//! Counting parameters (weights) and how many of them are non-zero.
use super::dtype::element_size;
use super::proto::{tensor_proto::DataType, GraphProto, TensorProto};

/// Elements in a tensor according to its dims.
pub fn element_count(t: &TensorProto) -> u64 {
    t.dims.iter().map(|&d| d.max(0) as u64).product()
}

/// Every weight tensor of a graph: initializers and the `value` of `Constant` nodes, recursively
/// through subgraphs (If/Loop bodies).
pub fn weight_tensors(graph: &GraphProto) -> Vec<&TensorProto> {
    let mut out: Vec<&TensorProto> = graph.initializer.iter().collect();
    for node in &graph.node {
        for attr in &node.attribute {
            if node.op_type.as_deref() == Some("Constant") {
                if let Some(t) = attr.t.as_ref() {
                    out.push(t);
                }
            }
            if let Some(g) = attr.g.as_ref() {
                out.extend(weight_tensors(g));
            }
            for g in &attr.graphs {
                out.extend(weight_tensors(g));
            }
        }
    }
    out
}

/// Number of non-zero elements, reading raw or typed storage. Negative zero counts as zero.
pub fn nonzero_count(t: &TensorProto) -> u64 {
    let elem = t.data_type.unwrap_or(0);
    if let Some(raw) = t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        let Some(size) = element_size(elem) else {
            return element_count(t);
        };
        return raw
            .chunks_exact(size)
            .filter(|c| match DataType::try_from(elem) {
                Ok(DataType::Float) => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) != 0.0,
                Ok(DataType::Double) => {
                    f64::from_le_bytes((*c).try_into().unwrap_or([0; 8])) != 0.0
                }
                // IEEE half and bfloat16: zero when every bit but the sign is zero.
                Ok(DataType::Float16) | Ok(DataType::Bfloat16) => {
                    (u16::from_le_bytes([c[0], c[1]]) & 0x7fff) != 0
                }
                _ => c.iter().any(|&b| b != 0),
            })
            .count() as u64;
    }
    let n = t.float_data.iter().filter(|v| **v != 0.0).count()
        + t.double_data.iter().filter(|v| **v != 0.0).count()
        + t.int64_data.iter().filter(|v| **v != 0).count()
        + t.uint64_data.iter().filter(|v| **v != 0).count();
    let int32 = match DataType::try_from(elem) {
        // float16/bfloat16 values are stored as bit patterns in int32_data.
        Ok(DataType::Float16) | Ok(DataType::Bfloat16) => {
            t.int32_data.iter().filter(|v| (**v & 0x7fff) != 0).count()
        }
        _ => t.int32_data.iter().filter(|v| **v != 0).count(),
    };
    (n + int32) as u64
}

/// (parameters, non-zero parameters) over every weight of the graph.
pub fn parameter_counts(graph: &GraphProto) -> (u64, u64) {
    weight_tensors(graph)
        .into_iter()
        .fold((0, 0), |(p, nz), t| {
            (p + element_count(t), nz + nonzero_count(t))
        })
}
