//! Webhooks: one signed delivery per ended job, private targets refused, and deliveries that
//! wait for a receiver that is down — also across a restart of the server.
use crate::binary::Server;
use crate::helpers::*;
use axum::routing::post;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Received = Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// A receiver on `listener` that records every request and answers 204.
fn receive(listener: tokio::net::TcpListener) -> Received {
    let got: Received = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push((headers, body));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    got
}

/// Checks a delivery's Standard Webhooks signature with the endpoint's secret.
fn verify(secret: &str, headers: &axum::http::HeaderMap, body: &str) {
    let header = |n: &str| headers[n].to_str().unwrap().to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(
        format!(
            "{}.{}.{body}",
            header("webhook-id"),
            header("webhook-timestamp")
        )
        .as_bytes(),
    );
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(header("webhook-signature"), expected, "bad signature");
    let age = chrono::Utc::now().timestamp() - header("webhook-timestamp").parse::<i64>().unwrap();
    assert!((0..120).contains(&age), "timestamp {age} s old");
}

async fn wait_for(got: &Received, n: usize) {
    for _ in 0..600 {
        if got.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} deliveries, expected {n}", got.lock().unwrap().len());
}

#[tokio::test]
async fn loopback_and_private_targets_are_refused_unless_the_operator_allows_them() {
    let app = spawn_app(Setup::Embedded).await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.7/hook",
        "http://[::1]:8080/x",
        "http://169.254.169.254/latest",
    ] {
        let r = post_json(&app.client, &app.url("/webhooks"), &json!({"url": url})).await;
        let pointers = problem_pointers(r).await;
        assert_eq!(pointers, ["/url"], "{url}");
    }
    let r = post_json(
        &app.client,
        &app.url("/webhooks"),
        &json!({"url": "ftp://example.com/x", "events": []}),
    )
    .await;
    assert_eq!(problem_pointers(r).await, ["/url", "/events"]);
    let (_, hooks) = app.get_json("/webhooks").await;
    assert_eq!(hooks, json!([]));
}

#[tokio::test]
async fn each_ended_job_is_delivered_once_signed() {
    let (mut settings, dir) = test_settings(Setup::Production).await;
    settings.webhook_allow_private = true;
    settings.webhook_poll_ms = 50;
    let app = spawn_with(settings, dir, 0).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = receive(listener);
    let r = post_json(&app.client, &app.url("/webhooks"), &json!({"url": url})).await;
    assert_eq!(r.status(), 201);
    let hook: Value = r.json().await.unwrap();
    let secret = hook["secret"].as_str().unwrap().to_string();
    let (_, listed) = app.get_json("/webhooks").await;
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is listed"
    );

    let (m, d) = app.two_input().await;
    let (succeeded, _) = run_job(&app, TestApp::evaluate_spec(&m, &d)).await;
    let r = app.post_job(&TestApp::evaluate_spec(&m, &d)).await;
    let cancelled = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = app
        .client
        .post(app.url(&format!("/jobs/{cancelled}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    wait_for(&got, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = got.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "exactly one delivery per job");
    let mut events = Vec::new();
    for (headers, body) in &received {
        verify(&secret, headers, body);
        let payload: Value = serde_json::from_str(body).unwrap();
        events.push((
            payload["type"].as_str().unwrap().to_string(),
            payload["data"]["job_id"].as_str().unwrap().to_string(),
        ));
        if payload["type"] == "job.succeeded" {
            assert_eq!(payload["data"]["passed"], true, "{payload}");
            assert!(payload["data"]["verdicts"].is_array(), "{payload}");
            assert_eq!(
                payload["data"]["report_url"],
                format!("/jobs/{succeeded}/report")
            );
        }
    }
    events.sort();
    let mut expected = vec![
        ("job.cancelled".to_string(), cancelled),
        ("job.succeeded".to_string(), succeeded),
    ];
    expected.sort();
    assert_eq!(events, expected);
    let (_, deliveries) = app
        .get_json(&format!(
            "/webhooks/{}/deliveries",
            hook["id"].as_str().unwrap()
        ))
        .await;
    let deliveries = deliveries.as_array().unwrap();
    assert_eq!(deliveries.len(), 2);
    assert!(
        deliveries
            .iter()
            .all(|d| d["status"] == "delivered" && d["attempts"] == 1 && d["last_status"] == 204),
        "{deliveries:?}"
    );
    let ids: Vec<&str> = received
        .iter()
        .map(|(h, _)| h["webhook-id"].to_str().unwrap())
        .collect();
    assert!(deliveries
        .iter()
        .all(|d| ids.contains(&d["id"].as_str().unwrap())));
}

#[tokio::test]
async fn a_delivery_waits_for_a_receiver_that_is_down_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHRINK_WORKERS", "1"),
        ("SHRINK_WEBHOOK_ALLOW_PRIVATE", "true"),
        ("SHRINK_WEBHOOK_POLL_MS", "100"),
    ];
    let mut server = Server::start(dir.path(), &env).await;
    let key = server.admin_key();
    let client = client_with_key(Some(&key));
    // The receiver's port, with nothing listening yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = post_json(
        &client,
        &server.url("/webhooks"),
        &json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["job.succeeded"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let hook: Value = r.json().await.unwrap();
    let (hook_id, secret) = (
        hook["id"].as_str().unwrap().to_string(),
        hook["secret"].as_str().unwrap().to_string(),
    );
    let upload = |path: &'static str, file: &'static str| {
        let (client, url) = (client.clone(), server.url(path));
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/octet-stream")
                .body(std::fs::read(fixture(file)).unwrap())
                .send()
                .await
                .unwrap();
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let m = upload("/models", "two_input.onnx").await;
    let d = upload("/datasets", "two_input.npz").await;
    let job = post_json(
        &client,
        &server.url("/jobs"),
        &TestApp::evaluate_spec(&m, &d),
    )
    .await
    .json::<Value>()
    .await
    .unwrap();
    let job_id = job["id"].as_str().unwrap().to_string();
    // The first attempt fails: nothing listens.
    let mut first = Value::Null;
    for _ in 0..300 {
        first = get_value(
            &client,
            &server.url(&format!("/webhooks/{hook_id}/deliveries")),
        )
        .await;
        if first[0]["attempts"].as_i64().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(first[0]["status"], "pending", "{first}");
    assert!(first[0]["last_error"].is_string(), "{first}");

    // Restart the server, then bring the receiver up: the outbox survives, the retry arrives.
    server.stop();
    let server = Server::start(dir.path(), &env).await;
    let got = receive(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    wait_for(&got, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = got.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    verify(&secret, &received[0].0, &received[0].1);
    let payload: Value = serde_json::from_str(&received[0].1).unwrap();
    assert_eq!(payload["data"]["job_id"], job_id);
    assert_eq!(
        received[0].0["webhook-id"].to_str().unwrap(),
        first[0]["id"].as_str().unwrap(),
        "a retry keeps its id"
    );
    let after = get_value(
        &client,
        &server.url(&format!("/webhooks/{hook_id}/deliveries")),
    )
    .await;
    assert_eq!(after[0]["status"], "delivered", "{after}");
    assert_eq!(after[0]["attempts"], 2, "{after}");
    // /metrics counts the delivery by outcome.
    let metrics = get_text(&client_with_key(None), &server.url("/metrics")).await;
    assert!(
        metrics.contains("shrink_webhook_deliveries_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
}
