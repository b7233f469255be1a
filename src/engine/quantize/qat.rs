//! Quantization-aware training: the prepared float model (BatchNorm folded, activations
//! calibrated) trains with every tensor that static QDQ quantizes fake-quantized exactly as the
//! export will hold it, against labels and the float model's softened outputs; the trained
//! weights are then written as the same QDQ model as static PTQ, with the same activation scales.
//!
//! Activation scales are the calibrated ones (observed before training, held fixed so the trained
//! weights fit the grid they will run on); weight scales follow the weights at every step. The
//! int32 bias rounding (a step of input scale x weight scale, far below one output step) is the
//! one rounding not simulated.
use super::params::{activation_params, quantize, quantize_weights_bits};
use super::{qdq, Prepared, Scheme};
use crate::engine::dataset::{bind, Dataset};
use crate::engine::onnx::tensor::dims;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::Runtime;
use crate::engine::train::distill::{self, Pair, Recipe};
use crate::engine::train::fake_quant::{FakeQuant, FakeQuantSpec, RoundTrip};
use crate::engine::train::fit::FitReport;
use crate::engine::train::{candle_error, TrainGraph, ValueHook};
use crate::engine::{EngineError, Progress, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// The fake quantization that reproduces `prepared`'s all-int8 QDQ model (embedding tables
/// excepted: the scheme must not list Gather).
pub fn fake_quant(prepared: &Prepared) -> Result<FakeQuant> {
    let Scheme::Static(o) = &prepared.scheme else {
        return Err(EngineError::InvalidOption {
            option: "mode".into(),
            problem: "quantization-aware training writes static QDQ models".into(),
        });
    };
    let model = &prepared.model;
    let (targets, _) = qdq::plan(model, o);
    let (names, constants) = qdq::activations(model, &targets);
    let mut specs = HashMap::new();
    let (qmin, qmax) = qdq::activation_limits(o.activation);
    let empty = Default::default();
    let ranges = prepared.ranges().unwrap_or(&empty);
    for name in names {
        if let Some(&(lo, hi)) = ranges.get(&name) {
            let p = activation_params(lo, hi, o.activation, o.symmetric);
            let spec = FakeQuantSpec::Activation {
                scale: p.scale,
                zero_point: p.zero_point,
                qmin,
                qmax,
            };
            specs.insert(name, spec);
        }
    }
    let graph = model.graph.as_ref().expect("prepared models have a graph");
    for t in &targets {
        let Some(w) = graph
            .initializer
            .iter()
            .find(|i| i.name.as_deref() == Some(t.weight.as_str()))
        else {
            continue;
        };
        let shape = dims(w);
        let (axis, per_channel, auto, seven) =
            (t.axis, o.per_channel, o.auto_granularity, o.reduce_range);
        let round_trip: RoundTrip = Arc::new(move |v: &[f32]| {
            quantize_weights_bits(v, &shape, axis, per_channel, auto, seven)
                .dequantize(&shape, axis)
        });
        specs
            .entry(t.weight.clone())
            .or_insert(FakeQuantSpec::Values(round_trip));
    }
    for c in constants {
        let round_trip: RoundTrip = Arc::new(|v: &[f32]| {
            let p = qdq::constant_params(v);
            v.iter()
                .map(|&x| (quantize(x, p, 0, 255) - p.zero_point) as f32 * p.scale)
                .collect()
        });
        specs.insert(c.name, FakeQuantSpec::Values(round_trip));
    }
    Ok(FakeQuant::new(specs))
}

/// The outcome of quantization-aware training.
pub struct Trained {
    /// The preparation over the trained weights: `build` writes the QDQ model.
    pub prepared: Prepared,
    pub report: FitReport,
    pub fake_quant: FakeQuant,
}

/// What the training works on.
pub struct QatData<'a> {
    pub rt: &'a Runtime,
    /// The float model before preparation: the teacher of the KL term.
    pub float: &'a LoadedModel,
    /// The classifier output.
    pub output: &'a str,
    pub train: &'a Dataset,
    /// Rows that pick the epoch to keep.
    pub validation: Option<&'a Dataset>,
}

