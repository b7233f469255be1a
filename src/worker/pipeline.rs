//! Runs a job's stages in order on the engine (blocking code, no database or network):
//! baseline evaluation, each stage on the previous stage's output, evaluation after each, report.
use crate::domain::report::{
    self, CalibrationInfo, Deltas, Environment, Metrics, Report, StageReport,
};
use crate::domain::spec::{JobSpec, Stage};
use crate::engine::dataset::Dataset;
use crate::engine::evaluate::{evaluate, Baseline};
use crate::engine::onnx::LoadedModel;
use crate::engine::runtime::Runtime;
use crate::engine::{table, EngineError, Progress, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Instant;

/// Hashes of the inputs, recorded in the report's environment block.
pub struct InputHashes {
    pub spec: String,
    pub model: String,
    pub dataset: String,
}

/// What a pipeline works on.
pub struct PipelineInputs {
    pub model: LoadedModel,
    pub data: Dataset,
    /// The spec's calibration dataset; without one, calibration rows are split off `data`.
    pub calibration: Option<Dataset>,
    /// The spec's training dataset (distill stages).
    pub train: Option<Dataset>,
    /// The spec's uploaded student model (distill stages).
    pub student: Option<LoadedModel>,
    pub hashes: InputHashes,
}

/// What a finished pipeline produced.
pub struct PipelineOutput {
    pub report: Report,
    /// The final model's bytes (the input model when no stage changes it).
    pub final_model: bytes::Bytes,
    /// Models written by stages that change the model, by artifact name.
    pub stage_models: Vec<(String, bytes::Bytes)>,
    /// Human-readable log: the report table and stage notes.
    pub log: String,
}

/// Splits off calibration rows when a stage needs them and no calibration dataset was given:
/// a seeded random sample, removed from the evaluation set so no number is measured on them.
fn calibration_split(
    spec: &JobSpec,
    model: &LoadedModel,
    data: &Dataset,
    given: Option<Dataset>,
) -> Result<(Dataset, Option<Dataset>, Option<CalibrationInfo>)> {
    let wanted = spec
        .pipeline
        .iter()
        .filter_map(|s| match s {
            Stage::Quantize(q)
                if super::quantize_stage::needs_calibration(q, model)
                    || given.is_some() && super::quantize_stage::auto_compares(q, model) =>
            {
                Some(q.calibration.samples as usize)
            }
            _ => None,
        })
        .max();
    let Some(wanted) = wanted else {
        return Ok((data.clone(), given, None));
    };
    if let Some(c) = given {
        let info = CalibrationInfo {
            source: "calibration_dataset".into(),
            samples: c.summary.samples.min(wanted as u64),
            dataset_rows: vec![],
        };
        return Ok((data.clone(), Some(c), Some(info)));
    }
    let total = data.summary.samples as usize;
    if total < 2 {
        return Err(EngineError::InvalidDataset {
            tensor: "(all)".into(),
            problem: "one sample cannot both calibrate and evaluate".into(),
        });
    }
    // Keep at least half of the dataset for evaluation.
    let n = wanted.min(total / 2).max(1);
    let mut rows: Vec<usize> = (0..total).collect();
    rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(spec.seed));
    let (calib, rest) = rows.split_at(n);
    let mut calib = calib.to_vec();
    let mut rest = rest.to_vec();
    calib.sort_unstable();
    rest.sort_unstable();
    let info = CalibrationInfo {
        source: "split_of_dataset".into(),
        samples: n as u64,
        dataset_rows: calib.iter().map(|&r| r as u64).collect(),
    };
    Ok((data.select(&rest), Some(data.select(&calib)), Some(info)))
}

fn evaluate_stage(
    rt: &Runtime,
    model: &LoadedModel,
    data: &Dataset,
    spec: &JobSpec,
    stage: &Stage,
    baseline: &Baseline,
    progress: &dyn Progress,
) -> Result<(Metrics, Vec<String>)> {
    let opts = match stage {
        Stage::Evaluate(o) => o.clone(),
        _ => spec.evaluate_options(),
    };
    let e = evaluate(rt, model, data, &opts, Some(baseline), progress)?;
    Ok((e.metrics, e.notes))
}

