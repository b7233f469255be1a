//! A job's lifecycle as users see it.
use super::spec::JobSpec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Why a job failed, with a stable machine-readable type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Stable: `invalid_input`, `runtime_unavailable`, `engine`, `infrastructure`, `lease_lost`, `attempts_exhausted`.
    #[schema(example = "invalid_input")]
    pub r#type: String,
    pub message: String,
    /// The error's causes, outermost first.
    pub causes: Vec<String>,
}

/// A job as returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    pub project: String,
    pub status: JobStatus,
    /// The stage running now (`baseline` before the first stage).
    pub stage: Option<String>,
    /// 0..1 over the whole pipeline.
    pub progress: f64,
    pub attempt: i64,
    pub max_attempts: i64,
    pub spec: JobSpec,
    pub labels: BTreeMap<String, String>,
    pub cancel_requested: bool,
    pub error: Option<JobError>,
    /// Whether every constraint held (present once the job succeeded).
    pub passed: Option<bool>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The request id of the request that created the job; every log line of the job carries it.
    pub request_id: Option<String>,
}
