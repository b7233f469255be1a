//! Reading and building initializer tensors.
use super::proto::{tensor_proto::DataType, TensorProto, ValueInfoProto};
use bytes::Bytes;
use std::borrow::Cow;

/// Whether the tensor holds float32 values.
pub fn is_f32(t: &TensorProto) -> bool {
    t.data_type == Some(DataType::Float as i32)
}

/// The float32 values of a tensor, from raw or typed storage; None for other element types.
pub fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    f32_view(t).map(Cow::into_owned)
}

/// The float32 values of a tensor as little-endian 4-byte groups, borrowed in place from raw
/// storage at any alignment (see [`crate::engine::quantize::params::F32`]); None for other types.
pub fn f32_le(t: &TensorProto) -> Option<Cow<'_, [[u8; 4]]>> {
    if t.data_type != Some(DataType::Float as i32) {
        return None;
    }
    match t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        // SAFETY: [u8; 4] has alignment 1 and the length stays within `raw`.
        Some(raw) => Some(Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(raw.as_ptr().cast::<[u8; 4]>(), raw.len() / 4)
        })),
        None => Some(Cow::Owned(
            t.float_data.iter().map(|v| v.to_le_bytes()).collect(),
        )),
    }
}

/// The float32 values of a tensor, borrowed in place when the raw bytes are aligned (weights of
/// a memory-mapped model usually are), copied otherwise.
pub fn f32_view(t: &TensorProto) -> Option<Cow<'_, [f32]>> {
    if t.data_type != Some(DataType::Float as i32) {
        return None;
    }
    match t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        Some(raw) => {
            #[cfg(target_endian = "little")]
            {
                // SAFETY: every bit pattern is a valid f32, and align_to only hands out the
                // correctly aligned middle part.
                let (head, mid, tail) = unsafe { raw.align_to::<f32>() };
                if head.is_empty() && tail.is_empty() {
                    return Some(Cow::Borrowed(mid));
                }
            }
            Some(Cow::Owned(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ))
        }
        None => Some(Cow::Borrowed(&t.float_data)),
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

/// A 1-D int64 tensor (Reshape shapes, axes).
pub fn i64_tensor(name: &str, values: &[i64]) -> TensorProto {
    tensor(
        name,
        &[values.len()],
        DataType::Int64,
        values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

/// The values of an int64 tensor; None for other element types.
pub fn i64_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != Some(DataType::Int64 as i32) {
        return None;
    }
    match t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        Some(raw) => Some(
            raw.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunks")))
                .collect(),
        ),
        None => Some(t.int64_data.clone()),
    }
}

/// The values of an int32 or int64 tensor, widened to i64; None for other element types.
pub fn int_values(t: &TensorProto) -> Option<Vec<i64>> {
    if t.data_type != Some(DataType::Int32 as i32) {
        return i64_values(t);
    }
    match t.raw_data.as_ref().filter(|r| !r.is_empty()) {
        Some(raw) => Some(
            raw.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4-byte chunks")) as i64)
                .collect(),
        ),
        None => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
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

/// A float16 tensor of `values` (rounded to nearest).
pub fn f16_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    tensor(
        name,
        dims,
        DataType::Float16,
        values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
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

/// An int8 tensor that takes over `values` without copying them.
pub fn i8_tensor_owned(name: &str, dims: &[usize], values: Vec<i8>) -> TensorProto {
    let mut values = std::mem::ManuallyDrop::new(values);
    let (ptr, len, cap) = (values.as_mut_ptr(), values.len(), values.capacity());
    // SAFETY: i8 and u8 have the same size, alignment and validity; the Vec is not used again.
    let bytes = unsafe { Vec::from_raw_parts(ptr as *mut u8, len, cap) };
    tensor(name, dims, DataType::Int8, bytes)
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

/// A float32 graph output of unknown shape: exposes an intermediate tensor to ONNX Runtime.
pub fn float_value_info(name: &str) -> ValueInfoProto {
    use crate::engine::onnx::proto::{type_proto, TypeProto};
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::quantize::params::F32;

    #[test]
    fn float_bytes_are_read_in_place_at_any_offset_and_from_typed_storage() {
        let values = [1.5f32, -2.25, 3.0e-7];
        let mut t = f32_tensor("w", &[3], &values);
        // Shift the bytes by one so they sit at an odd address inside a larger buffer.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(t.raw_data.as_ref().unwrap());
        t.raw_data = Some(Bytes::from(shifted).slice(1..));
        let read: Vec<f32> = f32_le(&t).unwrap().iter().map(|b| b.get()).collect();
        assert_eq!(read, values);
        assert!(matches!(f32_le(&t), Some(Cow::Borrowed(_))), "no copy");
        let typed = TensorProto {
            data_type: Some(DataType::Float as i32),
            float_data: values.to_vec(),
            ..Default::default()
        };
        let read: Vec<f32> = f32_le(&typed).unwrap().iter().map(|b| b.get()).collect();
        assert_eq!(read, values);
        assert!(f32_le(&i8_tensor("q", &[1], &[1])).is_none());
    }
}
