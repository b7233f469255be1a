//! Options of the `quantize` stage.
use super::training::Recovery;
use super::validation::{Checker, Validate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Operators quantized by default: the ones with integer kernels that make models faster.
pub const DEFAULT_OP_TYPES: &[&str] = &["Conv", "MatMul", "Gemm"];
/// Operators that can be named in `op_types` (Gather: embedding tables, int8 rows).
pub const QUANTIZABLE_OP_TYPES: &[&str] = &["Conv", "MatMul", "Gemm", "Gather"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantizeMode {
    /// `static` for graphs with convolutions (ONNX Runtime runs dynamic int8 convolutions several
    /// times slower), `dynamic` otherwise.
    #[default]
    Auto,
    /// int8 weights and activations in QDQ form, activations calibrated beforehand.
    Static,
    /// int8 weights; activations quantized at run time (DynamicQuantizeLinear + MatMulInteger).
    Dynamic,
    /// Only weights are quantized (int8 behind DequantizeLinear, or int4 blocks in MatMulNBits).
    WeightOnly,
    /// Half-precision weights and activations.
    Fp16,
    /// Quantization-aware training: static int8 QDQ whose weights were trained on
    /// `train_dataset_id` with every quantized tensor fake-quantized (see `qat`).
    Qat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Per channel, except layers whose channels have similar ranges, where one scale per tensor
    /// adds little rounding noise and saves the per-channel scales.
    #[default]
    Auto,
    /// One weight scale per output channel (more accurate; needs opset 13, upgraded when older).
    PerChannel,
    PerTensor,
}

/// How static int8 weights are rounded to their integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightRounding {
    /// GPTQ: each layer's weights rounded one input after another, the weights not yet rounded
    /// moved to cancel the error on the calibration rows' inputs, each layer fitted to the float
    /// output from the input it reads with the earlier layers int8. Same scales as nearest
    /// rounding. With an accuracy budget it is measured for the float layers the budget chose and
    /// kept when that model scores no worse.
    #[default]
    Gptq,
    /// Each weight to its nearest integer step.
    Nearest,
}

/// Integer type of quantized activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivationType {
    /// Asymmetric uint8 (zero point anywhere in 0..=255): ORT's default for activations.
    #[default]
    Uint8,
    /// Symmetric int8 (zero point 0).
    Int8,
}

/// How activations are calibrated (the engine turns it into range methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// Min/max, percentile, entropy and MSE ranges from one histogram pass; the accuracy budget
    /// keeps the calibration whose all-int8 model scores best (min/max when no budget is measured).
    #[default]
    Auto,
    /// The full observed range.
    Minmax,
    /// The range holding `percentile` % of the values (the most extreme tails clipped).
    Percentile,
    /// The clipping threshold that minimises the KL divergence between the float and the
    /// quantized distribution (TensorRT's method).
    Entropy,
    /// The range that minimises the mean squared quantization error.
    Mse,
}

/// How activations are calibrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Calibration {
    #[serde(default)]
    pub method: CalibrationMethod,
    /// Calibration samples: from `calibration_dataset_id`, or a seeded split of the job's dataset
    /// that is then left out of every evaluation.
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// With `method: percentile`: the share of values the range keeps (90..=100).
    #[serde(default = "default_percentile")]
    pub percentile: f64,
}

fn default_percentile() -> f64 {
    99.999
}

fn default_samples() -> u32 {
    128
}

fn default_bits() -> u32 {
    8
}

fn default_block_size() -> u32 {
    32
}

fn default_true() -> bool {
    true
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            method: CalibrationMethod::Auto,
            samples: default_samples(),
            percentile: default_percentile(),
        }
    }
}

/// Options of the `quantize` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuantizeOptions {
    #[serde(default)]
    pub mode: QuantizeMode,
    #[serde(default)]
    pub granularity: Granularity,
    #[serde(default)]
    pub activation_type: ActivationType,
    /// Symmetric ranges: activations centred on zero (static), int4 blocks without zero points
    /// (weight_only). Weights are always symmetric int8.
    #[serde(default)]
    pub symmetric: bool,
    /// Operator types to quantize.
    #[serde(default = "default_op_types")]
    pub op_types: Vec<String>,
    /// Node names to keep in float.
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub calibration: Calibration,
    /// weight_only: 8 (int8 behind DequantizeLinear) or 4 (int4 blocks, MatMulNBits).
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// weight_only with 4 bits: weights per block sharing one scale (16..=256, a power of two).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// fp16: keep float32 graph inputs and outputs (casts at the boundary).
    #[serde(default = "default_true")]
    pub keep_io_types: bool,
    /// The accuracy budget of int8 modes (a fraction: 0.005 = half a point of top-1 accuracy, or
    /// of agreement with the float model when the data has no labels). The most sensitive layers
    /// stay float until it holds. Falls back to the job's `constraints.max_accuracy_drop`, then
    /// to 0.005; 1 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Most trial models the accuracy budget builds and scores (one per layer to measure each
    /// layer's cost, then a bisection and a pass that returns unneeded float layers to int8);
    /// 200 by default. A smaller number bounds the search's time: the best model found is
    /// returned, and the budget fails when none of those tried fits it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_trials: Option<u32>,
    /// Keep the int8 model even when ONNX Runtime runs it slower than the input (for its size).
    /// By default a slower int8 model is not kept: layers that slow the model stay float, and
    /// the stage returns its input when nothing helps.
    #[serde(default)]
    pub allow_slower: bool,
    /// `mode: qat`: how the model trains with every quantized tensor fake-quantized: α·CE(labels)
    /// + (1−α)·T²·KL(float model ‖ fake-quantized model); α 0.5, T 2 by default.
    #[serde(default)]
    pub qat: Recovery,
    /// Int8 weights in 7 bits, [-63, 63] (ONNX Runtime's `reduce_range`), for x86 CPUs without
    /// VNNI (AVX2), whose uint8 x int8 kernels add pairs of products in saturating 16-bit
    /// arithmetic. Unset: weights use 7 bits when the worker's CPU lacks VNNI (the models it
    /// measures would otherwise lose accuracy to the saturation). Set it to get the same model
    /// from every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_range: Option<bool>,
    /// Static int8 (post-training): move each int8 Conv's and Gemm's bias by the mean shift int8
    /// rounding gives its output on the calibration rows, layer by layer in graph order. With an
    /// accuracy budget it is kept only when every-layer-int8 scores no worse with it. On by default.
    #[serde(default = "default_true")]
    pub bias_correction: bool,
    /// Static int8 (post-training): how weights round to int8, `gptq` (default) or `nearest`.
    #[serde(default)]
    pub weight_rounding: WeightRounding,
}

