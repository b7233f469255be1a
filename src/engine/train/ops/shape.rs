//! Shape, indexing and reduction ops.
use super::attrs::{attr, attr_i, attr_ints, axis, input, optional};
use super::{max_keep, Ctx};
use crate::engine::onnx::proto::NodeProto;
use crate::engine::train::tensors::{from_proto, to_i64s};
use candle_core::{bail, Result, Tensor};

/// Numpy broadcasting of two shapes.
pub(super) fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        let off = rank - s.len();
        if i < off {
            1
        } else {
            s[i - off]
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => bail!("shapes {a:?} and {b:?} do not broadcast ({x} vs {y})"),
        })
        .collect()
}

pub(super) fn reshape(x: &Tensor, shape: &[i64], allow_zero: bool) -> Result<Tensor> {
    let mut dims: Vec<usize> = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 if !allow_zero => dims.push(x.dim(i)?),
            -1 => {
                infer = Some(i);
                dims.push(1);
            }
            s if s < 0 => bail!("bad reshape dim {s}"),
            s => dims.push(s as usize),
        }
    }
    if let Some(i) = infer {
        let known: usize = dims.iter().product();
        dims[i] = x.elem_count() / known.max(1);
    }
    x.reshape(dims)
}

pub(super) fn reduce(
    n: &NodeProto,
    inputs: &[Option<Tensor>],
    op: &str,
    ctx: &Ctx,
) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    // ReduceSum takes axes as an input from opset 13, the others from 18.
    let from_input = if op == "ReduceSum" { 13 } else { 18 };
    let axes = if ctx.opset >= from_input {
        optional(inputs, 1).map(to_i64s).transpose()?
    } else {
        attr_ints(n, "axes")
    };
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&a| axis(a, x.rank()))
            .collect::<Result<_>>()?,
        _ if attr_i(n, "noop_with_empty_axes", 0) != 0 => return Ok(x.clone()),
        _ => (0..x.rank()).collect(),
    };
    axes.sort_unstable();
    let mut y = match op {
        "ReduceSum" => x.sum_keepdim(axes.clone())?,
        "ReduceMean" => x.mean_keepdim(axes.clone())?,
        "ReduceL2" => x.sqr()?.sum_keepdim(axes.clone())?.sqrt()?,
        _ => {
            let mut y = x.clone();
            for &a in &axes {
                y = max_keep(&y, a)?;
            }
            y
        }
    };
    if attr_i(n, "keepdims", 1) == 0 {
        for &a in axes.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

pub(super) fn slice(n: &NodeProto, inputs: &[Option<Tensor>], ctx: &Ctx) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    let (starts, ends, axes, steps) = if ctx.opset >= 10 {
        (
            to_i64s(input(inputs, 1)?)?,
            to_i64s(input(inputs, 2)?)?,
            optional(inputs, 3).map(to_i64s).transpose()?,
            optional(inputs, 4).map(to_i64s).transpose()?,
        )
    } else {
        (
            attr_ints(n, "starts").unwrap_or_default(),
            attr_ints(n, "ends").unwrap_or_default(),
            attr_ints(n, "axes"),
            None,
        )
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let mut y = x.clone();
    for (i, &a) in axes.iter().enumerate() {
        let d = axis(a, x.rank())?;
        let len = x.dim(d)? as i64;
        let step = steps.as_ref().map_or(1, |s| s[i]);
        if step == 0 {
            bail!("Slice step 0")
        }
        let clamp = |v: i64, lo: i64, hi: i64| {
            let v = if v < 0 { v + len } else { v };
            v.clamp(lo, hi)
        };
        let idx: Vec<u32> = if step > 0 {
            let (s, e) = (clamp(starts[i], 0, len), clamp(ends[i], 0, len));
            (s..e).step_by(step as usize).map(|v| v as u32).collect()
        } else {
            let (s, e) = (clamp(starts[i], -1, len - 1), clamp(ends[i], -1, len - 1));
            let mut v = Vec::new();
            let mut k = s;
            while k > e {
                v.push(k as u32);
                k += step;
            }
            v
        };
        y = if step == 1 {
            let start = idx.first().copied().unwrap_or(0) as usize;
            y.narrow(d, start, idx.len())?
        } else {
            let n = idx.len();
            y.index_select(&Tensor::from_vec(idx, n, x.device())?, d)?
        };
    }
    Ok(y)
}

pub(super) fn gather(n: &NodeProto, data: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let a = axis(attr_i(n, "axis", 0), data.rank())?;
    let len = data.dim(a)? as i64;
    let idx: Vec<i64> = to_i64s(indices)?
        .into_iter()
        .map(|i| if i < 0 { i + len } else { i })
        .collect();
    let count = idx.len();
    let picked = data.index_select(&Tensor::from_vec(idx, count, data.device())?, a)?;
    let mut dims = data.dims()[..a].to_vec();
    dims.extend_from_slice(indices.dims());
    dims.extend_from_slice(&data.dims()[a + 1..]);
    picked.reshape(dims)
}

pub(super) fn constant(n: &NodeProto, dev: &candle_core::Device) -> Result<Tensor> {
    if let Some(t) = attr(n, "value").and_then(|a| a.t.as_ref()) {
        return from_proto(t, dev).map_err(|e| candle_core::Error::Msg(e.to_string()));
    }
    if let Some(a) = attr(n, "value_float") {
        return Tensor::new(a.f.unwrap_or(0.0), dev);
    }
    if let Some(a) = attr(n, "value_int") {
        return Tensor::new(a.i.unwrap_or(0), dev);
    }
    if let Some(a) = attr(n, "value_floats") {
        return Tensor::new(a.floats.as_slice(), dev);
    }
    if let Some(a) = attr(n, "value_ints") {
        return Tensor::new(a.ints.as_slice(), dev);
    }
    bail!("Constant without a supported value attribute")
}
