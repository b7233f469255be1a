//! `/jobs`: create from a spec (JSON or multipart with files), list, poll, cancel. What a job
//! leaves behind (events, log, report, artifacts) is served by [`super::results`].
use super::auth::Caller;
use super::error::{ApiError, ApiResult, Problem};
use super::pagination::{ApiQuery, Page, PageQuery};
use super::uploads::{is_multipart, store_dataset, store_model, UploadLimit};
use super::AppState;
use crate::domain::dataset::DatasetSummary;
use crate::domain::ids::JobId;
use crate::domain::job::{Job, JobStatus};
use crate::domain::model::ModelSummary;
use crate::domain::spec::{JobSpec, RefKind, REFERENCE_FIELDS};
use crate::domain::validation::Problems;
use crate::ingest::{self, Staged};
use crate::store::jobs::{Inserted, JobRow, NewJob};
use crate::store::uploads::UploadKind;
use crate::store::{now_ms, StoreError};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

const SPEC_LIMIT: usize = 1024 * 1024;

/// A file part of a multipart job request, received but not stored yet.
enum Part {
    Model(Staged, ModelSummary, String),
    Dataset(Staged, DatasetSummary, String),
}

/// A job request as `multipart/form-data`: the spec as JSON plus files that stand in for ids.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobForm {
    /// The job spec as JSON (a `JobSpec`), without the ids the file parts give.
    #[schema(example = r#"{"pipeline":[{"stage":"evaluate"}]}"#)]
    pub spec: String,
    /// The ONNX model (instead of `model_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub model: Option<Vec<u8>>,
    /// The evaluation dataset (instead of `dataset_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub dataset: Option<Vec<u8>>,
    /// Calibration samples (instead of `calibration_dataset_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub calibration: Option<Vec<u8>>,
    /// Training rows (instead of `train_dataset_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub train: Option<Vec<u8>>,
    /// Unlabelled rows training learns from the teacher alone (instead of `unlabelled_dataset_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub unlabelled: Option<Vec<u8>>,
    /// A teacher model (instead of `teacher_model_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub teacher: Option<Vec<u8>>,
    /// A student model (instead of `student_model_id`).
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream", required = false)]
    pub student: Option<Vec<u8>>,
}

/// Create a job.
///
/// Send the spec as JSON referencing uploaded ids, or as `multipart/form-data` with a `spec` part and
/// file parts (`model`, `dataset`, `calibration`, `train`, `teacher`, `student`) that stand in for the ids.
/// The whole request is validated before anything is stored or queued. With an `Idempotency-Key`
/// header, repeating a request returns the first job; reusing the key with another body is a 409.
#[utoipa::path(post, path = "/jobs", tag = "jobs",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and body return the same job")),
    request_body(description = "The job spec as JSON referencing uploaded ids, or a multipart form with the spec and files",
        content((JobSpec = "application/json"), (JobForm = "multipart/form-data"))),
    responses(
        (status = 202, description = "Queued", body = Job),
        (status = 409, description = "Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "A malformed multipart body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "A file part is over the upload limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Every invalid field, as JSON pointers", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "/problems/validation", "title": "The request is invalid", "status": 422, "detail": "2 fields are invalid",
                "errors": [{"pointer": "/pipeline/0/stage", "detail": "unknown value `quantise`; expected one of: evaluate, quantize, distill, finetune, prune"},
                           {"pointer": "/pipeline/1/batch_size", "detail": "`batch_size` must be an integer from 1 to 4096"}]}))
    ))]
