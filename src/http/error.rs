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
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    #[error("the upload exceeds {0} bytes")]
    TooLarge(u64),
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
        };
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
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
        IngestError::Invalid(inner) => ApiError::field(pointer, inner.to_string()),
        IngestError::Interrupted(m) => {
            ApiError::BadRequest(format!("the upload was interrupted: {m}"))
        }
        IngestError::Store(s) => s.into(),
        other => ApiError::Internal(other.into()),
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
