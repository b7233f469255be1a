//! Options of the `finetune` stage.
use super::training::Recovery;
use super::validation::{Checker, Validate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Options of the `finetune` stage: the current model trains on `train_dataset_id`. With labels,
/// on α·CE + (1−α)·T²·KL to the model as it entered the stage (α 1: cross-entropy alone, by
/// default); without labels, on T²·KL alone (T 1 by default) — what recovers a pruned model
/// without labelled data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinetuneOptions {
    #[serde(flatten)]
    pub recovery: Recovery,
}

pub const DEFAULT_ALPHA: f64 = 1.0;
pub const DEFAULT_TEMPERATURE: f64 = 1.0;

impl Validate for FinetuneOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        c.flattened(&self.recovery);
    }
}

impl super::stage::StageOptions for FinetuneOptions {
    fn training(&self) -> Option<&Recovery> {
        Some(&self.recovery)
    }
}
