//! The `prune` stage: spec options -> engine pruning, recovery training with the zeros held
//! (gradual for magnitude pruning), and the report's pruning section.
use super::recovery::{batch_norm_note, batch_norm_step, epoch_notes, Setup};
use super::{StageContext, StageOutcome};
use crate::domain::prune::{
    PruneFinetune, PruneImportance, PruneMethod, PruneOptions, PruneTarget, DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
};
use crate::domain::report::{PrunedLayer, PruningReport};
use crate::domain::training::TrainingCurve;
use crate::engine::evaluate::zstd_size;
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::LoadedModel;
use crate::engine::prune::{magnitude, n_m, structured, taylor, Masks, Pruned};
use crate::engine::train::distill;
use crate::engine::{quantize, EngineError, Progress, Result, SubProgress};

/// Most training rows Taylor importance reads.
const TAYLOR_ROWS: usize = 256;

/// Taylor importance of every channel group, over the training rows (unlabelled ones after the
/// labelled), when the stage asks for it.
fn taylor_scores(
    model: &ModelProto,
    p: &PruneOptions,
    ctx: &StageContext<'_>,
    progress: &dyn Progress,
) -> Result<Option<std::collections::HashMap<String, Vec<f32>>>> {
    if p.importance != PruneImportance::Taylor || p.method != PruneMethod::Structured {
        return Ok(None);
    }
    let train = ctx.train.ok_or_else(|| EngineError::InvalidOption {
        option: "importance".into(),
        problem: "`importance: taylor` needs train_dataset_id".into(),
    })?;
    let summary = crate::engine::onnx::summarize(model);
    let merged = ctx
        .unlabelled
        .map(|u| crate::engine::dataset::merge_unlabelled(train, u, &summary))
        .transpose()?;
    let data = merged.as_ref().unwrap_or(train);
    // Every row, the labelled ones and as many unlabelled as fit: an even spread of both.
    let rows = data.summary.samples as usize;
    let picked: Vec<usize> = if rows <= TAYLOR_ROWS {
        (0..rows).collect()
    } else {
        (0..TAYLOR_ROWS).map(|i| i * rows / TAYLOR_ROWS).collect()
    };
    let data = data.select(&picked);
    let named = p
        .finetune
        .as_ref()
        .and_then(|f| f.recovery.output.clone())
        .or_else(|| ctx.spec.evaluate_options().output);
    let output =
        crate::engine::evaluate::choose_classifier(&summary.outputs, named.as_deref(), true)?
            .expect("with labels assumed, a choice or an error");
    let (logits, _) = distill::logits_of(model, &output);
    let groups = crate::engine::channels::channel_groups(model);
    let scores = taylor::importance(model, &logits, &groups, &data, picked.len(), progress)?;
    Ok(Some(scores))
}

fn prune_once(
    model: &ModelProto,
    p: &PruneOptions,
    sparsity: f64,
    scores: Option<std::collections::HashMap<String, Vec<f32>>>,
) -> Result<Pruned> {
    match p.method {
        PruneMethod::Magnitude => magnitude::prune(
            model,
            &magnitude::MagnitudeOptions {
                sparsity,
                scope: p.scope,
                exclude: p.exclude.clone(),
                skip_first: p.skip_first,
                skip_last: p.skip_last,
            },
        ),
        PruneMethod::NM => n_m::prune(
            model,
            &n_m::NmOptions {
                n: p.n as usize,
                m: p.m as usize,
                exclude: p.exclude.clone(),
                skip_first: p.skip_first,
                skip_last: p.skip_last,
            },
        ),
        PruneMethod::Structured => structured::prune(
            model,
            &structured::StructuredOptions {
                sparsity,
                importance: p.importance,
                channels: p.targets.contains(&PruneTarget::Channels),
                neurons: p.targets.contains(&PruneTarget::Neurons),
                heads: p.targets.contains(&PruneTarget::Heads),
                multiple_of: p.multiple_of as usize,
                exclude: p.exclude.clone(),
                scores,
            },
        ),
    }
}

/// Trains `pruned` from `dense` (the model before the stage) with `masks` held, for 1/`part` of
/// the training budget (gradual pruning spreads it over its steps).
fn recover(
    f: &PruneFinetune,
    dense: &LoadedModel,
    pruned: &ModelProto,
    masks: &Masks,
    ctx: &StageContext<'_>,
    progress: &dyn Progress,
    part: usize,
) -> Result<(ModelProto, Vec<String>, TrainingCurve)> {
    let mut setup = Setup::new(
        ctx,
        &f.recovery,
        dense,
        (DEFAULT_ALPHA, DEFAULT_TEMPERATURE),
        &crate::domain::training::TrainingDefaults::STANDARD,
        "recovery fine-tuning",
    )?;
    setup.share_budget(part);
    let (start, bn) = batch_norm_step(
        ctx,
        &setup,
        dense,
        pruned,
        &SubProgress {
            parent: progress,
            start: 0.0,
            span: 0.1,
        },
    )?;
    let pair = distill::Pair {
        rt: ctx.rt,
        teacher: dense,
        student: &start,
        output: &setup.output,
        train: &setup.fit_data,
        validation: Some(&setup.validation),
    };
    let sub = SubProgress {
        parent: progress,
        start: 0.1,
        span: 0.9,
    };
    let out = distill::distill_with(pair, masks.training_hook()?, &setup.recipe, &sub)?;
    let mut model = out.model;
    masks.apply(&mut model);
    let mut notes: Vec<String> = bn
        .iter()
        .map(|r| batch_norm_note(r, setup.validation_metric))
        .collect();
    notes.push(format!(
        "recovery: on {}, loss {}{}",
        setup.rows_note(),
        setup.loss_note("the model before pruning"),
        if masks.is_empty() { "" } else { ", zeros held" }
    ));
    notes.push(setup.schedule_note.clone());
    notes.extend(epoch_notes(&out.report, setup.validation_metric));
    let curve = setup.curve(&out.report, bn);
    Ok((model, notes, curve))
}

