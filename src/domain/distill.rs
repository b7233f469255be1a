//! Options of the `distill` stage.
use super::stage::{Given, StageOptions};
use super::training::Recovery;
use super::validation::{Checker, Problems, Validate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where the student comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StudentSource {
    /// With `teacher_model_id`: the job's model is the student. Otherwise the spec's
    /// `student_model_id` when it names one, else `width`.
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

/// An intermediate-feature hint: the student's tensor learns the teacher's tensor `teacher`
/// (same shape) by mean squared error, weighted by `weight`.
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

impl FeatureHint {
    /// The student tensor that learns the teacher's.
    pub fn student_tensor(&self) -> &str {
        self.student.as_deref().unwrap_or(&self.teacher)
    }
}

/// Options of the `distill` stage: a teacher teaches a student on the `train_dataset_id` rows
/// with loss α·CE(labels) + (1−α)·T²·KL(teacher_T ‖ student_T) (KL only without labels; α 0.5
/// and T 4 by default); a seeded `validation_share` of those rows picks the epoch to keep. The
/// teacher is the job's current model, or the uploaded `teacher_model_id`, in which case the
/// job's model is the student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DistillOptions {
    #[serde(default)]
    pub student: StudentSource,
    /// With a `width` student: the share of each layer's channels kept (0 < width < 1).
    #[serde(default = "default_width")]
    pub width: f64,
    /// With a `width` student: each layer's kept channels rounded up to a multiple of this (1:
    /// the exact share). ONNX Runtime's blocked convolution kernels run widths that are
    /// multiples of 8 much faster than odd ones.
    #[serde(default = "default_multiple_of")]
    pub multiple_of: u32,
    /// With a `depth` student: keep encoder layers 0, k, 2k, ... (k >= 2).
    #[serde(default = "default_keep_every")]
    pub keep_every: u32,
    /// Intermediate-feature hints added to the loss: weight · MSE(student tensor, teacher tensor).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureHint>,
    #[serde(flatten)]
    pub recovery: Recovery,
}

impl Default for DistillOptions {
    fn default() -> Self {
        Self {
            student: StudentSource::default(),
            width: default_width(),
            multiple_of: default_multiple_of(),
            keep_every: default_keep_every(),
            features: Vec::new(),
            recovery: Recovery::default(),
        }
    }
}

/// The loss weight and temperature of distillation when the spec leaves them unset.
pub const DEFAULT_ALPHA: f64 = 0.5;
pub const DEFAULT_TEMPERATURE: f64 = 4.0;

fn default_width() -> f64 {
    0.25
}
fn default_multiple_of() -> u32 {
    1
}
fn default_keep_every() -> u32 {
    2
}

impl Validate for DistillOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        c.check(
            "width",
            self.width > 0.0 && self.width < 1.0,
            "`width` must be between 0 and 1 (exclusive)",
        );
        c.check(
            "multiple_of",
            (1..=256).contains(&self.multiple_of),
            "`multiple_of` must be an integer in 1..=256",
        );
        c.check(
            "keep_every",
            (2..=64).contains(&self.keep_every),
            "`keep_every` must be an integer in 2..=64",
        );
        c.each("features", &self.features);
        c.flattened(&self.recovery);
    }
}

impl Validate for FeatureHint {
    fn validate(&self, c: &mut Checker<'_>) {
        c.check(
            "teacher",
            !self.teacher.is_empty(),
            "`teacher` must name a tensor of the teacher",
        );
        c.check(
            "student",
            self.student.as_ref().is_none_or(|s| !s.is_empty()),
            "`student` must name a tensor of the student",
        );
        c.check(
            "weight",
            self.weight > 0.0 && self.weight <= 1000.0,
            "`weight` must be in (0, 1000]",
        );
    }
}

impl StageOptions for DistillOptions {
    fn training(&self) -> Option<&Recovery> {
        Some(&self.recovery)
    }

    fn check_inputs(&self, given: Given, at: &str, p: &mut Problems) {
        if self.student == StudentSource::Uploaded && !given.student_model {
            p.add(
                "/student_model_id",
                "a distill stage with `student: uploaded` needs `student_model_id`",
            );
        }
        if given.teacher_model && self.student != StudentSource::Auto {
            p.add(
                format!("{at}/student"),
                "with `teacher_model_id` the job's model is the student: leave `student` unset (auto)",
            );
        }
        if given.teacher_model && given.student_model {
            p.add(
                "/student_model_id",
                "give a teacher (`teacher_model_id`, the job's model learns) or a student (`student_model_id`, the job's model teaches), not both",
            );
        }
    }
}
