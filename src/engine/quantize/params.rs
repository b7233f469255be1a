//! Quantization arithmetic: scales and zero points from ranges, and float -> integer conversion.
//! Rounding is half-to-even, as ONNX Runtime's QuantizeLinear does.

pub use crate::domain::quantize::ActivationType;

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

/// Rounds half to even without a libm call (x86-64 without SSE4.1 has no rounding instruction,
/// and LLVM would call `rintf` for every weight): adding 1.5 * 2^52 in f64 leaves the nearest
/// integer (ties to even, the default rounding mode) in the low mantissa bits. Exact for every
/// f32 in i32 range; larger values saturate. Branch-free, so the weight loops vectorize.
#[inline(always)]
pub fn round_even(x: f32) -> i32 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let x = (x as f64).clamp(i32::MIN as f64, i32::MAX as f64);
    ((x + MAGIC).to_bits() as i64 - MAGIC.to_bits() as i64) as i32
}

pub fn quantize(x: f32, p: QParams, lo: i32, hi: i32) -> i32 {
    (round_even(x / p.scale) + p.zero_point).clamp(lo, hi)
}

/// Symmetric int8 of `x` with `scale`, clamped to [-127, 127].
#[inline(always)]
fn to_i8(x: f32, scale: f32) -> i8 {
    round_even((x / scale).clamp(-127.0, 127.0)) as i8
}

/// |x| as bits: for non-NaN floats the order of these integers is the order of |x|, and integer
/// max reductions vectorize where float ones do not.
#[inline(always)]
fn abs_bits(x: impl F32) -> u32 {
    x.get().to_bits() & 0x7fff_ffff
}

/// A float32 weight as stored: an `f32`, or its 4 little-endian bytes straight from the model
/// file (most initializers sit at unaligned offsets, and reading them in place saves a copy of
/// every weight; unaligned vector loads cost nothing extra on x86-64).
pub trait F32: Copy + Send + Sync {
    fn get(self) -> f32;
}

impl F32 for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

impl F32 for [u8; 4] {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_le_bytes(self)
    }
}

/// The largest |value| of each channel along `axis`, walking the tensor as [outer, channels,
/// inner] blocks so the loops stay linear (no division per element) and vectorize.
pub fn channel_max_abs<T: F32>(values: &[T], shape: &[usize], axis: usize) -> Vec<f32> {
    let channels = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product::<usize>().max(1);
    let mut max_bits = vec![0u32; channels];
    if inner == 1 {
        // Channels along the last axis (MatMul weights [K, N]): row by row, element-wise.
        for row in values.chunks(channels) {
            for (m, v) in max_bits.iter_mut().zip(row) {
                *m = (*m).max(abs_bits(*v));
            }
        }
    } else {
        for chunk in values.chunks(channels * inner) {
            for (c, row) in chunk.chunks(inner).enumerate() {
                let m = row.iter().fold(0u32, |m, v| m.max(abs_bits(*v)));
                max_bits[c] = max_bits[c].max(m);
            }
        }
    }
    max_bits.into_iter().map(f32::from_bits).collect()
}

/// Per-channel symmetric int8 quantization along `axis` of a tensor with `shape`.
/// Returns one scale per channel and the quantized values in the same layout.
pub fn quantize_weights_per_channel<T: F32>(
    values: &[T],
    shape: &[usize],
    axis: usize,
) -> (Vec<f32>, Vec<i8>) {
    let max_abs = channel_max_abs(values, shape, axis);
    with_channel_max(values, shape, axis, &max_abs)
}

/// Smallest normal float16.
pub const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// How much finer than the layer's coarsest step a channel's step may get: channels whose
/// largest |weight| is under 2^-12 of the layer's largest (dead neurons) share this floor, so
/// their step stays in proportion to the layer's (and their int32 bias scale far from underflow).
pub const DEAD_CHANNEL_RATIO: f32 = 1.0 / 4096.0;

