//! Workers: async orchestration only. Claim a job, fetch its inputs, run the
//! [`pipeline`](crate::pipeline) on a blocking thread, store the results.
//!
//! Each worker slot loops: claim -> run -> finish. A heartbeat task renews the lease and carries
//! progress and cancellation between the database and the pipeline. A rescuer requeues jobs whose
//! worker died. On shutdown, slots stop claiming and hand running jobs back to the queue.
mod heartbeat;
mod runner;

use crate::blob::BlobStore;
use crate::engine::runtime::Runtime;
use crate::store::{now_ms, Db};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What every worker slot shares.
#[derive(Clone)]
pub struct WorkerContext {
    pub db: Db,
    pub blobs: Arc<dyn BlobStore>,
    /// The loaded ONNX Runtime, or why it failed to load (jobs then fail with that reason).
    pub runtime: Result<Arc<Runtime>, String>,
    pub worker_id: String,
    pub lease: Duration,
    pub poll: Duration,
    pub scratch_dir: std::path::PathBuf,
    pub metrics: crate::metrics::SharedMetrics,
    /// Bytes one training pass may hold (`SHRINK_TRAINING_PASS_MEMORY_MB`).
    pub training_pass_memory: usize,
}

impl WorkerContext {
    /// Claims and runs one job; false when the queue had nothing runnable.
    pub async fn run_next(&self, shutdown: &watch::Receiver<bool>) -> anyhow::Result<bool> {
        let now = now_ms();
        let Some(job) = self
            .db
            .claim_next_job(&self.worker_id, now, now + self.lease.as_millis() as i64)
            .await?
        else {
            return Ok(false);
        };
        runner::run_job(self, job, shutdown.clone()).await;
        Ok(true)
    }
}

/// Runs `slots` worker loops, the lease rescuer and (on Postgres) the NOTIFY listener until `shutdown` turns true.
pub async fn run(ctx: WorkerContext, slots: usize, shutdown: watch::Receiver<bool>) {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(rescuer(ctx.clone(), shutdown.clone()));
    let listener = tokio::spawn(crate::store::queue::listen(ctx.db.clone()));
    for slot in 0..slots {
        let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move { slot_loop(ctx, slot, shutdown).await });
    }
    tracing::info!(worker_id = %ctx.worker_id, slots, "workers started");
    while tasks.join_next().await.is_some() {}
    listener.abort();
    tracing::info!(worker_id = %ctx.worker_id, "workers stopped");
}

async fn slot_loop(ctx: WorkerContext, slot: usize, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        // Register interest before claiming, so a job queued in between still wakes us.
        let notified = ctx.db.job_queued.notified();
        match ctx.run_next(&shutdown).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => tracing::warn!(
                slot,
                error = format!("{e:#}"),
                "claiming a job failed; retrying"
            ),
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(ctx.poll) => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn rescuer(ctx: WorkerContext, mut shutdown: watch::Receiver<bool>) {
    let every = (ctx.lease / 3).max(Duration::from_millis(200));
    while !*shutdown.borrow() {
        match ctx.db.rescue_expired(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                jobs = n,
                "requeued jobs whose worker stopped renewing its lease"
            ),
            Err(e) => tracing::warn!(error = %e, "lease rescue failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {}
        }
    }
}
