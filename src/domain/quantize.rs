//! Options of the `quantize` stage and their validation.
use super::validation::{pointer_key, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Quantization modes this version can run.
pub const AVAILABLE_MODES: &[&str] = &["static"];
/// Modes the spec language names that are not built yet.
pub const PLANNED_MODES: &[&str] = &["dynamic", "weight_only", "fp16", "qat"];
/// Operators quantized by default: the ones with integer kernels that make models faster.
pub const DEFAULT_OP_TYPES: &[&str] = &["Conv", "MatMul", "Gemm"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantizeMode {
    /// int8 weights and activations in QDQ form, activations calibrated beforehand.
    Static,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One weight scale per output channel (more accurate; needs opset 13).
    #[default]
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
    /// The full observed range.
    #[default]
    Minmax,
    /// The range holding `percentile` % of the values (the most extreme tails clipped).
    Percentile,
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

impl Default for Calibration {
    fn default() -> Self {
        Self {
            method: CalibrationMethod::Minmax,
            samples: default_samples(),
            percentile: default_percentile(),
        }
    }
}

/// Options of the `quantize` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QuantizeOptions {
    pub mode: QuantizeMode,
    #[serde(default)]
    pub granularity: Granularity,
    #[serde(default)]
    pub activation_type: ActivationType,
    /// Operator types to quantize.
    #[serde(default = "default_op_types")]
    pub op_types: Vec<String>,
    /// Node names to keep in float.
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub calibration: Calibration,
    /// Keep the int8 model even when ONNX Runtime runs it slower than the input (for its size).
    /// By default a slower int8 model is not kept: the stage returns its input and says why.
    #[serde(default)]
    pub allow_slower: bool,
}

fn default_op_types() -> Vec<String> {
    DEFAULT_OP_TYPES.iter().map(|s| s.to_string()).collect()
}

pub(super) fn validate(obj: &Map<String, Value>, base: &str, p: &mut Problems) {
    let known = [
        "stage",
        "mode",
        "granularity",
        "activation_type",
        "op_types",
        "exclude",
        "calibration",
        "allow_slower",
    ];
    for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        p.add(
            format!("{base}/{}", pointer_key(key)),
            format!(
                "unknown option `{key}` for quantize; expected one of: {}",
                known[1..].join(", ")
            ),
        );
    }
    match obj.get("mode").and_then(Value::as_str) {
        Some(m) if AVAILABLE_MODES.contains(&m) => {}
        Some(m) if PLANNED_MODES.contains(&m) => p.add(
            format!("{base}/mode"),
            format!(
                "quantization mode `{m}` is not available in this version; available: {}",
                AVAILABLE_MODES.join(", ")
            ),
        ),
        Some(m) => p.add(
            format!("{base}/mode"),
            format!(
                "unknown mode `{m}`; expected one of: {}",
                AVAILABLE_MODES.join(", ")
            ),
        ),
        None => p.add(
            format!("{base}/mode"),
            "`mode` is required (e.g. \"static\")",
        ),
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
    one_of("granularity", &["per_channel", "per_tensor"], p);
    one_of("activation_type", &["uint8", "int8"], p);
    if let Some(v) = obj.get("op_types") {
        match v.as_array() {
            Some(ops) if !ops.is_empty() => {
                for (i, op) in ops.iter().enumerate() {
                    if !op.as_str().is_some_and(|s| DEFAULT_OP_TYPES.contains(&s)) {
                        p.add(
                            format!("{base}/op_types/{i}"),
                            format!(
                                "operator types that can be quantized: {}",
                                DEFAULT_OP_TYPES.join(", ")
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
    if obj.get("allow_slower").is_some_and(|v| !v.is_boolean()) {
        p.add(
            format!("{base}/allow_slower"),
            "`allow_slower` must be true or false",
        );
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
        match c.get("method").map(|m| m.as_str()) {
            None | Some(Some("minmax" | "percentile")) => {}
            Some(Some(m @ ("entropy" | "mse"))) => p.add(
                format!("{base}/calibration/method"),
                format!("calibration method `{m}` is not available in this version; available: minmax, percentile"),
            ),
            _ => p.add(format!("{base}/calibration/method"), "`method` must be one of: minmax, percentile"),
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
}
