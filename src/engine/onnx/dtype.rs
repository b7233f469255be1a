//! ONNX element types and their numpy-style names, which users see in errors and summaries.
use super::proto::tensor_proto::DataType;

/// numpy-style name of an ONNX element type (`float32`, `int64`, ...).
pub fn name(elem_type: i32) -> String {
    let s = match DataType::try_from(elem_type) {
        Ok(DataType::Float) => "float32",
        Ok(DataType::Double) => "float64",
        Ok(DataType::Float16) => "float16",
        Ok(DataType::Bfloat16) => "bfloat16",
        Ok(DataType::Int8) => "int8",
        Ok(DataType::Uint8) => "uint8",
        Ok(DataType::Int16) => "int16",
        Ok(DataType::Uint16) => "uint16",
        Ok(DataType::Int32) => "int32",
        Ok(DataType::Uint32) => "uint32",
        Ok(DataType::Int64) => "int64",
        Ok(DataType::Uint64) => "uint64",
        Ok(DataType::Bool) => "bool",
        Ok(DataType::String) => "string",
        Ok(DataType::Int4) => "int4",
        Ok(DataType::Uint4) => "uint4",
        Ok(other) => return other.as_str_name().to_ascii_lowercase(),
        Err(_) => return format!("unknown({elem_type})"),
    };
    s.to_string()
}

/// Bytes per element for fixed-size numeric types (None for strings and sub-byte types).
pub fn element_size(elem_type: i32) -> Option<usize> {
    Some(match DataType::try_from(elem_type).ok()? {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Double | DataType::Int64 | DataType::Uint64 => 8,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        _ => return None,
    })
}
