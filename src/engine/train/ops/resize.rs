//! Resampling for decoders: Resize and Upsample (nearest and linear, every coordinate mode ONNX
//! Runtime implements for them) and ConvTranspose.
//!
//! Resize of the last two axes is `M_h · x · M_wᵀ` with constant interpolation matrices, so its
//! gradient is two matrix products for any scale, integer or not.
use super::super::tensors::to_f32s;
use super::attrs::{attr, attr_i, attr_ints, attr_s, input, optional};
use crate::engine::onnx::proto::NodeProto;
use candle_core::{bail, Result, Tensor};

/// How an output coordinate maps back to the input (ONNX `coordinate_transformation_mode`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Coordinates {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Nearest(Nearest),
    Linear,
}

/// The interpolation matrix `[out, in]` of one axis.
fn matrix(input: usize, output: usize, scale: f64, mode: Mode, coords: Coordinates) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    let last = (input - 1) as f64;
    for o in 0..output {
        let x = o as f64;
        let src = match coords {
            Coordinates::HalfPixel => (x + 0.5) / scale - 0.5,
            Coordinates::PytorchHalfPixel if output > 1 => (x + 0.5) / scale - 0.5,
            Coordinates::PytorchHalfPixel => 0.0,
            Coordinates::AlignCorners if output > 1 => x * last / (output - 1) as f64,
            Coordinates::AlignCorners => 0.0,
            Coordinates::Asymmetric => x / scale,
        };
        match mode {
            Mode::Nearest(rule) => {
                let frac = src - src.floor();
                let i = match rule {
                    Nearest::Floor => src.floor(),
                    Nearest::Ceil => src.ceil(),
                    Nearest::RoundPreferFloor if frac == 0.5 => src.floor(),
                    Nearest::RoundPreferCeil if frac == 0.5 => src.ceil(),
                    _ => src.round(),
                };
                let i = i.clamp(0.0, last) as usize;
                m[o * input + i] = 1.0;
            }
            Mode::Linear => {
                let s = src.clamp(0.0, last);
                let i0 = s.floor() as usize;
                let i1 = (i0 + 1).min(input - 1);
                let w1 = (s - i0 as f64) as f32;
                m[o * input + i0] += 1.0 - w1;
                m[o * input + i1] += w1;
            }
        }
    }
    m
}

/// Resizes the last two axes of `x` to `out` with the given per-axis `scales`.
fn resample(
    x: &Tensor,
    out: [usize; 2],
    scales: [f64; 2],
    mode: Mode,
    coords: Coordinates,
) -> Result<Tensor> {
    let rank = x.rank();
    let (h, w) = (x.dims()[rank - 2], x.dims()[rank - 1]);
    if h == 0 || w == 0 || out[0] == 0 || out[1] == 0 {
        bail!("Resize of an empty axis");
    }
    let mh = Tensor::from_vec(
        matrix(h, out[0], scales[0], mode, coords),
        (out[0], h),
        x.device(),
    )?
    .to_dtype(x.dtype())?;
    let mw = Tensor::from_vec(
        matrix(w, out[1], scales[1], mode, coords),
        (out[1], w),
        x.device(),
    )?
    .to_dtype(x.dtype())?;
    // [.., H, W] x [W, W'] -> [.., H, W'], then [H', H] x [.., H, W'] -> [.., H', W'].
    let along_w = x.contiguous()?.broadcast_matmul(&mw.t()?)?;
    mh.broadcast_left(x.dims()[..rank - 2].to_vec())?
        .contiguous()?
        .matmul(&along_w.contiguous()?)
}

fn mode_of(n: &NodeProto, legacy: bool) -> Result<Mode> {
    let mode = attr_s(n, "mode").unwrap_or_else(|| "nearest".into());
    Ok(match mode.as_str() {
        "nearest" if legacy => Mode::Nearest(Nearest::Floor),
        "nearest" => Mode::Nearest(
            match attr_s(n, "nearest_mode")
                .as_deref()
                .unwrap_or("round_prefer_floor")
            {
                "round_prefer_floor" => Nearest::RoundPreferFloor,
                "round_prefer_ceil" => Nearest::RoundPreferCeil,
                "floor" => Nearest::Floor,
                "ceil" => Nearest::Ceil,
                other => bail!("Resize nearest_mode `{other}` is not supported for training"),
            },
        ),
        "linear" | "bilinear" => Mode::Linear,
        other => {
            bail!("Resize mode `{other}` is not supported for training (nearest and linear are)")
        }
    })
}

