//! ONNX operators as differentiable candle compositions.
use super::graph::Mode;
use super::tensors::{dtype_of, from_proto, to_f32s, to_i64s};
use crate::engine::onnx::proto::NodeProto;
use candle_core::{bail, DType, Result, Shape, Tensor, D};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct Ctx<'a> {
    pub mode: Mode,
    pub opset: i64,
    pub running: &'a Mutex<HashMap<String, Tensor>>,
}

fn attr<'n>(
    n: &'n NodeProto,
    name: &str,
) -> Option<&'n crate::engine::onnx::proto::AttributeProto> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name))
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).and_then(|a| a.i).unwrap_or(default)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).and_then(|a| a.f).unwrap_or(default)
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    attr(n, name)
        .and_then(|a| a.s.as_ref())
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// An axis that may count from the end.
fn axis(a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if !(0..r.max(1)).contains(&v) {
        bail!("axis {a} is out of range for rank {rank}")
    }
    Ok(v as usize)
}

fn input(inputs: &[Option<Tensor>], i: usize) -> Result<&Tensor> {
    match inputs.get(i) {
        Some(Some(t)) => Ok(t),
        _ => bail!("input {i} is missing"),
    }
}

fn optional(inputs: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    inputs.get(i).and_then(|t| t.as_ref())
}

/// Axes from an attribute (older opsets) or an optional input (newer).
fn axes_of(n: &NodeProto, inputs: &[Option<Tensor>], at: usize) -> Result<Option<Vec<i64>>> {
    if let Some(a) = attr_ints(n, "axes") {
        return Ok(Some(a));
    }
    optional(inputs, at).map(to_i64s).transpose()
}

