//! The `distill` stage: spec options -> engine distillation, the student (uploaded or derived
//! by width), and the notes the report carries.
use crate::domain::distill::{DistillOptions, StudentSource};
use crate::domain::finetune::FinetuneOptions;
use crate::domain::spec::JobSpec;
use crate::domain::training::{LrSchedule, TrainingOptions};
use crate::engine::dataset::Dataset;
use crate::engine::evaluate::choose_classifier;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::Runtime;
use crate::engine::train::{distill, fit};
use crate::engine::{quantize, EngineError, Progress, Result};
use std::time::Duration;

pub struct StageInputs<'a> {
    pub teacher: &'a LoadedModel,
    pub student: Option<&'a LoadedModel>,
    pub train: Option<&'a Dataset>,
    pub spec: &'a JobSpec,
}

pub struct Outcome {
    pub model: LoadedModel,
    pub notes: Vec<String>,
}

pub fn fit_options(d: &TrainingOptions, seed: u64) -> fit::FitOptions {
    fit::FitOptions {
        epochs: d.epochs as usize,
        batch_size: d.batch_size as usize,
        learning_rate: d.learning_rate,
        weight_decay: d.weight_decay,
        warmup: d.warmup,
        schedule: match d.schedule {
            LrSchedule::Cosine => fit::Schedule::Cosine,
            LrSchedule::Linear => fit::Schedule::Linear,
            LrSchedule::Constant => fit::Schedule::Constant,
        },
        max_grad_norm: (d.max_grad_norm > 0.0).then_some(d.max_grad_norm),
        seed,
        patience: (d.patience > 0).then_some(d.patience as usize),
        time_budget: d.time_budget_s.map(Duration::from_secs_f64),
    }
}

pub fn run(
    rt: &Runtime,
    d: &DistillOptions,
    inputs: StageInputs<'_>,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let StageInputs {
        teacher,
        student,
        train,
        spec,
    } = inputs;
    let train = train.ok_or_else(|| EngineError::InvalidOption {
        option: "train_dataset_id".into(),
        problem: "a distill stage needs training data".into(),
    })?;
    let summary = summarize(&teacher.proto);
    let named = d.output.clone().or_else(|| spec.evaluate_options().output);
    let output = choose_classifier(&summary.outputs, named.as_deref(), true)?
        .expect("with labels assumed, a choice or an error");
    let mut notes = Vec::new();
    let student_proto = match (d.student, student) {
        (StudentSource::Uploaded | StudentSource::Auto, Some(s)) => {
            let outputs = summarize(&s.proto).outputs;
            if !outputs.iter().any(|o| o.name == output) {
                return Err(EngineError::InvalidOption {
                    option: "student_model_id".into(),
                    problem: format!("the student has no output `{output}` like the teacher's"),
                });
            }
            notes.push("student: the uploaded student_model_id".to_string());
            s.proto.clone()
        }
        (StudentSource::Uploaded, None) => {
            return Err(EngineError::InvalidOption {
                option: "student_model_id".into(),
                problem: "`student: uploaded` needs student_model_id".into(),
            })
        }
        (StudentSource::Depth, _) => {
            let (s, note) =
                crate::engine::train::depth::every_other(&teacher.proto, d.keep_every as usize)?;
            notes.push(format!("student: the teacher's depth cut: {note}"));
            s
        }
        _ => {
            let (s, layer_notes) = distill::width_student(&teacher.proto, d.width);
            if layer_notes.is_empty() {
                return Err(EngineError::InvalidOption {
                    option: "student".into(),
                    problem: "no layer of this model can be narrowed (every layer's channels reach a residual, concat or output); upload a student instead".into(),
                });
            }
            notes.push(format!(
                "student: the teacher at width {} ({})",
                d.width,
                layer_notes.join("; ")
            ));
            s
        }
    };
    let (fit_data, val_data, fit_rows, val_rows) =
        split_validation(train, d.training.validation_share, spec.seed);
    let opts = distill::DistillOptions {
        alpha: d.alpha,
        temperature: d.temperature,
        fit: fit_options(&d.training, spec.seed),
        features: d
            .features
            .iter()
            .map(|h| distill::FeatureHint {
                teacher: h.teacher.clone(),
                student: h.student.clone().unwrap_or_else(|| h.teacher.clone()),
                weight: h.weight,
            })
            .collect(),
    };
    let pair = distill::Pair {
        rt,
        teacher,
        student: &student_proto,
        output: &output,
        train: &fit_data,
        validation: Some(&val_data),
    };
    let out = distill::distill(pair, &opts, progress)?;
    let teacher_params = summary.parameters;
    notes.push(format!(
        "trained {} parameters (teacher {teacher_params}) on {} rows, {} held out to pick the epoch; loss {}·CE + {}·T²·KL at T = {}",
        out.student_parameters,
        fit_rows,
        val_rows,
        d.alpha,
        1.0 - d.alpha,
        d.temperature
    ));
    for h in &opts.features {
        notes.push(format!(
            "feature hint: + {}·MSE(student `{}`, teacher `{}`)",
            h.weight, h.student, h.teacher
        ));
    }
    notes.extend(epoch_notes(&out.report));
    let model = quantize::finish(rt, &out.model)?;
    Ok(Outcome { model, notes })
}

