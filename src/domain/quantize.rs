//! Options of the `quantize` stage and their validation.
use super::training::{check_keys, needs_train_data, validate_training, TrainingOptions};
use super::validation::{pointer_key, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Quantization modes this version can run.
pub const AVAILABLE_MODES: &[&str] = &["auto", "static", "dynamic", "weight_only", "fp16", "qat"];
/// Operators quantized by default: the ones with integer kernels that make models faster.
pub const DEFAULT_OP_TYPES: &[&str] = &["Conv", "MatMul", "Gemm"];
/// Operators that can be named in `op_types` (Gather: embedding tables, int8 rows).
pub const QUANTIZABLE_OP_TYPES: &[&str] = &["Conv", "MatMul", "Gemm", "Gather"];
const CALIBRATION_METHODS: &[&str] = &["auto", "minmax", "percentile", "entropy", "mse"];

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

/// Training of `mode: qat`: α·CE(labels) + (1−α)·T²·KL(float model ‖ fake-quantized model), KL
/// alone when the training data has no labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QatOptions {
    /// Weight of the label cross-entropy (ignored without labels).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Softmax temperature of the KL term.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(flatten)]
    pub training: TrainingOptions,
}

fn default_alpha() -> f64 {
    0.5
}

fn default_temperature() -> f64 {
    2.0
}

impl Default for QatOptions {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            temperature: default_temperature(),
            output: None,
            training: TrainingOptions::default(),
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActivationType {
    /// Asymmetric uint8.
    #[default]
    Uint8,
    /// Symmetric int8.
    Int8,
}

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
    /// Keep the int8 model even when ONNX Runtime runs it slower than the input (for its size).
    /// By default a slower int8 model is not kept: layers that slow the model stay float, and
    /// the stage returns its input when nothing helps.
    #[serde(default)]
    pub allow_slower: bool,
    /// `mode: qat`: how the model trains.
    #[serde(default)]
    pub qat: QatOptions,
    /// Int8 weights in 7 bits, [-63, 63] (ONNX Runtime's `reduce_range`), for x86 CPUs without
    /// VNNI (AVX2), whose uint8 x int8 kernels add pairs of products in saturating 16-bit
    /// arithmetic. Unset: dynamic weights use 7 bits when the worker's CPU lacks VNNI, static
    /// weights 8. Set it to get the same model from every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reduce_range: Option<bool>,
}

fn default_op_types() -> Vec<String> {
    DEFAULT_OP_TYPES.iter().map(|s| s.to_string()).collect()
}

const KNOWN: &[&str] = &[
    "stage",
    "mode",
    "granularity",
    "activation_type",
    "symmetric",
    "op_types",
    "exclude",
    "calibration",
    "bits",
    "block_size",
    "keep_io_types",
    "max_accuracy_drop",
    "allow_slower",
    "qat",
    "reduce_range",
];

const QAT_KEYS: &[&str] = &["qat", "alpha", "temperature", "output"];

