//! What a stage asks of the job: the trait every stage's options type implements, so the spec
//! checks stage order and inputs without knowing each stage.
use super::training::Recovery;
use super::validation::{Problems, Validate};

/// Which optional inputs the job names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Given {
    pub train_data: bool,
    pub student_model: bool,
    pub teacher_model: bool,
}

pub trait StageOptions: Validate {
    /// The training options when the stage trains the model on `train_dataset_id`.
    fn training(&self) -> Option<&Recovery> {
        None
    }
    /// Whether the stage leaves a quantized model, which only `evaluate` can read after it.
    fn quantizes(&self) -> bool {
        false
    }
    /// Whether the stage reads the float model's weights (everything but evaluation).
    fn needs_float_model(&self) -> bool {
        true
    }
    /// Checks of the inputs the stage needs beyond training rows; `at` is the stage's pointer.
    fn check_inputs(&self, _given: Given, _at: &str, _p: &mut Problems) {}
}
