//! What a model's scored output predicts, and how Shrink scores it: one class per sample
//! (classification), per pixel (segmentation), per position (sequence) or a CTC-decoded string.
use super::validation::Checker;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The kind of prediction the scored output makes. Inferred from the output's and the labels'
/// shapes when the spec does not name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// One class per sample: scores `[N, C]` (or `[N]` class ids), labels `[N]`.
    #[default]
    Classification,
    /// One class per pixel: scores `[N, C, H, W]` (arg-max over C) or a probability map
    /// `[N, 1, H, W]` (threshold), labels `[N, H, W]` with 255 (or any negative value) ignored.
    Segmentation,
    /// One class per position: scores `[N, T, C]`, labels `[N, T]` with negative values ignored.
    Sequence,
    /// A CTC recogniser: scores `[N, T, C]` decoded greedily (repeats merged, blanks dropped);
    /// labels are strings (with `characters`) or class-id sequences `[N, L]` padded with -1.
    Ctc,
}

impl TaskKind {
    /// The metric budgets and `max_accuracy_drop` use for this task when the data has labels.
    pub fn metric(self) -> &'static str {
        match self {
            TaskKind::Classification => "top-1 accuracy",
            TaskKind::Segmentation => "mean IoU",
            TaskKind::Sequence => "per-position accuracy",
            TaskKind::Ctc => "sequence accuracy",
        }
    }

    /// The agreement with the baseline model budgets use when the data has no labels.
    pub fn agreement(self) -> &'static str {
        match self {
            TaskKind::Classification => "top-1 agreement with the baseline",
            TaskKind::Segmentation => "mask IoU with the baseline",
            TaskKind::Sequence => "per-position agreement with the baseline",
            TaskKind::Ctc => "decoded-sequence agreement with the baseline",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Segmentation => "segmentation",
            TaskKind::Sequence => "sequence",
            TaskKind::Ctc => "ctc",
        }
    }
}

/// Per-pixel metrics of a segmentation output against per-pixel labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SegmentationMetrics {
    /// Labelled pixels scored (ignored pixels excluded).
    pub pixels: u64,
    pub pixel_accuracy: f64,
    /// Mean over classes present in the labels or the predictions of TP / (TP + FP + FN).
    pub mean_iou: f64,
    /// IoU of each class index; null where the class is in neither labels nor predictions.
    pub per_class_iou: Vec<Option<f64>>,
    /// Mean over the same classes of 2·TP / (2·TP + FP + FN).
    pub mean_dice: f64,
    pub per_class_dice: Vec<Option<f64>>,
    /// The probability threshold of a single-channel map (absent for arg-max outputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
}

/// Per-position and decoded-sequence metrics of a `[N, T, C]` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SequenceMetrics {
    /// Labelled positions scored (padding excluded); 0 for CTC, whose labels do not align to positions.
    pub positions: u64,
    /// Share of labelled positions whose arg-max is the label (absent for CTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_accuracy: Option<f64>,
    /// CTC: share of samples whose greedy-decoded sequence equals the label exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_accuracy: Option<f64>,
    /// CTC: total edit distance over total label length (characters, or class ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub character_error_rate: Option<f64>,
    /// CTC: the blank class index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<u64>,
}

/// Checks an `evaluate` stage's task options: each applies to its task only.
pub fn validate_options(
    c: &mut Checker<'_>,
    task: Option<TaskKind>,
    threshold: Option<f64>,
    blank: Option<u32>,
    characters: Option<&[String]>,
) {
    c.check(
        "threshold",
        threshold.is_none_or(|t| t > 0.0 && t < 1.0),
        "`threshold` must be a probability strictly between 0 and 1",
    );
    c.check(
        "threshold",
        threshold.is_none() || matches!(task, None | Some(TaskKind::Segmentation)),
        "`threshold` applies only to segmentation",
    );
    let ctc = task == Some(TaskKind::Ctc);
    for (key, given) in [
        ("blank", blank.is_some()),
        ("characters", characters.is_some()),
    ] {
        c.check(
            key,
            !given || ctc,
            format!("`{key}` applies only to `task: ctc`"),
        );
    }
    if let Some(chars) = characters {
        c.check(
            "characters",
            !chars.is_empty() && chars.len() <= 1_000_000,
            "`characters` must list from 1 to 1,000,000 entries",
        );
    }
}
