//! The `quantize` stage: options -> engine scheme, the accuracy budget, the speed search and the
//! latency gate, and the notes and per-layer table the report carries.
use super::{StageContext, StageOutcome};
use crate::domain::quantize::WeightRounding;
use crate::domain::quantize::{Granularity, QuantizeMode, QuantizeOptions};
use crate::domain::report::LayerReport;
use crate::domain::spec::JobSpec;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::quantize::{
    self, budget, latency_gate, params, CalibrationData, DynamicOptions, LayerDecision, Prepared,
    Scheme, StaticOptions, WeightOnlyOptions,
};
use crate::engine::quantize::{bias_correction, calibrate, gptq};
use crate::engine::{Progress, Result, SubProgress};
use std::collections::HashSet;

/// The accuracy budget of int8 modes when neither the stage nor the job names one: half a point
/// of top-1 (or of agreement with the float model). `max_accuracy_drop: 1` turns it off.
pub const DEFAULT_ACCURACY_BUDGET: f64 = 0.005;

/// Whether the stage needs calibration rows for this model.
pub fn needs_calibration(q: &QuantizeOptions, model: &LoadedModel) -> bool {
    match q.mode {
        QuantizeMode::Static | QuantizeMode::Qat => true,
        QuantizeMode::Auto => quantize::prefers_static(&model.proto),
        _ => false,
    }
}

/// Whether the stage reads any data: calibration, the accuracy budget or the latency gate.
pub fn reads_data(q: &QuantizeOptions, model: &LoadedModel, spec: &JobSpec) -> bool {
    let int8 = matches!(scheme(q, model), Scheme::Static(_) | Scheme::Dynamic(_));
    let budget = q
        .max_accuracy_drop
        .or(spec.constraints.max_accuracy_drop)
        .unwrap_or(DEFAULT_ACCURACY_BUDGET);
    needs_calibration(q, model) || int8 && (!q.allow_slower || budget < 1.0)
}

pub fn scheme(q: &QuantizeOptions, model: &LoadedModel) -> Scheme {
    let per_channel = q.granularity != Granularity::PerTensor;
    let auto_granularity = q.granularity == Granularity::Auto;
    let mode = match q.mode {
        QuantizeMode::Auto if quantize::prefers_static(&model.proto) => QuantizeMode::Static,
        QuantizeMode::Auto => QuantizeMode::Dynamic,
        m => m,
    };
    match mode {
        QuantizeMode::Static | QuantizeMode::Auto | QuantizeMode::Qat => {
            let (calibration, also_try) =
                calibrate::ranges_for(q.calibration.method, q.calibration.percentile);
            Scheme::Static(StaticOptions {
                per_channel,
                auto_granularity,
                tables_per_row: per_channel,
                activation: q.activation_type,
                symmetric: q.symmetric,
                // Training does not simulate int8 embedding tables, so QAT leaves them float.
                op_types: if mode == QuantizeMode::Qat {
                    q.op_types.clone()
                } else {
                    with_gather(&q.op_types)
                },
                exclude: q.exclude.clone(),
                reduce_range: q.reduce_range.unwrap_or_else(params::u8s8_saturates),
                calibration,
                also_try,
            })
        }
        QuantizeMode::Dynamic => Scheme::Dynamic(DynamicOptions {
            per_channel,
            auto_granularity,
            tables_per_row: per_channel,
            op_types: with_gather(&q.op_types),
            exclude: q.exclude.clone(),
            reduce_range: q.reduce_range.unwrap_or_else(params::u8s8_saturates),
        }),
        QuantizeMode::WeightOnly => Scheme::WeightOnly(WeightOnlyOptions {
            bits: q.bits,
            block_size: q.block_size as usize,
            symmetric: q.symmetric,
            op_types: with_gather(&q.op_types),
            exclude: q.exclude.clone(),
        }),
        QuantizeMode::Fp16 => Scheme::Fp16 {
            keep_io_types: q.keep_io_types,
        },
    }
}

/// Embedding tables are quantized with the default op types (they hold most of a transformer's
/// bytes); a user who lists op types decides for themselves.
fn with_gather(ops: &[String]) -> Vec<String> {
    let mut ops = ops.to_vec();
    if ops == crate::domain::quantize::DEFAULT_OP_TYPES {
        ops.push("Gather".into());
    }
    ops
}

