//! `/models` and `/datasets`: streamed uploads, listing, download, deletion.
use super::auth::Caller;
use super::error::{ingest_error, ApiError, ApiResult, Problem};
use super::pagination::{ApiQuery, Page, PageQuery};
use super::AppState;
use crate::domain::dataset::{DatasetSummary, TensorInfo};
use crate::domain::model::ModelSummary;
use crate::ingest::{self, IngestError, Staged};
use crate::store::uploads::{Upload, UploadKind};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// An uploaded ONNX model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelResponse {
    pub id: String,
    pub name: String,
    /// Always `onnx` for now.
    pub format: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub summary: ModelSummary,
}

/// An uploaded dataset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetResponse {
    pub id: String,
    pub name: String,
    /// `npz` or `safetensors`.
    pub format: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    pub tensors: Vec<TensorInfo>,
    /// Rows along axis 0, shared by every tensor.
    pub samples: u64,
}

impl From<Upload<ModelSummary>> for ModelResponse {
    fn from(u: Upload<ModelSummary>) -> Self {
        Self {
            id: u.id,
            name: u.name,
            format: u.format,
            size_bytes: u.size_bytes,
            sha256: u.sha256,
            created_at: u.created_at,
            summary: u.summary,
        }
    }
}

impl From<Upload<DatasetSummary>> for DatasetResponse {
    fn from(u: Upload<DatasetSummary>) -> Self {
        Self {
            id: u.id,
            name: u.name,
            format: u.format,
            size_bytes: u.size_bytes,
            sha256: u.sha256,
            created_at: u.created_at,
            samples: u.summary.samples,
            tensors: u.summary.tensors,
        }
    }
}

/// A file as the raw request body.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
pub struct RawFile(#[allow(dead_code)] Vec<u8>);

/// A file as the `file` part of a `multipart/form-data` body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FileForm {
    /// The file; its file name is recorded unless `?name=` is given.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    pub file: Vec<u8>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Name to record for a raw (non-multipart) upload; defaults to the id.
    pub name: Option<String>,
}

/// Receives a file from a raw body or the multipart field `file` into a staged temporary file.
pub async fn receive(
    state: &AppState,
    limit: UploadLimit,
    req: Request,
    query_name: Option<String>,
) -> ApiResult<(Staged, String)> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.bytes + 64 * 1024) {
        return Err(limit.error());
    }
    let tmp = state.settings.data_dir.join("tmp");
    if is_multipart(req.headers()) {
        let mut multipart = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?
        {
            if field.name() == Some("file") {
                let name = query_name
                    .or_else(|| field.file_name().map(str::to_string))
                    .unwrap_or_default();
                let staged = ingest::stage(&tmp, field, limit.bytes)
                    .await
                    .map_err(|e| limit.map(e, "/file"))?;
                return Ok((staged, name));
            }
        }
        return Err(ApiError::field(
            "/file",
            "the multipart body has no `file` part",
        ));
    }
    let body = req
        .into_body()
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let staged = ingest::stage(&tmp, body, limit.bytes)
        .await
        .map_err(|e| limit.map(e, "/body"))?;
    Ok((staged, query_name.unwrap_or_default()))
}

/// The largest upload a project may send: the server's limit or the project's `max_upload_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimit {
    pub bytes: u64,
    /// Whether the project's quota (rather than the server's limit) is the smaller.
    by_quota: bool,
}

impl UploadLimit {
    pub async fn of(state: &AppState, project: &str) -> ApiResult<UploadLimit> {
        let server = state.settings.max_upload_bytes;
        let quota = state.db.project_quotas(project).await?.max_upload_bytes;
        Ok(match quota {
            Some(q) if (q.max(0) as u64) < server => UploadLimit {
                bytes: q.max(0) as u64,
                by_quota: true,
            },
            _ => UploadLimit {
                bytes: server,
                by_quota: false,
            },
        })
    }

    pub fn error(&self) -> ApiError {
        if self.by_quota {
            ApiError::Quota {
                limit: "max_upload_bytes",
                status: StatusCode::PAYLOAD_TOO_LARGE,
                detail: format!(
                    "the upload exceeds this project's max_upload_bytes of {} bytes; nothing was stored",
                    self.bytes
                ),
            }
        } else {
            ApiError::TooLarge(self.bytes)
        }
    }

    /// An ingest error, with "too large" naming the limit that applied.
    pub fn map(&self, e: IngestError, pointer: &str) -> ApiError {
        match e {
            IngestError::TooLarge { .. } => self.error(),
            other => ingest_error(other, pointer),
        }
    }
}

pub fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"))
}

fn empty_name_to_id<S>(mut u: Upload<S>) -> Upload<S> {
    if u.name.is_empty() {
        u.name = u.id.clone();
    }
    u
}

