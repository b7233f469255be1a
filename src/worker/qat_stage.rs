//! `quantize` with `mode: qat`: the calibrated static preparation trains with fake quantization
//! on the training data, and the report states how faithfully the QDQ export reproduces the
//! fake-quant model in ONNX Runtime.
use super::distill_stage::{epoch_notes, fit_options, split_validation};
use crate::domain::quantize::QatOptions;
use crate::domain::report::QatParity;
use crate::domain::spec::JobSpec;
use crate::engine::dataset::{bind, Dataset};
use crate::engine::evaluate::choose_classifier;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::quantize::{self, qat, Prepared};
use crate::engine::runtime::Runtime;
use crate::engine::train::distill::DistillOptions;
use crate::engine::{EngineError, Progress, Result};
use std::collections::HashSet;

/// What the training gives the rest of the quantize stage.
pub struct Trained {
    /// The preparation over the trained weights (the budget and the latency gate build from it).
    pub prepared: Prepared,
    pub notes: Vec<String>,
    pub parity: QatParity,
}

pub struct QatInputs<'a> {
    pub current: &'a LoadedModel,
    pub train: Option<&'a Dataset>,
    pub eval_data: &'a Dataset,
    pub spec: &'a JobSpec,
}

pub fn run(
    rt: &Runtime,
    o: &QatOptions,
    prepared: &Prepared,
    inputs: QatInputs<'_>,
    progress: &dyn Progress,
) -> Result<Trained> {
    let QatInputs {
        current,
        train,
        eval_data,
        spec,
    } = inputs;
    let train = train.ok_or_else(|| EngineError::InvalidOption {
        option: "train_dataset_id".into(),
        problem: "quantization-aware training needs training data".into(),
    })?;
    let summary = summarize(&current.proto);
    let named = o.output.clone().or_else(|| spec.evaluate_options().output);
    let output = choose_classifier(&summary.outputs, named.as_deref(), true)?
        .expect("with labels assumed, a choice or an error");
    let labelled = bind(&summary, &train.summary)?.labels.is_some();
    let (fit_data, val_data, fit_rows, val_rows) =
        split_validation(train, o.training.validation_share, spec.seed);
    let opts = DistillOptions {
        alpha: if labelled { o.alpha } else { 0.0 },
        temperature: o.temperature,
        fit: fit_options(&o.training, spec.seed),
        features: Vec::new(),
    };
    let data = qat::QatData {
        rt,
        float: current,
        output: &output,
        train: &fit_data,
        validation: Some(&val_data),
    };
    let trained = qat::train(data, prepared, &opts, progress)?;
    let mut notes = vec![format!(
        "quantization-aware training: {} tensors fake-quantized (weights follow their scales every step, activations keep their calibrated scales); {fit_rows} rows trained ({val_rows} held out to pick the epoch) on {}",
        trained.fake_quant.len(),
        if labelled {
            format!("{}·CE(labels) + {}·T²·KL to the float model at T = {}", opts.alpha, 1.0 - opts.alpha, opts.temperature)
        } else {
            format!("T²·KL to the float model at T = {} (no labels)", opts.temperature)
        }
    )];
    notes.extend(epoch_notes(&trained.report));
    let all = HashSet::new();
    let exported = quantize::finish(rt, &trained.prepared.build(&all)?.0)?;
    let untrained = quantize::finish(rt, &prepared.build(&all)?.0)?;
    let exports = qat::Exports {
        trained: &exported,
        untrained: &untrained,
    };
    let p = qat::parity(rt, current, &trained, exports, eval_data, &output)?;
    let difference_points = (p.fake_quant - p.onnx_runtime).abs() * 100.0;
    notes.push(format!(
        "export parity on {} evaluation samples ({}): fake-quant {:.4}, exported QDQ in ONNX Runtime {:.4} ({difference_points:.2} points apart, same class on {:.2}% of rows); static PTQ without training {:.4}",
        p.samples,
        p.metric,
        p.fake_quant,
        p.onnx_runtime,
        p.agreement * 100.0,
        p.before_training
    ));
    Ok(Trained {
        prepared: trained.prepared,
        notes,
        parity: QatParity {
            samples: p.samples as u64,
            metric: p.metric.into(),
            fake_quant: p.fake_quant,
            onnx_runtime: p.onnx_runtime,
            difference_points,
            agreement: p.agreement,
            before_training: p.before_training,
        },
    })
}
