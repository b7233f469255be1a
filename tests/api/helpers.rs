//! The test harness: fixtures, `spawn_app`, typed request helpers and a synchronous queue drain.
pub use crate::fixtures::{fixture, onnxruntime_python, reference};
use reqwest::{multipart, Client, Response};
use serde_json::Value;
use shrink::app::Application;
use shrink::config::Settings;
use shrink::store::Db;
use shrink::worker::WorkerContext;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Which database and object store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// The embedded defaults: SQLite + local directory.
    Embedded,
    /// Production: PostgreSQL + an S3-compatible server (SeaweedFS from `scripts/test`).
    Production,
}

pub struct TestApp {
    pub address: String,
    /// Sends the first admin key (project `default`) with every request.
    pub client: Client,
    pub db: Db,
    pub worker: WorkerContext,
    pub settings: Settings,
    pub data_dir: tempfile::TempDir,
    stop_workers: watch::Sender<bool>,
    shutdown: Option<oneshot::Sender<()>>,
}

pub fn postgres_admin_url() -> String {
    std::env::var("SHRINK_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty PostgreSQL database and returns its URL.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Executor;
    let admin = postgres_admin_url();
    let name = format!("shrink_test_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432");
    pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

/// The bucket integration tests share; each test writes under its own key prefix.
pub const TEST_BUCKET: &str = "shrink-tests";

pub fn s3_endpoint() -> String {
    std::env::var("SHRINK_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8333".into())
}

/// Settings for a fresh app of the given setup (a new database and bucket each time).
pub async fn test_settings(setup: Setup) -> (Settings, tempfile::TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let mut s = Settings::for_data_dir(data_dir.path().to_path_buf());
    s.bind = "127.0.0.1:0".into();
    s.workers = 0;
    s.ort_auto_install = false;
    s.max_upload_bytes = 8 * 1024 * 1024;
    s.lease_secs = 5;
    s.poll_ms = 50;
    if setup == Setup::Production {
        std::env::set_var(
            "AWS_ACCESS_KEY_ID",
            std::env::var("SHRINK_TEST_S3_KEY").unwrap_or_else(|_| "testkey".into()),
        );
        std::env::set_var(
            "AWS_SECRET_ACCESS_KEY",
            std::env::var("SHRINK_TEST_S3_SECRET").unwrap_or_else(|_| "testsecret".into()),
        );
        s.database_url = Some(fresh_postgres_database().await);
        // One bucket for every test (each bucket costs the test server volumes), a prefix each.
        s.s3_bucket = Some(TEST_BUCKET.into());
        s.s3_prefix = format!("{}/", uuid::Uuid::new_v4().simple());
        s.s3_endpoint = Some(s3_endpoint());
        s.s3_create_bucket = true;
    }
    (s, data_dir)
}

pub async fn spawn_app(setup: Setup) -> TestApp {
    let (settings, data_dir) = test_settings(setup).await;
    spawn_with(settings, data_dir, 0).await
}

/// Starts the app with `workers` in-process worker slots (0: tests drain the queue themselves).
pub async fn spawn_with(
    settings: Settings,
    data_dir: tempfile::TempDir,
    workers: usize,
) -> TestApp {
    let app = Application::build(settings.clone(), true)
        .await
        .expect("the application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let admin_key = std::fs::read_to_string(settings.data_dir.join("admin.key"))
        .expect("the first start writes admin.key")
        .trim()
        .to_string();
    let db = app.state.db.clone();
    let worker = app.workers.clone();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(workers, async move {
        let _ = rx.await;
    }));
    let (stop_workers, _) = watch::channel(false);
    TestApp {
        address,
        client: client_with_key(Some(&admin_key)),
        db,
        worker,
        settings,
        data_dir,
        stop_workers,
        shutdown: Some(tx),
    }
}

/// A client that sends `key` as a bearer token (none: no Authorization header); no redirects.
pub fn client_with_key(key: Option<&str>) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = key {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {k}").parse().unwrap(),
        );
    }
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .unwrap()
}

/// POSTs `body` as JSON with `client` (any status).
pub async fn post_json(client: &Client, url: &str, body: &Value) -> Response {
    client.post(url).json(body).send().await.unwrap()
}

