//! The declarative job spec: which inputs, which stages in which order, which constraints.
//!
//! Parsing walks the raw JSON so that every unknown field, wrong type and out-of-range value is
//! reported together with its JSON pointer; serde's own errors stop at the first problem.
use super::validation::{pointer_key, FieldError, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Stages that this version of Shrink can run. Others are rejected when a job is created.
pub const AVAILABLE_STAGES: &[&str] = &["evaluate", "quantize", "distill", "finetune", "prune"];

/// Spec fields that reference uploaded models or datasets, and the multipart file part that can stand in for each.
pub const REFERENCE_FIELDS: &[(&str, &str, RefKind)] = &[
    ("model_id", "model", RefKind::Model),
    ("dataset_id", "dataset", RefKind::Dataset),
    ("calibration_dataset_id", "calibration", RefKind::Dataset),
    ("train_dataset_id", "train", RefKind::Dataset),
    ("student_model_id", "student", RefKind::Model),
    ("teacher_model_id", "teacher", RefKind::Model),
];

/// Whether a reference points at a model or a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Model,
    Dataset,
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "model_id": "0193a4f0-8c1e-7b3a-9d2e-5f6a7b8c9d0e",
    "dataset_id": "0193a4f0-9a2b-7c4d-8e5f-6a7b8c9d0e1f",
    "pipeline": [{"stage": "evaluate", "batch_size": 32}],
    "constraints": {"max_accuracy_drop": 0.01, "min_speedup": 1.0},
    "seed": 42,
    "labels": {"team": "vision"}
}))]
pub struct JobSpec {
    pub model_id: String,
    pub dataset_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_dataset_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_dataset_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_model_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model_id: Option<String>,
    pub pipeline: Vec<Stage>,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One pipeline stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Measure the current model: task metrics, fidelity to the baseline, size, latency, memory.
    Evaluate(EvaluateOptions),
    /// Quantize the current model to int8.
    Quantize(super::quantize::QuantizeOptions),
    /// Distil the current model (the teacher) into a smaller student.
    Distill(super::distill::DistillOptions),
    /// Train the current model further (recovery after pruning or quantization).
    Finetune(super::finetune::FinetuneOptions),
    /// Zero weights (magnitude, N:M) or remove channels, neurons and attention heads (structured).
    Prune(super::prune::PruneOptions),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Evaluate(_) => "evaluate",
            Stage::Quantize(_) => "quantize",
            Stage::Distill(_) => "distill",
            Stage::Finetune(_) => "finetune",
            Stage::Prune(_) => "prune",
        }
    }
}

/// Options of the `evaluate` stage; the baseline evaluation uses those of the first `evaluate` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvaluateOptions {
    /// The classifier output; inferred when the model has one float output of rank >= 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
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
            batch_size: defaults::batch_size(),
            latency_runs: defaults::latency_runs(),
            warmup_runs: defaults::warmup_runs(),
            threads: defaults::threads(),
            max_samples: None,
        }
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

/// Limits the final model must meet; each becomes a pass/fail verdict in the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Constraints {
    /// Largest allowed top-1 accuracy loss vs the baseline, as a fraction (0.01 = one point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Smallest allowed top-1 agreement with the baseline's predictions (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_fidelity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size_bytes: Option<u64>,
    /// Largest allowed batch-1 p50 latency in ONNX Runtime, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<f64>,
    /// Smallest allowed batch-1 p50 speedup vs the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_speedup: Option<f64>,
}

impl JobSpec {
    /// The first evaluate stage's options, used for the baseline too, so that numbers compare.
    /// Without an evaluate stage naming the classifier output, a training stage's `output` names it.
    pub fn evaluate_options(&self) -> EvaluateOptions {
        let mut opts = self
            .pipeline
            .iter()
            .find_map(|s| match s {
                Stage::Evaluate(o) => Some(o.clone()),
                _ => None,
            })
            .unwrap_or_default();
        if opts.output.is_none() {
            opts.output = self.pipeline.iter().find_map(|s| match s {
                Stage::Distill(d) => d.output.clone(),
                Stage::Finetune(f) => f.output.clone(),
                Stage::Prune(p) => p.finetune.as_ref().and_then(|f| f.output.clone()),
                _ => None,
            });
        }
        opts
    }

