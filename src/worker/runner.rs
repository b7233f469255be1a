//! One attempt at one job: fetch inputs, run the pipeline on a blocking thread, store the outputs,
//! and end the attempt as succeeded, failed (maybe retried), cancelled or handed back.
use super::heartbeat::{self, JobProgress, LeaseTerms, StopReason};
use super::WorkerContext;
use crate::blob::artifact_key;
use crate::domain::dataset::DatasetSummary;
use crate::domain::job::JobError;
use crate::domain::model::ModelSummary;
use crate::engine::{self, EngineError};
use crate::pipeline::{self, InputHashes, JobProgress as _, PipelineInputs, PipelineOutput};
use crate::store::jobs::{ArtifactRow, JobRow};
use crate::store::now_ms;
use crate::store::queue::{Ending, FailOutcome};
use crate::store::uploads::UploadKind;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::Instrument;

/// How an attempt failed, which decides whether to retry.
enum Failure {
    /// The input is at fault: retrying cannot help.
    Invalid(anyhow::Error),
    /// Storage, database or runtime trouble: worth retrying.
    Infrastructure(anyhow::Error),
    Stopped(StopReason),
}

pub async fn run_job(ctx: &WorkerContext, job: JobRow, shutdown: watch::Receiver<bool>) {
    let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempt, request_id = job.request_id.as_deref().unwrap_or("-"));
    async move {
        tracing::info!("job started");
        let started = std::time::Instant::now();
        let progress = Arc::new(JobProgress::default());
        progress.enter("baseline", 0.0, 0.0);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let interval = (ctx.lease / 3).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        );
        let beat = tokio::spawn(
            heartbeat::run(
                LeaseTerms {
                    db: ctx.db.clone(),
                    job_id: job.id.clone(),
                    worker: ctx.worker_id.clone(),
                    lease: ctx.lease,
                    interval,
                    metrics: ctx.metrics.clone(),
                },
                progress.clone(),
                shutdown,
                done_rx,
            )
            .in_current_span(),
        );
        let result = attempt(ctx, &job, progress.clone()).await;
        let _ = done_tx.send(());
        let _ = beat.await;
        let outcome = match &result {
            Ok(()) => "succeeded",
            Err(Failure::Invalid(_)) => "failed",
            Err(Failure::Infrastructure(_)) => "infrastructure_error",
            Err(Failure::Stopped(StopReason::Cancelled)) => "cancelled",
            Err(Failure::Stopped(StopReason::LeaseLost)) => "lease_lost",
            Err(Failure::Stopped(StopReason::Shutdown)) => "handed_back",
        };
        finish(ctx, &job, result, &progress).await;
        for (stage, seconds) in progress.stage_times() {
            ctx.metrics.stage_finished(&stage, seconds);
        }
        ctx.metrics
            .job_finished(outcome, started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await
}

/// Downloads the upload `id` names (when it names one) into `dir`, as `<what>`.
async fn fetch_optional(
    ctx: &WorkerContext,
    job: &JobRow,
    kind: UploadKind,
    id: &Option<String>,
    dir: &std::path::Path,
    what: &str,
) -> Result<Option<std::path::PathBuf>, Failure> {
    let Some(id) = id else {
        return Ok(None);
    };
    let noun = if kind == UploadKind::Model {
        "model"
    } else {
        "dataset"
    };
    let blob_key = match kind {
        UploadKind::Model => ctx
            .db
            .get_upload::<ModelSummary>(kind, &job.project, id)
            .await
            .map(|row| row.blob_key),
        _ => ctx
            .db
            .get_upload::<DatasetSummary>(kind, &job.project, id)
            .await
            .map(|row| row.blob_key),
    }
    .with_context(|| format!("while looking up the {what} {noun}"))
    .map_err(Failure::Invalid)?;
    let path = dir.join(what);
    ctx.blobs
        .get_to_file(&blob_key, &path)
        .await
        .with_context(|| format!("while downloading the {what} {noun}"))
        .map_err(Failure::Infrastructure)?;
    Ok(Some(path))
}