/// The scale of one channel whose largest |weight| is `max_abs`, in a layer whose largest is
/// `layer_max`: max_abs / 127, at least `layer_max / 127 * DEAD_CHANNEL_RATIO`, rounded to the
/// nearest float16 value when it is a normal float16 (then the scales store in half the bytes
/// without changing a weight; the rounding moves the scale by at most 2^-11 of itself, so the
/// largest weight may clamp by under 0.07 of a step). Scales outside float16's normal range stay
/// float32: a layer whose BatchNorm folded in a factor of 1e-4 has weights of 1e-4 and steps of
/// 1e-6, which a float16 floor would have made 2-bit.
pub fn channel_scale(max_abs: f32, layer_max: f32) -> f32 {
    if layer_max.is_nan() || layer_max <= 0.0 {
        return 1.0;
    }
    let exact = (max_abs.max(0.0) / 127.0).max(layer_max / 127.0 * DEAD_CHANNEL_RATIO);
    as_f16_when_normal(exact)
}

/// `scale` rounded to the nearest float16 value when it is within float16's normal range.
fn as_f16_when_normal(scale: f32) -> f32 {
    if (F16_MIN_NORMAL..=half::f16::MAX.to_f32()).contains(&scale) {
        half::f16::from_f32(scale).to_f32()
    } else {
        scale
    }
}

/// Per-channel quantization from channel maxima already computed.
fn with_channel_max<T: F32>(
    values: &[T],
    shape: &[usize],
    axis: usize,
    max_abs: &[f32],
) -> (Vec<f32>, Vec<i8>) {
    let inner: usize = shape[axis + 1..].iter().product::<usize>().max(1);
    let block = max_abs.len() * inner;
    let layer_max = max_abs.iter().copied().fold(0.0f32, f32::max);
    let scales: Vec<f32> = max_abs
        .iter()
        .map(|&m| channel_scale(m, layer_max))
        .collect();
    let mut q = vec![0i8; values.len()];
    if inner == 1 {
        for (row, out) in values.chunks(block).zip(q.chunks_mut(block)) {
            for ((o, &v), &s) in out.iter_mut().zip(row).zip(&scales) {
                *o = to_i8(v.get(), s);
            }
        }
        return (scales, q);
    }
    for (chunk, out) in values.chunks(block).zip(q.chunks_mut(block)) {
        for ((row, out), &s) in chunk.chunks(inner).zip(out.chunks_mut(inner)).zip(&scales) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o = to_i8(v.get(), s);
            }
        }
    }
    (scales, q)
}

/// Symmetric int8 weights and their scales.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeights {
    /// One scale, or one per channel.
    pub scales: Vec<f32>,
    pub values: Vec<i8>,
    pub per_channel: bool,
}

impl QuantizedWeights {
    /// The float values DequantizeLinear gives back (`shape` and `axis` as quantized).
    pub fn dequantize(&self, shape: &[usize], axis: usize) -> Vec<f32> {
        if !self.per_channel {
            return self
                .values
                .iter()
                .map(|&q| q as f32 * self.scales[0])
                .collect();
        }
        let inner: usize = shape[axis + 1..].iter().product::<usize>().max(1);
        let channels = self.scales.len();
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.scales[(i / inner) % channels])
            .collect()
    }
}

/// Quantizes weights per channel along `axis` when `per_channel` asks for it, except when `auto`
/// finds the channels' ranges close (then one scale serves, see [`per_tensor_is_enough`]); else
/// per tensor. The channel maxima are computed once for both the choice and the scales.
pub fn quantize_weights<T: F32>(
    values: &[T],
    shape: &[usize],
    axis: usize,
    per_channel: bool,
    auto: bool,
) -> QuantizedWeights {
    if !per_channel {
        let (scale, values) = quantize_weights_per_tensor(values);
        return QuantizedWeights {
            scales: vec![scale],
            values,
            per_channel: false,
        };
    }
    let max_abs = channel_max_abs(values, shape, axis);
    if auto && ranges_are_close(&max_abs) {
        let m = max_abs.iter().copied().fold(0.0f32, f32::max);
        let scale = if m > 0.0 { m / 127.0 } else { 1.0 };
        return QuantizedWeights {
            scales: vec![scale],
            values: values.iter().map(|&v| to_i8(v.get(), scale)).collect(),
            per_channel: false,
        };
    }
    let (scales, values) = with_channel_max(values, shape, axis, &max_abs);
    QuantizedWeights {
        scales,
        values,
        per_channel: true,
    }
}