fn calibration_note(prepared: &Prepared) -> String {
    let Scheme::Static(o) = &prepared.scheme else {
        return String::new();
    };
    let methods: Vec<String> = std::iter::once(calibrate::describe(o.calibration))
        .chain(o.also_try.iter().map(|m| m.describe()))
        .collect();
    format!(
        "calibrated with {} over {} samples",
        methods.join(", "),
        prepared.calibration_samples
    )
}

/// Whether `mode: auto` measures both int8 forms: graphs without convolutions or embedding
/// lookups (MLPs), where ONNX Runtime's static QGemm chain and dynamic DynamicQuantizeMatMul
/// run close and which is faster depends on the model and the machine. Needs calibration rows,
/// so it applies when a calibration dataset is given.
pub fn auto_compares(q: &QuantizeOptions, model: &LoadedModel) -> bool {
    let has = |op: &str| {
        model
            .proto
            .graph
            .as_ref()
            .is_some_and(|g| g.node.iter().any(|n| n.op_type.as_deref() == Some(op)))
    };
    q.mode == QuantizeMode::Auto && !has("Conv") && !has("Gather")
}

pub fn run(q: &QuantizeOptions, ctx: &StageContext<'_>) -> Result<StageOutcome> {
    // Calibration rows are read only where the mode calibrates; auto on an MLP compares static
    // with dynamic when they are at hand.
    let needs = needs_calibration(q, ctx.current) || auto_compares(q, ctx.current);
    let ctx = StageContext {
        calibration: ctx.calibration.filter(|_| needs),
        ..*ctx
    };
    if ctx.calibration.is_some() && auto_compares(q, ctx.current) {
        return fastest_of_both(q, &ctx);
    }
    run_mode(q, &ctx, ctx.progress)
}

/// `mode: auto` on an MLP: the dynamic and the static stage, each with its budget and latency
/// gate, then the faster of the two results in ONNX Runtime (static only when it also scores
/// at least as well).
fn fastest_of_both(q: &QuantizeOptions, ctx: &StageContext<'_>) -> Result<StageOutcome> {
    let (rt, progress) = (ctx.rt, ctx.progress);
    let part = |start: f64, span: f64| SubProgress {
        parent: progress,
        start,
        span,
    };
    let with = |mode| QuantizeOptions { mode, ..q.clone() };
    let dynamic = run_mode(&with(QuantizeMode::Dynamic), ctx, &part(0.0, 0.45))?;
    let fixed = run_mode(&with(QuantizeMode::Static), ctx, &part(0.45, 0.45))?;
    let (d, s) = match (&dynamic.model, &fixed.model) {
        (Some(d), Some(s)) => (d, s),
        (None, Some(_)) => return Ok(chosen(fixed, "static: dynamic int8 kept no int8 model")),
        (Some(_), None) => return Ok(chosen(dynamic, "dynamic: static int8 kept no int8 model")),
        (None, None) => return Ok(chosen(dynamic, "the input: neither form beat it")),
    };
    let batch = summarize(&ctx.current.proto)
        .fixed_batch()
        .unwrap_or(ctx.eval_opts.batch_size.max(1) as usize);
    let (td, ts) = latency_gate::compare_latency(rt, d, s, ctx.eval_data, batch, 30)?;
    let scorer = budget::Scorer::new(rt, ctx.current, ctx.eval_data, ctx.eval_opts)?;
    let (sd, ss) = (scorer.score(&d.proto)?, scorer.score(&s.proto)?);
    let note = format!(
        "ONNX Runtime p50 at batch {batch}: dynamic {td:.3} ms, static {ts:.3} ms; {}: dynamic {sd:.4}, static {ss:.4}",
        scorer.metric
    );
    Ok(if ts < td && ss >= sd {
        chosen(fixed, &format!("static ({note})"))
    } else {
        chosen(dynamic, &format!("dynamic ({note})"))
    })
}

