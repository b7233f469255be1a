//! The report: what every stage did to accuracy, fidelity, size, latency and memory.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::task::{SegmentationMetrics, SequenceMetrics, TaskKind};

/// Task metrics, present when the dataset has labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskMetrics {
    /// The scored output the metrics were computed on.
    pub output: String,
    /// What the output predicts, which decides how it is scored.
    #[serde(default)]
    pub task: TaskKind,
    /// The metric in `score`, which `max_accuracy_drop` budgets: top-1 accuracy, mean IoU,
    /// per-position accuracy or sequence accuracy.
    #[serde(default)]
    pub metric: String,
    #[serde(default)]
    pub score: f64,
    pub samples: u64,
    pub classes: u64,
    /// Share of correct top-1 predictions: per sample (classification, and per decoded sequence
    /// for CTC), per labelled pixel (segmentation) or per labelled position (sequence).
    pub top1_accuracy: f64,
    /// Present when a per-sample classifier has at least five classes.
    pub top5_accuracy: Option<f64>,
    /// Unweighted mean of per-class F1 over every class seen in labels or predictions (as
    /// scikit-learn), over the same units as `top1_accuracy` (per pixel it is the mean Dice);
    /// absent for CTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<SegmentationMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<SequenceMetrics>,
}

/// Agreement of one output with the baseline model's output on the same samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OutputFidelity {
    pub output: String,
    /// How the output was read: one prediction per sample, per pixel or per position.
    #[serde(default)]
    pub task: TaskKind,
    /// Share of predictions (per sample, pixel or position) whose arg-max (for scalar outputs:
    /// value; for probability maps: thresholded class) equals the baseline's.
    pub top1_agreement: f64,
    /// Segmentation outputs: mean IoU between the two models' masks, over classes in either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_iou: Option<f64>,
    /// CTC outputs: share of samples whose greedy-decoded sequences (arg-max per step, repeats
    /// merged, blanks dropped) equal the baseline's — what a recogniser's text depends on, where
    /// per-position agreement also counts spikes that move by a step and decode the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_agreement: Option<f64>,
    /// Mean over samples of the cosine similarity of the per-sample output vectors.
    pub cosine_mean: f64,
    pub cosine_min: f64,
    pub mean_abs_error: f64,
    pub max_abs_error: f64,
}

/// Size on disk and parameter counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SizeMetrics {
    pub bytes: u64,
    /// Size after zstd (level 3): what sparsity and weight sharing save in transfer.
    pub zstd_bytes: u64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    /// Share of parameters that are zero.
    pub sparsity: f64,
    /// Baseline bytes / these bytes.
    pub compression_ratio: f64,
}

/// Latency of repeated runs at one batch size in ONNX Runtime on CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencyStats {
    pub batch_size: u64,
    pub warmup_runs: u64,
    pub runs: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    /// Samples per second at the mean latency.
    pub throughput_per_s: f64,
}

/// Latency in ONNX Runtime at batch 1 and at the configured batch size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatencyMetrics {
    pub runtime: String,
    pub intra_op_threads: u64,
    pub batch_1: LatencyStats,
    /// Absent when the model's batch dimension is fixed to 1.
    pub batch_n: Option<LatencyStats>,
    /// Baseline p50 / this p50 at batch 1.
    pub speedup_batch_1: f64,
    pub speedup_batch_n: Option<f64>,
}

/// Memory used by the ONNX Runtime session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryMetrics {
    /// Peak growth of the process's resident set while the session loaded and ran, over the level before.
    pub peak_rss_growth_bytes: u64,
    /// Resident-set growth right after the session loaded.
    pub load_rss_growth_bytes: u64,
    /// What the figures cover.
    pub scope: MemoryScope,
}

/// Whose memory a [`MemoryMetrics`] figure counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemoryScope {
    /// The whole worker process's resident set: jobs that run at the same time in one process
    /// (several worker slots) add to each other's figures. For an exact figure run the worker
    /// with one slot (`--workers 1`), or `shrink eval`.
    Process,
}

/// Everything measured on one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Metrics {
    pub samples: u64,
    pub task: Option<TaskMetrics>,
    pub fidelity: Vec<OutputFidelity>,
    pub size: SizeMetrics,
    pub latency: LatencyMetrics,
    pub memory: MemoryMetrics,
}

