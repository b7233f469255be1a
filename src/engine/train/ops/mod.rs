//! ONNX operators as differentiable candle compositions.
mod attrs;
mod channel;
mod norm;
mod resize;
mod shape;
mod spatial;

use super::tensors::{dtype_of, to_f32s, to_i64s};
use crate::engine::onnx::proto::NodeProto;
use attrs::{attr, attr_f, attr_i, attr_ints, axes_of, axis, input, optional};
use candle_core::{bail, DType, Result, Shape, Tensor, D};
use norm::{batch_norm, layer_norm};
use shape::{broadcast_dims, constant, gather, reduce, reshape, slice};
use spatial::{conv, pool};
use std::collections::HashMap;
use std::sync::Mutex;

/// The f32 values of a contiguous CPU tensor, for custom operations (`op` names it in errors).
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(values) = storage else {
        bail!("{op} takes float32 tensors")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op} takes contiguous tensors")
    };
    Ok(&values[start..end])
}

/// Forward-pass mode: `Train` normalises BatchNormalization with batch statistics (and updates
/// the running ones); `Eval` runs the model as ONNX Runtime does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train,
}

pub struct Ctx<'a> {
    pub mode: Mode,
    pub opset: i64,
    pub running: &'a Mutex<HashMap<String, Tensor>>,
    /// BatchNormalization uses (and keeps) its running statistics in `Train` mode too.
    pub frozen_batch_norm: bool,
}

fn same_dtype(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        Ok(b.clone())
    } else {
        b.to_dtype(a.dtype())
    }
}

fn softmax(x: &Tensor, dim: usize, log: bool) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(dim)?.detach())?;
    let sum = shifted.exp()?.sum_keepdim(dim)?;
    if log {
        shifted.broadcast_sub(&sum.log()?)
    } else {
        shifted.exp()?.broadcast_div(&sum)
    }
}

/// Softmax and LogSoftmax; before opset 13 they normalise the input flattened to 2-D at `axis`.
fn softmax_op(n: &NodeProto, x: &Tensor, opset: i64, log: bool) -> Result<Tensor> {
    let rank = x.rank();
    if opset >= 13 {
        return softmax(x, axis(attr_i(n, "axis", -1), rank)?, log);
    }
    let a = axis(attr_i(n, "axis", 1), rank)?;
    if a == rank - 1 {
        return softmax(x, a, log);
    }
    let dims = x.dims().to_vec();
    let (outer, inner): (usize, usize) = (dims[..a].iter().product(), dims[a..].iter().product());
    softmax(&x.reshape((outer, inner))?, 1, log)?.reshape(dims)
}

/// Max over `dim` (kept) whose gradient is shared among tied maxima. candle's own max gives
/// each tied element the full gradient, which overcounts when duplicates (from overlapping max
/// pools, say) meet again in a later max.
pub(super) fn max_keep(x: &Tensor, dim: usize) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let mask = x.broadcast_eq(&m)?.to_dtype(x.dtype())?;
    let count = mask.sum_keepdim(dim)?;
    (x * &mask)?.sum_keepdim(dim)?.broadcast_div(&count)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    // 0.5 (1 + tanh(x / 2)): no overflow, and a finite gradient everywhere.
    (x.affine(0.5, 0.0)?.tanh()? + 1.0)? * 0.5
}

fn hard_sigmoid(x: &Tensor, alpha: f64, beta: f64) -> Result<Tensor> {
    x.affine(alpha, beta)?.clamp(0f32, 1f32)
}

fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a = if a1 { a.unsqueeze(0)? } else { a.contiguous()? };
    let b = if b1 { b.unsqueeze(1)? } else { b.contiguous()? };
    let mut y = if a.rank() == 2 && b.rank() == 2 {
        a.matmul(&b)?
    } else {
        a.broadcast_matmul(&b)?
    };
    if b1 {
        y = y.squeeze(D::Minus1)?;
    }
    if a1 {
        y = y.squeeze(if b1 { D::Minus1 } else { D::Minus2 })?;
    }
    Ok(y)
}