/// Whether ONNX Runtime's uint8 x int8 kernels on this CPU add pairs of products in saturating
/// 16-bit arithmetic (x86-64 with AVX2 but without VNNI: `vpmaddubsw`), where 255 x 127 x 2
/// overflows; 7-bit weights (ONNX Runtime's `reduce_range`) keep every pair sum in range.
pub fn u8s8_saturates() -> bool {
    // Asked per quantized layer; the CPU does not change, so it is read once.
    static SATURATES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SATURATES.get_or_init(|| {
        cfg!(target_arch = "x86_64")
            && !std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
                c.lines().find(|l| l.starts_with("flags")).is_some_and(|l| {
                    l.split_whitespace()
                        .any(|f| f == "avx512_vnni" || f == "avx_vnni")
                })
            })
    })
}

/// [`quantize_weights`], in 7 bits ([`reduce_range`]) when `seven_bits`.
pub fn quantize_weights_bits<T: F32>(
    values: &[T],
    shape: &[usize],
    axis: usize,
    per_channel: bool,
    auto: bool,
    seven_bits: bool,
) -> QuantizedWeights {
    let q = quantize_weights(values, shape, axis, per_channel, auto);
    if seven_bits {
        reduce_range(q, values, shape, axis)
    } else {
        q
    }
}

/// The same weights in 7 bits ([-63, 63]): scales 127/63 times coarser (float16 values when
/// per channel and normal, as [`channel_scale`] keeps them), values requantized from the floats.
pub fn reduce_range<T: F32>(
    q: QuantizedWeights,
    values: &[T],
    shape: &[usize],
    axis: usize,
) -> QuantizedWeights {
    let inner: usize = shape[axis + 1..].iter().product::<usize>().max(1);
    let n = shape[axis];
    let scales: Vec<f32> = q
        .scales
        .iter()
        .map(|s| {
            let wide = s * 127.0 / 63.0;
            if q.per_channel {
                as_f16_when_normal(wide)
            } else {
                wide
            }
        })
        .collect();
    let values = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = if q.per_channel {
                scales[(i / inner) % n]
            } else {
                scales[0]
            };
            round_even((v.get() / s).clamp(-63.0, 63.0)) as i8
        })
        .collect();
    QuantizedWeights {
        scales,
        values,
        per_channel: q.per_channel,
    }
}

/// Extra rounding noise tolerated for one scale per tensor instead of one per channel.
pub const PER_TENSOR_NOISE_RATIO: f32 = 1.25;

/// Whether one scale for the whole tensor adds little rounding noise over one per channel along
/// `axis` (the noise of a symmetric int8 step grows with the square of its scale), so the
/// per-channel scales would only cost bytes.
pub fn per_tensor_is_enough<T: F32>(values: &[T], shape: &[usize], axis: usize) -> bool {
    ranges_are_close(&channel_max_abs(values, shape, axis))
}

fn ranges_are_close(max_abs: &[f32]) -> bool {
    let all = max_abs.iter().copied().fold(0.0f32, f32::max);
    let mean_sq = max_abs.iter().map(|m| m * m).sum::<f32>() / max_abs.len().max(1) as f32;
    mean_sq > 0.0 && all * all <= PER_TENSOR_NOISE_RATIO * mean_sq
}