pub async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    req: Request,
) -> ApiResult<Response> {
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 255)
    {
        return Err(ApiError::field(
            "/headers/Idempotency-Key",
            "must be 1 to 255 characters",
        ));
    }
    let (raw_spec, parts) = if is_multipart(&headers) {
        let limit = UploadLimit::of(&state, &caller.project).await?;
        read_multipart(&state, limit, req).await?
    } else {
        (read_json(req).await?, BTreeMap::new())
    };

    let provided: Vec<&str> = parts.keys().map(|s| s.as_str()).collect();
    let mut problems = Problems::default();
    for field in &provided {
        if raw_spec.get(*field).is_some_and(|v| !v.is_null()) {
            problems.add(
                format!("/{field}"),
                format!("`{field}` is given both as an id and as a file part; send one"),
            );
        }
    }
    let mut spec = match JobSpec::parse(&raw_spec, &provided) {
        Ok(spec) if problems.is_empty() => spec,
        Ok(_) => return Err(ApiError::Validation(problems.0)),
        Err(mut errors) => {
            errors.extend(problems.0);
            return Err(ApiError::Validation(errors));
        }
    };
    check_references(&state, &caller.project, &spec, &parts).await?;

    let request_sha256 = request_hash(&raw_spec, &parts);
    if let Some(key) = &idempotency_key {
        if let Some(existing) = state
            .db
            .find_job_by_idempotency_key(&caller.project, key)
            .await?
        {
            if existing.request_sha256.as_deref() == Some(request_sha256.as_str()) {
                return respond(existing);
            }
            return Err(ApiError::Conflict(format!(
                "Idempotency-Key `{key}` was already used with a different request body"
            )));
        }
    }

    // A quick refusal before file parts are stored; the insert checks again, exactly.
    let max_queued_jobs = check_queue_quota(&state, &caller.project).await?;

    // The file parts this request stored: removed again when no job of this request keeps them.
    let mut stored: Vec<(UploadKind, String)> = Vec::new();
    let mut stored_all = Ok(());
    for (field, part) in parts {
        let upload = match part {
            Part::Model(staged, summary, name) => {
                store_model(&state, &caller.project, staged, &name, summary)
                    .await
                    .map(|u| (UploadKind::Model, u.id))
            }
            Part::Dataset(staged, summary, name) => {
                store_dataset(&state, &caller.project, staged, &name, summary)
                    .await
                    .map(|u| (UploadKind::Dataset, u.id))
            }
        };
        match upload {
            Ok((kind, id)) => {
                spec.set_reference(&field, id.clone());
                stored.push((kind, id));
            }
            Err(e) => {
                stored_all = Err(e);
                break;
            }
        }
    }
    if let Err(e) = stored_all {
        discard_uploads(&state, &caller.project, &stored).await;
        return Err(e);
    }
    let id = JobId::new().to_string();
    let inserted = state
        .db
        .insert_job(NewJob {
            id: &id,
            project: &caller.project,
            spec: &spec,
            max_attempts: state.settings.max_attempts.max(1) as i64,
            idempotency_key: idempotency_key.as_deref(),
            request_sha256: &request_sha256,
            request_id: super::request_id(&headers).as_deref(),
            now: now_ms(),
            max_queued_jobs,
        })
        .await;
    match inserted {
        Ok(Inserted::Created(row)) => {
            state.metrics.job_created();
            tracing::info!(job_id = %row.id, project = %row.project, "job queued");
            respond(row)
        }
        Ok(Inserted::Existing(row)) => {
            // A concurrent retry created the job first; its files are the job's.
            discard_uploads(&state, &caller.project, &stored).await;
            respond(row)
        }
        Err(e) => {
            discard_uploads(&state, &caller.project, &stored).await;
            Err(e.into())
        }
    }
}

/// Deletes uploads this request stored but no job references (nothing else can know their ids).
async fn discard_uploads(state: &AppState, project: &str, stored: &[(UploadKind, String)]) {
    for (kind, id) in stored {
        match state.db.delete_upload(*kind, project, id).await {
            Ok(key) => {
                if let Err(e) = state.blobs.delete(&key).await {
                    tracing::warn!(upload = %id, error = %e, "could not delete an unused upload's file");
                }
            }
            Err(e) => tracing::warn!(upload = %id, error = %e, "could not delete an unused upload"),
        }
    }
}

/// Refuses a job when the project already has `max_queued_jobs` waiting; the quota.
async fn check_queue_quota(state: &AppState, project: &str) -> ApiResult<Option<i64>> {
    let Some(max) = state.db.project_quotas(project).await?.max_queued_jobs else {
        return Ok(None);
    };
    let queued = state.db.project_usage(project).await?.queued_jobs;
    if queued >= max {
        return Err(ApiError::Quota {
            limit: "max_queued_jobs",
            status: StatusCode::TOO_MANY_REQUESTS,
            detail: format!(
                "project `{project}` has {queued} queued jobs, its max_queued_jobs is {max}; nothing was stored or queued"
            ),
        });
    }
    Ok(Some(max))
}

fn respond(row: JobRow) -> ApiResult<Response> {
    let location = format!("/jobs/{}", row.id);
    let job = row.to_job()?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(job),
    )
        .into_response())
}

async fn read_json(req: Request) -> ApiResult<serde_json::Value> {
    let bytes = axum::body::to_bytes(req.into_body(), SPEC_LIMIT)
        .await
        .map_err(|_| {
            ApiError::BadRequest(format!("the job spec must be at most {SPEC_LIMIT} bytes"))
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::field("", format!("the body is not valid JSON: {e}")))
}

async fn read_multipart(
    state: &AppState,
    limit: UploadLimit,
    req: Request,
) -> ApiResult<(serde_json::Value, BTreeMap<String, Part>)> {
    let mut multipart = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let tmp = state.settings.data_dir.join("tmp");
    let (mut spec, mut parts, mut problems) = (None, BTreeMap::new(), Problems::default());
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::BadRequest(e.body_text()))?
    {
        let name = field.name().unwrap_or("").to_string();
        if name == "spec" {
            let text = field
                .bytes()
                .await
                .map_err(|e| ApiError::BadRequest(e.body_text()))?;
            match serde_json::from_slice(&text) {
                Ok(v) => spec = Some(v),
                Err(e) => problems.add("/spec", format!("the `spec` part is not valid JSON: {e}")),
            }
            continue;
        }
        let Some((spec_field, _, kind)) =
            REFERENCE_FIELDS.iter().find(|(_, part, _)| *part == name)
        else {
            problems.add(format!("/{name}"), "unknown multipart part; expected spec, model, dataset, calibration, train, unlabelled, teacher or student");
            continue;
        };
        let file_name = field.file_name().unwrap_or("").to_string();
        let staged = ingest::stage(&tmp, field, limit.bytes)
            .await
            .map_err(|e| limit.map(e, &format!("/{name}")))?;
        let part = match kind {
            RefKind::Model => match ingest::inspect_model(&staged).await {
                Ok(s) => Part::Model(staged, s, file_name),
                Err(e) => {
                    problems.add(format!("/{name}"), e.to_string());
                    continue;
                }
            },
            RefKind::Dataset => match ingest::inspect_dataset(&staged).await {
                Ok(s) => Part::Dataset(staged, s, file_name),
                Err(e) => {
                    problems.add(format!("/{name}"), e.to_string());
                    continue;
                }
            },
        };
        parts.insert(spec_field.to_string(), part);
    }
    let Some(spec) = spec else {
        problems.add(
            "/spec",
            "the multipart body needs a `spec` part holding the job spec as JSON",
        );
        return Err(ApiError::Validation(problems.0));
    };
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems.0));
    }
    Ok((spec, parts))
}