/// Trains `prepared`'s model with fake quantization: α·CE(labels) + (1−α)·T²·KL(float ‖ fake-quant),
/// KL alone without labels.
pub fn train(
    data: QatData<'_>,
    prepared: &Prepared,
    opts: &Recipe,
    progress: &dyn Progress,
) -> Result<Trained> {
    let fq = fake_quant(prepared)?;
    let hook: Arc<dyn ValueHook> = Arc::new(fq.clone());
    let pair = Pair {
        rt: data.rt,
        teacher: data.float,
        student: &prepared.model,
        output: data.output,
        train: data.train,
        validation: data.validation,
    };
    let out = distill::distill_with(pair, Some(hook), opts, progress)?;
    Ok(Trained {
        prepared: prepared.with_model(out.model),
        report: out.report,
        fake_quant: fq,
    })
}

/// The fake-quant model's and the exported model's top-1 on the same rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Parity {
    pub samples: usize,
    /// "top-1 accuracy" (labels) or "top-1 agreement with the float model".
    pub metric: &'static str,
    /// Top-1 of the fake-quantized training graph (candle).
    pub fake_quant: f64,
    /// Top-1 of the exported QDQ model in ONNX Runtime.
    pub onnx_runtime: f64,
    /// Share of rows on which both predict the same class.
    pub agreement: f64,
    /// Top-1 in ONNX Runtime of the same QDQ export with the weights before training.
    pub before_training: f64,
}

/// The classes ONNX Runtime predicts for every row of `data`.
fn runtime_classes(
    rt: &Runtime,
    model: &LoadedModel,
    data: &Dataset,
    output: &str,
) -> Result<Vec<i64>> {
    distill::unit_classes(&distill::teacher_logits(rt, model, data, output)?)
}

/// The models export parity compares.
pub struct Exports<'a> {
    /// Every layer int8, trained weights.
    pub trained: &'a LoadedModel,
    /// Every layer int8, weights before training (static PTQ).
    pub untrained: &'a LoadedModel,
}

/// Export parity: the fake-quant model (`trained`'s weights through its fake quantization, in
/// candle) against the exported QDQ model in ONNX Runtime, both scored on `data` against its
/// labels (else against the float model's classes); the PTQ export is scored alongside.
pub fn parity(
    rt: &Runtime,
    float: &LoadedModel,
    trained: &Trained,
    exports: Exports<'_>,
    data: &Dataset,
    output: &str,
) -> Result<Parity> {
    let model = &trained.prepared.model;
    let (logits, _) = distill::logits_of(model, output);
    let mut graph = TrainGraph::new(model, &[logits])?;
    graph.set_hook(Arc::new(trained.fake_quant.clone()));
    let binding = bind(&summarize(model), &data.summary)?;
    let simulated = distill::predict(&graph, data, &binding.inputs)?;
    let runtime = runtime_classes(rt, exports.trained, data, output)?;
    let before = runtime_classes(rt, exports.untrained, data, output)?;
    let float_logits = distill::teacher_logits(rt, float, data, output)?;
    let task = crate::engine::train::units::task_of(float_logits.dims());
    let (target, metric) = match distill::labels_of(data, model)? {
        Some(l) => (
            l.flatten_all()
                .and_then(|l| l.to_vec1::<i64>())
                .map_err(|e| candle_error("labels", e))?,
            "top-1 accuracy",
        ),
        None => (
            distill::unit_classes(&float_logits)?,
            "top-1 agreement with the float model",
        ),
    };
    let metric = match (task, metric) {
        (crate::domain::task::TaskKind::Segmentation, "top-1 accuracy") => "mean IoU",
        (crate::domain::task::TaskKind::Segmentation, _) => "mask IoU with the float model",
        (crate::domain::task::TaskKind::Sequence, "top-1 accuracy") => "per-position accuracy",
        (crate::domain::task::TaskKind::Sequence, _) => {
            "per-position agreement with the float model"
        }
        (_, m) => m,
    };
    let score = |a: &[i64], b: &[i64]| crate::engine::train::units::score(a, b, task);
    Ok(Parity {
        samples: data.summary.samples as usize,
        metric,
        fake_quant: score(&simulated, &target),
        onnx_runtime: score(&runtime, &target),
        agreement: score(&simulated, &runtime),
        before_training: score(&before, &target),
    })
}