/// Stores a staged model after checking it is a readable ONNX graph.
pub async fn store_model(
    state: &AppState,
    project: &str,
    staged: Staged,
    name: &str,
    summary: ModelSummary,
) -> ApiResult<Upload<ModelSummary>> {
    let u = ingest::commit(
        &state.db,
        state.blobs.as_ref(),
        ingest::Target {
            kind: UploadKind::Model,
            project,
            name,
            format: "onnx",
        },
        staged,
        summary,
    )
    .await
    .map_err(|e| ingest_error(e, "/file"))?;
    state.metrics.uploaded("model", u.size_bytes as u64);
    Ok(empty_name_to_id(u))
}

pub async fn store_dataset(
    state: &AppState,
    project: &str,
    staged: Staged,
    name: &str,
    summary: DatasetSummary,
) -> ApiResult<Upload<DatasetSummary>> {
    let format = summary.format.as_str();
    let size = staged.size;
    let u = ingest::commit(
        &state.db,
        state.blobs.as_ref(),
        ingest::Target {
            kind: UploadKind::Dataset,
            project,
            name,
            format,
        },
        staged,
        summary,
    )
    .await
    .map_err(|e| ingest_error(e, "/file"))?;
    state.metrics.uploaded("dataset", size);
    Ok(empty_name_to_id(u))
}

/// Upload an ONNX model.
///
/// The body is either the raw file (`application/octet-stream`, name in `?name=`) or
/// `multipart/form-data` with a `file` part. It is streamed to storage while hashed.
#[utoipa::path(post, path = "/models", tag = "models", params(UploadQuery),
    request_body(description = "The ONNX file, raw or as the `file` part of a multipart form",
        content((RawFile = "application/octet-stream"), (FileForm = "multipart/form-data"))),
    responses(
        (status = 201, description = "Stored", body = ModelResponse),
        (status = 400, description = "A malformed multipart body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over the upload limit; nothing stored", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a readable ONNX model; nothing stored", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "/problems/validation", "title": "The request is invalid", "status": 422,
                "detail": "invalid model: not a valid ONNX protobuf (is the file complete?): failed to decode Protobuf message",
                "errors": [{"pointer": "/body", "detail": "invalid model: not a valid ONNX protobuf (is the file complete?): failed to decode Protobuf message"}]}))
    ))]
pub async fn upload_model(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UploadQuery>,
    req: Request,
) -> ApiResult<(StatusCode, Json<ModelResponse>)> {
    let limit = UploadLimit::of(&state, &caller.project).await?;
    let (staged, name) = receive(&state, limit, req, q.name).await?;
    let summary = ingest::inspect_model(&staged)
        .await
        .map_err(|e| ingest_error(e, "/file"))?;
    let u = store_model(&state, &caller.project, staged, &name, summary).await?;
    Ok((StatusCode::CREATED, Json(u.into())))
}

/// Upload a dataset (`.npz` or `.safetensors`).
///
/// One tensor per model input (named as the input), optional integer `labels` (or `y`).
#[utoipa::path(post, path = "/datasets", tag = "datasets", params(UploadQuery),
    request_body(description = "The dataset file, raw or as the `file` part of a multipart form",
        content((RawFile = "application/octet-stream"), (FileForm = "multipart/form-data"))),
    responses(
        (status = 201, description = "Stored", body = DatasetResponse),
        (status = 400, description = "A malformed multipart body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Over the upload limit; nothing stored", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unreadable, or tensors disagree on the sample count", body = Problem, content_type = "application/problem+json",
            example = json!({"type": "/problems/validation", "title": "The request is invalid", "status": 422,
                "detail": "invalid dataset: tensor `labels`: has 9 samples along axis 0 but `input` has 10; all tensors must agree on the sample count",
                "errors": [{"pointer": "/file", "detail": "invalid dataset: tensor `labels`: has 9 samples along axis 0 but `input` has 10; all tensors must agree on the sample count"}]}))
    ))]
pub async fn upload_dataset(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UploadQuery>,
    req: Request,
) -> ApiResult<(StatusCode, Json<DatasetResponse>)> {
    let limit = UploadLimit::of(&state, &caller.project).await?;
    let (staged, name) = receive(&state, limit, req, q.name).await?;
    let summary = ingest::inspect_dataset(&staged)
        .await
        .map_err(|e| ingest_error(e, "/file"))?;
    let u = store_dataset(&state, &caller.project, staged, &name, summary).await?;
    Ok((StatusCode::CREATED, Json(u.into())))
}

