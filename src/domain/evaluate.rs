//! Options of the `evaluate` stage: how the model is measured, and how its scored output is
//! read (the task).
use super::stage::StageOptions;
use super::task::TaskKind;
use super::validation::{Checker, Validate};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Options of the `evaluate` stage; the baseline evaluation uses those of the first `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvaluateOptions {
    /// The scored output; inferred when the model has one float output of rank >= 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// What the scored output predicts (classification, segmentation, sequence, ctc); inferred
    /// from the shapes of the output and the labels when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskKind>,
    /// Segmentation with a single-channel probability map: a pixel is foreground when its
    /// probability is at least this (default 0.5). Outputs outside [0, 1] are read as logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// CTC: the blank class index (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blank: Option<u32>,
    /// CTC with string labels: the text of every class in index order, the blank left out
    /// (default: the model's `character` metadata, one entry per line, as PaddleOCR exports it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub characters: Option<Vec<String>>,
    /// Batch size for accuracy evaluation and the second latency measurement.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: u32,
    /// Timed runs per latency measurement.
    #[serde(default = "defaults::latency_runs")]
    pub latency_runs: u32,
    /// Untimed runs before timing.
    #[serde(default = "defaults::warmup_runs")]
    pub warmup_runs: u32,
    /// ONNX Runtime intra-op threads (1 gives the steadiest latency on small machines).
    #[serde(default = "defaults::threads")]
    pub threads: u32,
    /// Evaluate at most this many samples (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_samples: Option<u64>,
}

impl Default for EvaluateOptions {
    fn default() -> Self {
        Self {
            output: None,
            task: None,
            threshold: None,
            blank: None,
            characters: None,
            batch_size: defaults::batch_size(),
            latency_runs: defaults::latency_runs(),
            warmup_runs: defaults::warmup_runs(),
            threads: defaults::threads(),
            max_samples: None,
        }
    }
}

impl StageOptions for EvaluateOptions {
    fn needs_float_model(&self) -> bool {
        false
    }
}

impl Validate for EvaluateOptions {
    fn validate(&self, c: &mut Checker<'_>) {
        let range = |c: &mut Checker<'_>, key: &str, v: u64, lo: u64, hi: u64| {
            c.check(
                key,
                (lo..=hi).contains(&v),
                format!("`{key}` must be an integer from {lo} to {hi}"),
            )
        };
        range(c, "batch_size", self.batch_size.into(), 1, 4096);
        range(c, "latency_runs", self.latency_runs.into(), 1, 100_000);
        range(c, "warmup_runs", self.warmup_runs.into(), 0, 10_000);
        range(c, "threads", self.threads.into(), 1, 256);
        if let Some(n) = self.max_samples {
            range(c, "max_samples", n, 1, u32::MAX as u64);
        }
        super::task::validate_options(
            c,
            self.task,
            self.threshold,
            self.blank,
            self.characters.as_deref(),
        );
    }
}

mod defaults {
    pub fn batch_size() -> u32 {
        32
    }
    pub fn latency_runs() -> u32 {
        30
    }
    pub fn warmup_runs() -> u32 {
        5
    }
    pub fn threads() -> u32 {
        1
    }
}