fn chosen(mut out: StageOutcome, why: &str) -> StageOutcome {
    out.notes.insert(
        0,
        format!("mode auto on a graph without convolutions built both int8 forms and kept {why}"),
    );
    out
}

fn run_mode(
    q: &QuantizeOptions,
    ctx: &StageContext<'_>,
    progress: &dyn Progress,
) -> Result<StageOutcome> {
    let StageContext {
        rt,
        current,
        calibration,
        eval_data,
        spec,
        eval_opts,
        ..
    } = *ctx;
    let mut scheme = scheme(q, current);
    let int8 = matches!(scheme, Scheme::Static(_) | Scheme::Dynamic(_));
    let budget = int8.then(|| {
        q.max_accuracy_drop
            .or(spec.constraints.max_accuracy_drop)
            .unwrap_or(DEFAULT_ACCURACY_BUDGET)
    });
    let measured = budget.filter(|b| *b < 1.0);
    if let (Scheme::Static(o), None) = (&mut scheme, measured) {
        // Without a budget nothing scores the alternatives: calibration auto is min/max.
        o.also_try.clear();
    }
    let part = |start: f64, span: f64| SubProgress {
        parent: progress,
        start,
        span,
    };
    let calibration_rows = calibration;
    let calibration = calibration.map(|data| CalibrationData {
        data,
        samples: q.calibration.samples as usize,
    });
    let mut prepared = Prepared::new(rt, current, &scheme, calibration, &part(0.0, 0.25))?;
    let mut notes = prepared.notes.clone();
    notes.push(match &scheme {
        Scheme::Static(_) => format!("{}, {}", scheme.describe(), calibration_note(&prepared)),
        _ => scheme.describe(),
    });
    // Post-training static int8 only: QAT trains the weights (and biases) itself.
    let post_training = |on: bool| {
        calibration_rows
            .filter(|_| on && q.mode != QuantizeMode::Qat && matches!(scheme, Scheme::Static(_)))
    };
    let scorer = match measured {
        Some(_) => Some(budget::Scorer::new(rt, current, eval_data, eval_opts)?),
        None => None,
    };
    if let Some(scorer) = &scorer {
        // Before any training: QAT trains on the activation scales chosen here.
        let (chosen, note) = budget::choose_calibration(prepared, scorer)?;
        (prepared, notes) = (chosen, [notes, note].concat());
    }
    // GPTQ rounding, then bias correction; with a budget, of the models its search chose and
    // each model its give-back scores ([`bias_correction::refine`]), as both depend on which
    // layers stay float.
    let post = bias_correction::Post {
        gptq: q.weight_rounding == WeightRounding::Gptq,
        bias: q.bias_correction,
    };
    let correct_from = post_training(post.gptq || post.bias);
    if let (Some(data), None) = (correct_from, &scorer) {
        let samples = q.calibration.samples as usize;
        if post.gptq {
            let none = HashSet::new();
            let rounded = gptq::run(
                &mut prepared,
                rt,
                data,
                samples,
                &none,
                None,
                &part(0.25, 0.05),
            )?;
            notes.extend(rounded.map(|s| s.describe()));
        }
        if post.bias {
            notes.extend(bias_correction::run(
                &mut prepared,
                rt,
                data,
                samples,
                &part(0.3, 0.05),
            )?);
        }
    }
    let (mut qat, mut training) = (None, None);
    if q.mode == QuantizeMode::Qat {
        let trained = super::qat::run(&q.qat, &prepared, ctx, &part(0.3, 0.3))?;
        notes.extend(trained.notes);
        prepared = trained.prepared;
        qat = Some(trained.parity);
        training = Some(trained.curve);
    }
    let (proto, mut layers, float) = match (measured, &scorer) {
        (Some(max_drop), Some(scorer)) => {
            let max_trials = q.max_trials.map_or(budget::MAX_TRIALS, |n| n as usize);
            let mut choice =
                budget::search(&prepared, scorer, max_drop, max_trials, &part(0.3, 0.4))?;
            notes.append(&mut choice.notes);
            if let Some(data) = correct_from {
                let trials_left = max_trials.saturating_sub(choice.trials);
                notes.extend(bias_correction::refine(
                    &mut prepared,
                    rt,
                    data,
                    q.calibration.samples as usize,
                    scorer,
                    &mut choice,
                    max_drop,
                    trials_left,
                    post,
                )?);
            }
            notes.push(format!(
                "the budget was measured on the {} evaluation samples",
                eval_data.summary.samples
            ));
            let (mut model, mut layers) = (choice.model, choice.layers);
            if choice.holds {
                let (smaller, note) =
                    budget::prefer_per_tensor(&prepared, scorer, &choice.float, &model, max_drop)?;
                notes.extend(note);
                if let Some(p) = smaller {
                    merge_reasons(&mut layers, p.layers);
                    (prepared, model) = (p.prepared, p.model);
                }
            }
            (model, layers, choice.float)
        }
        _ => {
            let (p, l) = prepared.build(&HashSet::new())?;
            (p, l, HashSet::new())
        }
    };
    let batch = summarize(&current.proto)
        .fixed_batch()
        .unwrap_or(eval_opts.batch_size.max(1) as usize);
    let mut keep = true;
    // Loaded in ONNX Runtime once; the speed search replaces it when it picks another model.
    let mut checked = Some(quantize::finish(rt, &proto)?);
    // The latency gate (skipped when the user accepts a slower model).
    if int8 && !q.allow_slower && layers.iter().any(|l| l.precision == "int8") {
        let candidate = checked.as_ref().expect("checked above");
        let (mut before, mut after) =
            latency_gate::compare_latency(rt, current, candidate, eval_data, batch, 10)?;
        if latency_gate::close_call(before, after) {
            (before, after) =
                latency_gate::compare_latency(rt, current, candidate, eval_data, batch, 30)?;
            notes.push(
                "a close call between the input and int8: measured again with 30 runs".into(),
            );
        }
        notes.push(format!(
            "ONNX Runtime p50 at batch {batch}: input {before:.3} ms, int8 {after:.3} ms ({:.2}x)",
            before / after.max(1e-9)
        ));
        if !latency_gate::keep_quantized(before, after, false) {
            let choice = latency_gate::speed_search(
                rt,
                current,
                &prepared,
                &float,
                eval_data,
                batch,
                &part(0.7, 0.3),
            )?;
            notes.extend(choice.notes);
            keep = latency_gate::keep_quantized(choice.input_ms, choice.chosen_ms, false);
            notes.push(format!(
                "after the speed search: input {:.3} ms, int8 {:.3} ms ({:.2}x)",
                choice.input_ms,
                choice.chosen_ms,
                choice.input_ms / choice.chosen_ms.max(1e-9)
            ));
            checked = Some(quantize::finish(rt, &choice.model)?);
            merge_reasons(&mut layers, choice.layers);
        }
    }
    let model = if keep {
        checked
    } else {
        notes.push(
            "no int8 configuration is faster than the input here, so the stage keeps the input model; \
             set `allow_slower: true` to keep the int8 model for its size"
                .into(),
        );
        for l in layers.iter_mut().filter(|l| l.precision == "int8") {
            l.precision = "float".into();
            l.reason = "int8 would have made the model slower in ONNX Runtime".into();
        }
        None
    };
    progress.update(1.0)?;
    Ok(StageOutcome {
        model,
        notes,
        layers: layers.into_iter().map(report_row).collect(),
        budget: q.max_accuracy_drop.filter(|_| int8),
        qat,
        pruning: None,
        training,
    })
}

/// Another build's decisions (speed search, per-tensor scales), keeping the budget's
/// sensitivity figures and, where the precision did not change, its reasons.
fn merge_reasons(layers: &mut Vec<LayerDecision>, speed: Vec<LayerDecision>) {
    let old = std::mem::replace(layers, speed);
    for l in layers.iter_mut() {
        if let Some(o) = old.iter().find(|o| o.node == l.node) {
            l.sensitivity = o.sensitivity;
            if l.precision == o.precision {
                l.reason = o.reason.clone();
            }
        }
    }
}

fn report_row(l: LayerDecision) -> LayerReport {
    LayerReport {
        node: l.node,
        op: l.op,
        precision: l.precision,
        reason: l.reason,
        sensitivity: l.sensitivity,
    }
}
