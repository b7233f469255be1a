//! Uploaded models and datasets: the same columns, two tables.
use super::{json_col, ms_to_time, Db, Result, StoreError};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;

/// Which kind of upload a query is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    Model,
    Dataset,
}

impl UploadKind {
    fn table(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }
}

/// A stored upload; `summary` is the kind's summary type.
#[derive(Debug, Clone)]
pub struct Upload<S> {
    pub id: String,
    pub project: String,
    pub name: String,
    pub format: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub blob_key: String,
    pub summary: S,
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct UploadRow {
    id: String,
    project: String,
    name: String,
    format: String,
    size_bytes: i64,
    sha256: String,
    blob_key: String,
    summary: String,
    created_at: i64,
}

impl UploadRow {
    fn into_upload<S: DeserializeOwned>(self) -> Result<Upload<S>> {
        Ok(Upload {
            summary: json_col(&self.summary, "upload summary")?,
            id: self.id,
            project: self.project,
            name: self.name,
            format: self.format,
            size_bytes: self.size_bytes,
            sha256: self.sha256,
            blob_key: self.blob_key,
            created_at: ms_to_time(self.created_at),
        })
    }
}

const COLUMNS: &str =
    "id, project, name, format, size_bytes, sha256, blob_key, summary, created_at";

impl Db {
    /// Inserts an upload's row; with `max_stored_bytes`, rolls back when the project's stored
    /// bytes (this upload included) would go over it.
    pub async fn insert_upload<S: serde::Serialize>(
        &self,
        kind: UploadKind,
        u: &Upload<S>,
        max_stored_bytes: Option<i64>,
    ) -> Result<()> {
        let summary =
            serde_json::to_string(&u.summary).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            kind.table()
        )))
        .bind(&u.id)
        .bind(&u.project)
        .bind(&u.name)
        .bind(&u.format)
        .bind(u.size_bytes)
        .bind(&u.sha256)
        .bind(&u.blob_key)
        .bind(summary)
        .bind(u.created_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        if let Some(max) = max_stored_bytes {
            self.serialize_project(&mut tx, "stored", &u.project)
                .await?;
            let (stored,): (i64,) = sqlx::query_as(super::teams::STORED_BYTES)
                .bind(&u.project)
                .fetch_one(&mut *tx)
                .await?;
            if stored > max {
                tx.rollback().await?;
                return Err(StoreError::OverQuota {
                    limit: "max_stored_bytes",
                    detail: format!(
                        "project `{}` stores {} of its {max} bytes (max_stored_bytes); this {}-byte upload does not fit, so nothing was stored",
                        u.project,
                        stored - u.size_bytes,
                        u.size_bytes
                    ),
                });
            }
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_upload<S: DeserializeOwned>(
        &self,
        kind: UploadKind,
        project: &str,
        id: &str,
    ) -> Result<Upload<S>> {
        let row: Option<UploadRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM {} WHERE project = $1 AND id = $2",
            kind.table()
        )))
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or(StoreError::NotFound)?.into_upload()
    }

    /// Newest first; `before` is the last id of the previous page.
    pub async fn list_uploads<S: DeserializeOwned>(
        &self,
        kind: UploadKind,
        project: &str,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Upload<S>>> {
        let rows: Vec<UploadRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM {} WHERE project = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3",
            kind.table()
        )))
        .bind(project)
        .bind(before.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(UploadRow::into_upload).collect()
    }

    /// Deletes an upload unless a queued or running job reads it. Returns its blob key.
    ///
    /// One statement: a read-then-write transaction can fail on SQLite (WAL) when another
    /// writer commits in between, which concurrent requests do.
    pub async fn delete_upload(&self, kind: UploadKind, project: &str, id: &str) -> Result<String> {
        let key: Option<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {} WHERE project = $1 AND id = $2 AND NOT EXISTS (\
             SELECT 1 FROM job_inputs i JOIN jobs j ON j.id = i.job_id \
             WHERE i.input_id = $2 AND j.status IN ('queued', 'running')) RETURNING blob_key",
            kind.table()
        )))
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((key,)) = key {
            return Ok(key);
        }
        let job: Option<(String,)> = sqlx::query_as(
            "SELECT j.id FROM job_inputs i JOIN jobs j ON j.id = i.job_id WHERE i.input_id = $1 AND j.status IN ('queued', 'running') LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match job {
            Some((job,)) => Err(StoreError::Conflict(format!(
                "job {job} is queued or running with it"
            ))),
            None => Err(StoreError::NotFound),
        }
    }
}
