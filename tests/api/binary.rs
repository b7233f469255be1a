//! The real `shrink` binary: first start on an empty database, JSON logs, `shrink admin`, a
//! restart, `/metrics`, and clients that only know the committed OpenAPI document (a generated
//! Python client, schemathesis).
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Server {
    /// Starts `shrink serve` on a free port with the data directory and extra environment.
    pub async fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = data_dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
        cmd.arg("serve")
            .env("SHRINK_DATA_DIR", data_dir)
            .env("SHRINK_BIND", format!("127.0.0.1:{port}"))
            .env("SHRINK_ORT_AUTO_INSTALL", "false")
            .env("SHRINK_WORKERS", "0")
            .env("SHRINK_POLL_MS", "100")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the shrink binary starts");
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let client = client_with_key(None);
        for _ in 0..300 {
            if let Ok(r) = client.get(server.url("/healthz")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "shrink serve did not answer: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `shrink admin …` against the data directory's database: (status, stdout, stderr).
fn admin(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .arg("admin")
        .args(args)
        .env("SHRINK_DATA_DIR", data_dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_first_start_writes_an_admin_key_and_shrink_admin_manages_keys_offline() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[("SHRINK_LOG_FORMAT", "json")]).await;
    let key_file = dir.path().join("admin.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin.key is readable by others");
    let admin_key = server.admin_key();
    assert!(admin_key.starts_with("shrk_"), "{admin_key}");

    // Every log line is a JSON object; one says where the key is (never the key itself).
    let log = std::fs::read_to_string(&server.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    assert!(
        lines
            .iter()
            .any(|l| l["path"] == key_file.display().to_string()
                && l["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("admin API key")),
        "{log}"
    );
    assert!(!log.contains(&admin_key), "the log holds the secret");

    let admin_client = client_with_key(Some(&admin_key));
    let me: Value = get_value(&admin_client, &server.url("/me")).await;
    assert_eq!(me["role"], "admin");
    assert_eq!(me["project"], "default");
    let r = client_with_key(None)
        .get(server.url("/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The CLI finds the key: SHRINK_API_KEY first, else a local server's admin.key.
    let whoami = |key: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
        cmd.args(["whoami", "--server", &server.url])
            .env("SHRINK_DATA_DIR", dir.path())
            .env_remove("SHRINK_API_KEY");
        if let Some(k) = key {
            cmd.env("SHRINK_API_KEY", k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = whoami(None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("project default · role admin"), "{out}");
    let (code, out) = whoami(Some("shrk_not_a_key"));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("401") && out.contains("unknown or revoked"),
        "{out}"
    );

    // `shrink admin` against the same database while the server runs.
    let (code, out, err) = admin(
        dir.path(),
        &["project", "create", "vision", "--max-queued-jobs", "5"],
    );
    assert_eq!(code, 0, "{err}");
    let project: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(project["quotas"]["max_queued_jobs"], 5);
    let (code, secret, err) = admin(
        dir.path(),
        &[
            "key",
            "create",
            "--project",
            "vision",
            "--role",
            "viewer",
            "--name",
            "dashboard",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let secret = secret.trim().to_string();
    let details: Value = serde_json::from_str(&err).unwrap();
    let viewer = client_with_key(Some(&secret));
    let me: Value = get_value(&viewer, &server.url("/me")).await;
    assert_eq!(
        (me["project"].as_str(), me["role"].as_str()),
        (Some("vision"), Some("viewer"))
    );
    let r = viewer
        .post(server.url("/models"))
        .header("content-type", "application/octet-stream")
        .body(std::fs::read(fixture("two_input.onnx")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let (code, out, _) = admin(dir.path(), &["key", "list", "--project", "vision"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&secret) && out.contains(details["id"].as_str().unwrap()));
    let (code, _, err) = admin(
        dir.path(),
        &[
            "key",
            "revoke",
            "--project",
            "vision",
            details["id"].as_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        viewer.get(server.url("/me")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Mistakes are clear and change nothing.
    let (code, _, err) = admin(
        dir.path(),
        &[
            "key",
            "create",
            "--project",
            "nope",
            "--role",
            "member",
            "--name",
            "x",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("project `nope` does not exist"), "{err}");
    let (code, _, err) = admin(
        dir.path(),
        &[
            "key",
            "create",
            "--project",
            "vision",
            "--role",
            "owner",
            "--name",
            "x",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("--role must be admin, member or viewer"),
        "{err}"
    );
    let (code, _, err) = admin(dir.path(), &["project", "create", "Not Valid"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a project id"), "{err}");

    // A restart keeps the key: the file is written only on a database without keys.
    server.stop();
    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(server.admin_key(), admin_key);
    let r = client_with_key(Some(&admin_key))
        .get(server.url("/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let projects: Value = r.json().await.unwrap();
    assert_eq!(projects.as_array().unwrap().len(), 2, "{projects}");
}

/// Runs a Python script of `scripts/` with the project's environment; panics with its output on failure.
fn python(script: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts").join(script))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

#[tokio::test]
async fn a_client_generated_from_the_committed_document_runs_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("SHRINK_WORKERS", "1")]).await;
    let out = python(
        "check_generated_client.py",
        &[
            "--url",
            &server.url,
            "--key",
            &server.admin_key(),
            "--model",
            fixture("digits_mlp.onnx").to_str().unwrap(),
            "--dataset",
            fixture("digits_val.npz").to_str().unwrap(),
            "--work",
            dir.path().join("client").to_str().unwrap(),
        ],
    );
    assert!(out.contains("job succeeded"), "{out}");

    // /metrics counts what the client did, parsed as Prometheus text.
    let text = get_text(&client_with_key(None), &server.url("/metrics")).await;
    // Parsed by prometheus_client's strict OpenMetrics parser (scripts/parse_metrics.py).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut parser = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        parser
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = parser.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not valid OpenMetrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        samples
            .iter()
            .filter(|s| s["name"] == name)
            .filter(|s| label.is_none_or(|(k, v)| s["labels"][k] == v))
            .map(|s| s["value"].as_f64().unwrap())
            .sum()
    };
    // The client ran two jobs (one JSON, one multipart) and replayed one idempotently.
    assert_eq!(
        value("shrink_jobs", Some(("status", "succeeded"))),
        2.0,
        "{text}"
    );
    assert_eq!(
        value("shrink_jobs", Some(("status", "failed"))),
        0.0,
        "{text}"
    );
    assert_eq!(value("shrink_jobs_created_total", None), 2.0, "{text}");
    assert_eq!(
        value("shrink_jobs_finished_total", Some(("outcome", "succeeded"))),
        2.0,
        "{text}"
    );
    assert_eq!(value("shrink_queue_depth", None), 0.0, "{text}");
    assert!(
        value("shrink_job_duration_seconds_count", None) >= 2.0,
        "{text}"
    );
    assert!(
        value(
            "shrink_stage_duration_seconds_count",
            Some(("stage", "baseline"))
        ) >= 2.0,
        "{text}"
    );
    assert!(value("shrink_uploaded_bytes_total", Some(("kind", "model"))) > 0.0);
    assert!(value("shrink_stored_bytes", Some(("project", "default"))) > 0.0);
    assert!(
        value("shrink_http_requests_total", Some(("route", "/jobs/{id}"))) >= 1.0,
        "{text}"
    );
    assert!(
        !text.contains("route=\"/jobs/0"),
        "raw ids in route labels:\n{text}"
    );
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            ("SHRINK_RATE_LIMIT_PER_SECOND", "0"),
            ("SHRINK_WORKERS", "1"),
        ],
    )
    .await;
    // Seeded with a real model, dataset and finished job, so reads reach real reports and files.
    let out = python(
        "check_openapi_conformance.py",
        &[
            "--url",
            &server.url,
            "--key",
            &server.admin_key(),
            "--model",
            fixture("digits_mlp.onnx").to_str().unwrap(),
            "--dataset",
            fixture("digits_val.npz").to_str().unwrap(),
        ],
    );
    assert!(out.contains("conformance: ok"), "{out}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        !log.contains("request failed"),
        "the server logged internal errors:\n{log}"
    );
}

#[tokio::test]
async fn a_worker_process_runs_jobs_and_serves_its_own_metrics_and_no_api() {
    let dir = tempfile::tempdir().unwrap();
    // An API process without workers and a worker process, sharing the SQLite file and blobs.
    let api = Server::start(dir.path(), &[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .arg("worker")
        .env("SHRINK_DATA_DIR", dir.path())
        .env("SHRINK_METRICS_BIND", format!("127.0.0.1:{port}"))
        .env("SHRINK_ORT_AUTO_INSTALL", "false")
        .env("SHRINK_POLL_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = client_with_key(Some(&api.admin_key()));
    let upload = |path: &'static str, file: &'static str| {
        let client = client.clone();
        let url = api.url(path);
        async move {
            let r = client
                .post(url)
                .header("content-type", "application/octet-stream")
                .body(std::fs::read(fixture(file)).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let m = upload("/models", "two_input.onnx").await;
    let d = upload("/datasets", "two_input.npz").await;
    let r = post_json(&client, &api.url("/jobs"), &TestApp::evaluate_spec(&m, &d)).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut status = Value::Null;
    for _ in 0..600 {
        let job: Value = get_value(&client, &api.url(&format!("/jobs/{id}"))).await;
        status = job["status"].clone();
        if status == "succeeded" || status == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://127.0.0.1:{port}");
    let anyone = client_with_key(None);
    let text = anyone
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let health = anyone
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap()
        .status();
    let no_api = anyone
        .get(format!("{url}/models"))
        .send()
        .await
        .unwrap()
        .status();
    unsafe {
        libc::kill(worker.id() as i32, libc::SIGTERM);
    }
    let _ = worker.wait();
    assert_eq!(status, "succeeded");
    // The worker's own counters and histograms; the database's gauges are the API's to report.
    assert!(
        text.contains("shrink_jobs_finished_total{outcome=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shrink_job_duration_seconds_count{outcome=\"succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shrink_stage_duration_seconds_count{stage=\"baseline\"} 1"),
        "{text}"
    );
    assert!(!text.contains("shrink_queue_depth"), "{text}");
    assert_eq!(health, 200);
    assert_eq!(no_api, 404, "a worker serves no API");
}
