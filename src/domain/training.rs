//! Training options shared by the stages that train (`distill`, `finetune`), and their checks.
use super::validation::Problems;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// How the learning rate decays after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// AdamW with warm-up then decay, on the `train_dataset_id` rows; a seeded `validation_share`
/// of them picks the epoch to keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingOptions {
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Peak AdamW learning rate (pretrained transformers want about 1e-4).
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
}

impl Default for TrainingOptions {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            weight_decay: default_weight_decay(),
            warmup: default_warmup(),
            schedule: LrSchedule::default(),
            max_grad_norm: default_max_grad_norm(),
            patience: default_patience(),
            time_budget_s: None,
            validation_share: default_validation_share(),
        }
    }
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

/// The option names of [`TrainingOptions`].
pub const TRAINING_KEYS: &[&str] = &[
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
];

/// Flags keys that are neither the stage's own (`known`, starting with "stage") nor training
/// options, and checks the `output` name every training stage takes.
pub(super) fn check_keys(
    obj: &Map<String, Value>,
    base: &str,
    stage: &str,
    known: &[&str],
    p: &mut Problems,
) {
    let known: Vec<&str> = known.iter().chain(TRAINING_KEYS).copied().collect();
    for key in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        p.add(
            format!("{base}/{}", super::validation::pointer_key(key)),
            format!(
                "unknown option `{key}` for {stage}; expected one of: {}",
                known[1..].join(", ")
            ),
        );
    }
    if obj.get("output").is_some_and(|v| !v.is_string()) {
        p.add(format!("{base}/output"), "`output` must be an output name");
    }
}

/// A training stage needs `train_dataset_id`: the job's dataset is kept for evaluation.
pub(super) fn needs_train_data(
    spec: &Map<String, Value>,
    provided: &[&str],
    stage: &str,
    p: &mut Problems,
) {
    let given = spec.get("train_dataset_id").is_some_and(|v| !v.is_null())
        || provided.contains(&"train_dataset_id");
    if !given {
        p.add(
            "/train_dataset_id",
            format!("a {stage} stage trains on `train_dataset_id` (labels optional); the job's dataset is kept for evaluation"),
        );
    }
}

/// Checks the [`TrainingOptions`] keys of a stage object.
pub(super) fn validate_training(obj: &Map<String, Value>, base: &str, p: &mut Problems) {
    let number = |key: &str, ok: &dyn Fn(f64) -> bool, what: &str, p: &mut Problems| {
        if let Some(v) = obj.get(key) {
            if !v.as_f64().is_some_and(ok) {
                p.add(format!("{base}/{key}"), format!("`{key}` must be {what}"));
            }
        }
    };
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
}