/// One stage's parameters and the metrics after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StageReport {
    pub index: u64,
    pub stage: String,
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    pub metrics: Metrics,
    pub duration_ms: u64,
    pub notes: Vec<String>,
    /// The artifact holding this stage's model.
    pub artifact: Option<String>,
    /// Per-layer decisions of stages that treat layers differently (quantization precision).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerReport>,
    /// Quantization-aware training's export parity (`mode: qat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qat: Option<QatParity>,
    /// What a `prune` stage removed or zeroed, layer by layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PruningReport>,
    /// How a training stage (distill, finetune, prune recovery, QAT) trained: its schedule, the
    /// score before the first step and the loss and validation curve per step window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<super::training::TrainingCurve>,
}

/// What pruning did: each layer's pattern (checked on the written weights), the size it saves
/// on disk and compressed, and whether ONNX Runtime can run it faster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PruningReport {
    /// `magnitude`, `n_m` or `structured`.
    pub method: String,
    /// Parameters in the pruned layers before, and parameters (structured) or non-zeros
    /// (magnitude, N:M) after.
    pub parameters_before: u64,
    pub nonzero_after: u64,
    /// Zeroed or removed share of the pruned layers' parameters.
    pub sparsity: f64,
    /// Every pruned layer's pattern held when checked on the written weights.
    pub verified: bool,
    /// The model file before and after, raw and zstd-compressed (level 3).
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub zstd_bytes_before: u64,
    pub zstd_bytes_after: u64,
    /// Whether this kind of sparsity can make ONNX Runtime on CPU faster (only removed
    /// structure can), and why.
    pub runtime_speedup_expected: bool,
    pub runtime_note: String,
    pub layers: Vec<PrunedLayer>,
}

/// One pruned layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrunedLayer {
    pub node: String,
    pub op: String,
    pub weight: String,
    /// `unstructured`, `2:4`, `channels 32 -> 16`, `heads 12 -> 6`.
    pub pattern: String,
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub nonzero_after: u64,
    pub verified: bool,
}

/// The fake-quantized training model against the QDQ model it exported (every layer int8), on
/// the same evaluation rows: the export is faithful when the two scores match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QatParity {
    pub samples: u64,
    /// `top-1 accuracy` (labels) or `top-1 agreement with the float model`.
    pub metric: String,
    /// Score of the fake-quantized model (candle, the training graph).
    pub fake_quant: f64,
    /// Score of the exported QDQ model in ONNX Runtime.
    pub onnx_runtime: f64,
    /// |fake_quant − onnx_runtime| in percentage points.
    pub difference_points: f64,
    /// Share of rows on which both predict the same class.
    pub agreement: f64,
    /// Score of the same QDQ export with the weights before training (static PTQ), for what
    /// the training recovered.
    pub before_training: f64,
}

/// What a stage did to one layer, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LayerReport {
    pub node: String,
    pub op: String,
    /// `int8`, `int4`, `float16`, `float`.
    pub precision: String,
    pub reason: String,
    /// Accuracy lost when this layer alone is quantized (measured under an accuracy budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<f64>,
}

/// Which samples calibrated quantization; they are never among the evaluated samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CalibrationInfo {
    /// `calibration_dataset` or `split_of_dataset`.
    pub source: String,
    pub samples: u64,
    /// Row indices of the job's dataset used for calibration (for `split_of_dataset`); the rest were evaluated.
    pub dataset_rows: Vec<u64>,
}

/// Final vs baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deltas {
    /// Baseline task score minus final task score (positive = worse), in `metric`.
    pub accuracy_drop: Option<f64>,
    /// The task metric of `accuracy_drop`: top-1 accuracy, mean IoU, per-position accuracy or
    /// sequence accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    pub top1_agreement: Option<f64>,
    /// Fidelity of the scored output to the baseline, as `min_fidelity` and unlabelled budgets
    /// measure it: mask IoU for segmentation, else `top1_agreement`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_metric: Option<String>,
    /// Final bytes / baseline bytes.
    pub size_ratio: f64,
    pub speedup_batch_1: f64,
    pub speedup_batch_n: Option<f64>,
}

/// One constraint's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Verdict {
    pub constraint: String,
    pub limit: f64,
    /// None when the metric could not be measured (e.g. accuracy without labels), which fails the verdict.
    pub actual: Option<f64>,
    pub passed: bool,
    pub detail: String,
}

