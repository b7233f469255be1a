//! Node attributes, inputs and axes.
use super::super::tensors::to_i64s;
use crate::engine::onnx::proto::NodeProto;
use candle_core::{bail, Result, Tensor};

pub(super) fn attr<'n>(
    n: &'n NodeProto,
    name: &str,
) -> Option<&'n crate::engine::onnx::proto::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

pub(super) fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

pub(super) fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).and_then(|a| a.f).unwrap_or(default)
}

pub(super) fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

pub(super) fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// An axis that may count from the end.
pub(super) fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if !(0..r.max(1)).contains(&v) {
        bail!("axis {a} is out of range for rank {rank}")
    }
    Ok(v as usize)
}

pub(super) fn input(inputs: &[Option<Tensor>], i: usize) -> Result<&Tensor> {
    match inputs.get(i) {
        Some(Some(t)) => Ok(t),
        _ => bail!("input {i} is missing"),
    }
}

pub(super) fn optional(inputs: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    inputs.get(i).and_then(|t| t.as_ref())
}

/// Axes from an attribute (older opsets) or an optional input (newer).
pub(super) fn axes_of(
    n: &NodeProto,
    inputs: &[Option<Tensor>],
    at: usize,
) -> Result<Option<Vec<i64>>> {
    if let Some(a) = attr_ints(n, "axes") {
        return Ok(Some(a));
    }
    optional(inputs, at).map(to_i64s).transpose()
}