pub fn run(
    rt: &Runtime,
    job_id: &str,
    spec: &JobSpec,
    inputs: PipelineInputs,
    progress: &super::heartbeat::JobProgress,
) -> Result<PipelineOutput> {
    let PipelineInputs {
        model,
        data,
        calibration,
        train,
        student,
        hashes,
    } = inputs;
    let data = &data;
    let steps = (spec.pipeline.len() + 1) as f64;
    let opts = spec.evaluate_options();
    let mut log = String::new();
    let (eval_data, calibration, calibration_info) =
        calibration_split(spec, &model, data, calibration)?;

    progress.enter("baseline", 0.0, 1.0 / steps);
    let base = evaluate(rt, &model, &eval_data, &opts, None, progress)?;
    for n in &base.notes {
        log.push_str(&format!("baseline: {n}\n"));
    }
    let baseline = base.as_baseline();
    let mut current = model;
    let mut stages = Vec::new();
    let mut stage_models = Vec::new();
    let mut last_metrics = base.metrics.clone();
    let mut budget_verdicts = Vec::new();

    for (i, stage) in spec.pipeline.iter().enumerate() {
        progress.enter(stage.name(), (i + 1) as f64 / steps, 1.0 / steps);
        let started = Instant::now();
        let (mut notes, mut layers, mut artifact) = (Vec::new(), Vec::new(), None);
        let mut stage_budget = None;
        let mut qat = None;
        let mut pruning = None;
        if let Stage::Prune(p) = stage {
            let sub = crate::engine::SubProgress {
                parent: progress,
                start: (i + 1) as f64 / steps,
                span: 0.8 / steps,
            };
            let inputs = super::prune_stage::StageInputs {
                current: &current,
                train: train.as_ref(),
                spec,
            };
            let out = super::prune_stage::run(rt, p, inputs, &sub)?;
            notes.extend(out.notes);
            pruning = Some(out.report);
            let name = format!("stage-{i}-prune.onnx");
            stage_models.push((name.clone(), out.model.bytes.clone()));
            artifact = Some(name);
            current = out.model;
        }
        if let Stage::Quantize(q) = stage {
            let sub = crate::engine::SubProgress {
                parent: progress,
                start: (i + 1) as f64 / steps,
                span: 0.7 / steps,
            };
            // auto on an MLP compares static with dynamic when calibration rows are at hand.
            let needs = super::quantize_stage::needs_calibration(q, &current)
                || super::quantize_stage::auto_compares(q, &current);
            let out = super::quantize_stage::run(
                rt,
                q,
                super::quantize_stage::StageInputs {
                    current: &current,
                    calibration: calibration.as_ref().filter(|_| needs),
                    train: train.as_ref(),
                    eval_data: &eval_data,
                    spec,
                    eval_opts: &opts,
                },
                &sub,
            )?;
            notes.extend(out.notes);
            layers = out.layers;
            stage_budget = out.budget;
            qat = out.qat;
            if let Some(model) = out.model {
                let name = format!("stage-{i}-quantize.onnx");
                stage_models.push((name.clone(), model.bytes.clone()));
                artifact = Some(name);
                current = model;
            }
        }
        if matches!(stage, Stage::Distill(_) | Stage::Finetune(_)) {
            let sub = crate::engine::SubProgress {
                parent: progress,
                start: (i + 1) as f64 / steps,
                span: 0.8 / steps,
            };
            let inputs = super::distill_stage::StageInputs {
                teacher: &current,
                student: student.as_ref(),
                train: train.as_ref(),
                spec,
            };
            let out = match stage {
                Stage::Distill(d) => super::distill_stage::run(rt, d, inputs, &sub)?,
                Stage::Finetune(f) => super::distill_stage::finetune(rt, f, inputs, &sub)?,
                _ => unreachable!("matched above"),
            };
            notes.extend(out.notes);
            let name = format!("stage-{i}-{}.onnx", stage.name());
            stage_models.push((name.clone(), out.model.bytes.clone()));
            artifact = Some(name);
            current = out.model;
        }
        let (metrics, eval_notes) =
            evaluate_stage(rt, &current, &eval_data, spec, stage, &baseline, progress)?;
        notes.extend(eval_notes);
        for n in &notes {
            log.push_str(&format!("{i}:{}: {n}\n", stage.name()));
        }
        if let Some(limit) = stage_budget {
            budget_verdicts.push(report::stage_budget_verdict(
                i,
                limit,
                &base.metrics,
                &metrics,
            ));
        }
        last_metrics = metrics.clone();
        stages.push(StageReport {
            index: i as u64,
            stage: stage.name().to_string(),
            params: serde_json::to_value(stage).unwrap_or_default(),
            metrics,
            duration_ms: started.elapsed().as_millis() as u64,
            notes,
            artifact,
            layers,
            qat,
            pruning,
        });
    }

    let mut verdicts = report::verdicts(&spec.constraints, &base.metrics, &last_metrics);
    verdicts.extend(budget_verdicts);
    let report = Report {
        job_id: job_id.to_string(),
        deltas: Deltas::between(&base.metrics, &last_metrics),
        passed: verdicts.iter().all(|v| v.passed),
        verdicts,
        evaluated_samples: base.metrics.samples,
        calibration: calibration_info,
        environment: Environment {
            shrink_version: env!("CARGO_PKG_VERSION").to_string(),
            onnxruntime_version: rt.version.clone(),
            cpu_model: cpu_model(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
            intra_op_threads: opts.threads as u64,
            seed: spec.seed,
            spec_sha256: hashes.spec,
            model_sha256: hashes.model,
            dataset_sha256: hashes.dataset,
        },
        baseline: base.metrics,
        stages,
        final_metrics: last_metrics,
    };
    log.push_str(&table::render(&report));
    Ok(PipelineOutput {
        final_model: current.bytes,
        stage_models,
        report,
        log,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
