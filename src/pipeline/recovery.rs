//! The set-up every training stage shares (distill, finetune, a prune stage's recovery, QAT):
//! the classifier output, whether the training rows have labels, the held-out rows that pick
//! the epoch, and the loss and schedule.
use super::StageContext;
use crate::domain::training::{Recovery, TrainingOptions};
use crate::engine::dataset::{bind, Dataset};
use crate::engine::evaluate::choose_classifier;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::train::{distill, fit};
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
}

impl Setup {
    /// Loss weights, temperature and schedule for training against `reference` (the teacher,
    /// or the model as it entered the stage). `defaults` are the stage's (α, T); `what` names
    /// the training in errors.
    pub fn new(
        ctx: &StageContext<'_>,
        r: &Recovery,
        reference: &LoadedModel,
        defaults: (f64, f64),
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
        let (fit_data, validation) =
            split_validation(train, r.training.validation_share, ctx.spec.seed);
        let recipe = distill::Recipe {
            alpha: if labelled {
                r.alpha_or(defaults.0)
            } else {
                0.0
            },
            temperature: r.temperature_or(defaults.1),
            fit: fit_options(&r.training, ctx.spec.seed),
            features: Vec::new(),
        };
        Ok(Self {
            output,
            validation_metric,
            labelled,
            fit_data,
            validation,
            recipe,
        })
    }

    /// "N rows (M held out to pick the epoch)".
    pub fn rows_note(&self) -> String {
        format!(
            "{} rows ({} held out to pick the epoch)",
            self.fit_data.summary.samples, self.validation.summary.samples
        )
    }

    /// The loss in words.
    pub fn loss_note(&self, reference: &str) -> String {
        let (a, t) = (self.recipe.alpha, self.recipe.temperature);
        if self.labelled && a >= 1.0 {
            "cross-entropy on the labels".into()
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

/// The engine's training schedule for the spec's options.
pub(super) fn fit_options(t: &TrainingOptions, seed: u64) -> fit::FitOptions {
    fit::FitOptions {
        epochs: t.epochs as usize,
        batch_size: t.batch_size as usize,
        learning_rate: t.learning_rate,
        weight_decay: t.weight_decay,
        warmup: t.warmup,
        schedule: t.schedule,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        seed,
        patience: (t.patience > 0).then_some(t.patience as usize),
        time_budget: t.time_budget_s.map(Duration::from_secs_f64),
    }
}

/// A seeded share of the training rows that picks the epoch (the job's dataset stays unseen):
/// (fit rows, validation rows).
fn split_validation(train: &Dataset, share: f64, seed: u64) -> (Dataset, Dataset) {
    let rows = train.summary.samples as usize;
    let mut order: Vec<usize> = (0..rows).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let held = ((rows as f64 * share).round() as usize).clamp(1, rows.saturating_sub(1).max(1));
    let (mut val_rows, mut fit_rows) = (order[..held].to_vec(), order[held..].to_vec());
    val_rows.sort_unstable();
    fit_rows.sort_unstable();
    (train.select(&fit_rows), train.select(&val_rows))
}

/// One line per epoch, then why training stopped and which epoch was kept.
pub(super) fn epoch_notes(report: &fit::FitReport, metric: &str) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(v) = report.start_validation {
        notes.push(format!("before training: validation {metric} {v:.4}"));
    }
    for e in &report.epochs {
        notes.push(format!(
            "epoch {}: train loss {:.4}, validation {metric} {}, learning rate {:.2e}",
            e.epoch,
            e.train_loss,
            e.validation.map_or("-".into(), |v| format!("{v:.4}")),
            e.learning_rate
        ));
    }
    let kept = match report.best_epoch {
        Some(0) => "kept the weights it started from (no epoch validated better)".to_string(),
        Some(e) => format!("kept epoch {e}"),
        None => "kept the last epoch".to_string(),
    };
    notes.push(format!("{}; {kept}", report.stopped));
    notes
}
