//! The job queue on the jobs table: claim with a lease, heartbeat, finish fenced by the lease
//! holder, retry with backoff, rescue expired leases. Every call is one short statement or
//! transaction; no transaction stays open while a job runs. `now` is a parameter so tests control time.
use super::jobs::{JobRow, JOB_COLUMNS};
use super::{Backend, Db, Result, StoreError};

/// What a heartbeat or progress update learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Still ours; `cancel` says whether a user asked to cancel.
    Held { cancel: bool },
    /// Another worker (or the rescuer) took the job: stop working on it.
    Lost,
}

enum Claim {
    Job(Box<JobRow>),
    Empty,
    OverLimit,
}

/// How a failed attempt ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    Retrying {
        run_at: i64,
    },
    Failed,
    /// A user asked to cancel the job: it ends cancelled instead of retrying.
    Cancelled,
    LeaseLost,
}

/// How a job ends: its final status and what goes with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ending<'a> {
    pub status: &'a str,
    pub error: Option<&'a str>,
    pub report_key: Option<&'a str>,
    pub passed: Option<bool>,
}

impl<'a> Ending<'a> {
    pub fn succeeded(report_key: &'a str, passed: bool) -> Self {
        Self {
            status: "succeeded",
            report_key: Some(report_key),
            passed: Some(passed),
            error: None,
        }
    }

    pub fn failed(error: &'a str) -> Self {
        Self {
            status: "failed",
            error: Some(error),
            ..Default::default()
        }
    }

    pub fn cancelled() -> Self {
        Self {
            status: "cancelled",
            ..Default::default()
        }
    }
}

/// Delay before retry `attempt` (1-based): 2 s, 4 s, 8 s ... capped at 5 minutes.
pub fn backoff_ms(attempt: i64) -> i64 {
    (2_000i64 << (attempt.clamp(1, 20) - 1)).min(300_000)
}

