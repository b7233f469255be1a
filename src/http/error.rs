//! Every API error becomes an RFC 9457 problem+json response here, and only here.
use crate::domain::validation::FieldError;
use crate::ingest::IngestError;
use crate::store::StoreError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "type": "/problems/validation",
    "title": "The request is invalid",
    "status": 422,
    "detail": "2 fields are invalid",
    "errors": [{"pointer": "/pipeline/0/stage", "detail": "unknown value `quantise`; expected one of: evaluate, quantize, distill, finetune, prune"}]
}))]
pub struct Problem {
    /// Stable problem type; clients branch on it.
    pub r#type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Each invalid field, for validation problems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For quota problems: the limit that was reached (`max_stored_bytes`, `max_queued_jobs`,
    /// `max_upload_bytes`, or `server_max_upload_bytes` for the server's own upload limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("the upload exceeds the server's limit of {0} bytes")]
    TooLarge(u64),
    /// A project quota: 413 for bytes, 429 for job counts; `limit` names the quota.
    #[error("{detail}")]
    Quota {
        limit: &'static str,
        status: StatusCode,
        detail: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many requests for this API key; retry in {0} s")]
    RateLimited(u64),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A single invalid field.
    pub fn field(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError {
            pointer: pointer.into(),
            detail: detail.into(),
        }])
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            Self::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "The request is invalid",
            ),
            Self::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "The upload is too large",
            ),
            Self::Quota { status, .. } => (*status, "quota", "A project quota is reached"),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
            ),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Not allowed"),
            Self::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many requests",
            ),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "Bad request"),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let limit = match &self {
            Self::Quota { limit, .. } => Some(limit.to_string()),
            Self::TooLarge(_) => Some("server_max_upload_bytes".to_string()),
            _ => None,
        };
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"shrink\""),
                );
            }
            Self::RateLimited(secs) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from(*secs));
            }
            _ => {}
        }
        let (detail, errors) = match self {
            Self::Validation(errors) => {
                let detail = match errors.as_slice() {
                    [one] => one.detail.clone(),
                    many => format!("{} fields are invalid", many.len()),
                };
                (detail, errors)
            }
            Self::Internal(e) => {
                // Logged once, inside the request's span; the client gets no internals.
                tracing::error!(error = format!("{e:#}"), "request failed");
                (
                    "an unexpected error occurred; the server log has the details".into(),
                    vec![],
                )
            }
            other => (other.to_string(), vec![]),
        };
        let body = Problem {
            r#type: format!("/problems/{kind}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
            errors,
            limit,
        };
        (
            status,
            headers,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::NotFound("resource".into()),
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::OverQuota { limit, detail } => Self::Quota {
                limit,
                status: if limit.ends_with("_bytes") {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::TOO_MANY_REQUESTS
                },
                detail,
            },
            other => Self::Internal(other.into()),
        }
    }
}

impl From<crate::blob::BlobError> for ApiError {
    fn from(e: crate::blob::BlobError) -> Self {
        Self::Internal(e.into())
    }
}

/// Upload failures: `pointer` names the body part that carried the file.
pub fn ingest_error(e: IngestError, pointer: &str) -> ApiError {
    match e {
        IngestError::TooLarge { limit } => ApiError::TooLarge(limit),
        IngestError::OverQuota { limit, detail } => ApiError::Quota {
            limit,
            status: StatusCode::PAYLOAD_TOO_LARGE,
            detail,
        },
        IngestError::Invalid(inner) => ApiError::field(pointer, inner.to_string()),
        IngestError::Interrupted(m) => {
            ApiError::BadRequest(format!("the upload was interrupted: {m}"))
        }
        IngestError::Store(s) => s.into(),
        other => ApiError::Internal(other.into()),
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
