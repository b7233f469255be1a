//! `quantize` with `mode: qat`: the calibrated static preparation trains with fake quantization
//! on the training data, and the report states how faithfully the QDQ export reproduces the
//! fake-quant model in ONNX Runtime.
use super::recovery::{epoch_notes, Setup};
use super::StageContext;
use crate::domain::quantize::{QAT_DEFAULT_ALPHA, QAT_DEFAULT_TEMPERATURE};
use crate::domain::report::QatParity;
use crate::domain::training::Recovery;
use crate::engine::quantize::{self, qat, Prepared};
use crate::engine::{Progress, Result};
use std::collections::HashSet;

/// What the training gives the rest of the quantize stage.
pub struct Trained {
    /// The preparation over the trained weights (the budget and the latency gate build from it).
    pub prepared: Prepared,
    pub notes: Vec<String>,
    pub parity: QatParity,
    pub curve: crate::domain::training::TrainingCurve,
}

/// Trains `prepared` (the calibrated static preparation of `ctx.current`) with fake quantization.
pub fn run(
    o: &Recovery,
    prepared: &Prepared,
    ctx: &StageContext<'_>,
    progress: &dyn Progress,
) -> Result<Trained> {
    let (rt, current) = (ctx.rt, ctx.current);
    let setup = Setup::new(
        ctx,
        o,
        current,
        (QAT_DEFAULT_ALPHA, QAT_DEFAULT_TEMPERATURE),
        &crate::domain::training::TrainingDefaults::QAT,
        "quantization-aware training",
    )?;
    let data = qat::QatData {
        rt,
        float: current,
        output: &setup.output,
        train: &setup.fit_data,
        validation: Some(&setup.validation),
    };
    let trained = qat::train(data, prepared, &setup.recipe, progress)?;
    let mut notes = vec![format!(
        "quantization-aware training: {} tensors fake-quantized (weights follow their scales every step, activations keep their calibrated scales); trained on {} with {}",
        trained.fake_quant.len(),
        setup.rows_note(),
        setup.loss_note("the float model")
    ), setup.schedule_note.clone()];
    notes.extend(epoch_notes(&trained.report, setup.validation_metric));
    let curve = setup.curve(&trained.report, None);
    let all = HashSet::new();
    let exported = quantize::finish(rt, &trained.prepared.build(&all)?.0)?;
    let untrained = quantize::finish(rt, &prepared.build(&all)?.0)?;
    let exports = qat::Exports {
        trained: &exported,
        untrained: &untrained,
    };
    let p = qat::parity(rt, current, &trained, exports, ctx.eval_data, &setup.output)?;
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
        curve,
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