/// A seeded share of the training rows that picks the epoch (the job's dataset stays unseen):
/// (fit rows, validation rows, their counts).
pub(super) fn split_validation(
    train: &Dataset,
    share: f64,
    seed: u64,
) -> (Dataset, Dataset, usize, usize) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let rows = train.summary.samples as usize;
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let held = ((rows as f64 * share).round() as usize).clamp(1, rows.saturating_sub(1).max(1));
    let (mut val_rows, mut fit_rows) = (order[..held].to_vec(), order[held..].to_vec());
    val_rows.sort_unstable();
    fit_rows.sort_unstable();
    (
        train.select(&fit_rows),
        train.select(&val_rows),
        fit_rows.len(),
        val_rows.len(),
    )
}

pub(super) fn epoch_notes(report: &fit::FitReport) -> Vec<String> {
    let mut notes = Vec::new();
    for e in &report.epochs {
        notes.push(format!(
            "epoch {}: train loss {:.4}, validation top-1 {}, learning rate {:.2e}",
            e.epoch,
            e.train_loss,
            e.validation.map_or("-".into(), |v| format!("{v:.4}")),
            e.learning_rate
        ));
    }
    notes.push(format!(
        "{}; kept epoch {}",
        report.stopped,
        report.best_epoch.map_or("last".into(), |e| e.to_string())
    ));
    notes
}

/// A weight with at least this share of exact zeros was pruned: fine-tuning keeps them zero.
const SPARSE_SHARE: f64 = 0.2;

/// The `finetune` stage: the current model trains on `train`; with labels on cross-entropy,
/// without on T²·KL to the model as it entered the stage.
pub fn finetune(
    rt: &Runtime,
    f: &FinetuneOptions,
    inputs: StageInputs<'_>,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let StageInputs {
        teacher: current,
        train,
        spec,
        ..
    } = inputs;
    let train = train.ok_or_else(|| EngineError::InvalidOption {
        option: "train_dataset_id".into(),
        problem: "a finetune stage needs training data".into(),
    })?;
    let summary = summarize(&current.proto);
    let named = f.output.clone().or_else(|| spec.evaluate_options().output);
    let output = choose_classifier(&summary.outputs, named.as_deref(), true)?
        .expect("with labels assumed, a choice or an error");
    let labelled = crate::engine::dataset::bind(&summary, &train.summary)?
        .labels
        .is_some();
    let (fit_data, val_data, fit_rows, val_rows) =
        split_validation(train, f.training.validation_share, spec.seed);
    let opts = distill::DistillOptions {
        // Labels: cross-entropy alone; none: KL to the model as it came in.
        alpha: if labelled { 1.0 } else { 0.0 },
        temperature: f.temperature,
        fit: fit_options(&f.training, spec.seed),
        features: Vec::new(),
    };
    let pair = distill::Pair {
        rt,
        teacher: current,
        student: &current.proto,
        output: &output,
        train: &fit_data,
        validation: Some(&val_data),
    };
    // A pruned model keeps its zeros: weights that are mostly exact zeros hold them.
    let masks = crate::engine::prune::Masks::of_zeros(&current.proto, SPARSE_SHARE);
    let out = distill::distill_with(pair, masks.training_hook()?, &opts, progress)?;
    let mut notes = vec![format!(
        "fine-tuned {} parameters on {fit_rows} rows ({val_rows} held out to pick the epoch) with {}",
        out.student_parameters,
        if labelled {
            "cross-entropy on the labels".to_string()
        } else {
            format!("T²·KL to the model before the stage at T = {} (no labels)", f.temperature)
        }
    )];
    if !masks.is_empty() {
        notes.push(format!(
            "the zeros of {} sparse weights ({}) were held",
            masks.0.len(),
            masks.0.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    notes.extend(epoch_notes(&out.report));
    let mut trained = out.model;
    masks.apply(&mut trained);
    let model = quantize::finish(rt, &trained)?;
    Ok(Outcome { model, notes })
}
