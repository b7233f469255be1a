//! What a job leaves behind: its event stream, log, report and artifacts.
use super::auth::Caller;
use super::error::{ApiError, ApiResult, Problem};
use super::jobs::find_job;
use super::uploads::download;
use super::AppState;
use crate::domain::report::Report;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::time::Duration;
use utoipa::ToSchema;

/// Follow a job: Server-Sent Events (`event: job`, data = the job) on every status, stage or
/// progress change, until it ends. Each event's `id` is the job's version (its `updated_at` in
/// milliseconds): a client that reconnects with `Last-Event-ID` gets the job's current state at
/// once when it changed since that event, and nothing repeated when it did not.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path), ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received")),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    find_job(&state, &caller, &id).await?;
    let seen: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let stream = async_stream::stream! {
        let mut last: Option<(String, Option<String>, i64)> = None;
        loop {
            let Ok(row) = state.db.get_job(&caller.project, &id).await else { break };
            let key = (row.status.clone(), row.stage.clone(), (row.progress * 1000.0) as i64);
            let already_seen = last.is_none() && seen.is_some_and(|v| row.updated_at <= v);
            if last.as_ref() != Some(&key) && !already_seen {
                if let Ok(job) = row.to_job() {
                    if let Ok(ev) = Event::default().event("job").id(row.updated_at.to_string()).json_data(&job) {
                        yield Ok(ev);
                    }
                }
            }
            if last.as_ref() != Some(&key) {
                last = Some(key);
            }
            if row.status().is_final() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Get a job's log: what the pipeline wrote, and for an attempt that failed or was cancelled,
/// how it ended with every cause. Present once an attempt has ended, whatever its outcome.
#[utoipa::path(get, path = "/jobs/{id}/log", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "The log", content_type = "text/plain", body = String),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No attempt has ended yet", body = Problem, content_type = "application/problem+json")))]
pub async fn job_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = find_job(&state, &caller, &id).await?;
    let log = state
        .db
        .list_artifacts(&id)
        .await?
        .into_iter()
        .find(|a| a.name == "job.log")
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "job {id} has no log yet: it is {} and no attempt has ended",
                row.status
            ))
        })?;
    let blob = state.blobs.get_stream(&log.blob_key).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(blob.body),
    )
        .into_response())
}

/// Get the report of a succeeded job.
#[utoipa::path(get, path = "/jobs/{id}/report", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Report), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has no report (yet)", body = Problem, content_type = "application/problem+json")))]
pub async fn job_report(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row = find_job(&state, &caller, &id).await?;
    let Some(key) = row.report_key else {
        return Err(ApiError::Conflict(format!(
            "job {id} has no report: it is {}",
            row.status
        )));
    };
    let blob = state.blobs.get_stream(&key).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(blob.body),
    )
        .into_response())
}

/// One output file of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    pub name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub created_at: DateTime<Utc>,
    /// Where to download it.
    pub url: String,
}

/// List a job's artifacts (models after each stage, the report, the log).
#[utoipa::path(get, path = "/jobs/{id}/artifacts", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Artifact>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn list_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Artifact>>> {
    find_job(&state, &caller, &id).await?;
    let rows = state.db.list_artifacts(&id).await?;
    Ok(Json(
        rows.into_iter()
            .map(|a| Artifact {
                url: format!("/jobs/{id}/artifacts/{}", a.name),
                name: a.name,
                size_bytes: a.size_bytes,
                sha256: a.sha256,
                content_type: a.content_type,
                created_at: crate::store::ms_to_time(a.created_at),
            })
            .collect(),
    ))
}

/// Download one artifact (streamed, or a redirect to a presigned URL when configured).
#[utoipa::path(get, path = "/jobs/{id}/artifacts/{name}", tag = "jobs", params(("id" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "The file, with the content type its listing gives: models `application/octet-stream`, `report.json` `application/json`, `job.log` text",
            content(("application/octet-stream"), ("application/json"), ("text/plain"))),
        (status = 307, description = "Redirect to a presigned object-store URL (when configured)"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    find_job(&state, &caller, &id).await?;
    let rows = state.db.list_artifacts(&id).await?;
    let a = rows
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("artifact {name} of job {id}")))?;
    download(&state, &a.blob_key, &a.name, &a.content_type).await
}
