//! Liveness and readiness.
use super::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Readiness of each dependency.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// `ok` or the error.
    pub database: String,
    pub object_store: String,
    /// `onnxruntime <version>` or why it is unavailable.
    pub onnxruntime: String,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()), responses((status = 200, description = "Alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// The database, the object store and ONNX Runtime are all usable.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = Readiness), (status = 503, description = "Something is not usable", body = Readiness)),
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = state
        .db
        .ping()
        .await
        .map_or_else(|e| e.to_string(), |_| "ok".into());
    let object_store = state
        .blobs
        .check()
        .await
        .map_or_else(|e| e.to_string(), |_| "ok".into());
    let onnxruntime = match state.runtime.as_ref() {
        Ok(v) => format!("onnxruntime {v}"),
        Err(e) => e.clone(),
    };
    let ready = database == "ok" && object_store == "ok" && state.runtime.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            database,
            object_store,
            onnxruntime,
        }),
    )
}

/// Prometheus metrics in the OpenMetrics text format (no key needed).
#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "application/openmetrics-text", body = String),
        (status = 503, description = "The database could not be read", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let snapshot = if state.metrics.reads_database() {
        state.db.metrics_snapshot(crate::store::now_ms()).await
    } else {
        Ok(Default::default())
    };
    match snapshot {
        Ok(snapshot) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.render(&snapshot),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database could not be read: {e}"),
        )
            .into_response(),
    }
}
