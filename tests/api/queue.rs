//! Several `shrink worker` processes sharing one PostgreSQL queue and one bucket.
use crate::helpers::{s3_endpoint, spawn_app, Setup, TestApp};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn start_worker(app: &TestApp, id: &str, lease_secs: u64) -> Child {
    let dir = tempfile::tempdir().unwrap().keep();
    Command::new(env!("CARGO_BIN_EXE_shrink"))
        .arg("worker")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env(
            "SHRINK_DATABASE_URL",
            app.settings.database_url.as_ref().unwrap(),
        )
        .env("SHRINK_S3_BUCKET", app.settings.s3_bucket.as_ref().unwrap())
        .env("SHRINK_S3_ENDPOINT", s3_endpoint())
        .env("SHRINK_S3_PREFIX", &app.settings.s3_prefix)
        .env("SHRINK_DATA_DIR", dir)
        .env("SHRINK_WORKER_ID", id)
        .env("SHRINK_WORKERS", "1")
        .env("SHRINK_POLL_MS", "100")
        .env("SHRINK_LEASE_SECS", lease_secs.to_string())
        .env("SHRINK_ORT_AUTO_INSTALL", "false")
        .env("SHRINK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn runs(app: &TestApp, job_id: &str) -> Vec<(i64, String, Option<String>)> {
    app.db
        .list_runs(job_id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.attempt, r.worker_id, r.outcome))
        .collect()
}

#[tokio::test]
async fn fifty_jobs_over_two_worker_processes_each_run_exactly_once() {
    let app = spawn_app(Setup::Production).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate", "latency_runs": 2, "warmup_runs": 0}]});
    let mut ids = Vec::new();
    for _ in 0..50 {
        let job: Value = app.post_job(&spec).await.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    let _workers = Workers(vec![
        start_worker(&app, "worker-a", 10),
        start_worker(&app, "worker-b", 10),
    ]);
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let job = app.wait_final(id, Duration::from_secs(240)).await;
        assert_eq!(
            (job["status"].as_str(), job["attempt"].as_i64()),
            (Some("succeeded"), Some(1)),
            "{job}"
        );
        let r = runs(&app, id).await;
        assert_eq!(r.len(), 1, "job {id} ran more than once: {r:?}");
        assert_eq!(r[0].2.as_deref(), Some("succeeded"));
        *by_worker.entry(r[0].1.clone()).or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<usize>(), 50);
    assert_eq!(by_worker.len(), 2, "both workers took jobs: {by_worker:?}");
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_it_to_another_after_the_lease_expires() {
    let app = spawn_app(Setup::Production).await;
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate", "latency_runs": 1500, "warmup_runs": 0}]});
    let job: Value = app.post_job(&spec).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let mut first = start_worker(&app, "doomed", 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
        if j["status"] == "running" && j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first worker never started the job: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap(); // SIGKILL: no chance to hand the job back
    first.wait().unwrap();
    let _second = Workers(vec![start_worker(&app, "survivor", 2)]);
    let job = app.wait_final(id, Duration::from_secs(180)).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{job}"
    );
    let r = runs(&app, id).await;
    assert_eq!(
        r,
        vec![
            (1, "doomed".into(), Some("lease_expired".into())),
            (2, "survivor".into(), Some("succeeded".into()))
        ]
    );
    let (status, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    assert_eq!(status, 200);
    assert!(report["final"]["task"]["top1_accuracy"].as_f64().is_some());
}

#[tokio::test]
async fn a_worker_stopped_with_sigterm_hands_its_job_back() {
    let app = spawn_app(Setup::Production).await;
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate", "latency_runs": 20000, "warmup_runs": 0}]});
    let job: Value = app.post_job(&spec).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let mut worker = start_worker(&app, "leaving", 30);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
        if j["status"] == "running" && j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never started the job: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "the worker exits cleanly on SIGTERM");
    let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(
        (j["status"].as_str(), j["attempt"].as_i64()),
        (Some("queued"), Some(0)),
        "handed back without using an attempt: {j}"
    );
    assert_eq!(runs(&app, id).await[0].2.as_deref(), Some("handed_back"));
}
