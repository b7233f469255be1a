//! The set-up every training stage shares (distill, finetune, a prune stage's recovery, QAT):
//! the classifier output, whether the training rows have labels, the unlabelled rows that learn
//! from the reference alone, the held-out rows that pick the weights to keep, the loss and the
//! schedule, and BatchNormalization re-estimation before the first step.
use super::StageContext;
use crate::domain::training::{BatchNormReestimation, TrainingCurve, TrainingWindow};
use crate::domain::training::{Recovery, TrainingDefaults, TrainingOptions};
use crate::engine::dataset::{bind, Dataset};
use crate::engine::evaluate::choose_classifier;
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::prune::batch_norm;
use crate::engine::train::{distill, fit};
use crate::engine::Progress;
use crate::engine::{EngineError, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Duration;

/// A training stage's data and loss, ready for the engine.
pub(super) struct Setup {
    /// The classifier output the loss reads.
    pub output: String,
    /// What validation scores to pick the epoch: top-1, mean IoU (segmentation outputs) or
    /// per-position accuracy (sequence outputs).
    pub validation_metric: &'static str,
    /// Whether the training rows carry labels (else the loss is KL alone).
    pub labelled: bool,
    pub fit_data: Dataset,
    pub validation: Dataset,
    pub recipe: distill::Recipe,
    /// Unlabelled rows among (fit rows, held-out rows).
    pub unlabelled: (usize, usize),
    /// The schedule in words: steps, epochs and why.
    pub schedule_note: String,
}

impl Setup {
    /// Loss weights, temperature and schedule for training against `reference` (the teacher,
    /// or the model as it entered the stage). `defaults` are the stage's (α, T) and `training`
    /// its schedule defaults; `what` names the training in errors.
    pub fn new(
        ctx: &StageContext<'_>,
        r: &Recovery,
        reference: &LoadedModel,
        defaults: (f64, f64),
        training: &TrainingDefaults,
        what: &str,
    ) -> Result<Self> {
        let train = ctx.train.ok_or_else(|| EngineError::InvalidOption {
            option: "train_dataset_id".into(),
            problem: format!("{what} needs training data"),
        })?;
        let summary = summarize(&reference.proto);
        let named = r
            .output
            .clone()
            .or_else(|| ctx.spec.evaluate_options().output);
        let output = choose_classifier(&summary.outputs, named.as_deref(), true)?
            .expect("with labels assumed, a choice or an error");
        let labelled = bind(&summary, &train.summary)?.labels.is_some();
        let labelled_rows = train.summary.samples as usize;
        let merged = ctx
            .unlabelled
            .map(|u| crate::engine::dataset::merge_unlabelled(train, u, &summary))
            .transpose()?;
        let all = merged.as_ref().unwrap_or(train);
        let dims: Vec<usize> = summary
            .outputs
            .iter()
            .find(|o| o.name == output)
            .map(|o| {
                o.shape
                    .iter()
                    .map(|d| match d {
                        crate::domain::model::Dim::Fixed(n) if *n > 0 => *n as usize,
                        _ => 2,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let validation_metric = match crate::engine::train::units::task_of(&dims) {
            crate::domain::task::TaskKind::Segmentation => "mean IoU",
            crate::domain::task::TaskKind::Sequence => "per-position accuracy",
            _ => "top-1",
        };
        let share = r.training.validation_share;
        let (fit_data, validation, unlabelled) =
            split_validation(all, labelled_rows, share, ctx.spec.seed);
        let (steps, why) = r
            .training
            .schedule(fit_data.summary.samples as usize, training);
        let mut fit = fit_options(&r.training, training, ctx.spec.seed);
        fit.steps = Some(steps);
        fit.pass_memory = ctx.training_pass_memory;
        let schedule_note = format!(
            "schedule: {steps} optimizer steps ({why}), batch {}, peak learning rate {:.1e}, BatchNormalization `{}`, validated every {} steps or more",
            r.training.batch_size,
            fit.learning_rate,
            serde_json::to_value(r.training.batch_norm)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            VALIDATION_WINDOW
        );
        let recipe = distill::Recipe {
            alpha: if labelled {
                r.alpha_or(defaults.0)
            } else {
                0.0
            },
            temperature: r.temperature_or(defaults.1),
            fit,
            features: Vec::new(),
        };
        Ok(Self {
            output,
            validation_metric,
            labelled,
            fit_data,
            validation,
            recipe,
            unlabelled,
            schedule_note,
        })
    }

    /// The report's training curve for `report`.
    pub fn curve(
        &self,
        report: &fit::FitReport,
        batch_norm: Option<BatchNormReestimation>,
    ) -> TrainingCurve {
        TrainingCurve {
            metric: self.validation_metric.into(),
            schedule: self
                .schedule_note
                .trim_start_matches("schedule: ")
                .to_string(),
            fit_rows: self.fit_data.summary.samples,
            unlabelled_fit_rows: self.unlabelled.0 as u64,
            validation_rows: self.validation.summary.samples,
            unlabelled_validation_rows: self.unlabelled.1 as u64,
            batch_norm,
            pass_rows: report.passes.rows as u64,
            frozen_batch_norm: report.passes.frozen_batch_norm,
            start_validation: report.start_validation,
            windows: report
                .epochs
                .iter()
                .map(|e| TrainingWindow {
                    first_epoch: e.first_epoch as u64,
                    epoch: e.epoch as u64,
                    step: e.steps as u64,
                    train_loss: e.train_loss,
                    validation: e.validation,
                    validation_loss: e.validation_loss,
                    learning_rate: e.learning_rate,
                })
                .collect(),
            kept_step: report.best_steps.map(|s| s as u64),
            steps: report.steps as u64,
            stopped: report.stopped.clone(),
        }
    }

    /// Trains for 1/`part` of the budget (each step of a gradual schedule).
    pub fn share_budget(&mut self, part: usize) {
        if part > 1 {
            let total = self.recipe.fit.steps.unwrap_or(1);
            let mine = (total / part).max(1);
            self.recipe.fit.steps = Some(mine);
            self.schedule_note.push_str(&format!(
                "; this gradual step takes {mine} of them (1/{part})"
            ));
        }
    }

    /// "N rows (M held out to pick the weights to keep)", with the unlabelled rows among them.
    pub fn rows_note(&self) -> String {
        let (fit, held) = (
            self.fit_data.summary.samples,
            self.validation.summary.samples,
        );
        match self.unlabelled {
            (0, 0) => format!("{fit} rows ({held} held out to pick the weights to keep)"),
            (uf, uh) => format!(
                "{fit} rows, {uf} of them from `unlabelled_dataset_id` (KL alone) ({held} held out to pick the weights to keep, {uh} of them unlabelled, scored against the reference's classes)"
            ),
        }
    }

    /// The loss in words.
    pub fn loss_note(&self, reference: &str) -> String {
        let (a, t) = (self.recipe.alpha, self.recipe.temperature);
        if self.labelled && a >= 1.0 {
            "cross-entropy on the labels".into()
        } else if self.labelled && self.unlabelled.0 > 0 {
            format!(
                "{a}·CE(labels) + {}·T²·KL to {reference} at T = {t} on labelled rows, T²·KL alone on unlabelled ones",
                1.0 - a
            )
        } else if self.labelled {
            format!(
                "{a}·CE(labels) + {}·T²·KL to {reference} at T = {t}",
                1.0 - a
            )
        } else {
            format!("T²·KL to {reference} at T = {t} (no labels)")
        }
    }
}

/// Most training rows BatchNormalization re-estimation reads.
const BATCH_NORM_ROWS: usize = 512;

/// Before any gradient step of a pruned or narrowed model: BatchNormalization statistics re-estimated over the fit rows (never
/// the held-out ones), kept when they validate at least as well as the pruned model's. Returns
/// the model recovery starts from and a note with both scores.
pub(super) fn batch_norm_step(
    ctx: &StageContext<'_>,
    setup: &Setup,
    reference: &LoadedModel,
    model: &ModelProto,
    progress: &dyn Progress,
) -> Result<(ModelProto, Option<BatchNormReestimation>)> {
    let Some(r) =
        batch_norm::reestimate(ctx.rt, model, &setup.fit_data, BATCH_NORM_ROWS, progress)?
    else {
        return Ok((model.clone(), None));
    };
    let score = |m: &ModelProto| {
        distill::validation_score(ctx.rt, reference, m, &setup.output, &setup.validation)
    };
    let (before, after) = (score(model)?, score(&r.model)?);
    let kept = after >= before;
    let report = BatchNormReestimation {
        layers: r.layers as u64,
        rows: r.rows as u64,
        before,
        after,
        kept,
    };
    Ok((if kept { r.model } else { model.clone() }, Some(report)))
}

/// The note of a BatchNormalization re-estimation.
pub(super) fn batch_norm_note(r: &BatchNormReestimation, metric: &str) -> String {
    format!(
        "BatchNorm re-estimation (no gradient step): {} BatchNormalization layer(s) from {} training row(s), one after another in graph order: validation {metric} {:.4} -> {:.4}: {}",
        r.layers,
        r.rows,
        r.before,
        r.after,
        if r.kept { "kept" } else { "not kept (training starts from the statistics it had)" }
    )
}

/// Fewest optimizer steps between two validations of a stage's training.
pub(super) const VALIDATION_WINDOW: usize = 10;

/// The engine's training schedule for the spec's options (`steps` unset: the engine runs
/// `epochs`; [`Setup::new`] sets the steps its rows call for).
pub(super) fn fit_options(t: &TrainingOptions, d: &TrainingDefaults, seed: u64) -> fit::FitOptions {
    fit::FitOptions {
        epochs: t.epochs.unwrap_or(d.epochs) as usize,
        steps: t.optimizer_steps.map(|s| s as usize),
        min_window: VALIDATION_WINDOW,
        batch_norm: t.batch_norm,
        batch_size: t.batch_size as usize,
        pass_memory: fit::DEFAULT_PASS_MEMORY,
        learning_rate: t.learning_rate_or(d),
        weight_decay: t.weight_decay,
        warmup: t.warmup,
        schedule: t.schedule,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        seed,
        patience: (t.patience > 0).then_some(t.patience as usize),
        time_budget: t.time_budget_s.map(Duration::from_secs_f64),
    }
}

/// A seeded share of the training rows that picks the weights to keep (the job's dataset stays
/// unseen), taken from the labelled rows (`0..labelled`) and from the unlabelled ones after them
/// alike: (fit rows, validation rows, unlabelled rows among (fit, validation)).
fn split_validation(
    train: &Dataset,
    labelled: usize,
    share: f64,
    seed: u64,
) -> (Dataset, Dataset, (usize, usize)) {
    let rows = train.summary.samples as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut val_rows, mut fit_rows) = (Vec::new(), Vec::new());
    let mut unlabelled = (0, 0);
    for range in [0..labelled.min(rows), labelled.min(rows)..rows] {
        let n = range.len();
        if n == 0 {
            continue;
        }
        let mut order: Vec<usize> = range.clone().collect();
        order.shuffle(&mut rng);
        let held = ((n as f64 * share).round() as usize).clamp(1, n.saturating_sub(1).max(1));
        val_rows.extend_from_slice(&order[..held]);
        fit_rows.extend_from_slice(&order[held..]);
        if range.start > 0 {
            unlabelled = (n - held, held);
        }
    }
    val_rows.sort_unstable();
    fit_rows.sort_unstable();
    (train.select(&fit_rows), train.select(&val_rows), unlabelled)
}

/// One line per validation window (the training curve), then why training stopped and which
/// weights were kept.
pub(super) fn epoch_notes(report: &fit::FitReport, metric: &str) -> Vec<String> {
    let mut notes = vec![report.passes.note()];
    if let Some(v) = report.start_validation {
        notes.push(format!("before training: validation {metric} {v:.4}"));
    }
    for e in &report.epochs {
        let epochs = if e.first_epoch == e.epoch {
            format!("epoch {}", e.epoch)
        } else {
            format!("epochs {}-{}", e.first_epoch, e.epoch)
        };
        notes.push(format!(
            "{epochs}: step {}, train loss {:.4}, validation {metric} {}{}, learning rate {:.2e}",
            e.steps,
            e.train_loss,
            e.validation.map_or("-".into(), |v| format!("{v:.4}")),
            e.validation_loss
                .map_or(String::new(), |l| format!(" (loss {l:.4})")),
            e.learning_rate
        ));
    }
    let kept = match (report.best_epoch, report.best_steps) {
        (Some(0), _) => {
            "kept the weights it started from (no validation scored better)".to_string()
        }
        (Some(e), Some(s)) => format!("kept the weights of epoch {e} (step {s})"),
        (Some(e), None) => format!("kept epoch {e}"),
        _ => "kept the last weights".to_string(),
    };
    notes.push(format!("{}; {kept}", report.stopped));
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dataset::{DatasetFormat, DatasetSummary, TensorInfo};
    use crate::engine::dataset::{Tensor, TensorData};

    fn rows(n: usize) -> Dataset {
        Dataset {
            summary: DatasetSummary {
                format: DatasetFormat::Npz,
                tensors: vec![TensorInfo {
                    name: "x".into(),
                    dtype: "float32".into(),
                    shape: vec![n as u64, 1],
                }],
                samples: n as u64,
            },
            tensors: vec![Tensor {
                name: "x".into(),
                shape: vec![n, 1],
                data: TensorData::F32((0..n).map(|i| i as f32).collect()),
            }],
        }
    }

    fn values(d: &Dataset) -> Vec<usize> {
        match &d.tensors[0].data {
            TensorData::F32(v) => v.iter().map(|&x| x as usize).collect(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn held_out_rows_come_from_the_labelled_and_the_unlabelled_rows_alike() {
        let all = rows(30);
        let (fit, held, unlabelled) = split_validation(&all, 10, 0.2, 7);
        assert_eq!(unlabelled, (16, 4));
        let (f, h) = (values(&fit), values(&held));
        assert_eq!((f.len(), h.len()), (24, 6));
        assert_eq!(h.iter().filter(|&&r| r < 10).count(), 2, "{h:?}");
        assert!(f.iter().all(|r| !h.contains(r)));
        assert_eq!(values(&split_validation(&all, 10, 0.2, 7).1), h, "seeded");
        // Without unlabelled rows: the share of the labelled ones, as before.
        let (fit, held, unlabelled) = split_validation(&rows(20), 20, 0.15, 1);
        assert_eq!(
            (fit.summary.samples, held.summary.samples, unlabelled),
            (17, 3, (0, 0))
        );
    }
}
