//! ONNX tensors to candle tensors and back.
use crate::engine::dataset::{Dataset, TensorData};
use crate::engine::onnx::proto::TensorProto;
use crate::engine::onnx::tensor::{dims, f32_values};
use crate::engine::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// ONNX element types the evaluator holds, and the candle type each becomes.
pub fn dtype_of(elem_type: i32) -> Option<DType> {
    Some(match elem_type {
        1 => DType::F32,
        // Integer tensors are shapes, indices and masks: candle's I64 covers them all.
        2..=7 | 12 | 13 => DType::I64,
        9 => DType::U8,
        10 => DType::F16,
        11 => DType::F64,
        _ => return None,
    })
}

fn int_values(t: &TensorProto) -> Option<Vec<i64>> {
    let elem = t.data_type.unwrap_or(0);
    let raw = t.raw_data.as_deref().unwrap_or_default();
    if !raw.is_empty() {
        let size = match elem {
            2 | 3 | 9 => 1,
            4 | 5 => 2,
            6 | 12 => 4,
            7 | 13 => 8,
            _ => return None,
        };
        return Some(
            raw.chunks_exact(size)
                .map(|c| match (elem, size) {
                    (2 | 9, _) => c[0] as i64,
                    (3, _) => c[0] as i8 as i64,
                    (4, _) => u16::from_le_bytes([c[0], c[1]]) as i64,
                    (5, _) => i16::from_le_bytes([c[0], c[1]]) as i64,
                    (12, _) => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    (6, _) => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    _ => i64::from_le_bytes(c.try_into().expect("8-byte chunks")),
                })
                .collect(),
        );
    }
    Some(match elem {
        7 => t.int64_data.clone(),
        13 => t.uint64_data.iter().map(|&v| v as i64).collect(),
        _ => t.int32_data.iter().map(|&v| v as i64).collect(),
    })
}

/// An initializer or Constant value as a candle tensor.
pub fn from_proto(t: &TensorProto, device: &Device) -> Result<Tensor> {
    let name = t.name.clone().unwrap_or_default();
    let shape = dims(t);
    let elem = t.data_type.unwrap_or(0);
    let bad = |what: &str| EngineError::InvalidModel(format!("tensor `{name}`: {what}"));
    let tensor = match dtype_of(elem) {
        Some(DType::F32) => {
            let v = f32_values(t).ok_or_else(|| bad("unreadable float data"))?;
            Tensor::from_vec(v, shape, device)
        }
        Some(DType::I64) | Some(DType::U8) => {
            let v = int_values(t).ok_or_else(|| bad("unreadable integer data"))?;
            let t = Tensor::from_vec(v, shape, device);
            if elem == 9 {
                t.and_then(|t| t.to_dtype(DType::U8))
            } else {
                t
            }
        }
        Some(DType::F64) => {
            let raw = t.raw_data.as_deref().unwrap_or_default();
            let v: Vec<f64> = if raw.is_empty() {
                t.double_data.clone()
            } else {
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunks")))
                    .collect()
            };
            Tensor::from_vec(v, shape, device)
        }
        _ => {
            return Err(bad(&format!(
                "element type {elem} is not supported for training"
            )))
        }
    };
    tensor.map_err(|e| super::candle_error(&format!("tensor `{name}`"), e))
}

/// The values of an integer tensor (shapes, axes, indices).
pub fn to_i64s(t: &Tensor) -> candle_core::Result<Vec<i64>> {
    t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()
}

/// The values of a float tensor as f32.
pub fn to_f32s(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// Candle tensors of the given dataset `rows` for the model inputs in `binding` (model input ->
/// dataset tensor), in the input's own type (float data as f32, integer data as i64).
pub fn feeds(
    data: &Dataset,
    binding: &[(String, String)],
    rows: &[usize],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (input, name) in binding {
        let t = data
            .tensor(name)
            .ok_or_else(|| EngineError::InvalidDataset {
                tensor: name.clone(),
                problem: "missing".into(),
            })?;
        let row = t.row_len();
        let mut shape = t.shape.clone();
        shape[0] = rows.len();
        fn pick<T: Copy, U>(v: &[T], row: usize, rows: &[usize], f: impl Fn(T) -> U) -> Vec<U> {
            rows.iter()
                .flat_map(|&r| v[r * row..(r + 1) * row].iter().map(|&x| f(x)))
                .collect()
        }
        let tensor = match &t.data {
            TensorData::F32(v) => Tensor::from_vec(pick(v, row, rows, |x| x), shape, device),
            TensorData::F64(v) => Tensor::from_vec(pick(v, row, rows, |x| x as f32), shape, device),
            TensorData::F16(v) => Tensor::from_vec(pick(v, row, rows, f32::from), shape, device),
            TensorData::I8(v) => Tensor::from_vec(pick(v, row, rows, i64::from), shape, device),
            TensorData::U8(v) => Tensor::from_vec(pick(v, row, rows, i64::from), shape, device),
            TensorData::I32(v) => Tensor::from_vec(pick(v, row, rows, i64::from), shape, device),
            TensorData::I64(v) => Tensor::from_vec(pick(v, row, rows, |x| x), shape, device),
            TensorData::Bool(v) => Tensor::from_vec(pick(v, row, rows, u8::from), shape, device),
            TensorData::Str(_) => {
                return Err(crate::engine::EngineError::InvalidDataset {
                    tensor: name.to_string(),
                    problem: "holds text, which training cannot feed to a model".into(),
                })
            }
        }
        .map_err(|e| super::candle_error(&format!("dataset tensor `{name}`"), e))?;
        out.insert(input.clone(), tensor);
    }
    Ok(out)
}
