//! The options of every stage that trains (`distill`, `finetune`, a `prune` stage's recovery,
//! `quantize` with `mode: qat`): one [`Recovery`] block, with one [`TrainingOptions`] schedule.
use super::validation::{Checker, Validate};
use serde::{Deserialize, Serialize};
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

impl Validate for TrainingOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        let t = self;
        c.check(
            "learning_rate",
            t.learning_rate > 0.0 && t.learning_rate < 10.0,
            "`learning_rate` must be in (0, 10)",
        );
        c.check(
            "weight_decay",
            (0.0..1.0).contains(&t.weight_decay),
            "`weight_decay` must be in [0, 1)",
        );
        c.check(
            "warmup",
            (0.0..1.0).contains(&t.warmup),
            "`warmup` must be in [0, 1)",
        );
        c.check(
            "max_grad_norm",
            t.max_grad_norm >= 0.0,
            "`max_grad_norm` must be 0 (off) or positive",
        );
        c.check(
            "time_budget_s",
            t.time_budget_s.is_none_or(|s| s > 0.0 && s.is_finite()),
            "`time_budget_s` must be positive seconds",
        );
        c.check(
            "validation_share",
            t.validation_share > 0.0 && t.validation_share < 1.0,
            "`validation_share` must be between 0 and 1 (exclusive)",
        );
        c.check(
            "epochs",
            (1..=1000).contains(&t.epochs),
            "`epochs` must be an integer in 1..=1000",
        );
        c.check(
            "batch_size",
            (1..=4096).contains(&t.batch_size),
            "`batch_size` must be an integer in 1..=4096",
        );
        c.check(
            "patience",
            t.patience <= 1000,
            "`patience` must be an integer in 0..=1000",
        );
    }
}

/// How a stage trains the model on `train_dataset_id`: α·CE(labels) + (1−α)·T²·KL(reference ‖
/// trained), KL alone without labels. The reference is the model as it entered the stage (the
/// teacher, for `distill`). Unset `alpha` and `temperature` take the stage's own defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Recovery {
    /// Weight of the label cross-entropy (0..=1; ignored without labels). Default: 0.5, and 1
    /// (cross-entropy alone) for `finetune`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Softmax temperature of the KL term (0 < T <= 100). Default: 4 for `distill`, 1 for
    /// `finetune`, 2 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// The classifier output (inferred when the model has one output or an evaluate stage
    /// names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(flatten)]
    pub training: TrainingOptions,
}

impl Recovery {
    /// α, or the stage's default.
    pub fn alpha_or(&self, default: f64) -> f64 {
        self.alpha.unwrap_or(default)
    }

    /// T, or the stage's default.
    pub fn temperature_or(&self, default: f64) -> f64 {
        self.temperature.unwrap_or(default)
    }
}

impl Validate for Recovery {
    fn validate(&self, c: &mut Checker<'_>) {
        c.check(
            "alpha",
            self.alpha.is_none_or(|a| (0.0..=1.0).contains(&a)),
            "`alpha` must be in [0, 1]",
        );
        c.check(
            "temperature",
            self.temperature.is_none_or(|t| t > 0.0 && t <= 100.0),
            "`temperature` must be in (0, 100]",
        );
        c.flattened(&self.training);
    }
}
