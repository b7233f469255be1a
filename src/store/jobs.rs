//! Job rows, their inputs and artifacts.
use super::{json_col, ms_to_time, Db, Result, StoreError};
use crate::domain::job::{Job, JobError, JobStatus};
use crate::domain::spec::JobSpec;

/// A job as stored, with the columns the API shows and those the queue uses.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub project: String,
    pub status: String,
    pub spec: String,
    pub model_id: String,
    pub stage: Option<String>,
    pub progress: f64,
    pub attempt: i64,
    pub max_attempts: i64,
    pub run_at: i64,
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: i64,
    pub error: Option<String>,
    pub passed: Option<i64>,
    pub report_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub request_sha256: Option<String>,
    pub request_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

pub(crate) const JOB_COLUMNS: &str = "id, project, status, spec, model_id, stage, progress, attempt, max_attempts, run_at, \
    locked_by, lease_expires_at, cancel_requested, error, passed, report_key, idempotency_key, request_sha256, request_id, \
    created_at, started_at, finished_at, updated_at";

impl JobRow {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn spec(&self) -> Result<JobSpec> {
        json_col(&self.spec, "job spec")
    }

    pub fn to_job(&self) -> Result<Job> {
        let spec = self.spec()?;
        Ok(Job {
            id: self.id.clone(),
            project: self.project.clone(),
            status: self.status(),
            stage: self.stage.clone(),
            progress: self.progress,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            labels: spec.labels.clone(),
            spec,
            cancel_requested: self.cancel_requested != 0,
            error: self
                .error
                .as_deref()
                .map(|e| json_col::<JobError>(e, "job error"))
                .transpose()?,
            passed: self.passed.map(|p| p != 0),
            created_at: ms_to_time(self.created_at),
            started_at: self.started_at.map(ms_to_time),
            finished_at: self.finished_at.map(ms_to_time),
            updated_at: ms_to_time(self.updated_at),
            request_id: self.request_id.clone(),
        })
    }
}

/// What creating a job needs besides the spec.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub project: &'a str,
    pub spec: &'a JobSpec,
    pub max_attempts: i64,
    pub idempotency_key: Option<&'a str>,
    pub request_sha256: &'a str,
    pub request_id: Option<&'a str>,
    pub now: i64,
    /// The project's `max_queued_jobs`: the insert is rolled back when it would go over.
    pub max_queued_jobs: Option<i64>,
}

/// Outcome of inserting a job with an idempotency key.
pub enum Inserted {
    Created(JobRow),
    /// The same key and body were seen before: the earlier job.
    Existing(JobRow),
}

/// One stored artifact of a job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRow {
    pub job_id: String,
    pub name: String,
    pub blob_key: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub created_at: i64,
}

/// One claim of a job by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    pub job_id: String,
    pub attempt: i64,
    pub worker_id: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: Option<String>,
}

/// The job created earlier in `project` with this idempotency key, on a pool or inside a transaction.
async fn select_by_idempotency_key<'c, E>(
    exec: E,
    project: &str,
    key: &str,
) -> Result<Option<JobRow>>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE project = $1 AND idempotency_key = $2"
    )))
    .bind(project)
    .bind(key)
    .fetch_optional(exec)
    .await?)
}

impl Db {
    pub async fn find_job_by_idempotency_key(
        &self,
        project: &str,
        key: &str,
    ) -> Result<Option<JobRow>> {
        select_by_idempotency_key(&self.pool, project, key).await
    }

