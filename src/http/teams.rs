//! `/projects` and their keys and quotas (admin keys only), and `/me` (any key).
use super::auth::Caller;
use super::error::{ApiError, ApiResult, Problem};
use super::AppState;
use crate::domain::team::{ApiKey, CreatedKey, NewKey, NewProject, Project, Quotas, Role};
use crate::domain::validation;
use crate::store::{now_ms, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Who the key in the request is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub key_id: String,
    pub project: String,
    pub role: Role,
}

/// The calling key: its project and role.
#[utoipa::path(get, path = "/me", tag = "projects",
    responses((status = 200, body = Me), (status = 401, body = Problem, content_type = "application/problem+json")))]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        key_id: caller.key_id,
        project: caller.project,
        role: caller.role,
    })
}

fn parse<T>(body: &[u8]) -> ApiResult<T>
where
    T: serde::de::DeserializeOwned + Serialize + validation::Validate,
{
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::field("", format!("the body is not valid JSON: {e}")))?;
    validation::parse(&value).map_err(ApiError::Validation)
}

fn not_found(what: String) -> impl Fn(StoreError) -> ApiError {
    move |e| match e {
        StoreError::NotFound => ApiError::NotFound(what.clone()),
        other => other.into(),
    }
}

/// Create a project (admin).
#[utoipa::path(post, path = "/projects", tag = "projects",
    request_body(content = NewProject, content_type = "application/json"),
    responses((status = 201, body = Project),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The id is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn create_project(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Project>)> {
    let new: NewProject = parse(&body)?;
    let name = new.name.clone().unwrap_or_else(|| new.id.clone());
    let p = state
        .db
        .create_project(&new.id, &name, new.quotas, now_ms())
        .await?;
    tracing::info!(project = %p.id, "project created");
    Ok((StatusCode::CREATED, Json(p)))
}

/// List every project with its quotas and usage (admin).
#[utoipa::path(get, path = "/projects", tag = "projects",
    responses((status = 200, body = Vec<Project>),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json")))]
pub async fn list_projects(State(state): State<AppState>) -> ApiResult<Json<Vec<Project>>> {
    Ok(Json(state.db.list_projects().await?))
}

/// Get a project with its quotas and usage (admin).
#[utoipa::path(get, path = "/projects/{id}", tag = "projects", params(("id" = String, Path)),
    responses((status = 200, body = Project),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn get_project(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Project>> {
    Ok(Json(
        state
            .db
            .get_project(&id)
            .await
            .map_err(not_found(format!("project {id}")))?,
    ))
}

/// Set a project's quotas (admin). Every limit is replaced; `null` or absent is unlimited.
#[utoipa::path(put, path = "/projects/{id}/quotas", tag = "projects", params(("id" = String, Path)),
    request_body(content = Quotas, content_type = "application/json"),
    responses((status = 200, body = Project),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn set_quotas(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Project>> {
    let quotas: Quotas = parse(&body)?;
    let p = state
        .db
        .set_quotas(&id, quotas)
        .await
        .map_err(not_found(format!("project {id}")))?;
    tracing::info!(project = %id, ?quotas, "quotas set");
    Ok(Json(p))
}

/// Create an API key in a project (admin). The response is the only time its secret is shown.
#[utoipa::path(post, path = "/projects/{id}/keys", tag = "projects", params(("id" = String, Path)),
    request_body(content = NewKey, content_type = "application/json"),
    responses((status = 201, body = CreatedKey),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json")))]
pub async fn create_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let new: NewKey = parse(&body)?;
    let key = state
        .db
        .create_key(&id, &new.name, new.role, now_ms())
        .await
        .map_err(not_found(format!("project {id}")))?;
    tracing::info!(project = %id, key_id = %key.key.id, role = %key.key.role, "API key created");
    Ok((StatusCode::CREATED, Json(key)))
}

/// List a project's keys, revoked ones included; never their secrets (admin).
#[utoipa::path(get, path = "/projects/{id}/keys", tag = "projects", params(("id" = String, Path)),
    responses((status = 200, body = Vec<ApiKey>),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn list_keys(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ApiKey>>> {
    Ok(Json(
        state
            .db
            .list_keys(&id)
            .await
            .map_err(not_found(format!("project {id}")))?,
    ))
}

/// Revoke a key (admin): from now on it gets 401. The key stays listed with `revoked_at`.
#[utoipa::path(delete, path = "/projects/{id}/keys/{key_id}", tag = "projects",
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 200, body = ApiKey),
        (status = 403, description = "Not an admin key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The key in the request cannot revoke itself", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json")))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, key_id)): Path<(String, String)>,
) -> ApiResult<Json<ApiKey>> {
    if key_id == caller.key_id {
        return Err(ApiError::Conflict(
            "a key cannot revoke itself (that would lock this caller out); revoke it with another admin key or `shrink admin key revoke`".into(),
        ));
    }
    let key = state
        .db
        .revoke_key(&id, &key_id, now_ms())
        .await
        .map_err(not_found(format!("key {key_id} of project {id}")))?;
    tracing::info!(project = %id, key_id = %key_id, "API key revoked");
    Ok(Json(key))
}