/// Numpy broadcasting of two shapes.
fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
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
fn max_keep(x: &Tensor, dim: usize) -> Result<Tensor> {
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

/// Pads dims 2 and 3 with `value` (top, left, bottom, right).
fn pad2d(x: &Tensor, pads: [usize; 4], value: f32) -> Result<Tensor> {
    if pads == [0; 4] {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x
            .pad_with_zeros(2, pads[0], pads[2])?
            .pad_with_zeros(3, pads[1], pads[3]);
    }
    let mut x = x.clone();
    for (dim, lo, hi) in [(2, pads[0], pads[2]), (3, pads[1], pads[3])] {
        let mut parts = Vec::new();
        let mut shape = x.dims().to_vec();
        if lo > 0 {
            shape[dim] = lo;
            parts.push(Tensor::full(value, shape.clone(), x.device())?.to_dtype(x.dtype())?);
        }
        parts.push(x.clone());
        if hi > 0 {
            shape[dim] = hi;
            parts.push(Tensor::full(value, shape, x.device())?.to_dtype(x.dtype())?);
        }
        x = Tensor::cat(&parts, dim)?;
    }
    Ok(x)
}

/// Spatial attributes of Conv and the pools for a 2-D window: strides, dilations, pads.
struct Window {
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: [usize; 4],
}

fn window(n: &NodeProto, kernel: [usize; 2], hw: [usize; 2]) -> Result<Window> {
    let two = |name: &str| -> Result<[usize; 2]> {
        match attr_ints(n, name).as_deref() {
            None | Some([]) => Ok([1, 1]),
            Some([a, b]) => Ok([*a as usize, *b as usize]),
            Some(v) => bail!("`{name}` {v:?} is not 2-D"),
        }
    };
    let (strides, dilations) = (two("strides")?, two("dilations")?);
    let mut pads = match attr_ints(n, "pads").as_deref() {
        None | Some([]) => [0; 4],
        Some([t, l, b, r]) => [*t as usize, *l as usize, *b as usize, *r as usize],
        Some(v) => bail!("`pads` {v:?} is not 2-D"),
    };
    match attr_s(n, "auto_pad").as_deref() {
        Some("SAME_UPPER") | Some("SAME_LOWER") => {
            let upper = attr_s(n, "auto_pad").as_deref() == Some("SAME_UPPER");
            for d in 0..2 {
                let out = hw[d].div_ceil(strides[d]);
                let span = (kernel[d] - 1) * dilations[d] + 1;
                let total = ((out - 1) * strides[d] + span).saturating_sub(hw[d]);
                let (small, big) = (total / 2, total - total / 2);
                let (lo, hi) = if upper { (small, big) } else { (big, small) };
                pads[d] = lo;
                pads[d + 2] = hi;
            }
        }
        Some("VALID") => pads = [0; 4],
        _ => {}
    }
    Ok(Window {
        strides,
        dilations,
        pads,
    })
}

fn conv(n: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // 1-D convolutions run as 2-D ones over a height of 1.
    let one_d = x.rank() == 3;
    let (x, w) = if one_d {
        (x.unsqueeze(2)?, w.unsqueeze(2)?)
    } else {
        (x.clone(), w.clone())
    };
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let mut win = window(n, [kh, kw], [h, wd])?;
    if one_d {
        // The 1-D attributes describe the width.
        let ints = |k| attr_ints(n, k).unwrap_or_default();
        let s = ints("strides").first().copied().unwrap_or(1) as usize;
        let d = ints("dilations").first().copied().unwrap_or(1) as usize;
        let p = ints("pads");
        win.strides = [1, s];
        win.dilations = [1, d];
        win.pads = [
            0,
            *p.first().unwrap_or(&0) as usize,
            0,
            *p.get(1).unwrap_or(&0) as usize,
        ];
    }
    if win.strides[0] != win.strides[1] || win.dilations[0] != win.dilations[1] {
        bail!("Conv with different strides or dilations per axis is not supported for training")
    }
    let p = win.pads;
    let (x, padding) = if p[0] == p[1] && p[1] == p[2] && p[2] == p[3] {
        (x, p[0])
    } else {
        (pad2d(&x, p, 0.0)?, 0)
    };
    let groups = attr_i(n, "group", 1) as usize;
    let mut y = x.conv2d(
        &w.contiguous()?,
        padding,
        win.strides[0],
        win.dilations[0],
        groups,
    )?;
    if let Some(b) = b {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?;
    }
    if one_d {
        y = y.squeeze(2)?;
    }
    Ok(y)
}

/// Max and average pooling of any kernel, stride and padding: the window's k x k strided views
/// taken with `index_select` (which has a backward pass) and reduced elementwise.
fn pool(n: &NodeProto, x: &Tensor, max: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let k = match attr_ints(n, "kernel_shape").as_deref() {
        Some([a, b]) => [*a as usize, *b as usize],
        v => bail!("kernel_shape {v:?} is not 2-D"),
    };
    let win = window(n, k, [h, w])?;
    if attr_i(n, "ceil_mode", 0) != 0 {
        bail!("ceil_mode pooling is not supported for training")
    }
    let p = win.pads;
    let padded = pad2d(x, p, if max { f32::NEG_INFINITY } else { 0.0 })?;
    let span = |d: usize| (k[d] - 1) * win.dilations[d] + 1;
    let (ph, pw) = (h + p[0] + p[2], w + p[1] + p[3]);
    if ph < span(0) || pw < span(1) {
        bail!("the pooling window is larger than the padded input")
    }
    let out = [
        (ph - span(0)) / win.strides[0] + 1,
        (pw - span(1)) / win.strides[1] + 1,
    ];
    let index = |d: usize, offset: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..out[d])
            .map(|o| (o * win.strides[d] + offset * win.dilations[d]) as u32)
            .collect();
        Tensor::from_vec(v, out[d], x.device())
    };
    let view = |t: &Tensor, i: usize, j: usize| -> Result<Tensor> {
        t.index_select(&index(0, i)?, 2)?
            .index_select(&index(1, j)?, 3)
    };
    let mut acc: Option<Tensor> = None;
    for i in 0..k[0] {
        for j in 0..k[1] {
            let v = view(&padded, i, j)?;
            acc = Some(match acc {
                None => v,
                Some(a) if max => a.maximum(&v)?,
                Some(a) => (a + v)?,
            });
        }
    }
    let acc = acc.expect("kernels have at least one element");
    if max {
        return Ok(acc);
    }
    let include_pad = attr_i(n, "count_include_pad", 0) != 0;
    if include_pad || p == [0; 4] {
        return acc / (k[0] * k[1]) as f64;
    }
    // Each window's count of real (unpadded) elements.
    let ones = pad2d(&Tensor::ones((1, 1, h, w), DType::F32, x.device())?, p, 0.0)?;
    let mut count: Option<Tensor> = None;
    for i in 0..k[0] {
        for j in 0..k[1] {
            let v = view(&ones, i, j)?;
            count = Some(match count {
                None => v,
                Some(c) => (c + v)?,
            });
        }
    }
    let count = count.expect("kernels have at least one element");
    acc.broadcast_div(&count.to_dtype(acc.dtype())?)
}

