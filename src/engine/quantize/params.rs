//! Quantization arithmetic: scales and zero points from ranges, and float -> integer conversion.
//! Rounding is half-to-even, as ONNX Runtime's QuantizeLinear does.

/// Integer type of quantized activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationType {
    /// Asymmetric uint8 (zero point anywhere in 0..=255): ORT's default for activations.
    Uint8,
    /// Symmetric int8 (zero point 0).
    Int8,
}

/// Scale and zero point of one tensor or one channel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

/// Parameters for activations observed in `[min, max]`; the range always includes 0 so that
/// zero (padding, ReLU outputs) is represented exactly. `symmetric` centres uint8 on 128.
pub fn activation_params(min: f32, max: f32, ty: ActivationType, symmetric: bool) -> QParams {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    match ty {
        ActivationType::Uint8 if symmetric => {
            let m = lo.abs().max(hi.abs());
            QParams {
                scale: if m > 0.0 { m / 127.0 } else { 1.0 },
                zero_point: 128,
            }
        }
        ActivationType::Uint8 => {
            let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let zero_point = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
            QParams { scale, zero_point }
        }
        ActivationType::Int8 => {
            let m = lo.abs().max(hi.abs());
            QParams {
                scale: if m > 0.0 { m / 127.0 } else { 1.0 },
                zero_point: 0,
            }
        }
    }
}

/// Symmetric int8 weights in [-127, 127] (the value -128 is left unused so that negation is exact).
pub fn weight_scale(values: impl Iterator<Item = f32>) -> f32 {
    let m = values.fold(0.0f32, |m, v| m.max(v.abs()));
    if m > 0.0 {
        m / 127.0
    } else {
        1.0
    }
}

pub fn quantize(x: f32, p: QParams, lo: i32, hi: i32) -> i32 {
    ((x / p.scale).round_ties_even() as i32 + p.zero_point).clamp(lo, hi)
}

/// Per-channel symmetric int8 quantization along `axis` of a tensor with `shape`.
/// Returns one scale per channel and the quantized values in the same layout.
pub fn quantize_weights_per_channel(
    values: &[f32],
    shape: &[usize],
    axis: usize,
) -> (Vec<f32>, Vec<i8>) {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let channel_of = |i: usize| (i / inner) % channels;
    let mut max_abs = vec![0.0f32; channels];
    for (i, v) in values.iter().enumerate() {
        let c = channel_of(i);
        max_abs[c] = max_abs[c].max(v.abs());
    }
    let scales: Vec<f32> = max_abs
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            quantize(
                v,
                QParams {
                    scale: scales[channel_of(i)],
                    zero_point: 0,
                },
                -127,
                127,
            ) as i8
        })
        .collect();
    (scales, q)
}

/// Per-tensor symmetric int8 quantization.
pub fn quantize_weights_per_tensor(values: &[f32]) -> (f32, Vec<i8>) {
    let scale = weight_scale(values.iter().copied());
    let q = values
        .iter()
        .map(|&v| {
            quantize(
                v,
                QParams {
                    scale,
                    zero_point: 0,
                },
                -127,
                127,
            ) as i8
        })
        .collect();
    (scale, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_like_onnx_runtime() {
        let p = QParams {
            scale: 1.0,
            zero_point: 0,
        };
        assert_eq!(
            (
                quantize(0.5, p, -127, 127),
                quantize(1.5, p, -127, 127),
                quantize(-2.5, p, -127, 127)
            ),
            (0, 2, -2)
        );
    }

    #[test]
    fn zero_is_exactly_representable_for_activations() {
        for (lo, hi) in [(-1.3f32, 4.7f32), (0.2, 3.0), (-5.0, -0.5)] {
            let p = activation_params(lo, hi, ActivationType::Uint8, false);
            let q = quantize(0.0, p, 0, 255);
            assert_eq!((q - p.zero_point) as f32 * p.scale, 0.0);
        }
    }

    #[test]
    fn per_channel_round_trip_error_is_within_half_a_step_of_each_channel() {
        let shape = [3usize, 4];
        let values: Vec<f32> = (0..12)
            .map(|i| (i as f32 - 5.5) * [0.01, 1.0, 100.0][i / 4])
            .collect();
        let (scales, q) = quantize_weights_per_channel(&values, &shape, 0);
        for (i, (&v, &qi)) in values.iter().zip(&q).enumerate() {
            let s = scales[i / 4];
            assert!(
                (v - qi as f32 * s).abs() <= s / 2.0 + 1e-6,
                "value {v} came back as {}",
                qi as f32 * s
            );
        }
        // Along axis 1 every column gets its own scale.
        let (scales, _) = quantize_weights_per_channel(&values, &shape, 1);
        assert_eq!(scales.len(), 4);
    }

    #[test]
    fn an_all_zero_channel_gets_a_usable_scale() {
        let (scales, q) = quantize_weights_per_channel(&[0.0, 0.0, 1.0, -1.0], &[2, 2], 0);
        assert_eq!((scales[0], q[0], q[2], q[3]), (1.0, 0, 127, -127));
    }
}