    /// Parses and validates a spec. Reference fields may be absent when `provided` says a file part stands in.
    pub fn parse(value: &Value, provided: &[&str]) -> Result<JobSpec, Vec<FieldError>> {
        let mut p = Problems::default();
        let Some(obj) = value.as_object() else {
            p.add("", "the job spec must be a JSON object");
            return Err(p.0);
        };
        let known: Vec<&str> = REFERENCE_FIELDS
            .iter()
            .map(|(f, _, _)| *f)
            .chain(["pipeline", "constraints", "seed", "labels"])
            .collect();
        unknown_fields(obj, "", &known, &mut p);

        for (field, _, _) in REFERENCE_FIELDS {
            match obj.get(*field) {
                None | Some(Value::Null) => {
                    let required = matches!(*field, "model_id" | "dataset_id");
                    if required && !provided.contains(field) {
                        p.add(
                            format!("/{field}"),
                            format!("`{field}` is required (or send the file as a multipart part)"),
                        );
                    }
                }
                Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => {}
                Some(_) => p.add(
                    format!("/{field}"),
                    format!("`{field}` must be a model or dataset id (a UUID string)"),
                ),
            }
        }

        validate_pipeline(obj.get("pipeline"), obj, provided, &mut p);
        if let Some(c) = obj.get("constraints") {
            validate_constraints(c, &mut p);
        }
        if let Some(seed) = obj.get("seed") {
            if seed.as_u64().is_none() {
                p.add("/seed", "`seed` must be a non-negative integer");
            }
        }
        if let Some(labels) = obj.get("labels") {
            validate_labels(labels, &mut p);
        }
        if !p.is_empty() {
            return Err(p.0);
        }
        let mut filled = value.clone();
        for field in provided {
            // Placeholders for file parts; the caller replaces them with real ids once stored.
            filled[*field] = Value::String(uuid::Uuid::nil().to_string());
        }
        serde_json::from_value(filled).map_err(|e| {
            vec![FieldError {
                pointer: String::new(),
                detail: e.to_string(),
            }]
        })
    }

    /// Every (spec field, id) reference this spec makes.
    pub fn references(&self) -> Vec<(&'static str, RefKind, &str)> {
        let mut out = vec![
            ("model_id", RefKind::Model, self.model_id.as_str()),
            ("dataset_id", RefKind::Dataset, self.dataset_id.as_str()),
        ];
        let optional = [
            (
                "calibration_dataset_id",
                RefKind::Dataset,
                &self.calibration_dataset_id,
            ),
            ("train_dataset_id", RefKind::Dataset, &self.train_dataset_id),
            ("student_model_id", RefKind::Model, &self.student_model_id),
            ("teacher_model_id", RefKind::Model, &self.teacher_model_id),
        ];
        for (f, k, v) in optional {
            if let Some(v) = v {
                out.push((f, k, v.as_str()));
            }
        }
        out
    }

    /// Sets a reference field by name (used when multipart file parts stand in for ids).
    pub fn set_reference(&mut self, field: &str, id: String) {
        match field {
            "model_id" => self.model_id = id,
            "dataset_id" => self.dataset_id = id,
            "calibration_dataset_id" => self.calibration_dataset_id = Some(id),
            "train_dataset_id" => self.train_dataset_id = Some(id),
            "student_model_id" => self.student_model_id = Some(id),
            "teacher_model_id" => self.teacher_model_id = Some(id),
            _ => {}
        }
    }
}

fn unknown_fields(obj: &Map<String, Value>, base: &str, known: &[&str], p: &mut Problems) {
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            p.add(
                format!("{base}/{}", pointer_key(key)),
                format!(
                    "unknown field `{key}`; expected one of: {}",
                    known.join(", ")
                ),
            );
        }
    }
}

fn validate_pipeline(
    pipeline: Option<&Value>,
    spec: &Map<String, Value>,
    provided: &[&str],
    p: &mut Problems,
) {
    let Some(pipeline) = pipeline else {
        p.add(
            "/pipeline",
            "`pipeline` is required: a list of stages such as [{\"stage\": \"evaluate\"}]",
        );
        return;
    };
    let Some(stages) = pipeline.as_array() else {
        p.add("/pipeline", "`pipeline` must be an array of stage objects");
        return;
    };
    if stages.is_empty() {
        p.add("/pipeline", "`pipeline` must contain at least one stage");
    }
    if stages.len() > 16 {
        p.add("/pipeline", "`pipeline` may contain at most 16 stages");
    }
    for (i, stage) in stages.iter().enumerate() {
        let base = format!("/pipeline/{i}");
        let Some(obj) = stage.as_object() else {
            p.add(base, "each stage must be an object with a `stage` name");
            continue;
        };
        match obj.get("stage").and_then(Value::as_str) {
            Some("evaluate") => validate_evaluate(obj, &base, p),
            Some("quantize") => super::quantize::validate(obj, &base, spec, provided, p),
            Some("distill") => super::distill::validate(obj, &base, spec, provided, p),
            Some("finetune") => super::finetune::validate(obj, &base, spec, provided, p),
            Some("prune") => super::prune::validate(obj, &base, spec, provided, p),
            Some(name) => p.add(
                format!("{base}/stage"),
                format!(
                    "unknown stage `{name}`; expected one of: {}",
                    AVAILABLE_STAGES.join(", ")
                ),
            ),
            None => p.add(
                format!("{base}/stage"),
                "`stage` is required and must be a string",
            ),
        }
    }
}