impl Db {
    /// Takes the oldest runnable job, if any, and leases it to `worker` until `lease_until`.
    /// Jobs of a project already running its `max_running_jobs` wait.
    pub async fn claim_next_job(
        &self,
        worker: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRow>> {
        // A claim that raced another worker past its project's running limit is rolled back;
        // the next try no longer sees that project's jobs as runnable.
        for _ in 0..3 {
            match self.try_claim(worker, now, lease_until).await? {
                Claim::Job(job) => return Ok(Some(*job)),
                Claim::Empty => return Ok(None),
                Claim::OverLimit => continue,
            }
        }
        Ok(None)
    }

    async fn try_claim(&self, worker: &str, now: i64, lease_until: i64) -> Result<Claim> {
        // SKIP LOCKED lets concurrent claimers pass over each other's rows; SQLite serialises writers anyway.
        let lock = if self.backend == Backend::Postgres {
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let mut tx = self.pool.begin().await?;
        let row: Option<JobRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, locked_by = $1, lease_expires_at = $2, \
             started_at = COALESCE(started_at, $3), updated_at = $3, stage = 'baseline', progress = 0 \
             WHERE id = (SELECT j.id FROM jobs j WHERE j.status = 'queued' AND j.cancel_requested = 0 AND j.run_at <= $3 \
               AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.id = j.project AND p.max_running_jobs IS NOT NULL \
                 AND p.max_running_jobs <= (SELECT COUNT(*) FROM jobs r WHERE r.project = j.project AND r.status = 'running')) \
               ORDER BY j.run_at, j.id LIMIT 1 {lock}) \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(worker)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = row else {
            tx.commit().await?;
            return Ok(Claim::Empty);
        };
        if self.backend == Backend::Postgres {
            // Claims of one project's jobs queue up here, so each counts the others' committed claims.
            let limit: Option<(Option<i64>,)> =
                sqlx::query_as("SELECT max_running_jobs FROM projects WHERE id = $1")
                    .bind(&job.project)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((Some(limit),)) = limit {
                self.serialize_project(&mut tx, "running", &job.project)
                    .await?;
                let (running,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM jobs WHERE project = $1 AND status = 'running'",
                )
                .bind(&job.project)
                .fetch_one(&mut *tx)
                .await?;
                if running > limit {
                    tx.rollback().await?;
                    return Ok(Claim::OverLimit);
                }
            }
        }
        sqlx::query(
            "INSERT INTO job_runs (job_id, attempt, worker_id, started_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&job.id)
        .bind(job.attempt)
        .bind(worker)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Claim::Job(Box::new(job)))
    }

    /// Extends the lease and records progress; fenced by the lease holder.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        now: i64,
        lease_until: i64,
        stage: &str,
        progress: f64,
    ) -> Result<Lease> {
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = $1, updated_at = $2, stage = $3, progress = $4 \
             WHERE id = $5 AND locked_by = $6 AND status = 'running' RETURNING cancel_requested",
        )
        .bind(lease_until)
        .bind(now)
        .bind(stage)
        .bind(progress)
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((c,)) => Lease::Held { cancel: c != 0 },
            None => Lease::Lost,
        })
    }

    /// Ends a running job with a final status; false when the lease was lost.
    pub async fn finish_job(
        &self,
        id: &str,
        worker: &str,
        now: i64,
        end: Ending<'_>,
    ) -> Result<bool> {
        let Ending {
            status,
            error,
            report_key,
            passed,
        } = end;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET status = $1, error = $2, report_key = $3, passed = $4, finished_at = $5, updated_at = $5, \
             progress = CASE WHEN $1 = 'succeeded' THEN 1.0 ELSE progress END, \
             stage = CASE WHEN $1 = 'succeeded' THEN NULL ELSE stage END, locked_by = NULL, lease_expires_at = NULL \
             WHERE id = $6 AND locked_by = $7 AND status = 'running'",
        )
        .bind(status)
        .bind(error)
        .bind(report_key)
        .bind(passed.map(i64::from))
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if done {
            mark_run(&mut tx, id, worker, now, status).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Records a failed attempt: requeued with backoff when `retryable` and attempts remain, else failed.
    pub async fn fail_attempt(
        &self,
        id: &str,
        worker: &str,
        now: i64,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        let job = match sqlx::query_as::<_, (i64, i64, i64)>("SELECT attempt, max_attempts, cancel_requested FROM jobs WHERE id = $1 AND locked_by = $2 AND status = 'running'")
            .bind(id)
            .bind(worker)
            .fetch_optional(&self.pool)
            .await?
        {
            Some(j) => j,
            None => return Ok(FailOutcome::LeaseLost),
        };
        let (attempt, max, cancel) = job;
        if cancel != 0 {
            // Nobody wants the result any more: no retry.
            let ending = Ending {
                error: Some(error),
                ..Ending::cancelled()
            };
            return Ok(if self.finish_job(id, worker, now, ending).await? {
                FailOutcome::Cancelled
            } else {
                FailOutcome::LeaseLost
            });
        }
        if retryable && attempt < max {
            let run_at = now + backoff_ms(attempt);
            let mut tx = self.pool.begin().await?;
            let n = sqlx::query(
                "UPDATE jobs SET status = 'queued', error = $1, run_at = $2, updated_at = $3, locked_by = NULL, lease_expires_at = NULL \
                 WHERE id = $4 AND locked_by = $5 AND status = 'running'",
            )
            .bind(error)
            .bind(run_at)
            .bind(now)
            .bind(id)
            .bind(worker)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                mark_run(&mut tx, id, worker, now, "retrying").await?;
            }
            tx.commit().await?;
            if n == 1 {
                return Ok(FailOutcome::Retrying { run_at });
            }
            return Ok(FailOutcome::LeaseLost);
        }
        Ok(
            if self
                .finish_job(id, worker, now, Ending::failed(error))
                .await?
            {
                FailOutcome::Failed
            } else {
                FailOutcome::LeaseLost
            },
        )
    }

    /// Gives a running job back to the queue without using up an attempt (graceful shutdown);
    /// a job whose cancel was requested ends cancelled instead.
    pub async fn hand_back(&self, id: &str, worker: &str, now: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET status = CASE WHEN cancel_requested = 0 THEN 'queued' ELSE 'cancelled' END, \
             finished_at = CASE WHEN cancel_requested = 0 THEN NULL ELSE $1 END, \
             attempt = attempt - 1, run_at = $1, updated_at = $1, locked_by = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND locked_by = $3 AND status = 'running'",
        )
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            mark_run(&mut tx, id, worker, now, "handed_back").await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Requeues jobs whose lease expired (their worker died); fails those out of attempts and
    /// cancels those whose cancel was requested.
    /// Returns the number of jobs rescued.
    pub async fn rescue_expired(&self, now: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let lost: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT id, COALESCE(locked_by, ''), attempt FROM jobs WHERE status = 'running' AND lease_expires_at < $1",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for (id, worker, attempt) in &lost {
            sqlx::query("UPDATE job_runs SET finished_at = $1, outcome = 'lease_expired' WHERE job_id = $2 AND attempt = $3 AND finished_at IS NULL")
                .bind(now)
                .bind(id)
                .bind(attempt)
                .execute(&mut *tx)
                .await?;
            let error = serde_json::json!({
                "type": "lease_lost",
                "message": format!("worker {worker} stopped renewing its lease during attempt {attempt}"),
                "causes": []
            })
            .to_string();
            sqlx::query(
                "UPDATE jobs SET status = CASE WHEN cancel_requested <> 0 THEN 'cancelled' \
                 WHEN attempt < max_attempts THEN 'queued' ELSE 'failed' END, \
                 finished_at = CASE WHEN cancel_requested = 0 AND attempt < max_attempts THEN NULL ELSE $1 END, \
                 error = $2, run_at = $1, updated_at = $1, locked_by = NULL, lease_expires_at = NULL \
                 WHERE id = $3 AND status = 'running' AND lease_expires_at < $1",
            )
            .bind(now)
            .bind(&error)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if !lost.is_empty() {
            self.job_queued.notify_waiters();
        }
        Ok(lost.len() as u64)
    }

    /// Cancels a queued job at once, or asks the worker of a running one to stop.
    pub async fn request_cancel(&self, project: &str, id: &str, now: i64) -> Result<JobRow> {
        sqlx::query("UPDATE jobs SET status = 'cancelled', finished_at = $1, updated_at = $1 WHERE project = $2 AND id = $3 AND status = 'queued'")
            .bind(now)
            .bind(project)
            .bind(id)
            .execute(&self.pool)
            .await?;
        sqlx::query("UPDATE jobs SET cancel_requested = 1, updated_at = $1 WHERE project = $2 AND id = $3 AND status = 'running'")
            .bind(now)
            .bind(project)
            .bind(id)
            .execute(&self.pool)
            .await?;
        let job = self.get_job(project, id).await?;
        if matches!(job.status.as_str(), "succeeded" | "failed") {
            return Err(StoreError::Conflict(format!(
                "the job already ended ({})",
                job.status
            )));
        }
        Ok(job)
    }
}

async fn mark_run(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    worker: &str,
    now: i64,
    outcome: &str,
) -> Result<()> {
    sqlx::query("UPDATE job_runs SET finished_at = $1, outcome = $2 WHERE job_id = $3 AND worker_id = $4 AND finished_at IS NULL")
        .bind(now)
        .bind(outcome)
        .bind(id)
        .bind(worker)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Forwards Postgres `NOTIFY shrink_jobs` to this process's workers, reconnecting on errors.
pub async fn listen(db: Db) {
    if db.backend != Backend::Postgres {
        return;
    }
    loop {
        match sqlx::postgres::PgListener::connect(db.url()).await {
            Ok(mut listener) => {
                if listener.listen("shrink_jobs").await.is_ok() {
                    while listener.recv().await.is_ok() {
                        db.job_queued.notify_waiters();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot LISTEN for new jobs; polling only"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(
            (backoff_ms(1), backoff_ms(2), backoff_ms(3)),
            (2_000, 4_000, 8_000)
        );
        assert_eq!(backoff_ms(30), 300_000);
    }
}
