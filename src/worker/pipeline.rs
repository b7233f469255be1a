//! Runs a job's stages in order on the engine (blocking code, no database or network):
//! baseline evaluation, each stage on the previous stage's output, evaluation after each, report.
use crate::domain::report::{self, Deltas, Environment, Report, StageReport};
use crate::domain::spec::{JobSpec, Stage};
use crate::engine::dataset::Dataset;
use crate::engine::evaluate::evaluate;
use crate::engine::onnx::LoadedModel;
use crate::engine::runtime::Runtime;
use crate::engine::{table, Result};
use std::time::Instant;

use super::heartbeat::JobProgress;

/// Hashes of the inputs, recorded in the report's environment block.
pub struct InputHashes {
    pub spec: String,
    pub model: String,
    pub dataset: String,
}

/// What a finished pipeline produced.
pub struct PipelineOutput {
    pub report: Report,
    /// The final model's bytes (the input model when no stage changes it).
    pub final_model: bytes::Bytes,
    /// Human-readable log: the report table and stage notes.
    pub log: String,
}

pub fn run(
    rt: &Runtime,
    job_id: &str,
    spec: &JobSpec,
    model: LoadedModel,
    data: &Dataset,
    hashes: InputHashes,
    progress: &JobProgress,
) -> Result<PipelineOutput> {
    let steps = (spec.pipeline.len() + 1) as f64;
    let opts = spec.evaluate_options();
    let mut log = String::new();

    progress.enter("baseline", 0.0, 1.0 / steps);
    let base = evaluate(rt, &model, data, &opts, None, progress)?;
    for n in &base.notes {
        log.push_str(&format!("baseline: {n}\n"));
    }
    let baseline = base.as_baseline();
    let mut current = model;
    let mut stages = Vec::new();
    let mut last_metrics = base.metrics.clone();

    for (i, stage) in spec.pipeline.iter().enumerate() {
        progress.enter(stage.name(), (i + 1) as f64 / steps, 1.0 / steps);
        let started = Instant::now();
        let (metrics, notes) = match stage {
            Stage::Evaluate(o) => {
                let e = evaluate(rt, &current, data, o, Some(&baseline), progress)?;
                (e.metrics, e.notes)
            }
        };
        for n in &notes {
            log.push_str(&format!("{i}:{}: {n}\n", stage.name()));
        }
        last_metrics = metrics.clone();
        stages.push(StageReport {
            index: i as u64,
            stage: stage.name().to_string(),
            params: serde_json::to_value(stage).unwrap_or_default(),
            metrics,
            duration_ms: started.elapsed().as_millis() as u64,
            notes,
            artifact: None,
        });
        // Stages that transform the model replace `current` here; `evaluate` leaves it as is.
        current = LoadedModel {
            proto: current.proto,
            bytes: current.bytes,
        };
    }

    let verdicts = report::verdicts(&spec.constraints, &base.metrics, &last_metrics);
    let report = Report {
        job_id: job_id.to_string(),
        deltas: Deltas::between(&base.metrics, &last_metrics),
        passed: verdicts.iter().all(|v| v.passed),
        verdicts,
        evaluated_samples: base.metrics.samples,
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
