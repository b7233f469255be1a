//! Webhook delivery: materialises one delivery per (endpoint, ended job) in the database outbox,
//! then POSTs due deliveries signed as Standard Webhooks says, retrying with backoff (across
//! restarts: the outbox is the state). Runs in every `serve`; `SKIP LOCKED` shares the work.
use crate::blob::BlobStore;
use crate::domain::webhook::{secret_bytes, WebhookEvent};
use crate::metrics::SharedMetrics;
use crate::store::webhooks::{DueDelivery, Ending};
use crate::store::{now_ms, Db};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the delivery loop needs.
#[derive(Clone)]
pub struct Deliverer {
    pub db: Db,
    pub blobs: Arc<dyn BlobStore>,
    pub metrics: SharedMetrics,
    pub allow_private: bool,
    pub poll: Duration,
    pub max_attempts: i64,
}

/// Whether `ip` is one a tenant must not make the server call: loopback, private, link-local,
/// unspecified, broadcast, carrier-grade NAT, unique-local IPv6 (and such addresses mapped to IPv6).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a target URL: http(s), a host that resolves, and (unless allowed) only public addresses.
pub async fn check_target(url: &str, allow_private: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("only http and https URLs can receive webhooks".into());
    }
    let host = parsed.host_str().ok_or("the URL has no host")?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("`{host}` does not resolve: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("`{host}` does not resolve"));
    }
    if !allow_private {
        if let Some(a) = addrs.iter().find(|a| is_internal(a.ip())) {
            return Err(format!(
                "`{host}` is {}, a loopback, private or link-local address; the operator allows those with SHRINK_WEBHOOK_ALLOW_PRIVATE",
                a.ip()
            ));
        }
    }
    Ok(())
}

/// The Standard Webhooks signature header value for `body`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = secret_bytes(secret)?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// A new `whsec_` secret (24 random bytes).
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Runs until `stop` turns true.
pub async fn run(d: Deliverer, mut stop: watch::Receiver<bool>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook deliveries are off: no HTTP client");
            return;
        }
    };
    while !*stop.borrow() {
        if let Err(e) = tick(&d, &http).await {
            tracing::warn!(error = %e, "webhook delivery round failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(d.poll) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn tick(d: &Deliverer, http: &reqwest::Client) -> anyhow::Result<()> {
    for ending in d.db.undelivered_endings(100).await? {
        let Some(event) = WebhookEvent::for_status(&ending.status) else {
            continue;
        };
        let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        let payload = payload(d, &ending, event).await;
        d.db.insert_delivery(&id, &ending, event, &payload, now_ms())
            .await?;
    }
    let now = now_ms();
    for due in d.db.claim_due_deliveries(now, now + 60_000, 20).await? {
        deliver(d, http, &due).await?;
    }
    Ok(())
}

async fn payload(d: &Deliverer, e: &Ending, event: WebhookEvent) -> String {
    // The verdicts come from the report; a report that cannot be read leaves them out.
    let mut verdicts = serde_json::Value::Null;
    if let Some(key) = &e.report_key {
        if let Ok(blob) = d.blobs.get_stream(key).await {
            use futures::TryStreamExt;
            if let Ok(chunks) = blob.body.try_collect::<Vec<_>>().await {
                let bytes: Vec<u8> = chunks.concat();
                if let Ok(report) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                    verdicts = report["verdicts"].clone();
                }
            }
        }
    }
    json!({
        "type": event.as_str(),
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "data": {
            "job_id": e.job_id,
            "project": e.project,
            "status": e.status,
            "passed": e.passed.map(|p| p != 0),
            "verdicts": verdicts,
            "report_url": format!("/jobs/{}/report", e.job_id),
        }
    })
    .to_string()
}

async fn deliver(d: &Deliverer, http: &reqwest::Client, due: &DueDelivery) -> anyhow::Result<()> {
    let now = now_ms();
    let fail = |status: Option<i64>, error: String| async move {
        let gave_up =
            d.db.delivery_failed(due, status, &error, now_ms(), d.max_attempts)
                .await?;
        d.metrics
            .webhook_delivery(if gave_up { "failed" } else { "retrying" });
        tracing::info!(delivery = %due.id, error, gave_up, "webhook delivery failed");
        anyhow::Ok(())
    };
    // Checked again at delivery: a name can resolve elsewhere than when it was registered.
    if let Err(e) = check_target(&due.url, d.allow_private).await {
        return fail(None, format!("refused: {e}")).await;
    }
    let timestamp = now / 1000;
    let Some(signature) = sign(&due.secret, &due.id, timestamp, &due.payload) else {
        return fail(None, "the endpoint's secret is unusable".into()).await;
    };
    let sent = http
        .post(&due.url)
        .header("content-type", "application/json")
        .header("webhook-id", &due.id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(due.payload.clone())
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => {
            d.db.delivery_succeeded(&due.id, r.status().as_u16() as i64, now_ms())
                .await?;
            d.metrics.webhook_delivery("delivered");
            Ok(())
        }
        Ok(r) => {
            fail(
                Some(r.status().as_u16() as i64),
                format!("the endpoint answered {}", r.status()),
            )
            .await
        }
        Err(e) => fail(None, e.to_string()).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.9",
            "172.16.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