/// Where and with what the numbers were measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    pub shrink_version: String,
    pub onnxruntime_version: String,
    pub cpu_model: String,
    pub logical_cpus: u64,
    pub intra_op_threads: u64,
    pub seed: u64,
    pub spec_sha256: String,
    pub model_sha256: String,
    pub dataset_sha256: String,
}

/// The job's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Report {
    pub job_id: String,
    pub baseline: Metrics,
    pub stages: Vec<StageReport>,
    #[serde(rename = "final")]
    pub final_metrics: Metrics,
    pub deltas: Deltas,
    pub verdicts: Vec<Verdict>,
    /// True when every verdict passed (and when there are none).
    pub passed: bool,
    pub environment: Environment,
    /// Samples evaluated: every row of the dataset except those used for calibration.
    pub evaluated_samples: u64,
    pub calibration: Option<CalibrationInfo>,
}

impl Deltas {
    pub fn between(baseline: &Metrics, last: &Metrics) -> Self {
        let score = |m: &Metrics| m.task.as_ref().map(|t| t.score);
        let fidelity = primary_fidelity(last);
        Deltas {
            accuracy_drop: score(baseline).zip(score(last)).map(|(b, f)| b - f),
            metric: last.task.as_ref().map(|t| t.metric.clone()),
            top1_agreement: fidelity.map(|f| f.top1_agreement),
            agreement: fidelity.map(OutputFidelity::agreement),
            agreement_metric: fidelity.map(|f| f.task.agreement().to_string()),
            size_ratio: last.size.bytes as f64 / baseline.size.bytes.max(1) as f64,
            speedup_batch_1: last.latency.speedup_batch_1,
            speedup_batch_n: last.latency.speedup_batch_n,
        }
    }
}

impl OutputFidelity {
    /// The fidelity budgets use: mask IoU for segmentation outputs, decoded-sequence agreement
    /// for CTC outputs, else top-1 agreement (per sample or per position).
    pub fn agreement(&self) -> f64 {
        self.mask_iou
            .or(self.sequence_agreement)
            .unwrap_or(self.top1_agreement)
    }
}

/// Fidelity of the scored output (evaluation lists it first), else of the first output.
pub fn primary_fidelity(m: &Metrics) -> Option<&OutputFidelity> {
    let classifier = m.task.as_ref().map(|t| t.output.as_str());
    m.fidelity
        .iter()
        .find(|f| Some(f.output.as_str()) == classifier)
        .or_else(|| m.fidelity.first())
}

/// Judges the final model against the spec's constraints.
/// The verdict on a quantize stage's own accuracy budget, measured after the stage.
pub fn stage_budget_verdict(
    stage: usize,
    limit: f64,
    baseline: &Metrics,
    after: &Metrics,
) -> Verdict {
    let d = Deltas::between(baseline, after);
    let (actual, what) = match d.accuracy_drop {
        Some(a) => (
            Some(a),
            format!("{} drop", d.metric.as_deref().unwrap_or("accuracy")),
        ),
        None => (
            d.agreement.map(|a| 1.0 - a),
            format!(
                "1 - {}",
                d.agreement_metric
                    .as_deref()
                    .unwrap_or("agreement with the baseline")
            ),
        ),
    };
    Verdict {
        constraint: format!("stages/{stage}/max_accuracy_drop"),
        limit,
        actual,
        passed: actual.is_some_and(|a| a <= limit + 1e-12),
        detail: match actual {
            Some(a) => format!("{what} after stage {stage} is {a:.6}; must be at most {limit}"),
            None => format!("{what} after stage {stage} could not be measured"),
        },
    }
}

