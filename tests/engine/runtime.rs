//! Without the ONNX Runtime library the service still starts, says why at start-up and in
//! `/readyz`, and jobs fail with a clear, typed error — never a silent fallback.
use crate::fixtures::fixture;
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn without_onnx_runtime_readyz_says_why_and_jobs_fail_clearly() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .arg("serve")
        .env("SHRINK_BIND", format!("127.0.0.1:{port}"))
        .env("SHRINK_DATA_DIR", dir.path())
        .env(
            "SHRINK_ORT_LIBRARY",
            "/nonexistent/libonnxruntime.so.1.32.0",
        )
        .env("SHRINK_ORT_AUTO_INSTALL", "false")
        .env("SHRINK_MAX_ATTEMPTS", "1")
        .env("SHRINK_POLL_MS", "50")
        .env_remove("SHRINK_DATABASE_URL")
        .env_remove("SHRINK_S3_BUCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if reqwest::get(format!("{url}/healthz")).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the service starts even without ONNX Runtime");
    // The first start wrote an admin key; every API call sends it.
    let key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", key.trim()).parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();

    let r = client.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let ready: Value = r.json().await.unwrap();
    assert_eq!(
        (ready["database"].as_str(), ready["object_store"].as_str()),
        (Some("ok"), Some("ok"))
    );
    assert!(
        ready["onnxruntime"]
            .as_str()
            .unwrap()
            .contains("/nonexistent"),
        "{ready}"
    );

    let upload = |path: &str, file: &str| {
        let body = std::fs::read(fixture(file)).unwrap();
        client
            .post(format!("{url}{path}"))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
    };
    let upload_json = |path, file| async move {
        upload(path, file)
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let m = upload_json("/models", "two_input.onnx").await;
    let d = upload_json("/datasets", "two_input.npz").await;
    let spec =
        json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate"}]});
    let job: Value = client
        .post(format!("{url}/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let mut last = Value::Null;
    for _ in 0..200 {
        last = client
            .get(format!("{url}/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if last["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["status"], "failed", "{last}");
    assert_eq!(last["error"]["type"], "runtime_unavailable");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ONNX Runtime is unavailable"),
        "{last}"
    );

    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("ONNX Runtime is unavailable"),
        "the start-up log says so: {log}"
    );
}