pub(super) fn validate(
    obj: &Map<String, Value>,
    base: &str,
    spec: &Map<String, Value>,
    provided: &[&str],
    p: &mut Problems,
) {
    for key in obj.keys().filter(|k| !KNOWN.contains(&k.as_str())) {
        p.add(
            format!("{base}/{}", pointer_key(key)),
            format!(
                "unknown option `{key}` for quantize; expected one of: {}",
                KNOWN[1..].join(", ")
            ),
        );
    }
    let mode = obj.get("mode").map(|m| m.as_str());
    match mode {
        None => {}
        Some(Some(m)) if AVAILABLE_MODES.contains(&m) => {}
        _ => p.add(
            format!("{base}/mode"),
            format!("`mode` must be one of: {}", AVAILABLE_MODES.join(", ")),
        ),
    }
    let mode = mode.flatten().unwrap_or("auto");
    if mode == "qat" {
        needs_train_data(spec, provided, "quantization-aware (mode qat)", p);
    }
    match obj.get("qat") {
        Some(_) if mode != "qat" => p.add(
            format!("{base}/qat"),
            "`qat` holds the training options of `mode: qat`",
        ),
        Some(Value::Object(q)) => {
            let at = format!("{base}/qat");
            check_keys(q, &at, "qat", QAT_KEYS, p);
            if q.get("alpha")
                .is_some_and(|v| !v.as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)))
            {
                p.add(format!("{at}/alpha"), "`alpha` must be in [0, 1]");
            }
            if q.get("temperature")
                .is_some_and(|v| !v.as_f64().is_some_and(|t| t > 0.0 && t <= 100.0))
            {
                p.add(
                    format!("{at}/temperature"),
                    "`temperature` must be in (0, 100]",
                );
            }
            validate_training(q, &at, p);
        }
        Some(_) => p.add(
            format!("{base}/qat"),
            "`qat` must be an object of training options",
        ),
        None => {}
    }
    let one_of = |key: &str, allowed: &[&str], p: &mut Problems| {
        if let Some(v) = obj.get(key) {
            if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
                p.add(
                    format!("{base}/{key}"),
                    format!("`{key}` must be one of: {}", allowed.join(", ")),
                );
            }
        }
    };
    one_of("granularity", &["auto", "per_channel", "per_tensor"], p);
    one_of("activation_type", &["uint8", "int8"], p);
    if let Some(v) = obj.get("op_types") {
        match v.as_array() {
            Some(ops) if !ops.is_empty() => {
                for (i, op) in ops.iter().enumerate() {
                    if !op
                        .as_str()
                        .is_some_and(|s| QUANTIZABLE_OP_TYPES.contains(&s))
                    {
                        p.add(
                            format!("{base}/op_types/{i}"),
                            format!(
                                "operator types that can be quantized: {}",
                                QUANTIZABLE_OP_TYPES.join(", ")
                            ),
                        );
                    }
                }
            }
            _ => p.add(
                format!("{base}/op_types"),
                "`op_types` must be a non-empty list of operator types",
            ),
        }
    }
    if obj.contains_key("reduce_range") && matches!(mode, "weight_only" | "fp16") {
        p.add(
            format!("{base}/reduce_range"),
            "`reduce_range` applies to the integer-kernel modes (auto, dynamic, static, qat)",
        );
    }
    for key in ["allow_slower", "symmetric", "keep_io_types", "reduce_range"] {
        if obj.get(key).is_some_and(|v| !v.is_boolean()) {
            p.add(
                format!("{base}/{key}"),
                format!("`{key}` must be true or false"),
            );
        }
    }
    if let Some(v) = obj.get("bits") {
        match v.as_u64() {
            Some(8) => {}
            Some(4) if mode == "weight_only" => {}
            Some(4) => p.add(
                format!("{base}/bits"),
                "4-bit weights need `mode: weight_only` (int4 blocks in MatMulNBits)",
            ),
            _ => p.add(format!("{base}/bits"), "`bits` must be 8 or 4"),
        }
    }
    if let Some(v) = obj.get("block_size") {
        if !v
            .as_u64()
            .is_some_and(|b| (16..=256).contains(&b) && b.is_power_of_two())
        {
            p.add(
                format!("{base}/block_size"),
                "`block_size` must be a power of two from 16 to 256",
            );
        }
    }
    if let Some(v) = obj.get("max_accuracy_drop") {
        if !v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)) {
            p.add(
                format!("{base}/max_accuracy_drop"),
                "`max_accuracy_drop` must be a fraction from 0 to 1 (0.005 = half a point)",
            );
        } else if mode == "fp16" || mode == "weight_only" {
            p.add(
                format!("{base}/max_accuracy_drop"),
                "the accuracy budget chooses int8 layers: use it with mode auto, static, dynamic or qat",
            );
        }
    }
    if let Some(v) = obj.get("exclude") {
        if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
            p.add(
                format!("{base}/exclude"),
                "`exclude` must be a list of node names",
            );
        }
    }
    if let Some(c) = obj.get("calibration") {
        validate_calibration(c, base, p);
    }
}

fn validate_calibration(c: &Value, base: &str, p: &mut Problems) {
    let Some(c) = c.as_object() else {
        p.add(
            format!("{base}/calibration"),
            "`calibration` must be an object",
        );
        return;
    };
    for key in c
        .keys()
        .filter(|k| !["method", "samples", "percentile"].contains(&k.as_str()))
    {
        p.add(
            format!("{base}/calibration/{}", pointer_key(key)),
            format!("unknown option `{key}`; expected method, samples, percentile"),
        );
    }
    if let Some(m) = c.get("method") {
        if !m.as_str().is_some_and(|m| CALIBRATION_METHODS.contains(&m)) {
            p.add(
                format!("{base}/calibration/method"),
                format!(
                    "`method` must be one of: {}",
                    CALIBRATION_METHODS.join(", ")
                ),
            );
        }
    }
    if let Some(v) = c.get("percentile") {
        if !v.as_f64().is_some_and(|x| (90.0..=100.0).contains(&x)) {
            p.add(
                format!("{base}/calibration/percentile"),
                "`percentile` must be a number from 90 to 100",
            );
        }
    }
    if let Some(s) = c.get("samples") {
        if !s.as_u64().is_some_and(|n| (1..=100_000).contains(&n)) {
            p.add(
                format!("{base}/calibration/samples"),
                "`samples` must be an integer from 1 to 100000",
            );
        }
    }
}