pub fn verdicts(
    c: &crate::domain::spec::Constraints,
    baseline: &Metrics,
    last: &Metrics,
) -> Vec<Verdict> {
    let deltas = Deltas::between(baseline, last);
    let mut out = Vec::new();
    let mut check = |name: &str, limit: f64, actual: Option<f64>, at_most: bool, what: &str| {
        let passed = actual.is_some_and(|a| {
            if at_most {
                a <= limit + 1e-12
            } else {
                a + 1e-12 >= limit
            }
        });
        let detail = match actual {
            None => format!("{what} could not be measured"),
            Some(a) => format!(
                "{what} is {a:.6}; must be {} {limit}",
                if at_most { "at most" } else { "at least" }
            ),
        };
        out.push(Verdict {
            constraint: name.into(),
            limit,
            actual,
            passed,
            detail,
        });
    };
    if let Some(l) = c.max_accuracy_drop {
        let what = match &deltas.metric {
            Some(m) => format!("{m} drop"),
            None => "accuracy drop (needs labels)".to_string(),
        };
        check("max_accuracy_drop", l, deltas.accuracy_drop, true, &what);
    }
    if let Some(l) = c.min_fidelity {
        let what = deltas
            .agreement_metric
            .clone()
            .unwrap_or_else(|| "agreement with the baseline".into());
        check("min_fidelity", l, deltas.agreement, false, &what);
    }
    if let Some(l) = c.max_size_bytes {
        check(
            "max_size_bytes",
            l as f64,
            Some(last.size.bytes as f64),
            true,
            "model size in bytes",
        );
    }
    if let Some(l) = c.max_latency_ms {
        check(
            "max_latency_ms",
            l,
            Some(last.latency.batch_1.p50_ms),
            true,
            "batch-1 p50 latency (ms)",
        );
    }
    if let Some(l) = c.min_speedup {
        check(
            "min_speedup",
            l,
            Some(last.latency.speedup_batch_1),
            false,
            "batch-1 p50 speedup over the baseline",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::spec::Constraints;

    fn metrics(top1: Option<f64>, bytes: u64, p50: f64, speedup: f64) -> Metrics {
        let stats = LatencyStats {
            batch_size: 1,
            warmup_runs: 0,
            runs: 1,
            p50_ms: p50,
            p95_ms: p50,
            p99_ms: p50,
            mean_ms: p50,
            min_ms: p50,
            throughput_per_s: 1.0,
        };
        Metrics {
            samples: 10,
            task: top1.map(|a| TaskMetrics {
                output: "y".into(),
                task: TaskKind::Classification,
                metric: "top-1 accuracy".into(),
                score: a,
                samples: 10,
                classes: 2,
                top1_accuracy: a,
                top5_accuracy: None,
                macro_f1: Some(a),
                segmentation: None,
                sequence: None,
            }),
            fidelity: vec![],
            size: SizeMetrics {
                bytes,
                zstd_bytes: bytes,
                parameters: 1,
                nonzero_parameters: 1,
                sparsity: 0.0,
                compression_ratio: 1.0,
            },
            latency: LatencyMetrics {
                runtime: "ort".into(),
                intra_op_threads: 1,
                batch_1: stats,
                batch_n: None,
                speedup_batch_1: speedup,
                speedup_batch_n: None,
            },
            memory: MemoryMetrics {
                peak_rss_growth_bytes: 0,
                load_rss_growth_bytes: 0,
                scope: MemoryScope::Process,
            },
        }
    }

    #[test]
    fn an_accuracy_drop_within_budget_passes_and_beyond_fails() {
        let c = Constraints {
            max_accuracy_drop: Some(0.01),
            ..Default::default()
        };
        let base = metrics(Some(0.90), 100, 1.0, 1.0);
        assert!(verdicts(&c, &base, &metrics(Some(0.895), 100, 1.0, 1.0))[0].passed);
        assert!(!verdicts(&c, &base, &metrics(Some(0.88), 100, 1.0, 1.0))[0].passed);
    }

    #[test]
    fn an_accuracy_budget_without_labels_fails_rather_than_passing_silently() {
        let c = Constraints {
            max_accuracy_drop: Some(0.5),
            ..Default::default()
        };
        let v = verdicts(
            &c,
            &metrics(None, 100, 1.0, 1.0),
            &metrics(None, 100, 1.0, 1.0),
        );
        assert!(!v[0].passed && v[0].actual.is_none());
    }

    #[test]
    fn a_model_slower_than_required_fails_the_speedup_gate() {
        let c = Constraints {
            min_speedup: Some(1.0),
            max_size_bytes: Some(50),
            max_latency_ms: Some(2.0),
            ..Default::default()
        };
        let v = verdicts(
            &c,
            &metrics(None, 100, 1.0, 1.0),
            &metrics(None, 40, 1.5, 0.67),
        );
        let by = |n: &str| v.iter().find(|x| x.constraint == n).unwrap().passed;
        assert!(!by("min_speedup") && by("max_size_bytes") && by("max_latency_ms"));
    }
}
