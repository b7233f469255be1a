//! Options of the `distill` stage and their validation.
use super::validation::{pointer_key, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Where the student comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StudentSource {
    /// The spec's `student_model_id` when it names one, else `width`.
    #[default]
    Auto,
    /// The uploaded `student_model_id` (same inputs and classifier output as the teacher).
    Uploaded,
    /// Derived from the teacher: every layer keeps its `width` share of channels (neurons), the
    /// most important by L1 norm, initialised from the teacher's weights.
    Width,
    /// Derived from a transformer-encoder teacher: every `keep_every`-th encoder layer, the
    /// others removed (as DistilBERT keeps every other layer), initialised from the teacher's.
    Depth,
}

/// How the learning rate decays after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Options of the `distill` stage: the job's current model teaches a student on the
/// `train_dataset_id` rows with loss α·CE(labels) + (1−α)·T²·KL(teacher_T ‖ student_T) (KL only
/// without labels); a seeded `validation_share` of those rows picks the epoch to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DistillOptions {
    #[serde(default)]
    pub student: StudentSource,
    /// With a `width` student: the share of each layer's channels kept (0 < width < 1).
    #[serde(default = "default_width")]
    pub width: f64,
    /// With a `depth` student: keep encoder layers 0, k, 2k, ... (k >= 2).
    #[serde(default = "default_keep_every")]
    pub keep_every: u32,
    /// Weight of the hard-label cross-entropy (0..=1).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Softmax temperature of the distillation term (> 0).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Peak AdamW learning rate.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Share of the steps spent warming the learning rate up (0..1).
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Gradient clipping by global norm; 0 turns it off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Early stopping: epochs without a better validation score; 0 turns it off.
    #[serde(default = "default_patience")]
    pub patience: u32,
    /// Stop training after this many seconds, keeping the best epoch so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget_s: Option<f64>,
    /// Share of the training rows held out to choose the epoch (0 < share < 1).
    #[serde(default = "default_validation_share")]
    pub validation_share: f64,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

fn default_width() -> f64 {
    0.25
}
fn default_keep_every() -> u32 {
    2
}
fn default_alpha() -> f64 {
    0.5
}
fn default_temperature() -> f64 {
    4.0
}
fn default_epochs() -> u32 {
    20
}
fn default_batch_size() -> u32 {
    32
}
fn default_learning_rate() -> f64 {
    3e-3
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_warmup() -> f64 {
    0.05
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_patience() -> u32 {
    5
}
fn default_validation_share() -> f64 {
    0.15
}

const KNOWN: &[&str] = &[
    "stage",
    "student",
    "width",
    "keep_every",
    "alpha",
    "temperature",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "warmup",
    "schedule",
    "max_grad_norm",
    "patience",
    "time_budget_s",
    "validation_share",
    "output",
];

/// Checks a `distill` stage object; `spec` is the whole job spec (for the references it needs).
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
                "unknown option `{key}` for distill; expected one of: {}",
                KNOWN[1..].join(", ")
            ),
        );
    }
    let has =
        |field: &str| spec.get(field).is_some_and(|v| !v.is_null()) || provided.contains(&field);
    match obj.get("student").map(Value::as_str) {
        None | Some(Some("auto" | "width" | "depth")) => {}
        Some(Some("uploaded")) if !has("student_model_id") => p.add(
            "/student_model_id",
            "a distill stage with `student: uploaded` needs `student_model_id`",
        ),
        Some(Some("uploaded")) => {}
        _ => p.add(
            format!("{base}/student"),
            "`student` must be one of: auto, uploaded, width, depth",
        ),
    }
    if !has("train_dataset_id") {
        p.add(
            "/train_dataset_id",
            "a distill stage trains on `train_dataset_id` (labels optional); the job's dataset is kept for evaluation",
        );
    }
    let number = |key: &str, ok: &dyn Fn(f64) -> bool, what: &str, p: &mut Problems| {
        if let Some(v) = obj.get(key) {
            if !v.as_f64().is_some_and(ok) {
                p.add(format!("{base}/{key}"), format!("`{key}` must be {what}"));
            }
        }
    };
    number(
        "width",
        &|x| x > 0.0 && x < 1.0,
        "between 0 and 1 (exclusive)",
        p,
    );
    number("alpha", &|x| (0.0..=1.0).contains(&x), "between 0 and 1", p);
    number("temperature", &|x| x > 0.0 && x <= 100.0, "in (0, 100]", p);
    number("learning_rate", &|x| x > 0.0 && x < 10.0, "in (0, 10)", p);
    number("weight_decay", &|x| (0.0..1.0).contains(&x), "in [0, 1)", p);
    number("warmup", &|x| (0.0..1.0).contains(&x), "in [0, 1)", p);
    number("max_grad_norm", &|x| x >= 0.0, "0 (off) or positive", p);
    number("time_budget_s", &|x| x > 0.0, "positive seconds", p);
    number(
        "validation_share",
        &|x| x > 0.0 && x < 1.0,
        "between 0 and 1 (exclusive)",
        p,
    );
    let integer = |key: &str, lo: u64, hi: u64, p: &mut Problems| {
        if let Some(v) = obj.get(key) {
            if !v.as_u64().is_some_and(|x| (lo..=hi).contains(&x)) {
                p.add(
                    format!("{base}/{key}"),
                    format!("`{key}` must be an integer in {lo}..={hi}"),
                );
            }
        }
    };
    integer("epochs", 1, 1000, p);
    integer("keep_every", 2, 64, p);
    integer("batch_size", 1, 4096, p);
    integer("patience", 0, 1000, p);
    if let Some(v) = obj.get("schedule") {
        if !v
            .as_str()
            .is_some_and(|s| ["cosine", "linear", "constant"].contains(&s))
        {
            p.add(
                format!("{base}/schedule"),
                "`schedule` must be one of: cosine, linear, constant",
            );
        }
    }
    if obj.get("output").is_some_and(|v| !v.is_string()) {
        p.add(format!("{base}/output"), "`output` must be an output name");
    }
}
