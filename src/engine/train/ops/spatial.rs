//! Convolution and pooling over 2-D windows (1-D convolutions run as 2-D ones).
use super::attrs::{attr_i, attr_ints, attr_s};
use super::channel::channel_add;
use crate::engine::onnx::proto::NodeProto;
use candle_core::{bail, DType, Result, Tensor};

/// Pads dims 2 and 3 with `value` (top, left, bottom, right).
pub(super) fn pad2d(x: &Tensor, pads: [usize; 4], value: f32) -> Result<Tensor> {
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
pub(super) struct Window {
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: [usize; 4],
}

/// 1-D attributes (one stride, two pads) describe the width of a height-1 window.
pub(super) fn window(n: &NodeProto, kernel: [usize; 2], hw: [usize; 2]) -> Result<Window> {
    let two = |name: &str| -> Result<[usize; 2]> {
        match attr_ints(n, name).as_deref() {
            None | Some([]) => Ok([1, 1]),
            Some([a]) => Ok([1, *a as usize]),
            Some([a, b]) => Ok([*a as usize, *b as usize]),
            Some(v) => bail!("`{name}` {v:?} is not 2-D"),
        }
    };
    let (strides, dilations) = (two("strides")?, two("dilations")?);
    let mut pads = match attr_ints(n, "pads").as_deref() {
        None | Some([]) => [0; 4],
        Some([t, l, b, r]) => [*t as usize, *l as usize, *b as usize, *r as usize],
        Some([l, r]) => [0, *l as usize, 0, *r as usize],
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

pub(super) fn conv(n: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
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
        // Height 1, kernel height 1, no height padding: any height stride or dilation gives
        // height 1, so the width's serve both axes.
        (win.strides[0], win.dilations[0]) = (win.strides[1], win.dilations[1]);
    }
    if win.dilations[0] != win.dilations[1] {
        bail!("Conv with different dilations per axis is not supported for training")
    }
    // candle strides both axes alike: convolve at the strides' common divisor, then keep every
    // (stride / divisor)-th row and column (text recognisers halve the height alone, stride 2x1).
    let common = gcd(win.strides[0], win.strides[1]);
    let p = win.pads;
    let (x, padding) = if p[0] == p[1] && p[1] == p[2] && p[2] == p[3] {
        (x, p[0])
    } else {
        (pad2d(&x, p, 0.0)?, 0)
    };
    let groups = attr_i(n, "group", 1) as usize;
    let c_in = x.dim(1)?;
    let mut y = if groups > 1 && groups == c_in && w.dim(0)? == c_in && w.dim(1)? == 1 {
        depthwise(&x, &w, padding, &win)?
    } else {
        let mut y = x.conv2d(&w.contiguous()?, padding, common, win.dilations[0], groups)?;
        for (axis, stride) in [(2, win.strides[0]), (3, win.strides[1])] {
            y = every(&y, axis, stride / common)?;
        }
        y
    };
    if let Some(b) = b {
        y = channel_add(&y, b)?;
    }
    if one_d {
        y = y.squeeze(2)?;
    }
    Ok(y)
}

/// A depthwise convolution (one kernel per channel) computed directly, forward and backward:
/// candle runs a grouped convolution as one convolution per group, which for MobileNet's
/// depthwise layers is hundreds of tiny convolutions (and as many in the backward pass).
fn depthwise(x: &Tensor, w: &Tensor, padding: usize, win: &Window) -> Result<Tensor> {
    let x = pad2d(x, [padding; 4], 0.0)?;
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let d = win.dilations[0];
    let span = |k: usize| (k - 1) * d + 1;
    if h < span(kh) || wd < span(kw) {
        bail!("the convolution kernel is larger than the padded input")
    }
    let op = Depthwise {
        strides: win.strides,
        dilation: d,
        out: [
            (h - span(kh)) / win.strides[0] + 1,
            (wd - span(kw)) / win.strides[1] + 1,
        ],
    };
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2(&w.to_dtype(DType::F32)?.contiguous()?, op)
}

/// Depthwise convolution of a padded `[N, C, H, W]` input by `[C, 1, kh, kw]` kernels.
#[derive(Clone, Copy)]
struct Depthwise {
    strides: [usize; 2],
    dilation: usize,
    out: [usize; 2],
}

impl Depthwise {
    /// Calls `f(input row, output row, kernel index)` for every kernel position and output row:
    /// the row's `out[1]` outputs read the input row at a stride of `strides[1]`.
    fn rows(&self, x: &[usize], k: &[usize], mut f: impl FnMut(usize, usize, usize)) {
        let (n, c, h, w) = (x[0], x[1], x[2], x[3]);
        let (kh, kw) = (k[2], k[3]);
        let [oh, ow] = self.out;
        let sh = self.strides[0];
        let d = self.dilation;
        for plane in 0..n * c {
            let ch = plane % c;
            let (xi, yo) = (plane * h * w, plane * oh * ow);
            for i in 0..kh {
                for j in 0..kw {
                    let ki = (ch * kh + i) * kw + j;
                    for r in 0..oh {
                        f(xi + (r * sh + i * d) * w + j * d, yo + r * ow, ki);
                    }
                }
            }
        }
    }
}

impl candle_core::CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::contiguous_f32(s1, l1, self.name())?;
        let k = super::contiguous_f32(s2, l2, self.name())?;
        let (xd, kd) = (l1.shape().dims(), l2.shape().dims());
        let mut y = vec![0f32; xd[0] * xd[1] * self.out[0] * self.out[1]];
        let (ow, sw) = (self.out[1], self.strides[1]);
        self.rows(xd, kd, |xi, yi, ki| {
            let kv = k[ki];
            let src = x[xi..].iter().step_by(sw);
            for (y, x) in y[yi..yi + ow].iter_mut().zip(src) {
                *y += x * kv;
            }
        });
        let shape = candle_core::Shape::from((xd[0], xd[1], self.out[0], self.out[1]));
        Ok((candle_core::CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, kv) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            k.flatten_all()?.to_vec1::<f32>()?,
        );
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (mut dx, mut dk) = (vec![0f32; xv.len()], vec![0f32; kv.len()]);
        let (ow, sw) = (self.out[1], self.strides[1]);
        self.rows(x.dims(), k.dims(), |xi, yi, ki| {
            let (kval, g) = (kv[ki], &g[yi..yi + ow]);
            let mut sum = 0f32;
            for (g, (dx, x)) in g.iter().zip(
                dx[xi..]
                    .iter_mut()
                    .step_by(sw)
                    .zip(xv[xi..].iter().step_by(sw)),
            ) {
                *dx += g * kval;
                sum += g * x;
            }
            dk[ki] += sum;
        });
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
        ))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// Every `step`-th entry of `axis`, from the first (`index_select` has a backward pass).
fn every(x: &Tensor, axis: usize, step: usize) -> Result<Tensor> {
    if step <= 1 {
        return Ok(x.clone());
    }
    let len = x.dim(axis)?;
    let keep: Vec<u32> = (0..len).step_by(step).map(|i| i as u32).collect();
    let n = keep.len();
    x.index_select(&Tensor::from_vec(keep, n, x.device())?, axis)
}

/// Max and average pooling of any kernel, stride and padding: the window's k x k strided views
/// taken with `index_select` (which has a backward pass) and reduced elementwise.
pub(super) fn pool(n: &NodeProto, x: &Tensor, max: bool) -> Result<Tensor> {
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
