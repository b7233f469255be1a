//! The OpenAPI document, generated from the handlers' annotations. `shrink openapi` prints it and
//! a test keeps the committed `openapi/openapi.json` equal to it.
use super::{health, jobs, uploads, AppState};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Shrink", description = "Distill, prune, quantize and measure ONNX models. Errors are RFC 9457 problem+json."),
    tags(
        (name = "models", description = "Uploaded ONNX models"),
        (name = "datasets", description = "Uploaded datasets (.npz, .safetensors)"),
        (name = "jobs", description = "Optimization jobs, their reports and artifacts"),
        (name = "health", description = "Liveness and readiness")
    )
)]
struct ApiDoc;

/// Every route with its OpenAPI operation.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(uploads::upload_model, uploads::list_models))
        .routes(routes!(uploads::get_model, uploads::delete_model))
        .routes(routes!(uploads::model_file))
        .routes(routes!(uploads::upload_dataset, uploads::list_datasets))
        .routes(routes!(uploads::get_dataset, uploads::delete_dataset))
        .routes(routes!(uploads::dataset_file))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(jobs::job_report))
        .routes(routes!(jobs::job_log))
        .routes(routes!(jobs::list_artifacts))
        .routes(routes!(jobs::get_artifact))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
}

/// The document as pretty JSON with a trailing newline (the committed file's form).
pub fn document_json() -> String {
    let mut doc = api_router().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut s = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}
