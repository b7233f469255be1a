//! Webhook endpoints and their durable delivery outbox.
use super::{ms_to_time, Backend, Db, Result, StoreError};
use crate::domain::webhook::{Delivery, Webhook, WebhookEvent};

/// A delivery to make now.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub payload: String,
    pub attempts: i64,
}

/// A job that ended after a webhook of its project was registered, and has no delivery yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Ending {
    pub webhook_id: String,
    pub job_id: String,
    pub project: String,
    pub status: String,
    pub passed: Option<i64>,
    pub report_key: Option<String>,
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    id: String,
    url: String,
    events: String,
    created_at: i64,
}

impl WebhookRow {
    fn into_webhook(self) -> Result<Webhook> {
        Ok(Webhook {
            events: super::json_col(&self.events, "webhook events")?,
            id: self.id,
            url: self.url,
            created_at: ms_to_time(self.created_at),
        })
    }
}

/// Delay before retry `attempts` (1-based): 5 s, 10 s, 20 s … capped at an hour.
pub fn retry_delay_ms(attempts: i64) -> i64 {
    (5_000i64 << (attempts.clamp(1, 20) - 1)).min(3_600_000)
}

impl Db {
    pub async fn create_webhook(
        &self,
        project: &str,
        url: &str,
        events: &[WebhookEvent],
        secret: &str,
        now: i64,
    ) -> Result<Webhook> {
        let id = uuid::Uuid::now_v7().to_string();
        let events_json =
            serde_json::to_string(events).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO webhooks (id, project, url, events, secret, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&id)
            .bind(project)
            .bind(url)
            .bind(&events_json)
            .bind(secret)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(Webhook {
            id,
            url: url.to_string(),
            events: events.to_vec(),
            created_at: ms_to_time(now),
        })
    }

    pub async fn list_webhooks(&self, project: &str) -> Result<Vec<Webhook>> {
        let rows: Vec<WebhookRow> = sqlx::query_as(
            "SELECT id, url, events, created_at FROM webhooks WHERE project = $1 ORDER BY id",
        )
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(WebhookRow::into_webhook).collect()
    }

    /// Removes an endpoint and its deliveries; `NotFound` outside the project.
    pub async fn delete_webhook(&self, project: &str, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id IN (SELECT id FROM webhooks WHERE project = $1 AND id = $2)")
            .bind(project)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM webhooks WHERE project = $1 AND id = $2")
            .bind(project)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// An endpoint's deliveries, newest first; `NotFound` outside the project.
    pub async fn list_deliveries(&self, project: &str, webhook_id: &str) -> Result<Vec<Delivery>> {
        let owned: Option<(String,)> =
            sqlx::query_as("SELECT id FROM webhooks WHERE project = $1 AND id = $2")
                .bind(project)
                .bind(webhook_id)
                .fetch_optional(&self.pool)
                .await?;
        if owned.is_none() {
            return Err(StoreError::NotFound);
        }
        type DeliveryRow = (
            String,
            String,
            String,
            String,
            i64,
            Option<i64>,
            Option<String>,
            i64,
            i64,
            Option<i64>,
        );
        let rows: Vec<DeliveryRow> = sqlx::query_as(
            "SELECT id, job_id, event, status, attempts, last_status, last_error, created_at, next_attempt_at, delivered_at \
             FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY id DESC LIMIT 200",
        )
        .bind(webhook_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(
                |(
                    id,
                    job_id,
                    event,
                    status,
                    attempts,
                    last_status,
                    last_error,
                    created,
                    next,
                    delivered,
                )| {
                    let event = WebhookEvent::ALL
                        .into_iter()
                        .find(|e| e.as_str() == event)
                        .ok_or_else(|| StoreError::Corrupt(format!("delivery event `{event}`")))?;
                    Ok(Delivery {
                        next_attempt_at: (status == "pending").then(|| ms_to_time(next)),
                        id,
                        job_id,
                        event,
                        status,
                        attempts,
                        last_status,
                        last_error,
                        created_at: ms_to_time(created),
                        delivered_at: delivered.map(ms_to_time),
                    })
                },
            )
            .collect()
    }

    /// Jobs that ended (with an event the endpoint wants) after a webhook was registered and have
    /// no delivery to it yet.
    pub async fn undelivered_endings(&self, limit: i64) -> Result<Vec<Ending>> {
        Ok(sqlx::query_as(
            "SELECT w.id AS webhook_id, j.id AS job_id, j.project, j.status, j.passed, j.report_key \
             FROM webhooks w JOIN jobs j ON j.project = w.project \
             WHERE j.status IN ('succeeded', 'failed', 'cancelled') AND j.finished_at >= w.created_at \
               AND w.events LIKE '%\"job.' || j.status || '\"%' \
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.job_id = j.id) \
             ORDER BY j.finished_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Queues a delivery (once per endpoint and job, whoever gets there first).
    pub async fn insert_delivery(
        &self,
        id: &str,
        ending: &Ending,
        event: WebhookEvent,
        payload: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, job_id, event, payload, status, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6) ON CONFLICT (webhook_id, job_id) DO NOTHING",
        )
        .bind(id)
        .bind(&ending.webhook_id)
        .bind(&ending.job_id)
        .bind(event.as_str())
        .bind(payload)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes up to `limit` due deliveries and holds them until `hold_until` (another process
    /// skips them meanwhile; a crash releases them then).
    pub async fn claim_due_deliveries(
        &self,
        now: i64,
        hold_until: i64,
        limit: i64,
    ) -> Result<Vec<DueDelivery>> {
        let lock = if self.backend == Backend::Postgres {
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let claimed: Vec<(String, String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE id IN (\
               SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $2 \
               ORDER BY next_attempt_at LIMIT $3 {lock}) \
             RETURNING id, webhook_id, payload, attempts"
        )))
        .bind(hold_until)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(claimed.len());
        for (id, webhook_id, payload, attempts) in claimed {
            let target: Option<(String, String)> =
                sqlx::query_as("SELECT url, secret FROM webhooks WHERE id = $1")
                    .bind(&webhook_id)
                    .fetch_optional(&self.pool)
                    .await?;
            if let Some((url, secret)) = target {
                out.push(DueDelivery {
                    id,
                    url,
                    secret,
                    payload,
                    attempts,
                });
            }
        }
        Ok(out)
    }

    pub async fn delivery_succeeded(&self, id: &str, status: i64, now: i64) -> Result<()> {
        sqlx::query("UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, last_status = $1, last_error = NULL, delivered_at = $2 WHERE id = $3")
            .bind(status)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a failed attempt; true when it gave up (after `max_attempts`).
    pub async fn delivery_failed(
        &self,
        d: &DueDelivery,
        status: Option<i64>,
        error: &str,
        now: i64,
        max_attempts: i64,
    ) -> Result<bool> {
        let attempts = d.attempts + 1;
        let give_up = attempts >= max_attempts;
        sqlx::query("UPDATE webhook_deliveries SET status = $1, attempts = $2, last_status = $3, last_error = $4, next_attempt_at = $5 WHERE id = $6")
            .bind(if give_up { "failed" } else { "pending" })
            .bind(attempts)
            .bind(status)
            .bind(error)
            .bind(now + retry_delay_ms(attempts))
            .bind(&d.id)
            .execute(&self.pool)
            .await?;
        Ok(give_up)
    }
}
