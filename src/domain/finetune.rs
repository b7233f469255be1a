//! Options of the `finetune` stage and their validation.
use super::training::{check_keys, needs_train_data, validate_training, TrainingOptions};
use super::validation::Problems;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// Options of the `finetune` stage: the current model trains on `train_dataset_id` with
/// cross-entropy on its labels, or without labels with T²·KL to the model as it entered the stage
/// (what recovers a pruned or quantized model without labelled data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinetuneOptions {
    /// Softmax temperature of the KL term when the training data has no labels.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(flatten)]
    pub training: TrainingOptions,
}

fn default_temperature() -> f64 {
    1.0
}

const KNOWN: &[&str] = &["stage", "temperature", "output"];

pub(super) fn validate(
    obj: &Map<String, Value>,
    base: &str,
    spec: &Map<String, Value>,
    provided: &[&str],
    p: &mut Problems,
) {
    check_keys(obj, base, "finetune", KNOWN, p);
    needs_train_data(spec, provided, "finetune", p);
    if let Some(v) = obj.get("temperature") {
        if !v.as_f64().is_some_and(|x| x > 0.0 && x <= 100.0) {
            p.add(
                format!("{base}/temperature"),
                "`temperature` must be in (0, 100]",
            );
        }
    }
    validate_training(obj, base, p);
}