fn batch_norm(n: &NodeProto, inputs: &[Option<Tensor>], ctx: &Ctx) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    let (scale, bias) = (input(inputs, 1)?, input(inputs, 2)?);
    let (mean, var) = (input(inputs, 3)?, input(inputs, 4)?);
    let eps = attr_f(n, "epsilon", 1e-5) as f64;
    let c = x.dim(1)?;
    let mut shape = vec![1; x.rank()];
    shape[1] = c;
    let per_channel = |t: &Tensor| t.reshape(shape.clone());
    let (mean, var) = if ctx.mode == Mode::Train {
        let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
        let m = x.mean_keepdim(dims.clone())?;
        let v = x.broadcast_sub(&m)?.sqr()?.mean_keepdim(dims)?;
        let momentum = attr_f(n, "momentum", 0.9) as f64;
        let mut running = ctx.running.lock().expect("running statistics lock");
        for (name, batch) in [(&n.input[3], &m), (&n.input[4], &v)] {
            if let Some(r) = running.get_mut(name) {
                let b = batch.detach().flatten_all()?;
                *r = ((&*r * momentum)? + (b * (1.0 - momentum))?)?;
            }
        }
        (m, v)
    } else {
        (per_channel(mean)?, per_channel(var)?)
    };
    let inv = (var + eps)?.sqrt()?.recip()?;
    x.broadcast_sub(&mean)?
        .broadcast_mul(&inv.broadcast_mul(&per_channel(scale)?)?)?
        .broadcast_add(&per_channel(bias)?)
}

fn layer_norm(n: &NodeProto, inputs: &[Option<Tensor>]) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    let from = axis(attr_i(n, "axis", -1), x.rank())?;
    let dims: Vec<usize> = (from..x.rank()).collect();
    let eps = attr_f(n, "epsilon", 1e-5) as f64;
    let centred = x.broadcast_sub(&x.mean_keepdim(dims.clone())?)?;
    let var = centred.sqr()?.mean_keepdim(dims)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    y = y.broadcast_mul(input(inputs, 1)?)?;
    if let Some(b) = optional(inputs, 2) {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

fn reshape(x: &Tensor, shape: &[i64], allow_zero: bool) -> Result<Tensor> {
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

fn reduce(n: &NodeProto, inputs: &[Option<Tensor>], op: &str, ctx: &Ctx) -> Result<Tensor> {
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

fn slice(n: &NodeProto, inputs: &[Option<Tensor>], ctx: &Ctx) -> Result<Tensor> {
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

fn gather(n: &NodeProto, data: &Tensor, indices: &Tensor) -> Result<Tensor> {
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

fn constant(n: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let dev = x.device();
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
        "Constant" => {
            let anchor = Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?;
            constant(n, &anchor)?
        }
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
            if s.dtype() == DType::I64 {
                let (s, l, d) = (to_i64s(s)?[0], to_i64s(l)?[0], to_i64s(d)?[0]);
                let count = if d == 0 {
                    0
                } else {
                    ((l - s) as f64 / d as f64).ceil().max(0.0) as usize
                };
                let v: Vec<i64> = (0..count as i64).map(|i| s + i * d).collect();
                Tensor::from_vec(v, count, &s_device(inputs)?)?
            } else {
                let (s, l, d) = (to_f32s(s)?[0], to_f32s(l)?[0], to_f32s(d)?[0]);
                let count = if d == 0.0 {
                    0
                } else {
                    ((l - s) / d).ceil().max(0.0) as usize
                };
                let v: Vec<f32> = (0..count).map(|i| s + i as f32 * d).collect();
                Tensor::from_vec(v, count, &s_device(inputs)?)?
            }
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceL2" => reduce(n, inputs, op, ctx)?,
        other => bail!("op {other} is not supported for training"),
    };
    Ok(vec![y])
}

fn s_device(inputs: &[Option<Tensor>]) -> Result<candle_core::Device> {
    Ok(input(inputs, 0)?.device().clone())
}