async fn attempt(
    ctx: &WorkerContext,
    job: &JobRow,
    progress: Arc<JobProgress>,
) -> Result<(), Failure> {
    let spec = job.spec().map_err(|e| Failure::Invalid(e.into()))?;
    let rt = ctx.runtime.clone().map_err(|e| {
        Failure::Infrastructure(anyhow::anyhow!(EngineError::RuntimeUnavailable(e)))
    })?;
    let infra = |e: anyhow::Error| Failure::Infrastructure(e);

    let model_row = ctx
        .db
        .get_upload::<ModelSummary>(UploadKind::Model, &job.project, &spec.model_id)
        .await
        .context("while looking up the model")
        .map_err(Failure::Invalid)?;
    let data_row = ctx
        .db
        .get_upload::<DatasetSummary>(UploadKind::Dataset, &job.project, &spec.dataset_id)
        .await
        .context("while looking up the dataset")
        .map_err(Failure::Invalid)?;
    tokio::fs::create_dir_all(&ctx.scratch_dir)
        .await
        .context("while creating the scratch directory")
        .map_err(infra)?;
    let dir = tempfile::Builder::new()
        .prefix("job-")
        .tempdir_in(&ctx.scratch_dir)
        .context("while creating a scratch directory")
        .map_err(infra)?;
    let model_path = dir.path().join("model.onnx");
    let data_path = dir.path().join("dataset");
    ctx.blobs
        .get_to_file(&model_row.blob_key, &model_path)
        .await
        .context("while downloading the model")
        .map_err(infra)?;
    ctx.blobs
        .get_to_file(&data_row.blob_key, &data_path)
        .await
        .context("while downloading the dataset")
        .map_err(infra)?;

    // Optional inputs the spec names: a calibration dataset (otherwise the pipeline splits the
    // dataset), and a distill stage's training rows and uploaded student.
    let dir_path = dir.path();
    let calib_path = fetch_optional(
        ctx,
        job,
        UploadKind::Dataset,
        &spec.calibration_dataset_id,
        dir_path,
        "calibration",
    )
    .await?;
    let train_path = fetch_optional(
        ctx,
        job,
        UploadKind::Dataset,
        &spec.train_dataset_id,
        dir_path,
        "training",
    )
    .await?;
    let unlabelled_path = fetch_optional(
        ctx,
        job,
        UploadKind::Dataset,
        &spec.unlabelled_dataset_id,
        dir_path,
        "unlabelled",
    )
    .await?;
    let student_path = fetch_optional(
        ctx,
        job,
        UploadKind::Model,
        &spec.student_model_id,
        dir_path,
        "student",
    )
    .await?;
    let teacher_path = fetch_optional(
        ctx,
        job,
        UploadKind::Model,
        &spec.teacher_model_id,
        dir_path,
        "teacher",
    )
    .await?;

    let hashes = InputHashes {
        spec: hex::encode(Sha256::digest(job.spec.as_bytes())),
        model: model_row.sha256.clone(),
        dataset: data_row.sha256.clone(),
    };
    let job_id = job.id.clone();
    let training_pass_memory = ctx.training_pass_memory;
    let p = progress.clone();
    let span = tracing::Span::current();
    let output: Result<PipelineOutput, EngineError> = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let model = engine::onnx::load_model_file(&model_path)?;
        let data = engine::dataset::load(&data_path)?;
        let calibration = calib_path
            .as_deref()
            .map(engine::dataset::load)
            .transpose()?;
        let train = train_path
            .as_deref()
            .map(engine::dataset::load)
            .transpose()?;
        let unlabelled = unlabelled_path
            .as_deref()
            .map(engine::dataset::load)
            .transpose()?;
        let student = student_path
            .as_deref()
            .map(engine::onnx::load_model_file)
            .transpose()?;
        let teacher = teacher_path
            .as_deref()
            .map(engine::onnx::load_model_file)
            .transpose()?;
        let inputs = PipelineInputs {
            model,
            data,
            calibration,
            train,
            unlabelled,
            student,
            teacher,
            hashes,
            training_pass_memory,
        };
        pipeline::run(&rt, &job_id, &spec, inputs, p.as_ref())
    })
    .await
    .map_err(|e| Failure::Invalid(anyhow::anyhow!("the engine crashed: {e}")))?;
    let output = match output {
        Ok(o) => o,
        Err(EngineError::Cancelled) => {
            return Err(Failure::Stopped(
                progress.stop_reason().unwrap_or(StopReason::Cancelled),
            ))
        }
        Err(e @ EngineError::RuntimeUnavailable(_)) | Err(e @ EngineError::Io(_)) => {
            return Err(Failure::Infrastructure(e.into()))
        }
        Err(e) => {
            return Err(Failure::Invalid(
                anyhow::Error::from(e).context("while running the pipeline"),
            ))
        }
    };
    if let Some(reason) = progress.stop_reason() {
        return Err(Failure::Stopped(reason));
    }
    store_outputs(ctx, job, output).await.map_err(infra)
}

async fn store_outputs(
    ctx: &WorkerContext,
    job: &JobRow,
    out: PipelineOutput,
) -> anyhow::Result<()> {
    let report_json = serde_json::to_vec_pretty(&out.report)?;
    let mut files: Vec<(String, bytes::Bytes, &str)> = out
        .stage_models
        .iter()
        .chain([&out.final_model])
        .map(|a| (a.name.clone(), a.bytes.clone(), a.content_type))
        .collect();
    files.push((
        "job.log".into(),
        bytes::Bytes::from(out.log.clone()),
        "text/plain; charset=utf-8",
    ));
    files.push((
        "report.json".into(),
        bytes::Bytes::from(report_json),
        "application/json",
    ));
    let mut report_key = String::new();
    for (name, bytes, content_type) in files {
        let key = store_file(ctx, job, &name, bytes, content_type).await?;
        if name == "report.json" {
            report_key = key;
        }
    }
    tracing::info!("\n{}", out.log);
    let finished = ctx
        .db
        .finish_job(
            &job.id,
            &ctx.worker_id,
            now_ms(),
            Ending::succeeded(&report_key, out.report.passed),
        )
        .await?;
    if !finished {
        tracing::warn!("the lease was lost before the job could be marked succeeded; another attempt will redo it");
    }
    Ok(())
}