fn validate_evaluate(obj: &Map<String, Value>, base: &str, p: &mut Problems) {
    let known = [
        "stage",
        "output",
        "batch_size",
        "latency_runs",
        "warmup_runs",
        "threads",
        "max_samples",
    ];
    unknown_fields(obj, base, &known, p);
    if let Some(v) = obj.get("output") {
        if !v.is_string() {
            p.add(
                format!("{base}/output"),
                "`output` must be the name of a model output",
            );
        }
    }
    int_in_range(obj, base, "batch_size", 1, 4096, p);
    int_in_range(obj, base, "latency_runs", 1, 100_000, p);
    int_in_range(obj, base, "warmup_runs", 0, 10_000, p);
    int_in_range(obj, base, "threads", 1, 256, p);
    int_in_range(obj, base, "max_samples", 1, u32::MAX as u64, p);
}

fn int_in_range(
    obj: &Map<String, Value>,
    base: &str,
    key: &str,
    min: u64,
    max: u64,
    p: &mut Problems,
) {
    if let Some(v) = obj.get(key) {
        match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => {}
            _ => p.add(
                format!("{base}/{key}"),
                format!("`{key}` must be an integer from {min} to {max}"),
            ),
        }
    }
}

fn validate_constraints(c: &Value, p: &mut Problems) {
    let Some(obj) = c.as_object() else {
        p.add("/constraints", "`constraints` must be an object");
        return;
    };
    let known = [
        "max_accuracy_drop",
        "min_fidelity",
        "max_size_bytes",
        "max_latency_ms",
        "min_speedup",
    ];
    unknown_fields(obj, "/constraints", &known, p);
    for (key, v) in obj {
        let ptr = format!("/constraints/{}", pointer_key(key));
        let num = v.as_f64();
        match key.as_str() {
            "max_accuracy_drop" | "min_fidelity" if !matches!(num, Some(x) if (0.0..=1.0).contains(&x)) =>
            {
                p.add(ptr, format!("`{key}` must be a fraction between 0 and 1"));
            }
            "max_size_bytes" if !matches!(v.as_u64(), Some(n) if n > 0) => {
                p.add(ptr, "`max_size_bytes` must be a positive integer");
            }
            "max_latency_ms" | "min_speedup" if !matches!(num, Some(x) if x > 0.0 && x.is_finite()) =>
            {
                p.add(ptr, format!("`{key}` must be a positive number"));
            }
            _ => {}
        }
    }
}

fn validate_labels(labels: &Value, p: &mut Problems) {
    let Some(obj) = labels.as_object() else {
        p.add("/labels", "`labels` must be an object of string values");
        return;
    };
    if obj.len() > 64 {
        p.add("/labels", "`labels` may hold at most 64 entries");
    }
    for (k, v) in obj {
        if !v.is_string() || k.len() > 128 || v.as_str().is_some_and(|s| s.len() > 1024) {
            p.add(
                format!("/labels/{}", pointer_key(k)),
                "each label must be a string (keys up to 128, values up to 1024 bytes)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const M: &str = "0193a4f0-8c1e-7b3a-9d2e-5f6a7b8c9d0e";

    fn pointers(v: Value) -> Vec<String> {
        JobSpec::parse(&v, &[])
            .unwrap_err()
            .into_iter()
            .map(|e| e.pointer)
            .collect()
    }

    #[test]
    fn a_minimal_spec_gets_default_options() {
        let spec = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "pipeline": [{"stage": "evaluate"}]}),
            &[],
        )
        .unwrap();
        assert_eq!(spec.evaluate_options(), EvaluateOptions::default());
        assert_eq!(spec.seed, 0);
    }

    #[test]
    fn every_bad_field_is_reported_with_its_pointer() {
        let got = pointers(json!({
            "model_id": 7,
            "pipeline": [{"stage": "evaluate", "batch_size": 0, "colour": "red"}, {"stage": "quantise"}],
            "constraints": {"max_accuracy_drop": 3, "min_speedup": -1},
            "seed": -4,
            "extra": true
        }));
        for want in [
            "/model_id",
            "/dataset_id",
            "/pipeline/0/batch_size",
            "/pipeline/0/colour",
            "/pipeline/1/stage",
            "/constraints/max_accuracy_drop",
            "/constraints/min_speedup",
            "/seed",
            "/extra",
        ] {
            assert!(got.contains(&want.to_string()), "missing {want} in {got:?}");
        }
    }

    #[test]
    fn file_parts_stand_in_for_reference_ids() {
        let spec = JobSpec::parse(
            &json!({"pipeline": [{"stage": "evaluate"}]}),
            &["model_id", "dataset_id"],
        )
        .unwrap();
        assert_eq!(spec.model_id, uuid::Uuid::nil().to_string());
    }

    #[test]
    fn an_empty_pipeline_is_rejected() {
        assert_eq!(
            pointers(json!({"model_id": M, "dataset_id": M, "pipeline": []})),
            vec!["/pipeline"]
        );
    }
}
