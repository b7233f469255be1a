//! `/webhooks`: a project's endpoints for job events, and their deliveries.
use super::auth::Caller;
use super::error::{ApiError, ApiResult, Problem};
use super::AppState;
use crate::domain::validation;
use crate::domain::webhook::{CreatedWebhook, Delivery, NewWebhook, Webhook, WebhookEvent};
use crate::store::{now_ms, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

/// Register an endpoint for the project's job events. The response is the only time its
/// signing secret is shown. Deliveries are signed as Standard Webhooks says (`webhook-id`,
/// `webhook-timestamp`, `webhook-signature`), retried with backoff, at least once.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks",
    request_body(content = NewWebhook, content_type = "application/json"),
    responses((status = 201, body = CreatedWebhook),
        (status = 422, description = "Invalid, unresolvable, or on a loopback/private address", body = Problem, content_type = "application/problem+json")))]
pub async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::field("", format!("the body is not valid JSON: {e}")))?;
    let new: NewWebhook = validation::parse(&value).map_err(ApiError::Validation)?;
    crate::webhooks::check_target(&new.url, state.settings.webhook_allow_private)
        .await
        .map_err(|e| ApiError::field("/url", e))?;
    let events = new.events.unwrap_or_else(|| WebhookEvent::ALL.to_vec());
    let secret = new.secret.unwrap_or_else(crate::webhooks::new_secret);
    let webhook = state
        .db
        .create_webhook(&caller.project, &new.url, &events, &secret, now_ms())
        .await?;
    tracing::info!(webhook = %webhook.id, project = %caller.project, "webhook registered");
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook { webhook, secret }),
    ))
}

/// The project's endpoints (never their secrets).
#[utoipa::path(get, path = "/webhooks", tag = "webhooks", responses((status = 200, body = Vec<Webhook>)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<Webhook>>> {
    Ok(Json(state.db.list_webhooks(&caller.project).await?))
}

fn not_found(id: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(format!("webhook {id}")),
        other => other.into(),
    }
}

/// Remove an endpoint and its deliveries.
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .db
        .delete_webhook(&caller.project, &id)
        .await
        .map_err(not_found(&id))?;
    Ok(StatusCode::NO_CONTENT)
}

/// An endpoint's deliveries, newest first (at most 200): status, attempts, the last answer.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = Vec<Delivery>), (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Delivery>>> {
    Ok(Json(
        state
            .db
            .list_deliveries(&caller.project, &id)
            .await
            .map_err(not_found(&id))?,
    ))
}
