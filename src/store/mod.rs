//! The database: PostgreSQL in production, SQLite as the embedded default, through sqlx's `Any`
//! driver so that one set of queries serves both. Only this module knows sqlx.
pub mod jobs;
pub mod queue;
pub mod teams;
pub mod uploads;
pub mod webhooks;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Notify;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A project quota (`limit` names it) would be exceeded; the write was rolled back.
    #[error("{detail}")]
    OverQuota { limit: &'static str, detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database is behind the pool; the queue's claim query differs slightly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A connection pool plus a wake-up signal for workers in this process.
#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    url: String,
    /// Wakes idle workers in this process when a job is queued here; other processes hear it
    /// through Postgres NOTIFY (see `queue::listen`).
    pub job_queued: Arc<Notify>,
}

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

impl Db {
    /// Inside a transaction that has just written a row of `project`: on PostgreSQL, waits for
    /// every other such transaction of the project to end, so that a count made next sees their
    /// rows (SQLite already lets one writer at a time). What makes quota checks exact.
    pub(crate) async fn serialize_project(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        what: &str,
        project: &str,
    ) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1)::BIGINT)")
                .bind(format!("shrink-{what}:{project}"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    pub async fn connect(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Conflict(format!(
                "unsupported database URL scheme in `{}`",
                url.split(':').next().unwrap_or("")
            )));
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            if let Some(path) = url
                .strip_prefix("sqlite://")
                .and_then(|p| p.split('?').next())
            {
                if let Some(parent) = std::path::Path::new(path)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                {
                    let _ = std::fs::create_dir_all(parent);
                }
            }
            // WAL lets readers proceed during a write; the busy timeout queues writers instead of failing.
            options = options.max_connections(8).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
                        .await?;
                    Ok(())
                })
            });
        } else {
            options = options.max_connections(16);
        }
        let pool = options.connect(url).await?;
        Ok(Db {
            pool,
            backend,
            url: url.to_string(),
            job_queued: Arc::new(Notify::new()),
        })
    }

    pub async fn migrate(&self) -> Result<()> {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn ms_to_time(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub(crate) fn json_col<T: serde::de::DeserializeOwned>(row_text: &str, what: &str) -> Result<T> {
    serde_json::from_str(row_text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

#[allow(dead_code)]
pub(crate) type Row = AnyRow;
