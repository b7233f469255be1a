//! The job pipeline: synchronous, no async runtime, database or network. It evaluates the
//! baseline, runs each stage on the previous stage's model (one `match`, one file per stage),
//! measures after every stage, and writes the report.
//!
//! A stage is a function `run(options, &StageContext) -> Result<StageOutcome>`: the model in,
//! a new model (or none: the stage keeps its input), notes and the stage's report sections out.
//! [`artifacts`] turns the models stages return into files.
pub mod artifacts;
mod calibration;
pub mod checks;
pub mod distill;
pub mod finetune;
pub mod prune;
pub mod qat;
pub mod quantize;
mod recovery;

use crate::domain::report::{
    self, Deltas, Environment, LayerReport, PruningReport, QatParity, Report, StageReport,
};
use crate::domain::spec::{EvaluateOptions, JobSpec, Stage};
use crate::engine::dataset::Dataset;
use crate::engine::evaluate::evaluate;
use crate::engine::onnx::LoadedModel;
use crate::engine::runtime::Runtime;
use crate::engine::{table, Progress, Result, SubProgress};
use std::time::Instant;

/// Progress of a whole job: the pipeline names each step and the share of the job it covers;
/// the engine reports within it. The worker's heartbeat implements it (and cancels through it).
pub trait JobProgress: Progress {
    /// Starts a step covering `span` of the whole job from `start`.
    fn enter(&self, step: &str, start: f64, span: f64);
    /// One line of the job's log, as it is written (so a job that fails keeps what it logged).
    fn log(&self, _line: &str) {}
}

/// A [`JobProgress`] that ignores updates and never cancels (the command line, tests).
impl JobProgress for crate::engine::NoProgress {
    fn enter(&self, _step: &str, _start: f64, _span: f64) {}
}

/// What a stage works with.
#[derive(Clone, Copy)]
pub struct StageContext<'a> {
    pub rt: &'a Runtime,
    pub spec: &'a JobSpec,
    /// The model as it enters the stage.
    pub current: &'a LoadedModel,
    /// The rows every number is measured on.
    pub eval_data: &'a Dataset,
    pub eval_opts: &'a EvaluateOptions,
    /// Calibration rows: the spec's calibration dataset or a split of the job's dataset.
    pub calibration: Option<&'a Dataset>,
    /// The spec's training rows.
    pub train: Option<&'a Dataset>,
    /// The spec's unlabelled rows (training learns the teacher's outputs on them).
    pub unlabelled: Option<&'a Dataset>,
    /// The spec's uploaded student model.
    pub student: Option<&'a LoadedModel>,
    /// The spec's uploaded teacher model.
    pub teacher: Option<&'a LoadedModel>,
    /// Bytes one training pass may hold: larger batches run as several passes whose gradients
    /// add up.
    pub training_pass_memory: usize,
    pub progress: &'a dyn Progress,
}

/// What a stage returns.
#[derive(Default)]
pub struct StageOutcome {
    /// The new model, or None when the stage keeps its input.
    pub model: Option<LoadedModel>,
    pub notes: Vec<String>,
    /// Per-layer decisions (quantize).
    pub layers: Vec<LayerReport>,
    /// The export parity of quantization-aware training.
    pub qat: Option<QatParity>,
    /// What pruning removed.
    pub pruning: Option<PruningReport>,
    /// How the stage trained.
    pub training: Option<crate::domain::training::TrainingCurve>,
    /// The stage's own accuracy budget, which gets a verdict of its own.
    pub budget: Option<f64>,
}

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
    /// The spec's unlabelled training rows (training stages learn the teacher's outputs on them).
    pub unlabelled: Option<Dataset>,
    /// The spec's uploaded student model (distill stages).
    pub student: Option<LoadedModel>,
    /// The spec's uploaded teacher model (distill stages).
    pub teacher: Option<LoadedModel>,
    pub hashes: InputHashes,
    /// Bytes one training pass may hold (the operator's limit; see [`StageContext`]).
    pub training_pass_memory: usize,
}

