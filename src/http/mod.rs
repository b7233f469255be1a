//! The HTTP API. The only module that knows axum and utoipa; it never calls the engine directly
//! except to inspect uploads — optimization work always goes through jobs.
pub mod auth;
pub mod error;
pub mod health;
pub mod jobs;
pub mod openapi;
pub mod pagination;
pub mod results;
pub mod teams;
pub mod uploads;
pub mod webhooks;

use crate::blob::BlobStore;
use crate::config::Settings;
use crate::store::Db;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{HeaderName, HeaderValue, Request};
use axum::Router;
use std::sync::Arc;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa_swagger_ui::SwaggerUi;

/// Whether ONNX Runtime loaded (its version) or why not.
pub type RuntimeStatus = Result<String, String>;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub blobs: Arc<dyn BlobStore>,
    pub settings: Arc<Settings>,
    pub runtime: Arc<RuntimeStatus>,
    pub metrics: crate::metrics::SharedMetrics,
    /// The per-key request rate limit; `None` when turned off.
    pub limiter: Option<auth::KeyLimiter>,
}

pub const REQUEST_ID: &str = "x-request-id";

/// The full application router: API, OpenAPI document, docs UI and middleware.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = openapi::api_router().split_for_parts();
    openapi::finish(&mut doc);
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let request_id = HeaderName::from_static(REQUEST_ID);
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", doc))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // Outside authentication, so refused requests are counted too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        // Uploads enforce their own streaming limit (413 with nothing stored); axum's 2 MB default would cut them.
        .layer(DefaultBodyLimit::disable())
        .layer(cors(&state.settings.cors_origins))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let id = req.extensions().get::<RequestId>().and_then(|r| r.header_value().to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// What a worker process serves on `--metrics-bind`: its metrics and a liveness probe, no API.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(health::metrics))
        .route("/healthz", axum::routing::get(health::healthz))
        .with_state(state)
}

/// Counts every request and its latency by route template (never the raw path, which holds ids).
async fn track_requests(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    state.metrics.http_request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

fn cors(origins: &[String]) -> CorsLayer {
    let base = CorsLayer::new()
        .allow_methods(tower_http::cors::Any)
        .allow_headers(tower_http::cors::Any)
        .expose_headers([
            HeaderName::from_static(REQUEST_ID),
            axum::http::header::LOCATION,
            axum::http::header::RETRY_AFTER,
        ]);
    if origins.iter().any(|o| o == "*") {
        base.allow_origin(tower_http::cors::Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
            .collect();
        base.allow_origin(AllowOrigin::list(list))
    }
}

/// The request id that `SetRequestIdLayer` assigned, for storing on jobs.
pub fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