    /// Inserts a queued job and its input references in one transaction, honouring the
    /// idempotency key: a job already created with the key is returned when the request matches.
    pub async fn insert_job(&self, j: NewJob<'_>) -> Result<Inserted> {
        let spec_json =
            serde_json::to_string(j.spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // The insert comes first: the unique index on the key settles races between retries,
        // and a transaction that starts by writing never has to upgrade a read lock (which
        // SQLite refuses while another writer commits).
        let mut tx = self.pool.begin().await?;
        let inserted: std::result::Result<JobRow, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO jobs (id, project, status, spec, model_id, max_attempts, run_at, idempotency_key, request_sha256, request_id, \
             created_at, updated_at) VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $6, $6) RETURNING {JOB_COLUMNS}"
        )))
        .bind(j.id)
        .bind(j.project)
        .bind(&spec_json)
        .bind(&j.spec.model_id)
        .bind(j.max_attempts)
        .bind(j.now)
        .bind(j.idempotency_key)
        .bind(j.request_sha256)
        .bind(j.request_id)
        .fetch_one(&mut *tx)
        .await;
        let row = match (inserted, j.idempotency_key) {
            (Ok(row), _) => row,
            // A concurrent request with the same key won the race: answer as it was answered.
            (Err(sqlx::Error::Database(d)), Some(key)) if d.is_unique_violation() => {
                tx.rollback().await?;
                return match select_by_idempotency_key(&self.pool, j.project, key).await? {
                    Some(row) => replay(row, key, j.request_sha256),
                    None => Err(StoreError::Conflict(
                        "a concurrent request used the same Idempotency-Key".into(),
                    )),
                };
            }
            (Err(e), _) => return Err(e.into()),
        };
        if let Some(max) = j.max_queued_jobs {
            self.serialize_project(&mut tx, "queued", j.project).await?;
            let (queued,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM jobs WHERE project = $1 AND status = 'queued'",
            )
            .bind(j.project)
            .fetch_one(&mut *tx)
            .await?;
            if queued > max {
                tx.rollback().await?;
                return Err(StoreError::OverQuota {
                    limit: "max_queued_jobs",
                    detail: format!(
                        "project `{}` has {} queued jobs, its max_queued_jobs is {max}; nothing was queued",
                        j.project,
                        queued - 1
                    ),
                });
            }
        }
        let mut ids: Vec<&str> = j
            .spec
            .references()
            .into_iter()
            .map(|(_, _, id)| id)
            .collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            sqlx::query("INSERT INTO job_inputs (job_id, input_id) VALUES ($1, $2)")
                .bind(j.id)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if self.backend == super::Backend::Postgres {
            sqlx::query("SELECT pg_notify('shrink_jobs', $1)")
                .bind(j.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.job_queued.notify_waiters();
        Ok(Inserted::Created(row))
    }

    pub async fn get_job(&self, project: &str, id: &str) -> Result<JobRow> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE project = $1 AND id = $2"
        )))
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)
    }

    /// Newest first, optionally filtered; `before` is the last id of the previous page.
    pub async fn list_jobs(
        &self,
        project: &str,
        status: Option<JobStatus>,
        model_id: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE project = $1 AND ($2 = '' OR status = $2) AND ($3 = '' OR model_id = $3) \
             AND ($4 = '' OR id < $4) ORDER BY id DESC LIMIT $5"
        )))
        .bind(project)
        .bind(status.map_or("", |s| s.as_str()))
        .bind(model_id.unwrap_or(""))
        .bind(before.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn insert_artifact(&self, a: &ArtifactRow) -> Result<()> {
        // A retried attempt overwrites what an earlier attempt stored under the same name.
        sqlx::query(
            "INSERT INTO job_artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (job_id, name) DO UPDATE SET blob_key = excluded.blob_key, size_bytes = excluded.size_bytes, \
             sha256 = excluded.sha256, content_type = excluded.content_type, created_at = excluded.created_at",
        )
        .bind(&a.job_id)
        .bind(&a.name)
        .bind(&a.blob_key)
        .bind(a.size_bytes)
        .bind(&a.sha256)
        .bind(&a.content_type)
        .bind(a.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_artifacts(&self, job_id: &str) -> Result<Vec<ArtifactRow>> {
        Ok(sqlx::query_as("SELECT job_id, name, blob_key, size_bytes, sha256, content_type, created_at FROM job_artifacts WHERE job_id = $1 ORDER BY created_at, name")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn list_runs(&self, job_id: &str) -> Result<Vec<RunRow>> {
        Ok(sqlx::query_as("SELECT job_id, attempt, worker_id, started_at, finished_at, outcome FROM job_runs WHERE job_id = $1 ORDER BY attempt")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// The job an earlier request with the same Idempotency-Key created, when the body matches.
fn replay(row: JobRow, key: &str, request_sha256: &str) -> Result<Inserted> {
    if row.request_sha256.as_deref() == Some(request_sha256) {
        Ok(Inserted::Existing(row))
    } else {
        Err(StoreError::Conflict(format!(
            "Idempotency-Key `{key}` was already used with a different request body"
        )))
    }
}