/// Stores one artifact of this attempt; returns its blob key.
async fn store_file(
    ctx: &WorkerContext,
    job: &JobRow,
    name: &str,
    bytes: bytes::Bytes,
    content_type: &str,
) -> anyhow::Result<String> {
    let key = artifact_key(&job.project, &job.id, job.attempt, name);
    ctx.blobs
        .put_bytes(&key, bytes.clone())
        .await
        .with_context(|| format!("while storing {name}"))?;
    ctx.db
        .insert_artifact(&ArtifactRow {
            job_id: job.id.clone(),
            name: name.to_string(),
            blob_key: key.clone(),
            size_bytes: bytes.len() as i64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            content_type: content_type.to_string(),
            created_at: now_ms(),
        })
        .await
        .with_context(|| format!("while recording {name}"))?;
    Ok(key)
}

/// Stores `job.log` for an attempt that did not succeed: what the pipeline logged, then how the
/// attempt ended with the whole cause chain.
async fn store_failure_log(ctx: &WorkerContext, job: &JobRow, progress: &JobProgress, end: &str) {
    let mut text = progress.log_text();
    text.push_str(&format!("attempt {} {end}\n", job.attempt));
    let log = bytes::Bytes::from(text);
    if let Err(e) = store_file(ctx, job, "job.log", log, "text/plain; charset=utf-8").await {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not store the failed attempt's log"
        );
    }
}

/// "failed (kind): message" and one "caused by" line per cause.
fn failure_text(kind: &str, e: &anyhow::Error) -> String {
    let mut s = format!("failed ({kind}): {e}");
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    s
}

fn job_error(kind: &str, e: &anyhow::Error) -> String {
    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    let err = JobError {
        r#type: kind.to_string(),
        message: e.to_string(),
        causes,
    };
    serde_json::to_string(&err).unwrap_or_default()
}

async fn finish(
    ctx: &WorkerContext,
    job: &JobRow,
    result: Result<(), Failure>,
    progress: &JobProgress,
) {
    let now = now_ms();
    let outcome = match result {
        Ok(()) => {
            tracing::info!("job succeeded");
            return;
        }
        Err(Failure::Stopped(StopReason::Cancelled)) => {
            tracing::info!("job cancelled");
            store_failure_log(ctx, job, progress, "was cancelled").await;
            ctx.db
                .finish_job(&job.id, &ctx.worker_id, now, Ending::cancelled())
                .await
                .map(|_| ())
        }
        Err(Failure::Stopped(StopReason::LeaseLost)) => Ok(()),
        Err(Failure::Stopped(StopReason::Shutdown)) => {
            tracing::info!("handing the job back to the queue (shutting down)");
            ctx.db
                .hand_back(&job.id, &ctx.worker_id, now)
                .await
                .map(|_| ())
        }
        Err(Failure::Invalid(e)) => {
            let kind = if e
                .chain()
                .any(|c| c.to_string().contains("the engine crashed"))
            {
                "engine"
            } else {
                "invalid_input"
            };
            tracing::warn!(error = format!("{e:#}"), "job failed");
            store_failure_log(ctx, job, progress, &failure_text(kind, &e)).await;
            ctx.db
                .fail_attempt(&job.id, &ctx.worker_id, now, &job_error(kind, &e), false)
                .await
                .map(|_| ())
        }
        Err(Failure::Infrastructure(e)) => {
            let kind = if e
                .chain()
                .any(|c| c.to_string().contains("ONNX Runtime is unavailable"))
            {
                "runtime_unavailable"
            } else {
                "infrastructure"
            };
            tracing::warn!(error = format!("{e:#}"), "attempt failed");
            store_failure_log(ctx, job, progress, &failure_text(kind, &e)).await;
            match ctx
                .db
                .fail_attempt(&job.id, &ctx.worker_id, now, &job_error(kind, &e), true)
                .await
            {
                Ok(FailOutcome::Retrying { run_at }) => {
                    tracing::info!(retry_in_ms = run_at - now, "will retry");
                    Ok(())
                }
                other => other.map(|_| ()),
            }
        }
    };
    if let Err(e) = outcome {
        // The lease will expire and the rescuer will requeue the job: nothing is lost.
        tracing::error!(error = %e, "could not record the job's outcome");
    }
}
