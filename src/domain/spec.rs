//! The declarative job spec: which inputs, which stages in which order, which constraints.
//!
//! Every option is defined once, by its serde type; [`super::validation`] parses a spec into
//! those types and reports every unknown key, wrong type and out-of-range value together, each
//! with its JSON pointer. The checks that span stages (order, inputs a stage needs) run on the
//! typed spec, through [`StageOptions`].
pub use super::evaluate::EvaluateOptions;
pub use super::stage::{Given, StageOptions};
use super::validation::{self, Checker, FieldError, Problems, Validate};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Spec fields that reference uploaded models or datasets, and the multipart file part that can stand in for each.
pub const REFERENCE_FIELDS: &[(&str, &str, RefKind)] = &[
    ("model_id", "model", RefKind::Model),
    ("dataset_id", "dataset", RefKind::Dataset),
    ("calibration_dataset_id", "calibration", RefKind::Dataset),
    ("train_dataset_id", "train", RefKind::Dataset),
    ("unlabelled_dataset_id", "unlabelled", RefKind::Dataset),
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
    /// Rows without labels (or whose labels are not used) that training stages learn from the
    /// teacher's outputs alone (KL at the stage's temperature): a few hundred unlabelled inputs
    /// add most of what a small labelled set lacks. A seeded share of them joins the held-out
    /// rows that pick the weights to keep, scored against the teacher's classes. Never the
    /// evaluation rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabelled_dataset_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_model_id: Option<String>,
    /// A teacher for `distill` stages: the job's model is then the student and learns from it.
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

/// Declares the stages: the `Stage` enum, each stage's name and its options type. Adding a stage
/// is one line here, its options type, and its file and match arm in `pipeline/`.
macro_rules! stages {
    ($( $(#[$doc:meta])* $variant:ident($options:ty) = $name:literal, )*) => {
        /// One pipeline stage.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
        // `rename_all` says in the OpenAPI schema what each `rename` says to serde (utoipa does not
        // see a rename whose value comes from a macro argument); the two agree for every stage.
        #[serde(tag = "stage", rename_all = "lowercase")]
        pub enum Stage {
            $( $(#[$doc])* #[serde(rename = $name)] $variant($options), )*
        }

        impl Stage {
            /// The names a spec's `stage` field takes.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            pub fn name(&self) -> &'static str {
                match self {
                    $(Stage::$variant(_) => $name,)*
                }
            }

            /// The stage's options, as what they ask of the job.
            pub fn options(&self) -> &dyn StageOptions {
                match self {
                    $(Stage::$variant(o) => o,)*
                }
            }
        }
    };
}

stages! {
    /// Measure the current model: task metrics, fidelity to the baseline, size, latency, memory.
    Evaluate(EvaluateOptions) = "evaluate",
    /// Quantize the current model (int8, int4 weights or fp16).
    Quantize(super::quantize::QuantizeOptions) = "quantize",
    /// Distil a teacher into a student (the current model teaches a smaller one, or an uploaded
    /// teacher teaches the current model).
    Distill(super::distill::DistillOptions) = "distill",
    /// Train the current model further (recovery after pruning).
    Finetune(super::finetune::FinetuneOptions) = "finetune",
    /// Zero weights (magnitude, N:M) or remove channels, neurons and attention heads (structured).
    Prune(super::prune::PruneOptions) = "prune",
}

impl Validate for Stage {
    fn validate(&self, c: &mut Checker<'_>) {
        self.options().validate(c);
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

impl Validate for Constraints {
    fn validate(&self, c: &mut Checker<'_>) {
        for (key, v) in [
            ("max_accuracy_drop", self.max_accuracy_drop),
            ("min_fidelity", self.min_fidelity),
        ] {
            c.check(
                key,
                v.is_none_or(|x| (0.0..=1.0).contains(&x)),
                format!("`{key}` must be a fraction between 0 and 1"),
            );
        }
        c.check(
            "max_size_bytes",
            self.max_size_bytes != Some(0),
            "`max_size_bytes` must be a positive integer",
        );
        for (key, v) in [
            ("max_latency_ms", self.max_latency_ms),
            ("min_speedup", self.min_speedup),
        ] {
            c.check(
                key,
                v.is_none_or(|x| x > 0.0 && x.is_finite()),
                format!("`{key}` must be a positive number"),
            );
        }
    }
}

impl Validate for JobSpec {
    fn validate(&self, c: &mut Checker<'_>) {
        for (field, _, id) in self.references() {
            c.check(
                field,
                uuid::Uuid::parse_str(id).is_ok(),
                format!("`{field}` must be a model or dataset id (a UUID string)"),
            );
        }
        c.nested("constraints", &self.constraints);
        c.check(
            "labels",
            self.labels.len() <= 64,
            "`labels` may hold at most 64 entries",
        );
        for (k, v) in &self.labels {
            if k.len() > 128 || v.len() > 1024 {
                let at = format!("{}/{}", c.pointer("labels"), validation::pointer_key(k));
                c.add_at(
                    at,
                    "label keys are up to 128 bytes, values up to 1024 bytes",
                );
            }
        }
    }
}

/// At most this many stages in one pipeline.
const MAX_STAGES: usize = 16;

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
            opts.output = self
                .pipeline
                .iter()
                .find_map(|s| s.options().training().and_then(|r| r.output.clone()));
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
        let mut top = obj.clone();
        // Placeholders for file parts; the caller replaces them with real ids once stored.
        let placeholder = Value::String(uuid::Uuid::nil().to_string());
        for field in provided {
            top.insert(field.to_string(), placeholder.clone());
        }
        for field in ["model_id", "dataset_id"] {
            if top.get(field).is_none_or(Value::is_null) {
                p.add(
                    format!("/{field}"),
                    format!("`{field}` is required (or send the file as a multipart part)"),
                );
                top.insert(field.into(), placeholder.clone());
            }
        }
        let stages = parse_pipeline(top.insert("pipeline".into(), Value::Array(vec![])), &mut p);
        let spec = validation::parse_into::<JobSpec>(&Value::Object(top), "", &mut p);
        match (spec, stages) {
            (Some(mut spec), Some(stages)) => {
                spec.pipeline = stages;
                spec.check_stages(&mut p);
                p.into_result(spec)
            }
            _ => Err(p.0),
        }
    }

    /// Checks that span stages: a stage after `quantize` that needs a float model, and the
    /// inputs each stage needs.
    fn check_stages(&self, p: &mut Problems) {
        let given = Given {
            train_data: self.train_dataset_id.is_some(),
            student_model: self.student_model_id.is_some(),
            teacher_model: self.teacher_model_id.is_some(),
        };
        let mut quantized_at = None;
        for (i, stage) in self.pipeline.iter().enumerate() {
            let at = format!("/pipeline/{i}");
            let o = stage.options();
            if let (Some(q), true) = (quantized_at, o.needs_float_model()) {
                let hint = if o.training().is_some() {
                    " (to train with quantization in the loop, use quantize `mode: qat`)"
                } else {
                    ""
                };
                p.add(
                    at.clone(),
                    format!(
                        "`{}` needs a float model, but stage {q} (`quantize`) has already quantized it: only `evaluate` can follow a quantize stage; move this stage before it{hint}",
                        stage.name()
                    ),
                );
            }
            if o.quantizes() {
                quantized_at.get_or_insert(i);
            }
            if o.training().is_some() && !given.train_data {
                p.add(
                    "/train_dataset_id",
                    format!(
                        "the {} stage at {at} trains on `train_dataset_id` (labels optional); the job's dataset is kept for evaluation",
                        stage.name()
                    ),
                );
            }
            o.check_inputs(given, &at, p);
        }
        if let Some(u) = &self.unlabelled_dataset_id {
            if !self
                .pipeline
                .iter()
                .any(|s| s.options().training().is_some())
            {
                p.add(
                    "/unlabelled_dataset_id",
                    "`unlabelled_dataset_id` is read by training stages (distill, finetune, prune with `finetune`, quantize `mode: qat`), and the pipeline has none",
                );
            } else if u == &self.dataset_id {
                p.add(
                    "/unlabelled_dataset_id",
                    "`unlabelled_dataset_id` is the evaluation dataset (`dataset_id`): training on the rows every number is measured on would make those numbers meaningless",
                );
            }
        }
        if self.teacher_model_id.is_some()
            && !self.pipeline.iter().any(|s| matches!(s, Stage::Distill(_)))
        {
            p.add(
                "/teacher_model_id",
                "`teacher_model_id` teaches the job's model in a `distill` stage, and the pipeline has none",
            );
        }
    }

    /// Every (spec field, id) reference this spec makes.
    pub fn references(&self) -> Vec<(&'static str, RefKind, &str)> {
        let optional = [
            &self.calibration_dataset_id,
            &self.train_dataset_id,
            &self.unlabelled_dataset_id,
            &self.student_model_id,
            &self.teacher_model_id,
        ];
        let ids = [Some(&self.model_id), Some(&self.dataset_id)]
            .into_iter()
            .chain(optional.into_iter().map(Option::as_ref));
        REFERENCE_FIELDS
            .iter()
            .zip(ids)
            .filter_map(|((field, _, kind), id)| id.map(|id| (*field, *kind, id.as_str())))
            .collect()
    }

    /// Sets a reference field by name (used when multipart file parts stand in for ids).
    pub fn set_reference(&mut self, field: &str, id: String) {
        match field {
            "model_id" => self.model_id = id,
            "dataset_id" => self.dataset_id = id,
            "calibration_dataset_id" => self.calibration_dataset_id = Some(id),
            "train_dataset_id" => self.train_dataset_id = Some(id),
            "unlabelled_dataset_id" => self.unlabelled_dataset_id = Some(id),
            "student_model_id" => self.student_model_id = Some(id),
            "teacher_model_id" => self.teacher_model_id = Some(id),
            _ => {}
        }
    }
}

/// Parses each stage on its own, so that every stage's problems are reported.
fn parse_pipeline(pipeline: Option<Value>, p: &mut Problems) -> Option<Vec<Stage>> {
    let Some(pipeline) = pipeline else {
        p.add(
            "/pipeline",
            "`pipeline` is required: a list of stages such as [{\"stage\": \"evaluate\"}]",
        );
        return None;
    };
    let Value::Array(stages) = pipeline else {
        p.add("/pipeline", "`pipeline` must be an array of stage objects");
        return None;
    };
    if stages.is_empty() {
        p.add("/pipeline", "`pipeline` must contain at least one stage");
    }
    if stages.len() > MAX_STAGES {
        p.add(
            "/pipeline",
            format!("`pipeline` may contain at most {MAX_STAGES} stages"),
        );
    }
    let parsed: Vec<Option<Stage>> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| validation::parse_into::<Stage>(s, &format!("/pipeline/{i}"), p))
        .collect();
    parsed.into_iter().collect()
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

    #[test]
    fn a_stage_after_quantize_that_needs_a_float_model_is_refused_naming_it() {
        let got = pointers(json!({
            "model_id": M, "dataset_id": M, "train_dataset_id": M,
            "pipeline": [{"stage": "quantize"}, {"stage": "evaluate"}, {"stage": "finetune"},
                         {"stage": "prune"}, {"stage": "quantize", "mode": "fp16"}]
        }));
        assert_eq!(got, vec!["/pipeline/2", "/pipeline/3", "/pipeline/4"]);
        let ok = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "train_dataset_id": M,
                    "pipeline": [{"stage": "prune"}, {"stage": "finetune"}, {"stage": "quantize"},
                                 {"stage": "evaluate"}]}),
            &[],
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn every_training_stage_needs_training_rows() {
        for stage in [
            json!({"stage": "distill"}),
            json!({"stage": "finetune"}),
            json!({"stage": "prune", "finetune": {}}),
            json!({"stage": "quantize", "mode": "qat"}),
        ] {
            let got = pointers(json!({"model_id": M, "dataset_id": M, "pipeline": [stage]}));
            assert_eq!(got, vec!["/train_dataset_id"], "{stage}");
        }
    }

    #[test]
    fn unlabelled_rows_need_a_training_stage_and_are_never_the_evaluation_rows() {
        const U: &str = "0193a4f0-9a2b-7c4d-8e5f-6a7b8c9d0e1f";
        let got = pointers(
            json!({"model_id": M, "dataset_id": M, "unlabelled_dataset_id": U,
                                  "pipeline": [{"stage": "evaluate"}]}),
        );
        assert_eq!(got, vec!["/unlabelled_dataset_id"]);
        let got = pointers(
            json!({"model_id": M, "dataset_id": U, "train_dataset_id": M,
                                  "unlabelled_dataset_id": U, "pipeline": [{"stage": "finetune"}]}),
        );
        assert_eq!(got, vec!["/unlabelled_dataset_id"]);
        let got = pointers(
            json!({"model_id": M, "dataset_id": M, "train_dataset_id": M,
                                  "unlabelled_dataset_id": "nope", "pipeline": [{"stage": "finetune"}]}),
        );
        assert_eq!(got, vec!["/unlabelled_dataset_id"]);
        let ok = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "train_dataset_id": M, "unlabelled_dataset_id": U,
                    "pipeline": [{"stage": "prune", "finetune": {"optimizer_steps": 50}}]}),
            &[],
        )
        .unwrap();
        assert_eq!(ok.unlabelled_dataset_id.as_deref(), Some(U));
        assert!(ok
            .references()
            .contains(&("unlabelled_dataset_id", RefKind::Dataset, U)));
        let both = pointers(
            json!({"model_id": M, "dataset_id": M, "train_dataset_id": M,
                                   "pipeline": [{"stage": "finetune", "optimizer_steps": 50, "epochs": 2}]}),
        );
        assert_eq!(both, vec!["/pipeline/0/optimizer_steps"]);
    }

    #[test]
    fn the_shared_training_options_are_one_block_in_every_training_stage() {
        for (stage, base) in [
            (
                json!({"stage": "distill", "epochs": 0, "alpha": 2}),
                "/pipeline/0",
            ),
            (
                json!({"stage": "finetune", "epochs": 0, "alpha": 2}),
                "/pipeline/0",
            ),
            (
                json!({"stage": "prune", "finetune": {"epochs": 0, "alpha": 2}}),
                "/pipeline/0/finetune",
            ),
            (
                json!({"stage": "quantize", "mode": "qat", "qat": {"epochs": 0, "alpha": 2}}),
                "/pipeline/0/qat",
            ),
        ] {
            let mut got = pointers(
                json!({"model_id": M, "dataset_id": M, "train_dataset_id": M,
                                          "pipeline": [stage.clone()]}),
            );
            got.sort();
            assert_eq!(
                got,
                vec![format!("{base}/alpha"), format!("{base}/epochs")],
                "{stage}"
            );
        }
    }

    #[test]
    fn an_unknown_stage_names_the_stages_there_are() {
        let errors = JobSpec::parse(
            &json!({"model_id": M, "dataset_id": M, "pipeline": [{"stage": "quantise"}]}),
            &[],
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].pointer, "/pipeline/0/stage");
        assert_eq!(
            errors[0].detail,
            "unknown value `quantise`; expected one of: evaluate, quantize, distill, finetune, prune"
        );
    }
}
