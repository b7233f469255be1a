//! Options of the `distill` stage and their validation.
use super::training::{check_keys, needs_train_data, validate_training, TrainingOptions};
use super::validation::Problems;
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
    /// How training runs.
    #[serde(flatten)]
    pub training: TrainingOptions,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Intermediate-feature hints added to the loss: weight · MSE(student tensor, teacher tensor).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureHint>,
}

/// One intermediate-feature hint: the student's tensor learns the teacher's (same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FeatureHint {
    /// A tensor the teacher computes (a node output).
    pub teacher: String,
    /// The student's tensor; the teacher's name when absent (derived students keep names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<String>,
    /// Weight of this term in the loss.
    #[serde(default = "default_hint_weight")]
    pub weight: f64,
}

fn default_hint_weight() -> f64 {
    1.0
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

const KNOWN: &[&str] = &[
    "stage",
    "student",
    "width",
    "keep_every",
    "alpha",
    "temperature",
    "output",
    "features",
];

/// Checks a `distill` stage object; `spec` is the whole job spec (for the references it needs).
pub(super) fn validate(
    obj: &Map<String, Value>,
    base: &str,
    spec: &Map<String, Value>,
    provided: &[&str],
    p: &mut Problems,
) {
    check_keys(obj, base, "distill", KNOWN, p);
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
    needs_train_data(spec, provided, "distill", p);
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
    if let Some(v) = obj.get("keep_every") {
        if !v.as_u64().is_some_and(|x| (2..=64).contains(&x)) {
            p.add(
                format!("{base}/keep_every"),
                "`keep_every` must be an integer in 2..=64",
            );
        }
    }
    if let Some(v) = obj.get("features") {
        validate_features(v, &format!("{base}/features"), p);
    }
    validate_training(obj, base, p);
}

fn validate_features(v: &Value, at: &str, p: &mut Problems) {
    let Some(hints) = v.as_array() else {
        p.add(
            at,
            "`features` must be a list of {teacher, student, weight} objects",
        );
        return;
    };
    for (i, h) in hints.iter().enumerate() {
        let at = format!("{at}/{i}");
        let Some(h) = h.as_object() else {
            p.add(
                at,
                "each feature hint must be an object with a `teacher` tensor name",
            );
            continue;
        };
        for key in h
            .keys()
            .filter(|k| !["teacher", "student", "weight"].contains(&k.as_str()))
        {
            p.add(
                format!("{at}/{}", super::validation::pointer_key(key)),
                format!("unknown option `{key}`; expected teacher, student, weight"),
            );
        }
        let named = |key: &str| {
            h.get(key)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        };
        if !named("teacher") {
            p.add(
                format!("{at}/teacher"),
                "`teacher` must name a tensor of the teacher",
            );
        }
        if h.get("student").is_some() && !named("student") {
            p.add(
                format!("{at}/student"),
                "`student` must name a tensor of the student",
            );
        }
        if h.get("weight")
            .is_some_and(|w| !w.as_f64().is_some_and(|w| w > 0.0 && w <= 1000.0))
        {
            p.add(format!("{at}/weight"), "`weight` must be in (0, 1000]");
        }
    }
}