/// Per-tensor symmetric int8 quantization.
pub fn quantize_weights_per_tensor<T: F32>(values: &[T]) -> (f32, Vec<i8>) {
    let scale = weight_scale(values.iter().map(|v| v.get()));
    (
        scale,
        values.iter().map(|&v| to_i8(v.get(), scale)).collect(),
    )
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
    fn fast_rounding_equals_round_ties_even() {
        for i in -40_000..40_000 {
            let x = i as f32 / 8.0 + [0.0, 1e-3, -1e-3][(i as usize) % 3];
            assert_eq!(round_even(x), x.round_ties_even() as i32, "{x}");
        }
        for x in [1e7f32, -3e8, 4_194_304.5, 8_388_607.0, 2_500_000.5, 3.5e9] {
            assert_eq!(round_even(x), x.round_ties_even() as i32, "{x}");
        }
        assert_eq!(round_even(f32::NEG_INFINITY), i32::MIN);
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
    fn channel_scales_are_float16_values_within_half_a_step() {
        for m in [1e-2f32, 0.0123, 0.5, 1.0, 3.3, 1000.0, 7e6] {
            let s = channel_scale(m, m);
            let exact = m / 127.0;
            assert!((s - exact).abs() <= exact / 2048.0, "{m}: {s} vs {exact}");
            if exact <= 65504.0 {
                assert_eq!(half::f16::from_f32(s).to_f32(), s, "{m}: {s} is no float16");
            }
        }
        // A dead channel's tiny weights get a step 4096 times finer than the layer's largest,
        // never 0.
        assert_eq!(channel_scale(1e-9, 1.0), 1.0 / 127.0 / 4096.0);
        assert_eq!(channel_scale(0.0, 1.0), 1.0 / 127.0 / 4096.0);
    }

    #[test]
    fn weights_smaller_than_float16_steps_keep_their_own_scale() {
        // PP-OCRv4 det's head Conv after folding its BatchNorm (factor ~1e-4): channel maxima of
        // 6e-5..2.4e-4, steps below float16's smallest normal. A float16 floor made them 2-bit
        // weights and cost the detector half its mask IoU.
        let values: Vec<f32> = (0..64)
            .map(|i| (i as f32 - 31.5) / 31.5 * [2.4e-4, 6.1e-5][i / 32])
            .collect();
        let (scales, q) = quantize_weights_per_channel(&values, &[2, 32], 0);
        assert!((scales[0] - 2.4e-4 / 127.0).abs() < 1e-12, "{scales:?}");
        assert!((scales[1] - 6.1e-5 / 127.0).abs() < 1e-12, "{scales:?}");
        let back = QuantizedWeights {
            scales,
            values: q,
            per_channel: true,
        }
        .dequantize(&[2, 32], 0);
        for (i, (v, b)) in values.iter().zip(&back).enumerate() {
            let half_step = [2.4e-4f32, 6.1e-5][i / 32] / 127.0 / 2.0;
            assert!((v - b).abs() <= half_step * 1.001, "{v} -> {b}");
        }
        let seven = quantize_weights_bits(&values, &[2, 32], 0, true, false, true);
        assert!(
            (seven.scales[1] - 6.1e-5 / 63.0).abs() < 1e-12,
            "{:?}",
            seven.scales
        );
    }

    #[test]
    fn an_all_zero_channel_gets_a_usable_scale() {
        let (scales, q) = quantize_weights_per_channel(&[0.0, 0.0, 1.0, -1.0], &[2, 2], 0);
        assert_eq!(
            (scales[0], q[0], q[2], q[3]),
            (1.0 / 127.0 / 4096.0, 0, 127, -127)
        );
        let (scales, q) = quantize_weights_per_channel(&[0.0, 0.0, 0.0, 0.0], &[2, 2], 0);
        assert_eq!((scales, q), (vec![1.0, 1.0], vec![0; 4]));
    }

    #[test]
    fn per_tensor_is_enough_only_when_channels_have_similar_ranges() {
        // Three channels of four weights whose largest magnitudes are 1.0, 0.95 and 0.9.
        let even: Vec<f32> = (0..12)
            .map(|i| [1.0, -0.9, 0.5, -0.2][i % 4] * [1.0, 0.95, 0.9][i / 4])
            .collect();
        assert!(per_tensor_is_enough(&even, &[3, 4], 0));
        let outlier: Vec<f32> = (0..12).map(|i| if i < 4 { 50.0 } else { 0.5 }).collect();
        assert!(!per_tensor_is_enough(&outlier, &[3, 4], 0));
    }
}