/// Checks that references exist and that the datasets fit the model, collecting every problem.
async fn check_references(
    state: &AppState,
    project: &str,
    spec: &JobSpec,
    parts: &BTreeMap<String, Part>,
) -> ApiResult<()> {
    let mut problems = Problems::default();
    let mut models: BTreeMap<&str, ModelSummary> = BTreeMap::new();
    let mut datasets: BTreeMap<&str, DatasetSummary> = BTreeMap::new();
    for (field, kind, id) in spec.references() {
        match (parts.get(field), kind) {
            (Some(Part::Model(_, s, _)), _) => {
                models.insert(field, s.clone());
            }
            (Some(Part::Dataset(_, s, _)), _) => {
                datasets.insert(field, s.clone());
            }
            (None, RefKind::Model) => match state
                .db
                .get_upload::<ModelSummary>(UploadKind::Model, project, id)
                .await
            {
                Ok(u) => {
                    models.insert(field, u.summary);
                }
                Err(StoreError::NotFound) => {
                    problems.add(format!("/{field}"), format!("no model with id {id}"))
                }
                Err(e) => return Err(e.into()),
            },
            (None, RefKind::Dataset) => match state
                .db
                .get_upload::<DatasetSummary>(UploadKind::Dataset, project, id)
                .await
            {
                Ok(u) => {
                    datasets.insert(field, u.summary);
                }
                Err(StoreError::NotFound) => {
                    problems.add(format!("/{field}"), format!("no dataset with id {id}"))
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
    let uploads = crate::pipeline::checks::Uploads {
        models: &models,
        datasets: &datasets,
    };
    crate::pipeline::checks::check_inputs(spec, &uploads, &mut problems);
    problems.into_result(()).map_err(ApiError::Validation)
}

/// The spec as sorted JSON plus each file part's hash: equal requests hash equally.
fn request_hash(spec: &serde_json::Value, parts: &BTreeMap<String, Part>) -> String {
    let mut h = Sha256::new();
    h.update(spec.to_string().as_bytes());
    for (field, part) in parts {
        let sha = match part {
            Part::Model(s, _, _) | Part::Dataset(s, _, _) => &s.sha256,
        };
        h.update(format!("\n{field}={sha}").as_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    /// Only jobs with this status.
    #[param(value_type = Option<JobStatus>)]
    pub status: Option<String>,
    /// Only jobs on this model.
    pub model_id: Option<String>,
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/jobs", tag = "jobs", params(JobFilter, PageQuery),
    responses((status = 200, body = Page<Job>), (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(f): ApiQuery<JobFilter>,
    ApiQuery(p): ApiQuery<PageQuery>,
) -> ApiResult<Json<Page<Job>>> {
    let limit = p.limit()?;
    let status = match f.status.as_deref() {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::field(
                "/status",
                "`status` must be queued, running, succeeded, failed or cancelled",
            )
        })?),
    };
    let rows = state
        .db
        .list_jobs(
            &caller.project,
            status,
            f.model_id.as_deref(),
            p.cursor.as_deref(),
            limit,
        )
        .await?;
    let jobs = rows
        .iter()
        .map(JobRow::to_job)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::new(jobs, limit, |j: &Job| j.id.clone())))
}

/// The caller's job `id`; 404 for another project's, as for one that never existed.
pub(super) async fn find_job(state: &AppState, caller: &Caller, id: &str) -> ApiResult<JobRow> {
    state
        .db
        .get_job(&caller.project, id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("job {id}")),
            other => other.into(),
        })
}

/// Get a job's status, stage, progress and error.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Job>> {
    Ok(Json(find_job(&state, &caller, &id).await?.to_job()?))
}

/// Cancel a job: a queued job ends at once; a running one stops at its next checkpoint.
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, description = "Cancelled, or cancellation requested", body = Job),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job already succeeded or failed", body = Problem, content_type = "application/problem+json")))]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let row = state
        .db
        .request_cancel(&caller.project, &id, now_ms())
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ApiError::NotFound(format!("job {id}")),
            other => other.into(),
        })?;
    Ok((StatusCode::ACCEPTED, Json(row.to_job()?)))
}