pub fn run(p: &PruneOptions, ctx: &StageContext<'_>) -> Result<StageOutcome> {
    let (dense, progress) = (ctx.current, ctx.progress);
    let mut notes = Vec::new();
    let steps = match (&p.finetune, p.method) {
        (Some(f), PruneMethod::Magnitude) => f.steps.max(1),
        _ => 1,
    };
    let mut proto = dense.proto.clone();
    let mut last: Option<Pruned> = None;
    let mut training = None;
    for step in 1..=steps {
        let sparsity = if steps > 1 {
            magnitude::gradual_sparsity(p.sparsity, step as usize, steps as usize)
        } else {
            p.sparsity
        };
        let scores = taylor_scores(&proto, p, ctx, progress)?;
        let pruned = prune_once(&proto, p, sparsity, scores)?;
        if step == 1 || step == steps {
            notes.extend(pruned.notes.iter().cloned());
        }
        proto = pruned.model.clone();
        if let Some(f) = &p.finetune {
            if steps > 1 {
                notes.push(format!(
                    "gradual step {step} of {steps}: {:.1}% zeros, then 1/{steps} of the training budget",
                    sparsity * 100.0
                ));
            }
            let sub = SubProgress {
                parent: progress,
                start: (step - 1) as f64 / steps as f64,
                span: 1.0 / steps as f64,
            };
            let (trained, recovery_notes, curve) =
                recover(f, dense, &proto, &pruned.masks, ctx, &sub, steps as usize)?;
            proto = trained;
            if step == steps {
                notes.extend(recovery_notes);
                training = Some(curve);
            }
        }
        last = Some(pruned);
    }
    let pruned = last.expect("at least one step");
    // Rows checked on the final weights (after recovery training).
    let layers = match p.method {
        PruneMethod::Structured => pruned.layers,
        PruneMethod::NM => n_m::checked(
            &dense.proto,
            &proto,
            &pruned.masks,
            p.n as usize,
            p.m as usize,
        ),
        PruneMethod::Magnitude => {
            magnitude::report(&dense.proto, &proto, &pruned.masks, "unstructured")
        }
    };
    let model = quantize::finish(ctx.rt, &proto)?;
    let report = pruning_report(p, dense, &model, &layers);
    notes.push(report.runtime_note.clone());
    Ok(StageOutcome {
        model: Some(model),
        notes,
        pruning: Some(report),
        training,
        ..Default::default()
    })
}

fn pruning_report(
    p: &PruneOptions,
    dense: &LoadedModel,
    pruned: &LoadedModel,
    layers: &[crate::engine::prune::LayerPruning],
) -> PruningReport {
    let before: u64 = layers.iter().map(|l| l.parameters_before).sum();
    let after: u64 = layers.iter().map(|l| l.nonzero_after).sum();
    let (expected, note) = match p.method {
        PruneMethod::Structured => (
            true,
            "removed channels, neurons and heads shrink the graph itself: ONNX Runtime runs fewer operations (the stage's latency shows by how much)".to_string(),
        ),
        PruneMethod::Magnitude => (
            false,
            "unstructured zeros do not make ONNX Runtime faster: its CPU kernels are dense and multiply zeros like any other weight; the gain is the compressed size (zstd), and speed needs structured pruning".to_string(),
        ),
        PruneMethod::NM => (
            false,
            format!(
                "{}:{} sparsity runs no faster in ONNX Runtime on CPU (dense kernels); it speeds up on sparse tensor cores (TensorRT on Ampere or newer), and here the gain is the compressed size (zstd)",
                p.n, p.m
            ),
        ),
    };
    PruningReport {
        method: p.method.name().into(),
        parameters_before: before,
        nonzero_after: after,
        sparsity: if before == 0 {
            0.0
        } else {
            1.0 - after as f64 / before as f64
        },
        verified: !layers.is_empty() && layers.iter().all(|l| l.verified),
        bytes_before: dense.bytes.len() as u64,
        bytes_after: pruned.bytes.len() as u64,
        zstd_bytes_before: zstd_size(&dense.bytes),
        zstd_bytes_after: zstd_size(&pruned.bytes),
        runtime_speedup_expected: expected,
        runtime_note: note,
        layers: layers
            .iter()
            .map(|l| PrunedLayer {
                node: l.node.clone(),
                op: l.op.clone(),
                weight: l.weight.clone(),
                pattern: l.pattern.clone(),
                parameters_before: l.parameters_before,
                parameters_after: l.parameters_after,
                nonzero_after: l.nonzero_after,
                verified: l.verified,
            })
            .collect(),
    }
}
