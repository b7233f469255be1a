//! The `prune` stage: spec options -> engine pruning, recovery training with the zeros held
//! (gradual for magnitude pruning), and the report's pruning section.
use crate::domain::prune::{
    PruneFinetune, PruneImportance, PruneMethod, PruneOptions, PruneScope, PruneTarget,
};
use crate::domain::report::{PrunedLayer, PruningReport};
use crate::domain::spec::JobSpec;
use crate::engine::dataset::{bind, Dataset};
use crate::engine::evaluate::{choose_classifier, zstd_size};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::prune::{magnitude, n_m, structured, Masks, Pruned};
use crate::engine::runtime::Runtime;
use crate::engine::train::distill;
use crate::engine::{quantize, EngineError, Progress, Result, SubProgress};

pub struct StageInputs<'a> {
    pub current: &'a LoadedModel,
    pub train: Option<&'a Dataset>,
    pub spec: &'a JobSpec,
}

pub struct Outcome {
    pub model: LoadedModel,
    pub notes: Vec<String>,
    pub report: PruningReport,
}

fn prune_once(model: &ModelProto, p: &PruneOptions, sparsity: f64) -> Result<Pruned> {
    match p.method {
        PruneMethod::Magnitude => magnitude::prune(
            model,
            &magnitude::MagnitudeOptions {
                sparsity,
                scope: match p.scope {
                    PruneScope::PerLayer => magnitude::Scope::PerLayer,
                    PruneScope::Global => magnitude::Scope::Global,
                },
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
                importance: match p.importance {
                    PruneImportance::L1 => structured::Importance::L1,
                    PruneImportance::L2 => structured::Importance::L2,
                },
                channels: p.targets.contains(&PruneTarget::Channels),
                neurons: p.targets.contains(&PruneTarget::Neurons),
                heads: p.targets.contains(&PruneTarget::Heads),
                multiple_of: p.multiple_of as usize,
                exclude: p.exclude.clone(),
            },
        ),
    }
}

/// Trains `pruned` from `dense` (the model before the stage) with `masks` held.
fn recover(
    rt: &Runtime,
    f: &PruneFinetune,
    dense: &LoadedModel,
    pruned: &ModelProto,
    masks: &Masks,
    inputs: &StageInputs<'_>,
    progress: &dyn Progress,
) -> Result<(ModelProto, Vec<String>)> {
    let train = inputs.train.ok_or_else(|| EngineError::InvalidOption {
        option: "train_dataset_id".into(),
        problem: "recovery fine-tuning needs training data".into(),
    })?;
    let summary = summarize(&dense.proto);
    let named = f
        .output
        .clone()
        .or_else(|| inputs.spec.evaluate_options().output);
    let output = choose_classifier(&summary.outputs, named.as_deref(), true)?
        .expect("with labels assumed, a choice or an error");
    let labelled = bind(&summary, &train.summary)?.labels.is_some();
    let (fit_data, val_data, fit_rows, val_rows) = super::distill_stage::split_validation(
        train,
        f.training.validation_share,
        inputs.spec.seed,
    );
    let epochs = f.training.epochs;
    let opts = distill::DistillOptions {
        alpha: if labelled { f.alpha } else { 0.0 },
        temperature: f.temperature,
        fit: super::distill_stage::fit_options(&f.training, inputs.spec.seed),
        features: Vec::new(),
    };
    let pair = distill::Pair {
        rt,
        teacher: dense,
        student: pruned,
        output: &output,
        train: &fit_data,
        validation: Some(&val_data),
    };
    let out = distill::distill_with(pair, masks.training_hook()?, &opts, progress)?;
    let mut model = out.model;
    masks.apply(&mut model);
    let mut notes = vec![format!(
        "recovery: {} epochs on {fit_rows} rows ({val_rows} held out), loss {}·CE + {}·T²·KL to the model before pruning at T = {}{}",
        epochs,
        opts.alpha,
        1.0 - opts.alpha,
        f.temperature,
        if masks.is_empty() { "" } else { ", zeros held" }
    )];
    notes.extend(super::distill_stage::epoch_notes(&out.report));
    Ok((model, notes))
}

pub fn run(
    rt: &Runtime,
    p: &PruneOptions,
    inputs: StageInputs<'_>,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let dense = inputs.current;
    let mut notes = Vec::new();
    let steps = match (&p.finetune, p.method) {
        (Some(f), PruneMethod::Magnitude) => f.steps.max(1),
        _ => 1,
    };
    let mut proto = dense.proto.clone();
    let mut last: Option<Pruned> = None;
    for step in 1..=steps {
        let sparsity = if steps > 1 {
            magnitude::gradual_sparsity(p.sparsity, step as usize, steps as usize)
        } else {
            p.sparsity
        };
        let pruned = prune_once(&proto, p, sparsity)?;
        if step == 1 || step == steps {
            notes.extend(pruned.notes.iter().cloned());
        }
        proto = pruned.model.clone();
        if let Some(f) = &p.finetune {
            let epochs = (f.training.epochs / steps).max(1);
            if steps > 1 {
                notes.push(format!(
                    "gradual step {step} of {steps}: {:.1}% zeros, then {epochs} epochs",
                    sparsity * 100.0
                ));
            }
            let sub = SubProgress {
                parent: progress,
                start: (step - 1) as f64 / steps as f64,
                span: 1.0 / steps as f64,
            };
            let mut f = f.clone();
            f.training.epochs = epochs;
            let (trained, recovery_notes) =
                recover(rt, &f, dense, &proto, &pruned.masks, &inputs, &sub)?;
            proto = trained;
            if step == steps {
                notes.extend(recovery_notes);
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
    let model = quantize::finish(rt, &proto)?;
    let report = pruning_report(p, dense, &model, &layers);
    notes.push(report.runtime_note.clone());
    Ok(Outcome {
        model,
        notes,
        report,
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
        method: match p.method {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::NM => "n_m",
            PruneMethod::Structured => "structured",
        }
        .into(),
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
