//! Reading and building initializer tensors.
use super::proto::{tensor_proto::DataType, TensorProto};
use bytes::Bytes;

/// The float32 values of a tensor, from raw or typed storage; None for other element types.
pub fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(DataType::Float as i32) {
        return None;
    }
    match t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        Some(raw) => Some(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        None => Some(t.float_data.clone()),
    }
}

pub fn dims(t: &TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

fn tensor(name: &str, dims: &[usize], ty: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(ty as i32),
        raw_data: Some(Bytes::from(raw)),
        ..Default::default()
    }
}

pub fn f32_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Float,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

pub fn i8_tensor(name: &str, dims: &[usize], values: &[i8]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Int8,
        values.iter().map(|&v| v as u8).collect(),
    )
}

pub fn u8_tensor(name: &str, dims: &[usize], values: &[u8]) -> TensorProto {
    tensor(name, dims, DataType::Uint8, values.to_vec())
}

pub fn i32_tensor(name: &str, dims: &[usize], values: &[i32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Int32,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}