/// List models, newest first.
#[utoipa::path(get, path = "/models", tag = "models", params(PageQuery),
    responses((status = 200, body = Page<ModelResponse>), (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn list_models(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Page<ModelResponse>>> {
    let limit = q.limit()?;
    let rows = state
        .db
        .list_uploads::<ModelSummary>(
            UploadKind::Model,
            &caller.project,
            q.cursor.as_deref(),
            limit,
        )
        .await?;
    Ok(Json(Page::new(
        rows.into_iter().map(Into::into).collect(),
        limit,
        |m: &ModelResponse| m.id.clone(),
    )))
}

/// List datasets, newest first.
#[utoipa::path(get, path = "/datasets", tag = "datasets", params(PageQuery),
    responses((status = 200, body = Page<DatasetResponse>), (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn list_datasets(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<Page<DatasetResponse>>> {
    let limit = q.limit()?;
    let rows = state
        .db
        .list_uploads::<DatasetSummary>(
            UploadKind::Dataset,
            &caller.project,
            q.cursor.as_deref(),
            limit,
        )
        .await?;
    Ok(Json(Page::new(
        rows.into_iter().map(Into::into).collect(),
        limit,
        |d: &DatasetResponse| d.id.clone(),
    )))
}

async fn find<S: serde::de::DeserializeOwned>(
    state: &AppState,
    project: &str,
    kind: UploadKind,
    id: &str,
) -> ApiResult<Upload<S>> {
    let what = if kind == UploadKind::Model {
        "model"
    } else {
        "dataset"
    };
    state
        .db
        .get_upload(kind, project, id)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::NotFound(format!("{what} {id}")),
            other => other.into(),
        })
}

/// Get a model.
#[utoipa::path(get, path = "/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 200, body = ModelResponse), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelResponse>> {
    Ok(Json(
        find::<ModelSummary>(&state, &caller.project, UploadKind::Model, &id)
            .await?
            .into(),
    ))
}

/// Get a dataset.
#[utoipa::path(get, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = DatasetResponse), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_dataset(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<DatasetResponse>> {
    Ok(Json(
        find::<DatasetSummary>(&state, &caller.project, UploadKind::Dataset, &id)
            .await?
            .into(),
    ))
}

/// Streams a stored object as a download.
pub async fn download(
    state: &AppState,
    key: &str,
    filename: &str,
    content_type: &str,
) -> ApiResult<Response> {
    if state.settings.s3_presign {
        if let Some(url) = state
            .blobs
            .presigned_get(key, std::time::Duration::from_secs(900))
            .await?
        {
            return Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, url)]).into_response());
        }
    }
    let blob = match state.blobs.get_stream(key).await {
        // A DELETE that ran between reading the row and opening the object: the file is gone.
        Err(crate::blob::BlobError::NotFound(_)) => {
            return Err(ApiError::NotFound(format!(
                "the file of {filename} (deleted meanwhile)"
            )))
        }
        other => other?,
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_LENGTH, blob.len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", filename.replace('"', "")),
            ),
        ],
        Body::from_stream(blob.body),
    )
        .into_response())
}

/// Download a model file.
#[utoipa::path(get, path = "/models/{id}/file", tag = "models", params(("id" = String, Path)),
    responses((status = 200, description = "The ONNX file", content_type = "application/octet-stream"),
        (status = 307, description = "Redirect to a presigned object-store URL (when configured)"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn model_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let m = find::<ModelSummary>(&state, &caller.project, UploadKind::Model, &id).await?;
    download(
        &state,
        &m.blob_key,
        &format!("{}.onnx", m.name.trim_end_matches(".onnx")),
        "application/octet-stream",
    )
    .await
}

/// Download a dataset file.
#[utoipa::path(get, path = "/datasets/{id}/file", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, description = "The dataset file", content_type = "application/octet-stream"),
        (status = 307, description = "Redirect to a presigned object-store URL (when configured)"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn dataset_file(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let d = find::<DatasetSummary>(&state, &caller.project, UploadKind::Dataset, &id).await?;
    download(&state, &d.blob_key, &d.name, "application/octet-stream").await
}

async fn delete(
    state: &AppState,
    project: &str,
    kind: UploadKind,
    id: &str,
) -> ApiResult<StatusCode> {
    let what = if kind == UploadKind::Model {
        "model"
    } else {
        "dataset"
    };
    let key = state
        .db
        .delete_upload(kind, project, id)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::NotFound(format!("{what} {id}")),
            crate::store::StoreError::Conflict(m) => {
                ApiError::Conflict(format!("the {what} is in use: {m}"))
            }
            other => other.into(),
        })?;
    if let Err(e) = state.blobs.delete(&key).await {
        // The row is gone; an orphaned object wastes space but loses nothing.
        tracing::warn!(error = %e, key, "could not delete object");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Delete a model (refused while a queued or running job uses it).
#[utoipa::path(delete, path = "/models/{id}", tag = "models", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A queued or running job uses it", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete(&state, &caller.project, UploadKind::Model, &id).await
}

/// Delete a dataset (refused while a queued or running job uses it).
#[utoipa::path(delete, path = "/datasets/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A queued or running job uses it", body = Problem, content_type = "application/problem+json")))]
pub async fn delete_dataset(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete(&state, &caller.project, UploadKind::Dataset, &id).await
}