fn default_op_types() -> Vec<String> {
    DEFAULT_OP_TYPES.iter().map(|s| s.to_string()).collect()
}

impl Validate for QuantizeOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        use QuantizeMode::*;
        let mode = self.mode;
        c.check(
            "qat",
            mode == Qat || !c.given("qat"),
            "`qat` holds the training options of `mode: qat`",
        );
        if mode == Qat {
            c.nested("qat", &self.qat);
        }
        c.check(
            "op_types",
            !self.op_types.is_empty(),
            "`op_types` must be a non-empty list of operator types",
        );
        for (i, op) in self.op_types.iter().enumerate() {
            if !QUANTIZABLE_OP_TYPES.contains(&op.as_str()) {
                let at = format!("{}/{i}", c.pointer("op_types"));
                c.add_at(
                    at,
                    format!(
                        "operator types that can be quantized: {}",
                        QUANTIZABLE_OP_TYPES.join(", ")
                    ),
                );
            }
        }
        c.check(
            "reduce_range",
            !(self.reduce_range.is_some() && matches!(mode, WeightOnly | Fp16)),
            "`reduce_range` applies to the integer-kernel modes (auto, dynamic, static, qat)",
        );
        c.check(
            "bias_correction",
            !(self.bias_correction
                && c.given("bias_correction")
                && matches!(mode, Dynamic | WeightOnly | Fp16 | Qat)),
            "`bias_correction` corrects post-training static int8 (mode auto or static); `qat` trains the biases itself",
        );
        c.check(
            "weight_rounding",
            !(self.weight_rounding == WeightRounding::Gptq
                && c.given("weight_rounding")
                && matches!(mode, Dynamic | WeightOnly | Fp16 | Qat)),
            "`weight_rounding: gptq` rounds post-training static int8 weights against the calibration rows (mode auto or static); `qat` trains the weights itself",
        );
        match self.bits {
            8 => {}
            4 if mode == WeightOnly => {}
            4 => c.add(
                "bits",
                "4-bit weights need `mode: weight_only` (int4 blocks in MatMulNBits)",
            ),
            _ => c.add("bits", "`bits` must be 8 or 4"),
        }
        c.check(
            "block_size",
            (16..=256).contains(&self.block_size) && self.block_size.is_power_of_two(),
            "`block_size` must be a power of two from 16 to 256",
        );
        if let Some(d) = self.max_accuracy_drop {
            if !(0.0..=1.0).contains(&d) {
                c.add(
                    "max_accuracy_drop",
                    "`max_accuracy_drop` must be a fraction from 0 to 1 (0.005 = half a point)",
                );
            } else if matches!(mode, Fp16 | WeightOnly) {
                c.add(
                    "max_accuracy_drop",
                    "the accuracy budget chooses int8 layers: use it with mode auto, static, dynamic or qat",
                );
            }
        }
        if let Some(n) = self.max_trials {
            c.check(
                "max_trials",
                (1..=10_000).contains(&n),
                "`max_trials` must be from 1 to 10000",
            );
            c.check(
                "max_trials",
                !matches!(mode, Fp16 | WeightOnly),
                "`max_trials` bounds the accuracy budget's search: use it with mode auto, static, dynamic or qat",
            );
        }
        c.nested("calibration", &self.calibration);
    }
}

impl Validate for Calibration {
    fn validate(&self, c: &mut Checker<'_>) {
        c.check(
            "percentile",
            (90.0..=100.0).contains(&self.percentile),
            "`percentile` must be a number from 90 to 100",
        );
        c.check(
            "samples",
            (1..=100_000).contains(&self.samples),
            "`samples` must be an integer from 1 to 100000",
        );
    }
}

impl super::stage::StageOptions for QuantizeOptions {
    fn training(&self) -> Option<&Recovery> {
        (self.mode == QuantizeMode::Qat).then_some(&self.qat)
    }
    fn quantizes(&self) -> bool {
        true
    }
}

/// The loss weight and temperature of quantization-aware training when the spec leaves them unset.
pub const QAT_DEFAULT_ALPHA: f64 = 0.5;
pub const QAT_DEFAULT_TEMPERATURE: f64 = 2.0;
