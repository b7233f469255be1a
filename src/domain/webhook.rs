//! Webhooks: endpoints a project registers to hear when its jobs end.
use super::validation::{Checker, Validate};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a webhook can be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum WebhookEvent {
    #[serde(rename = "job.succeeded")]
    JobSucceeded,
    #[serde(rename = "job.failed")]
    JobFailed,
    #[serde(rename = "job.cancelled")]
    JobCancelled,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 3] = [Self::JobSucceeded, Self::JobFailed, Self::JobCancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobSucceeded => "job.succeeded",
            Self::JobFailed => "job.failed",
            Self::JobCancelled => "job.cancelled",
        }
    }

    /// The event a job's final status makes.
    pub fn for_status(status: &str) -> Option<Self> {
        match status {
            "succeeded" => Some(Self::JobSucceeded),
            "failed" => Some(Self::JobFailed),
            "cancelled" => Some(Self::JobCancelled),
            _ => None,
        }
    }
}

/// `POST /webhooks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where to POST events (http or https). Loopback, private and link-local addresses are
    /// refused unless the operator allows them.
    #[schema(
        example = "https://ci.example.com/shrink-hook",
        pattern = "^https?://",
        max_length = 2048
    )]
    pub url: String,
    /// Which events; all of them when absent.
    #[serde(default)]
    pub events: Option<Vec<WebhookEvent>>,
    /// The signing secret (`whsec_` + base64 of at least 24 bytes); one is made when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

impl Validate for NewWebhook {
    fn validate(&self, c: &mut Checker<'_>) {
        let scheme_ok = self.url.starts_with("http://") || self.url.starts_with("https://");
        c.check(
            "url",
            scheme_ok && self.url.len() <= 2048,
            "`url` must be an http or https URL of at most 2048 characters",
        );
        if let Some(events) = &self.events {
            c.check(
                "events",
                !events.is_empty(),
                "`events` must name at least one event (or be left out for all)",
            );
        }
        if let Some(secret) = &self.secret {
            c.check(
                "secret",
                secret_bytes(secret).is_some_and(|b| b.len() >= 24),
                "`secret` must be `whsec_` followed by base64 of at least 24 bytes",
            );
        }
    }
}

/// The key bytes of a `whsec_…` secret.
pub fn secret_bytes(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = secret.strip_prefix("whsec_")?;
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// A registered endpoint (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub created_at: DateTime<Utc>,
}

/// A webhook just created: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// Verify `webhook-signature` with it (Standard Webhooks: HMAC-SHA256 of `id.timestamp.body`).
    pub secret: String,
}

/// One event to one endpoint, and how its delivery went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// Also the `webhook-id` header: stable across retries, so receivers can drop duplicates.
    pub id: String,
    pub job_id: String,
    pub event: WebhookEvent,
    /// `pending` (will be tried again), `delivered` or `failed` (gave up).
    pub status: String,
    pub attempts: i64,
    /// The HTTP status of the last attempt, if it got one.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}
