//! Projects, their quotas and usage, and API keys (stored only as SHA-256 hashes of the secret).
use super::{ms_to_time, Db, Result, StoreError};
use crate::domain::team::{ApiKey, CreatedKey, Project, Quotas, Role, Usage, KEY_PREFIX};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// `last_used_at` is written at most once per this many milliseconds per key.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// Who a valid key says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub key_id: String,
    pub project: String,
    pub role: Role,
}

#[derive(sqlx::FromRow)]
struct ProjectRow {
    id: String,
    name: String,
    max_stored_bytes: Option<i64>,
    max_queued_jobs: Option<i64>,
    max_running_jobs: Option<i64>,
    max_upload_bytes: Option<i64>,
    created_at: i64,
}

impl ProjectRow {
    fn quotas(&self) -> Quotas {
        Quotas {
            max_stored_bytes: self.max_stored_bytes,
            max_queued_jobs: self.max_queued_jobs,
            max_running_jobs: self.max_running_jobs,
            max_upload_bytes: self.max_upload_bytes,
        }
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    project: String,
    name: String,
    role: String,
    prefix: String,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl KeyRow {
    fn into_key(self) -> Result<ApiKey> {
        Ok(ApiKey {
            role: Role::parse(&self.role)
                .ok_or_else(|| StoreError::Corrupt(format!("api key role `{}`", self.role)))?,
            id: self.id,
            project: self.project,
            name: self.name,
            prefix: self.prefix,
            created_at: ms_to_time(self.created_at),
            last_used_at: self.last_used_at.map(ms_to_time),
            revoked_at: self.revoked_at.map(ms_to_time),
        })
    }
}

const PROJECT_COLUMNS: &str =
    "id, name, max_stored_bytes, max_queued_jobs, max_running_jobs, max_upload_bytes, created_at";
const KEY_COLUMNS: &str = "id, project, name, role, prefix, created_at, last_used_at, revoked_at";

/// A project's stored bytes: models, datasets and job artifacts (`$1` is the project).
pub(crate) const STORED_BYTES: &str = "SELECT CAST(\
       (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE project = $1) \
     + (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE project = $1) \
     + (SELECT COALESCE(SUM(a.size_bytes), 0) FROM job_artifacts a JOIN jobs j ON j.id = a.job_id WHERE j.project = $1) AS BIGINT)";

/// The hash a key is stored and looked up by.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new secret: `shrk_` and 256 random bits as hex.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

impl Db {
    pub async fn create_project(
        &self,
        id: &str,
        name: &str,
        quotas: Quotas,
        now: i64,
    ) -> Result<Project> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO projects ({PROJECT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING"
        )))
        .bind(id)
        .bind(name)
        .bind(quotas.max_stored_bytes)
        .bind(quotas.max_queued_jobs)
        .bind(quotas.max_running_jobs)
        .bind(quotas.max_upload_bytes)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "project `{id}` already exists"
            )));
        }
        self.get_project(id).await
    }

    async fn project_row(&self, id: &str) -> Result<ProjectRow> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)
    }

    pub async fn get_project(&self, id: &str) -> Result<Project> {
        let row = self.project_row(id).await?;
        let usage = self.project_usage(id).await?;
        Ok(Project {
            quotas: row.quotas(),
            id: row.id,
            name: row.name,
            usage,
            created_at: ms_to_time(row.created_at),
        })
    }

    pub async fn list_projects(&self) -> Result<Vec<Project>> {
        let rows: Vec<ProjectRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PROJECT_COLUMNS} FROM projects ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let usage = self.project_usage(&row.id).await?;
            out.push(Project {
                quotas: row.quotas(),
                id: row.id,
                name: row.name,
                usage,
                created_at: ms_to_time(row.created_at),
            });
        }
        Ok(out)
    }

    /// A project's limits; `NotFound` when it does not exist.
    pub async fn project_quotas(&self, id: &str) -> Result<Quotas> {
        Ok(self.project_row(id).await?.quotas())
    }

    pub async fn set_quotas(&self, id: &str, q: Quotas) -> Result<Project> {
        let done = sqlx::query(
            "UPDATE projects SET max_stored_bytes = $1, max_queued_jobs = $2, max_running_jobs = $3, max_upload_bytes = $4 WHERE id = $5",
        )
        .bind(q.max_stored_bytes)
        .bind(q.max_queued_jobs)
        .bind(q.max_running_jobs)
        .bind(q.max_upload_bytes)
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        self.get_project(id).await
    }

    /// Bytes stored (models, datasets, job artifacts) and jobs queued and running.
    pub async fn project_usage(&self, project: &str) -> Result<Usage> {
        let (stored_bytes,): (i64,) = sqlx::query_as(STORED_BYTES)
            .bind(project)
            .fetch_one(&self.pool)
            .await?;
        let (queued_jobs, running_jobs): (i64, i64) = sqlx::query_as(
            "SELECT \
               (SELECT COUNT(*) FROM jobs WHERE project = $1 AND status = 'queued'), \
               (SELECT COUNT(*) FROM jobs WHERE project = $1 AND status = 'running')",
        )
        .bind(project)
        .fetch_one(&self.pool)
        .await?;
        Ok(Usage {
            stored_bytes,
            queued_jobs,
            running_jobs,
        })
    }

    /// Creates a key in `project` and returns it with its secret (the only time it exists in clear).
    pub async fn create_key(
        &self,
        project: &str,
        name: &str,
        role: Role,
        now: i64,
    ) -> Result<CreatedKey> {
        self.project_row(project).await?;
        let secret = new_secret();
        let id = uuid::Uuid::now_v7().to_string();
        let prefix = secret[..KEY_PREFIX.len() + 8].to_string();
        sqlx::query(
            "INSERT INTO api_keys (id, project, name, role, prefix, secret_sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(project)
        .bind(name)
        .bind(role.as_str())
        .bind(&prefix)
        .bind(secret_hash(&secret))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(CreatedKey {
            key: ApiKey {
                id,
                project: project.to_string(),
                name: name.to_string(),
                role,
                prefix,
                created_at: ms_to_time(now),
                last_used_at: None,
                revoked_at: None,
            },
            secret,
        })
    }

    /// A project's keys, revoked ones included, oldest first; `NotFound` for an unknown project.
    pub async fn list_keys(&self, project: &str) -> Result<Vec<ApiKey>> {
        self.project_row(project).await?;
        let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE project = $1 ORDER BY id"
        )))
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(KeyRow::into_key).collect()
    }

    /// Revokes a key of `project` (revoking twice keeps the first time); `NotFound` otherwise.
    pub async fn revoke_key(&self, project: &str, key_id: &str, now: i64) -> Result<ApiKey> {
        sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE project = $2 AND id = $3")
            .bind(now)
            .bind(project)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        let row: KeyRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE project = $1 AND id = $2"
        )))
        .bind(project)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        row.into_key()
    }

    /// The caller a secret belongs to, when the key exists and is not revoked; records its use.
    pub async fn authenticate(&self, secret: &str, now: i64) -> Result<Option<Authenticated>> {
        let row: Option<(String, String, String, Option<i64>)> = sqlx::query_as(
            "SELECT id, project, role, last_used_at FROM api_keys WHERE secret_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(secret_hash(secret))
        .fetch_optional(&self.pool)
        .await?;
        let Some((key_id, project, role, last_used)) = row else {
            return Ok(None);
        };
        if last_used.is_none_or(|t| now - t >= LAST_USED_RESOLUTION_MS) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(&key_id)
                .execute(&self.pool)
                .await?;
        }
        let role = Role::parse(&role)
            .ok_or_else(|| StoreError::Corrupt(format!("api key role `{role}`")))?;
        Ok(Some(Authenticated {
            key_id,
            project,
            role,
        }))
    }

    /// Every key ever created, revoked ones included.
    pub async fn count_keys(&self) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}

