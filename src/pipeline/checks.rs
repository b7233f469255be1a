//! Checks a job's spec against the summaries of the models and datasets it names, before the
//! job is queued: the datasets fit the model, the classifier outputs exist, and a training
//! stage's graph is one training can run. The API calls these instead of the engine.
use crate::domain::dataset::DatasetSummary;
use crate::domain::model::ModelSummary;
use crate::domain::spec::{JobSpec, Stage};
use crate::domain::task::TaskKind;
use crate::domain::validation::Problems;
use crate::engine::dataset::bind;
use crate::engine::evaluate::choose_classifier;
use std::collections::BTreeMap;

/// The summaries of the uploads a spec names, by spec field (`model_id`, `train_dataset_id`...).
pub struct Uploads<'a> {
    pub models: &'a BTreeMap<&'a str, ModelSummary>,
    pub datasets: &'a BTreeMap<&'a str, DatasetSummary>,
}

/// Adds a problem for every way the uploads do not fit the spec.
pub fn check_inputs(spec: &JobSpec, uploads: &Uploads<'_>, problems: &mut Problems) {
    let Some(model) = uploads.models.get("model_id") else {
        return;
    };
    for field in [
        "dataset_id",
        "calibration_dataset_id",
        "train_dataset_id",
        "unlabelled_dataset_id",
    ] {
        if let Some(data) = uploads.datasets.get(field) {
            if let Err(e) = bind(model, data) {
                problems.add(
                    format!("/{field}"),
                    format!("the dataset does not fit the model: {e}"),
                );
            }
        }
    }
    let teacher = uploads.models.get("teacher_model_id");
    for field in ["train_dataset_id", "unlabelled_dataset_id"] {
        if let (Some(t), Some(data)) = (teacher, uploads.datasets.get(field)) {
            if let Err(e) = bind(t, data) {
                problems.add(
                    "/teacher_model_id",
                    format!("the `{field}` rows do not fit the teacher: {e}"),
                );
            }
        }
    }
    for (i, stage) in spec.pipeline.iter().enumerate() {
        if let Stage::Evaluate(opts) = stage {
            if let (Some(kind), Ok(Some(out))) = (
                opts.task,
                choose_classifier(&model.outputs, opts.output.as_deref(), true),
            ) {
                let rank = model
                    .outputs
                    .iter()
                    .find(|o| o.name == out)
                    .map(|o| o.shape.len());
                let wanted = match kind {
                    TaskKind::Segmentation => Some(4),
                    TaskKind::Sequence | TaskKind::Ctc => Some(3),
                    TaskKind::Classification => None,
                };
                if let (Some(rank), Some(wanted)) = (rank, wanted) {
                    if rank != wanted {
                        problems.add(
                            format!("/pipeline/{i}/task"),
                            format!(
                                "output `{out}` has rank {rank}, but {} scores rank-{wanted} outputs",
                                kind.name()
                            ),
                        );
                    }
                }
            }
            if let Some(out) = &opts.output {
                if !model.outputs.iter().any(|o| &o.name == out) {
                    let names: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
                    problems.add(
                        format!("/pipeline/{i}/output"),
                        format!(
                            "the model has no output `{out}` (it has: {})",
                            names.join(", ")
                        ),
                    );
                }
            }
        }
        let Some(training) = stage.options().training() else {
            continue;
        };
        let named = training
            .output
            .clone()
            .or_else(|| spec.evaluate_options().output);
        let reference = match (stage, teacher) {
            (Stage::Distill(_), Some(t)) => t,
            _ => model,
        };
        let out = match choose_classifier(&reference.outputs, named.as_deref(), true) {
            Ok(Some(out)) => out,
            Ok(None) => continue,
            Err(e) => {
                problems.add(format!("/pipeline/{i}/output"), e.to_string());
                continue;
            }
        };
        if let Some(data) = uploads.datasets.get("train_dataset_id") {
            let text = bind(reference, data)
                .ok()
                .and_then(|b| b.labels)
                .and_then(|l| data.tensors.iter().find(|t| t.name == l))
                .is_some_and(|t| t.dtype == "str");
            if text {
                problems.add(
                    "/train_dataset_id",
                    format!(
                        "{} needs integer class labels; text labels score CTC models (evaluate, quantize) but do not train them",
                        stage.name()
                    ),
                );
            }
        }
        // The graphs that train: the job's model, and an uploaded student of a distill stage.
        let student = match stage {
            Stage::Distill(_) => uploads.models.get("student_model_id"),
            _ => None,
        };
        for (field, m) in [("model_id", Some(model)), ("student_model_id", student)] {
            let Some(m) = m else { continue };
            if !m.outputs.iter().any(|o| o.name == out) {
                problems.add(
                    format!("/{field}"),
                    format!("the student has no output `{out}` like the teacher's"),
                );
            } else if let Some(ops) = m.untrainable_ops.get(&out) {
                problems.add(
                    format!("/{field}"),
                    format!(
                        "{} cannot train through output `{out}`: the op(s) {} are outside the training subset ({})",
                        stage.name(),
                        ops.join(", "),
                        crate::engine::train::SUPPORTED_OPS.join(", ")
                    ),
                );
            }
        }
    }
}