/// GETs `url` with `client` and returns the body as text (any status).
pub async fn get_text(client: &Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// GETs `url` with `client` and returns the body as JSON (any status).
pub async fn get_value(client: &Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn upload_raw(&self, path: &str, file: &Path, name: Option<&str>) -> Response {
        let bytes = tokio::fs::read(file).await.unwrap();
        let mut req = self
            .client
            .post(self.url(path))
            .header("content-type", "application/octet-stream")
            .body(bytes);
        if let Some(n) = name {
            req = req.query(&[("name", n)]);
        }
        req.send().await.unwrap()
    }

    /// Uploads a model fixture and returns its JSON (asserting 201).
    pub async fn model(&self, name: &str) -> Value {
        let r = self.upload_raw("/models", &fixture(name), Some(name)).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    pub async fn dataset(&self, name: &str) -> Value {
        let r = self
            .upload_raw("/datasets", &fixture(name), Some(name))
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    pub async fn post_job(&self, spec: &Value) -> Response {
        self.client
            .post(self.url("/jobs"))
            .json(spec)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_job_multipart(&self, spec: &Value, files: &[(&str, &str)]) -> Response {
        let mut form = multipart::Form::new().text("spec", spec.to_string());
        for (part, file) in files {
            let bytes = tokio::fs::read(fixture(file)).await.unwrap();
            form = form.part(
                part.to_string(),
                multipart::Part::bytes(bytes).file_name(file.to_string()),
            );
        }
        self.client
            .post(self.url("/jobs"))
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    /// GETs a path and returns the body bytes (asserting 200).
    pub async fn get_bytes(&self, path: &str) -> bytes::Bytes {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.bytes().await.unwrap()
    }

    /// POSTs a streamed octet-stream body.
    pub async fn post_stream(&self, path: &str, body: reqwest::Body) -> reqwest::Result<Response> {
        self.client
            .post(self.url(path))
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Runs queued jobs in this task until the queue is empty.
    pub async fn drain(&self) {
        let rx = self.stop_workers.subscribe();
        while self.worker.run_next(&rx).await.expect("claiming works") {}
    }

    /// Polls a job until it reaches a final status (for tests with live workers).
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (_, job) = self.get_json(&format!("/jobs/{id}")).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not finish in {timeout:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Uploads the two-input model and its dataset and queues a quick evaluate job; its id.
    pub async fn queue_evaluate_job(&self) -> String {
        let (m, d) = self.two_input().await;
        let spec = Self::evaluate_spec(&m, &d);
        let job: Value = self.post_job(&spec).await.json().await.unwrap();
        job["id"].as_str().unwrap().to_string()
    }

    /// Uploads the two-input model and its dataset; their ids.
    pub async fn two_input(&self) -> (String, String) {
        let m = self.model("two_input.onnx").await;
        let d = self.dataset("two_input.npz").await;
        let id = |v: &Value| v["id"].as_str().unwrap().to_string();
        (id(&m), id(&d))
    }

    /// A quick evaluate spec for the given ids.
    pub fn evaluate_spec(model_id: &str, dataset_id: &str) -> Value {
        serde_json::json!({
            "model_id": model_id,
            "dataset_id": dataset_id,
            "pipeline": [{"stage": "evaluate", "latency_runs": 5, "warmup_runs": 1}],
        })
    }
}

/// Asserts a 422 problem+json and returns the pointers of its invalid fields.
pub async fn problem_pointers(r: reqwest::Response) -> Vec<String> {
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap().to_string())
        .collect()
}

/// Files under a directory, recursively (to check that failed uploads leave nothing behind).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Downloads the artifact of `stage` (a report's stage) of job `id` and runs it in
/// onnxruntime-Python on the fixture `data`: the artifact's bytes and Python's result.
pub async fn stage_artifact_in_python(
    app: &TestApp,
    id: &str,
    stage: &Value,
    data: &str,
    output: &str,
) -> (bytes::Bytes, Value) {
    let name = stage["artifact"]
        .as_str()
        .unwrap_or_else(|| panic!("no artifact: {stage}"));
    let bytes = app.get_bytes(&format!("/jobs/{id}/artifacts/{name}")).await;
    let file = app.data_dir.path().join(name);
    std::fs::write(&file, &bytes).unwrap();
    let py = onnxruntime_python(&file, &fixture(data), output);
    (bytes, py)
}

/// Posts a job spec (202 expected), runs the queue dry, and returns the job id and its report.
pub async fn run_job(app: &TestApp, spec: Value) -> (String, Value) {
    let r = app.post_job(&spec).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let job: Value = r.json().await.unwrap();
    app.drain().await;
    let id = job["id"].as_str().unwrap().to_string();
    let (_, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    let (_, status) = app.get_json(&format!("/jobs/{id}")).await;
    assert!(report["stages"].is_array(), "{report} {status}");
    (id, report)
}

/// Top-1 accuracy of a report's metrics block.
pub fn top1(metrics: &Value) -> f64 {
    metrics["task"]["top1_accuracy"].as_f64().unwrap()
}