/// What a finished pipeline produced.
pub struct PipelineOutput {
    pub report: Report,
    /// The final model's file (the input model when no stage changes it).
    pub final_model: artifacts::Artifact,
    /// The files of the models that stages produced, in stage order.
    pub stage_models: Vec<artifacts::Artifact>,
    /// Human-readable log: the report table and stage notes.
    pub log: String,
}

/// Runs the job: the baseline, then every stage, each followed by an evaluation.
pub fn run(
    rt: &Runtime,
    job_id: &str,
    spec: &JobSpec,
    inputs: PipelineInputs,
    progress: &dyn JobProgress,
) -> Result<PipelineOutput> {
    let PipelineInputs {
        model,
        data,
        calibration,
        train,
        unlabelled,
        student,
        teacher,
        hashes,
        training_pass_memory,
    } = inputs;
    let steps = (spec.pipeline.len() + 1) as f64;
    let opts = spec.evaluate_options();
    let mut log = Log {
        text: String::new(),
        sink: progress,
    };
    let (eval_data, calibration, calibration_info) =
        calibration::split(spec, &model, &data, calibration)?;

    progress.enter("baseline", 0.0, 1.0 / steps);
    let base = evaluate(rt, &model, &eval_data, &opts, None, progress)?;
    for n in &base.notes {
        log.line(format!("baseline: {n}"));
    }
    let baseline = base.as_baseline();
    let mut current = model;
    let mut stages = Vec::new();
    let mut stage_models = Vec::new();
    let mut last_metrics = base.metrics.clone();
    let mut budget_verdicts = Vec::new();

    for (i, stage) in spec.pipeline.iter().enumerate() {
        let start = (i + 1) as f64 / steps;
        progress.enter(stage.name(), start, 1.0 / steps);
        let started = Instant::now();
        // Within the stage's window: 80% for the stage's work, the rest for measuring its model.
        let part = SubProgress {
            parent: progress,
            start: 0.0,
            span: 0.8,
        };
        let ctx = StageContext {
            rt,
            spec,
            current: &current,
            eval_data: &eval_data,
            eval_opts: &opts,
            calibration: calibration.as_ref(),
            train: train.as_ref(),
            unlabelled: unlabelled.as_ref(),
            student: student.as_ref(),
            teacher: teacher.as_ref(),
            training_pass_memory,
            progress: &part,
        };
        let out = match stage {
            Stage::Evaluate(_) => StageOutcome::default(),
            Stage::Quantize(q) => quantize::run(q, &ctx)?,
            Stage::Distill(d) => distill::run(d, &ctx)?,
            Stage::Finetune(f) => finetune::run(f, &ctx)?,
            Stage::Prune(p) => prune::run(p, &ctx)?,
        };
        let mut notes = out.notes;
        let artifact = match out.model {
            Some(model) => {
                let file = artifacts::stage_artifact(i, stage.name(), &model);
                let name = file.name.clone();
                stage_models.push(file);
                current = model;
                Some(name)
            }
            None => None,
        };
        let eval_opts = match stage {
            Stage::Evaluate(o) => o.clone(),
            _ => opts.clone(),
        };
        let measuring = SubProgress {
            parent: progress,
            start: 0.8,
            span: 0.2,
        };
        let measured = evaluate(
            rt,
            &current,
            &eval_data,
            &eval_opts,
            Some(&baseline),
            &measuring,
        )?;
        let metrics = measured.metrics;
        notes.extend(measured.notes);
        for n in &notes {
            log.line(format!("{i}:{}: {n}", stage.name()));
        }
        if let Some(limit) = out.budget {
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
            layers: out.layers,
            qat: out.qat,
            pruning: out.pruning,
            training: out.training,
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
    log.line(table::render(&report));
    Ok(PipelineOutput {
        final_model: artifacts::final_artifact(&current),
        stage_models,
        report,
        log: log.text,
    })
}

/// The job's log: kept for the report's `job.log`, and handed line by line to the progress
/// sink as it is written.
struct Log<'a> {
    text: String,
    sink: &'a dyn JobProgress,
}

impl Log<'_> {
    fn line(&mut self, line: String) {
        self.sink.log(&line);
        self.text.push_str(&line);
        if !line.ends_with('\n') {
            self.text.push('\n');
        }
    }
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