/// Runs one node.
pub fn run(n: &NodeProto, inputs: &[Option<Tensor>], ctx: &Ctx) -> Result<Vec<Tensor>> {
    let op = n.op_type.as_deref().unwrap_or_default();
    let x = || input(inputs, 0);
    let binary = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<Tensor> {
        let (a, b) = (input(inputs, 0)?, input(inputs, 1)?);
        f(a, &same_dtype(a, b)?)
    };
    let y = match op {
        "Identity" | "Dropout" => x()?.clone(),
        "Constant" => constant(n, &candle_core::Device::Cpu)?,
        "Add" => binary(|a, b| a.broadcast_add(b))?,
        "Sub" => binary(|a, b| a.broadcast_sub(b))?,
        "Mul" => binary(|a, b| a.broadcast_mul(b))?,
        "Div" => binary(|a, b| a.broadcast_div(b))?,
        "Equal" => binary(|a, b| a.broadcast_eq(b))?,
        "Pow" => {
            let (a, e) = (x()?, input(inputs, 1)?);
            if e.elem_count() == 1 {
                match to_f32s(e)?[0] {
                    2.0 => a.sqr()?,
                    1.0 => a.clone(),
                    p => a.powf(p as f64)?,
                }
            } else {
                a.broadcast_pow(&same_dtype(a, e)?)?
            }
        }
        "Relu" => x()?.relu()?,
        "Sigmoid" => sigmoid(x()?)?,
        "Tanh" => x()?.tanh()?,
        "Exp" => x()?.exp()?,
        "Log" => x()?.log()?,
        "Neg" => x()?.neg()?,
        "Sqrt" => x()?.sqrt()?,
        "Erf" => x()?.erf()?,
        "HardSigmoid" => hard_sigmoid(
            x()?,
            attr_f(n, "alpha", 0.2) as f64,
            attr_f(n, "beta", 0.5) as f64,
        )?,
        "HardSwish" => x()?.mul(&hard_sigmoid(x()?, 1.0 / 6.0, 0.5)?)?,
        "Clip" => {
            let x = x()?;
            let bound = |i: usize, name: &str| -> Result<Option<f32>> {
                if let Some(t) = optional(inputs, i) {
                    return Ok(Some(to_f32s(t)?[0]));
                }
                Ok(attr(n, name).and_then(|a| a.f))
            };
            let mut y = x.clone();
            if let Some(lo) = bound(1, "min")? {
                y = y.maximum(lo)?;
            }
            if let Some(hi) = bound(2, "max")? {
                y = y.minimum(hi)?;
            }
            y
        }
        "Softmax" => softmax_op(n, x()?, ctx.opset, false)?,
        "LogSoftmax" => softmax_op(n, x()?, ctx.opset, true)?,
        "MatMul" => matmul(x()?, input(inputs, 1)?)?,
        "Gemm" => {
            let (mut a, mut b) = (x()?.clone(), input(inputs, 1)?.clone());
            if attr_i(n, "transA", 0) != 0 {
                a = a.t()?;
            }
            if attr_i(n, "transB", 0) != 0 {
                b = b.t()?;
            }
            let mut y = (matmul(&a, &b)? * attr_f(n, "alpha", 1.0) as f64)?;
            if let Some(c) = optional(inputs, 2) {
                y = y.broadcast_add(&(c * attr_f(n, "beta", 1.0) as f64)?)?;
            }
            y
        }
        "Conv" => conv(n, x()?, input(inputs, 1)?, optional(inputs, 2))?,
        "ConvTranspose" => resize::conv_transpose(n, x()?, input(inputs, 1)?, optional(inputs, 2))?,
        "Resize" | "Upsample" => resize::resize(n, inputs, ctx.opset)?,
        "BatchNormalization" => batch_norm(n, inputs, ctx)?,
        "LayerNormalization" => layer_norm(n, inputs)?,
        "MaxPool" => pool(n, x()?, true)?,
        "AveragePool" => pool(n, x()?, false)?,
        "GlobalAveragePool" => {
            let x = x()?;
            x.mean_keepdim((2..x.rank()).collect::<Vec<_>>())?
        }
        "GlobalMaxPool" => {
            let mut y = x()?.clone();
            for d in 2..y.rank() {
                y = max_keep(&y, d)?;
            }
            y
        }
        "Flatten" => {
            let x = x()?;
            let a = axis(attr_i(n, "axis", 1), x.rank() + 1)?;
            let outer: usize = x.dims()[..a].iter().product();
            x.reshape((outer, x.elem_count() / outer.max(1)))?
        }
        "Reshape" => {
            let shape = to_i64s(input(inputs, 1)?)?;
            reshape(x()?, &shape, attr_i(n, "allowzero", 0) != 0)?
        }
        "Transpose" => {
            let x = x()?;
            let perm: Vec<usize> = match attr_ints(n, "perm") {
                Some(p) if !p.is_empty() => p.iter().map(|&p| p as usize).collect(),
                _ => (0..x.rank()).rev().collect(),
            };
            x.permute(perm)?
        }
        "Concat" => {
            let parts: Vec<Tensor> = inputs.iter().flatten().cloned().collect();
            let rank = parts.first().map_or(1, |t| t.rank());
            let first = parts.first().map(|t| t.dtype()).unwrap_or(DType::F32);
            let parts = parts
                .iter()
                .map(|t| t.to_dtype(first))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, axis(attr_i(n, "axis", 0), rank)?)?
        }
        "Shape" => {
            let dims: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let r = dims.len() as i64;
            let norm = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (norm(attr_i(n, "start", 0)), norm(attr_i(n, "end", r)));
            let part = dims[s..e.max(s)].to_vec();
            let len = part.len();
            Tensor::from_vec(part, len, x()?.device())?
        }
        "Gather" => gather(n, x()?, input(inputs, 1)?)?,
        "Unsqueeze" => {
            let x = x()?;
            let axes = axes_of(n, inputs, 1)?.unwrap_or_default();
            let rank = x.rank() + axes.len();
            let mut axes: Vec<usize> =
                axes.iter().map(|&a| axis(a, rank)).collect::<Result<_>>()?;
            axes.sort_unstable();
            let mut y = x.clone();
            for a in axes {
                y = y.unsqueeze(a)?;
            }
            y
        }
        "Squeeze" => {
            let x = x()?;
            let mut axes: Vec<usize> = match axes_of(n, inputs, 1)? {
                Some(a) if !a.is_empty() => a
                    .iter()
                    .map(|&a| axis(a, x.rank()))
                    .collect::<Result<_>>()?,
                _ => (0..x.rank()).filter(|&d| x.dims()[d] == 1).collect(),
            };
            axes.sort_unstable();
            let mut y = x.clone();
            for &a in axes.iter().rev() {
                y = y.squeeze(a)?;
            }
            y
        }
        "Slice" => slice(n, inputs, ctx)?,
        "Cast" => {
            let to = attr_i(n, "to", 1) as i32;
            match dtype_of(to) {
                Some(d) => x()?.to_dtype(d)?,
                None => bail!("Cast to element type {to} is not supported for training"),
            }
        }
        "Where" => {
            let (c, a, b) = (x()?, input(inputs, 1)?, input(inputs, 2)?);
            let b = same_dtype(a, b)?;
            let dims = broadcast_dims(&broadcast_dims(c.dims(), a.dims())?, b.dims())?;
            let shape = Shape::from(dims);
            c.broadcast_as(shape.clone())?
                .where_cond(&a.broadcast_as(shape.clone())?, &b.broadcast_as(shape)?)?
        }
        "Expand" => {
            let x = x()?;
            let target: Vec<usize> = to_i64s(input(inputs, 1)?)?
                .iter()
                .map(|&d| d as usize)
                .collect();
            x.broadcast_as(broadcast_dims(x.dims(), &target)?)?
        }
        "Range" => {
            let (s, l, d) = (x()?, input(inputs, 1)?, input(inputs, 2)?);
            let dev = s.device().clone();
            if s.dtype() == DType::I64 {
                let (s, l, d) = (to_i64s(s)?[0], to_i64s(l)?[0], to_i64s(d)?[0]);
                let count = if d == 0 {
                    0
                } else {
                    ((l - s) as f64 / d as f64).ceil().max(0.0) as usize
                };
                let v: Vec<i64> = (0..count as i64).map(|i| s + i * d).collect();
                Tensor::from_vec(v, count, &dev)?
            } else {
                let (s, l, d) = (to_f32s(s)?[0], to_f32s(l)?[0], to_f32s(d)?[0]);
                let count = if d == 0.0 {
                    0
                } else {
                    ((l - s) / d).ceil().max(0.0) as usize
                };
                let v: Vec<f32> = (0..count).map(|i| s + i as f32 * d).collect();
                Tensor::from_vec(v, count, &dev)?
            }
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceL2" => reduce(n, inputs, op, ctx)?,
        other => bail!("op {other} is not supported for training"),
    };
    Ok(vec![y])
}
