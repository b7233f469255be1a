//! Authentication, roles and the per-key rate limit, as one middleware in front of every route.
//!
//! Every request except the public ones (`/healthz`, `/readyz`, `/metrics`, the OpenAPI document
//! and its docs UI) carries `Authorization: Bearer <key>`. The key decides the caller's project
//! (every handler scopes its queries to it) and role: viewers read, members also write, admins
//! also manage projects, keys and quotas.
use super::error::ApiError;
use super::AppState;
use crate::domain::team::Role;
use crate::store::now_ms;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;

/// Who is calling: set by [`authenticate`], read by handlers as an extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub project: String,
    pub role: Role,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("this route needs an API key".into()))
    }
}

/// Per-key request rate limit (a token bucket per key id).
pub type KeyLimiter = Arc<DefaultKeyedRateLimiter<String>>;

/// `per_second` requests a second with bursts of `burst`; `None` when `per_second` is 0 (no limit).
pub fn limiter(per_second: u32, burst: u32) -> Option<KeyLimiter> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
    Some(Arc::new(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    )))
}

/// Routes anyone may call: probes, metrics, and the API's own description.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
        || path == "/docs"
        || path.starts_with("/docs/")
}

/// The least role a request needs.
pub fn required_role(method: &Method, path: &str) -> Role {
    if path == "/projects" || path.starts_with("/projects/") {
        Role::Admin
    } else if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        Role::Viewer
    } else {
        Role::Member
    }
}

fn bearer(req: &Request) -> Result<&str, ApiError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "send an API key as `Authorization: Bearer shrk_…` (the first `serve` writes an admin key to <data-dir>/admin.key)".into(),
            )
        })?
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not text".into()))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <key>`".into(),
        ));
    }
    Ok(token.trim())
}

/// The middleware: 401 without a valid key, 429 over the key's rate, 403 below the route's role.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let secret = match bearer(&req) {
        Ok(s) => s.to_string(),
        Err(e) => return e.into_response(),
    };
    let caller = match identify(&state, &secret).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Some(limiter) = &state.limiter {
        if let Err(not_until) = limiter.check_key(&caller.key_id) {
            state.metrics.rate_limited();
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return ApiError::RateLimited(secs.max(1)).into_response();
        }
    }
    let needed = required_role(req.method(), req.uri().path());
    if caller.role < needed {
        return ApiError::Forbidden(format!(
            "this key's role is `{}`; {} {} needs `{}`",
            caller.role,
            req.method(),
            req.uri().path(),
            needed
        ))
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

async fn identify(state: &AppState, secret: &str) -> Result<Caller, ApiError> {
    match state.db.authenticate(secret, now_ms()).await? {
        Some(a) => Ok(Caller {
            key_id: a.key_id,
            project: a.project,
            role: a.role,
        }),
        None => Err(ApiError::Unauthorized(
            "the API key is unknown or revoked".into(),
        )),
    }
}