/// ONNX Resize (opset 10+) and Upsample (opset 7-9) over the last two axes.
pub(super) fn resize(n: &NodeProto, inputs: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let op = n.op_type.as_deref().unwrap_or_default();
    let x = input(inputs, 0)?;
    let rank = x.rank();
    if rank < 2 {
        bail!("{op} of a rank-{rank} tensor");
    }
    // Opset 10 Resize and Upsample: (X, scales), asymmetric coordinates, nearest floors.
    let legacy = op == "Upsample" || opset < 11;
    let scales_at = if legacy { 1 } else { 2 };
    let scales: Option<Vec<f32>> = if op == "Upsample" && optional(inputs, 1).is_none() {
        // Opset 7 Upsample: `scales` is an attribute.
        attr(n, "scales").map(|a| a.floats.clone())
    } else {
        match optional(inputs, scales_at) {
            Some(t) if t.elem_count() > 0 => Some(to_f32s(t)?),
            _ => None,
        }
    };
    let sizes = if legacy {
        None
    } else {
        match optional(inputs, 3) {
            Some(t) if t.elem_count() > 0 => Some(super::super::tensors::to_i64s(t)?),
            _ => None,
        }
    };
    if attr_ints(n, "axes").is_some_and(|a| !a.is_empty()) {
        bail!("Resize with `axes` is not supported for training");
    }
    if attr_i(n, "antialias", 0) != 0 {
        bail!("Resize with antialias is not supported for training");
    }
    let dims = x.dims();
    let (out, scale) = match (sizes, scales) {
        (Some(s), _) if s.len() == rank => {
            let out: Vec<usize> = s.iter().map(|&v| v as usize).collect();
            let scale: Vec<f64> = out
                .iter()
                .zip(dims)
                .map(|(&o, &i)| o as f64 / i as f64)
                .collect();
            (out, scale)
        }
        (_, Some(s)) if s.len() == rank => {
            let out: Vec<usize> = s
                .iter()
                .zip(dims)
                .map(|(&f, &i)| (i as f64 * f as f64).floor() as usize)
                .collect();
            (out, s.iter().map(|&v| v as f64).collect())
        }
        _ => {
            bail!("{op} needs `scales` or `sizes` with one entry per axis of its rank-{rank} input")
        }
    };
    if out[..rank - 2] != dims[..rank - 2] {
        bail!("{op} of any but the last two axes is not supported for training");
    }
    let coords = if legacy {
        Coordinates::Asymmetric
    } else {
        match attr_s(n, "coordinate_transformation_mode")
            .as_deref()
            .unwrap_or("half_pixel")
        {
            "half_pixel" => Coordinates::HalfPixel,
            "pytorch_half_pixel" => Coordinates::PytorchHalfPixel,
            "align_corners" => Coordinates::AlignCorners,
            "asymmetric" => Coordinates::Asymmetric,
            other => bail!(
                "Resize coordinate_transformation_mode `{other}` is not supported for training"
            ),
        }
    };
    resample(
        x,
        [out[rank - 2], out[rank - 1]],
        [scale[rank - 2], scale[rank - 1]],
        mode_of(n, legacy)?,
        coords,
    )
}

/// ONNX ConvTranspose (2-D, one group): candle's transposed convolution without padding, then
/// ONNX's `pads` cropped and `output_padding` added at the end of each axis.
pub(super) fn conv_transpose(
    n: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    if x.rank() != 4 {
        bail!("ConvTranspose is supported for training in 2-D only");
    }
    if attr_i(n, "group", 1) != 1 {
        bail!("grouped ConvTranspose is not supported for training");
    }
    if attr_ints(n, "output_shape").is_some_and(|v| !v.is_empty()) {
        bail!("ConvTranspose with `output_shape` is not supported for training; give `pads`");
    }
    if attr_s(n, "auto_pad").is_some_and(|p| p != "NOTSET") {
        bail!("ConvTranspose with auto_pad is not supported for training; give `pads`");
    }
    let two = |name: &str, default: usize| -> Result<[usize; 2]> {
        match attr_ints(n, name).as_deref() {
            None | Some([]) => Ok([default; 2]),
            Some([a, b]) => Ok([*a as usize, *b as usize]),
            Some(v) => bail!("ConvTranspose `{name}` {v:?} is not 2-D"),
        }
    };
    let (strides, dilations, extra) = (
        two("strides", 1)?,
        two("dilations", 1)?,
        two("output_padding", 0)?,
    );
    if strides[0] != strides[1] || dilations[0] != dilations[1] {
        bail!("ConvTranspose with different strides or dilations per axis is not supported for training");
    }
    let pads = match attr_ints(n, "pads").as_deref() {
        None | Some([]) => [0; 4],
        Some([t, l, b, r]) => [*t as usize, *l as usize, *b as usize, *r as usize],
        Some(v) => bail!("ConvTranspose `pads` {v:?} is not 2-D"),
    };
    let full = x.conv_transpose2d(&w.contiguous()?, 0, 0, strides[0], dilations[0])?;
    let (_, _, fh, fw) = full.dims4()?;
    let full = full
        .pad_with_zeros(2, 0, extra[0])?
        .pad_with_zeros(3, 0, extra[1])?;
    let (oh, ow) = (
        (fh + extra[0]).checked_sub(pads[0] + pads[2]),
        (fw + extra[1]).checked_sub(pads[1] + pads[3]),
    );
    let (Some(oh), Some(ow)) = (oh, ow) else {
        bail!("ConvTranspose pads {pads:?} exceed its output");
    };
    let y = full.narrow(2, pads[0], oh)?.narrow(3, pads[1], ow)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}