impl Db {
    /// The database's side of `/metrics`.
    pub async fn metrics_snapshot(&self, now: i64) -> Result<crate::metrics::Snapshot> {
        let by_status: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let jobs_by_status = crate::domain::job::JobStatus::ALL
            .iter()
            .map(|s| {
                let n = by_status
                    .iter()
                    .find(|(st, _)| st == s.as_str())
                    .map_or(0, |(_, n)| *n);
                (s.as_str().to_string(), n)
            })
            .collect();
        let running_by_stage: Vec<(String, i64)> = sqlx::query_as(
            "SELECT COALESCE(stage, ''), COUNT(*) FROM jobs WHERE status = 'running' GROUP BY COALESCE(stage, '')",
        )
        .fetch_all(&self.pool)
        .await?;
        let (queue_depth, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(created_at) FROM jobs WHERE status = 'queued'")
                .fetch_one(&self.pool)
                .await?;
        let stored_bytes_by_project: Vec<(String, i64)> = sqlx::query_as(
            "SELECT p.id, CAST(\
               (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE project = p.id) \
             + (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE project = p.id) \
             + (SELECT COALESCE(SUM(a.size_bytes), 0) FROM job_artifacts a JOIN jobs j ON j.id = a.job_id WHERE j.project = p.id) AS BIGINT) \
             FROM projects p ORDER BY p.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(crate::metrics::Snapshot {
            jobs_by_status,
            running_by_stage,
            queue_depth,
            oldest_queued_age_seconds: oldest.map_or(0.0, |t| ((now - t).max(0)) as f64 / 1000.0),
            stored_bytes_by_project,
        })
    }
}
