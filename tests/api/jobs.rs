//! Creating jobs, validation, idempotency, cancellation, events, reports and artifacts.
use crate::helpers::{
    files_under, fixture, onnxruntime_python, problem_pointers, reference, spawn_app, spawn_with,
    test_settings, Setup, TestApp,
};
use serde_json::{json, Value};
use std::time::Duration;

/// Runs an evaluate-only job on the digits MLP and checks the report against onnxruntime-Python.
pub async fn evaluate_job_matches_onnxruntime_python(setup: Setup) {
    let app = spawn_app(setup).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let mut spec = TestApp::evaluate_spec(m["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    spec["constraints"] =
        json!({"max_accuracy_drop": 0.0, "min_fidelity": 1.0, "max_size_bytes": 1_000_000});
    let r = app.post_job(&spec).await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("location"));
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["status"], "queued");
    let id = job["id"].as_str().unwrap().to_string();
    app.drain().await;

    let (_, job) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        (
            job["progress"].as_f64(),
            job["attempt"].as_i64(),
            job["passed"].as_bool()
        ),
        (Some(1.0), Some(1), Some(true))
    );

    let (status, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    assert_eq!(status, 200);
    let want = &reference()["digits_mlp"];
    for m in [
        &report["baseline"],
        &report["final"],
        &report["stages"][0]["metrics"],
    ] {
        let task = &m["task"];
        assert_eq!(task["output"], "probabilities");
        assert_eq!(
            task["top1_accuracy"].as_f64(),
            want["top1"].as_f64(),
            "accuracy must equal onnxruntime-Python's exactly"
        );
        assert_eq!(task["top5_accuracy"].as_f64(), want["top5"].as_f64());
        assert!(
            (task["macro_f1"].as_f64().unwrap() - want["macro_f1"].as_f64().unwrap()).abs() < 1e-12
        );
        assert_eq!(
            (task["samples"].as_u64(), task["classes"].as_u64()),
            (Some(450), Some(10))
        );
        let size = &m["size"];
        assert_eq!(
            size["bytes"].as_u64(),
            Some(std::fs::metadata(fixture("digits_mlp.onnx")).unwrap().len())
        );
        assert!(size["zstd_bytes"].as_u64().unwrap() < size["bytes"].as_u64().unwrap());
        assert!(
            size["nonzero_parameters"].as_u64().unwrap() <= size["parameters"].as_u64().unwrap()
        );
        assert_eq!(size["compression_ratio"].as_f64(), Some(1.0));
        for stats in [&m["latency"]["batch_1"], &m["latency"]["batch_n"]] {
            let (p50, p95, p99) = (
                stats["p50_ms"].as_f64().unwrap(),
                stats["p95_ms"].as_f64().unwrap(),
                stats["p99_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{stats}");
            assert_eq!(stats["runs"], 5);
            assert!(stats["throughput_per_s"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(m["latency"]["batch_n"]["batch_size"], 32);
        assert_eq!(m["latency"]["intra_op_threads"], 1);
        // Growth of the process's resident set while a 200 KB model loads and runs: at least
        // what loading alone added, and nowhere near a gigabyte.
        let peak = m["memory"]["peak_rss_growth_bytes"].as_u64().unwrap();
        assert!(peak >= m["memory"]["load_rss_growth_bytes"].as_u64().unwrap());
        assert!(peak < 1 << 30, "peak RSS growth {peak} bytes");
        assert_eq!(
            m["memory"]["scope"], "process",
            "the figure says what it covers"
        );
        let fid = m["fidelity"].as_array().unwrap();
        assert_eq!(fid.len(), 2, "one fidelity entry per output");
        for f in fid {
            assert_eq!(
                (f["top1_agreement"].as_f64(), f["max_abs_error"].as_f64()),
                (Some(1.0), Some(0.0))
            );
        }
    }
    assert_eq!(report["deltas"]["accuracy_drop"].as_f64(), Some(0.0));
    assert_eq!(report["verdicts"].as_array().unwrap().len(), 3);
    assert!(
        report["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["passed"] == true),
        "{}",
        report["verdicts"]
    );
    let env = &report["environment"];
    assert_eq!(env["onnxruntime_version"], "1.32.0");
    assert_eq!(env["model_sha256"], m["sha256"]);
    assert_eq!(env["dataset_sha256"], d["sha256"]);
    assert_eq!(env["spec_sha256"].as_str().unwrap().len(), 64);

    let (_, artifacts) = app.get_json(&format!("/jobs/{id}/artifacts")).await;
    let names: Vec<&str> = artifacts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for want in ["model.onnx", "report.json", "job.log"] {
        assert!(names.contains(&want), "{names:?}");
    }
    let model = app
        .client
        .get(app.url(&format!("/jobs/{id}/artifacts/model.onnx")))
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), 200);
    assert_eq!(
        model.bytes().await.unwrap().to_vec(),
        std::fs::read(fixture("digits_mlp.onnx")).unwrap()
    );
    let log = app
        .client
        .get(app.url(&format!("/jobs/{id}/artifacts/job.log")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("baseline") && log.contains("[PASS] max_accuracy_drop"),
        "{log}"
    );
}

#[tokio::test]
async fn an_evaluate_job_reports_what_onnxruntime_python_computes_embedded() {
    evaluate_job_matches_onnxruntime_python(Setup::Embedded).await;
}

#[tokio::test]
async fn an_evaluate_job_reports_what_onnxruntime_python_computes_on_postgres_and_s3() {
    evaluate_job_matches_onnxruntime_python(Setup::Production).await;
}

#[tokio::test]
async fn each_class_of_spec_error_is_a_422_with_its_pointer() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let (mid, did) = (m["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    let missing = uuid::Uuid::now_v7().to_string();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "evaluate"}], "colour": 1}),
            "/colour",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "evaluate", "batch_size": 0}]}),
            "/pipeline/0/batch_size",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "evaluate", "speed": "max"}]}),
            "/pipeline/0/speed",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "squash"}]}),
            "/pipeline/0/stage",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "prune", "method": "n_m", "n": 4, "m": 4}]}),
            "/pipeline/0/n",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "prune", "finetune": {"epochs": 3}}]}),
            "/train_dataset_id",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "evaluate"}], "constraints": {"max_accuracy_drop": 2}}),
            "/constraints/max_accuracy_drop",
        ),
        (
            json!({"model_id": missing, "dataset_id": did, "pipeline": [{"stage": "evaluate"}]}),
            "/model_id",
        ),
        (
            json!({"model_id": mid, "dataset_id": mid, "pipeline": [{"stage": "evaluate"}]}),
            "/dataset_id",
        ),
        (
            json!({"model_id": mid, "pipeline": [{"stage": "evaluate"}]}),
            "/dataset_id",
        ),
        (
            json!({"model_id": mid, "dataset_id": did, "pipeline": [{"stage": "evaluate", "output": "logits"}]}),
            "/pipeline/0/output",
        ),
        (json!({"model_id": mid, "dataset_id": did}), "/pipeline"),
        (json!([1, 2]), ""),
    ];
    for (spec, pointer) in cases {
        let got = problem_pointers(app.post_job(&spec).await).await;
        assert!(
            got.contains(&pointer.to_string()),
            "{spec}: wanted {pointer}, got {got:?}"
        );
    }
    // Several problems at once are all reported.
    let got = problem_pointers(
        app.post_job(
            &json!({"model_id": 3, "pipeline": [{"stage": "evaluate", "threads": 0}], "seed": "x"}),
        )
        .await,
    )
    .await;
    for p in ["/model_id", "/dataset_id", "/pipeline/0/threads", "/seed"] {
        assert!(got.contains(&p.to_string()), "{got:?}");
    }
    let r = app
        .client
        .post(app.url("/jobs"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(problem_pointers(r).await, vec![String::new()]);
    let (_, jobs) = app.get_json("/jobs").await;
    assert_eq!(
        jobs["items"].as_array().unwrap().len(),
        0,
        "nothing may be queued by an invalid request"
    );
}

#[tokio::test]
async fn a_dataset_that_does_not_fit_the_model_is_refused_naming_the_tensor() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    for (file, needle) in [
        ("bad/wrong_dtype.npz", "float64"),
        ("bad/wrong_name.npz", "needs input `input`"),
        ("bad/wrong_width.npz", "axis 1"),
        ("bad/wrong_rank.npz", "rank 2"),
        ("bad/float_labels.npz", "integer class ids"),
    ] {
        let d = app.dataset(file).await;
        let r = app
            .post_job(&TestApp::evaluate_spec(
                m["id"].as_str().unwrap(),
                d["id"].as_str().unwrap(),
            ))
            .await;
        assert_eq!(r.status(), 422);
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["errors"][0]["pointer"], "/dataset_id", "{file}");
        assert!(
            p["errors"][0]["detail"].as_str().unwrap().contains(needle),
            "{file}: {p}"
        );
    }
}

#[tokio::test]
async fn the_same_idempotency_key_and_body_return_the_same_job() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let spec = TestApp::evaluate_spec(m["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    let post = |body: Value| {
        app.client
            .post(app.url("/jobs"))
            .header("idempotency-key", "ci-run-42")
            .json(&body)
            .send()
    };
    let a: Value = post(spec.clone()).await.unwrap().json().await.unwrap();
    let b = post(spec.clone()).await.unwrap();
    assert_eq!(b.status(), 202);
    let b: Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let mut other = spec.clone();
    other["seed"] = json!(7);
    let c = post(other).await.unwrap();
    assert_eq!(c.status(), 409);
    let (_, jobs) = app.get_json("/jobs").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_multipart_job_stores_its_files_as_models_and_datasets() {
    let app = spawn_app(Setup::Embedded).await;
    let spec = json!({"pipeline": [{"stage": "evaluate", "latency_runs": 3}], "labels": {"team": "vision"}});
    let r = app
        .post_job_multipart(
            &spec,
            &[("model", "digits_mlp.onnx"), ("dataset", "digits_val.npz")],
        )
        .await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["labels"]["team"], "vision");
    let model_id = job["spec"]["model_id"].as_str().unwrap();
    let (status, model) = app.get_json(&format!("/models/{model_id}")).await;
    assert_eq!(
        (status, model["name"].as_str()),
        (200, Some("digits_mlp.onnx"))
    );
    app.drain().await;
    let (_, job) = app
        .get_json(&format!("/jobs/{}", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(job["status"], "succeeded");

    // A bad file part is named by its part; nothing is stored.
    let r = app
        .post_job_multipart(
            &spec,
            &[("model", "bad/garbage.onnx"), ("dataset", "digits_val.npz")],
        )
        .await;
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["errors"][0]["pointer"], "/model");
    let r = app
        .post_job_multipart(
            &spec,
            &[("model", "digits_mlp.onnx"), ("weights", "digits_val.npz")],
        )
        .await;
    assert_eq!(r.status(), 422);
    let (_, models) = app.get_json("/models").await;
    assert_eq!(
        models["items"].as_array().unwrap().len(),
        1,
        "only the first job's model is stored"
    );
}

#[tokio::test]
async fn cancelling_a_queued_job_ends_it_at_once() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let job: Value = app
        .post_job(&TestApp::evaluate_spec(
            m["id"].as_str().unwrap(),
            d["id"].as_str().unwrap(),
        ))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let r = app
        .client
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["status"], "cancelled");
    app.drain().await;
    let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(
        (j["status"].as_str(), j["attempt"].as_i64()),
        (Some("cancelled"), Some(0)),
        "a cancelled job never runs"
    );
    let (status, _) = app.get_json(&format!("/jobs/{id}/report")).await;
    assert_eq!(status, 409);
}

/// A job that runs for many seconds: thousands of timed runs of the big MLP at batch 32.
pub fn slow_spec(model_id: &str, dataset_id: &str) -> Value {
    json!({"model_id": model_id, "dataset_id": dataset_id, "pipeline": [{"stage": "evaluate", "latency_runs": 20000, "warmup_runs": 0}]})
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_within_seconds() {
    let (settings, dir) = test_settings(Setup::Embedded).await;
    let app = spawn_with(settings, dir, 1).await;
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let job: Value = app
        .post_job(&slow_spec(
            m["id"].as_str().unwrap(),
            d["id"].as_str().unwrap(),
        ))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
        if j["status"] == "running" && j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never started: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = std::time::Instant::now();
    let r = app
        .client
        .post(app.url(&format!("/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let j = app.wait_final(id, Duration::from_secs(15)).await;
    assert_eq!(j["status"], "cancelled", "{j}");
    assert!(asked.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn events_stream_the_job_until_it_ends() {
    let (settings, dir) = test_settings(Setup::Embedded).await;
    let app = spawn_with(settings, dir, 1).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let job: Value = app
        .post_job(&TestApp::evaluate_spec(
            m["id"].as_str().unwrap(),
            d["id"].as_str().unwrap(),
        ))
        .await
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let r = app
        .client
        .get(app.url(&format!("/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = tokio::time::timeout(Duration::from_secs(60), r.text())
        .await
        .expect("the stream ends with the job")
        .unwrap();
    let statuses: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("succeeded"),
        "{body}"
    );
    assert!(body.contains("event: job"));
}

#[tokio::test]
async fn events_carry_ids_and_a_reconnect_with_last_event_id_repeats_nothing_and_misses_nothing() {
    let app = spawn_app(Setup::Embedded).await;
    let id = app.queue_evaluate_job().await;
    let id = id.as_str();
    let follow = |last: Option<String>| {
        let mut r = app.client.get(app.url(&format!("/jobs/{id}/events")));
        if let Some(last) = last {
            r = r.header("last-event-id", last);
        }
        async move {
            let body = r.send().await.unwrap().text();
            tokio::time::timeout(Duration::from_secs(30), body)
                .await
                .expect("the stream of an ended job ends")
                .unwrap()
        }
    };
    let field = |body: &str, name: &str| -> Vec<String> {
        body.lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(str::to_string)
            .collect()
    };
    app.drain().await;
    // The ended job: one event, with an id.
    let body = follow(None).await;
    let ids = field(&body, "id: ");
    assert_eq!(
        ids.len(),
        1,
        "one event for the ended job, with an id: {body}"
    );
    assert!(field(&body, "data: ")[0].contains("succeeded"), "{body}");
    // Reconnecting with the last id seen: the job has not changed since, nothing is repeated.
    let again = follow(Some(ids[0].clone())).await;
    assert!(field(&again, "data: ").is_empty(), "{again}");
    // With an older id: the change since then is delivered.
    let older: i64 = ids[0].parse::<i64>().unwrap() - 1;
    let missed = follow(Some(older.to_string())).await;
    let data = field(&missed, "data: ");
    assert_eq!(data.len(), 1, "{missed}");
    assert!(data[0].contains("succeeded"), "{missed}");
}

#[tokio::test]
async fn a_failed_job_keeps_its_log_with_the_cause() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("bad/unknown_op.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let spec =
        json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate"}]});
    let job: Value = app.post_job(&spec).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    let (status, problem) = app.get_json(&format!("/jobs/{id}/log")).await;
    assert_eq!(status, 409, "no attempt has ended yet: {problem}");
    app.drain().await;
    let (_, j) = app.get_json(&format!("/jobs/{id}")).await;
    assert_eq!(j["status"], "failed");
    let r = app
        .client
        .get(app.url(&format!("/jobs/{id}/log")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = r.text().await.unwrap();
    assert!(log.contains("attempt 1 failed (invalid_input)"), "{log}");
    assert!(log.contains("Frobnicate"), "the cause chain: {log}");
    let (_, artifacts) = app.get_json(&format!("/jobs/{id}/artifacts")).await;
    assert!(
        artifacts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "job.log"),
        "{artifacts}"
    );
}

#[tokio::test]
async fn a_job_whose_input_vanished_is_retried_as_an_infrastructure_failure() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let job: Value = app
        .post_job(&TestApp::evaluate_spec(
            m["id"].as_str().unwrap(),
            d["id"].as_str().unwrap(),
        ))
        .await
        .json()
        .await
        .unwrap();
    // Delete the dataset's blob behind the API's back: the worker cannot fetch it, which is an
    // infrastructure failure, retried with backoff rather than failed at once.
    let blobs = crate::helpers::files_under(&app.data_dir.path().join("blobs"));
    for b in blobs
        .iter()
        .filter(|p| p.to_string_lossy().contains("/datasets/"))
    {
        std::fs::remove_file(b).unwrap();
    }
    app.drain().await;
    let (_, j) = app
        .get_json(&format!("/jobs/{}", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        j["status"], "queued",
        "an infrastructure failure is retried: {j}"
    );
    assert_eq!(j["error"]["type"], "infrastructure");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("downloading the dataset"),
        "{j}"
    );
    assert_eq!(j["attempt"], 1);
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let spec = TestApp::evaluate_spec(m["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    let a: Value = app.post_job(&spec).await.json().await.unwrap();
    let b: Value = app.post_job(&spec).await.json().await.unwrap();
    app.client
        .post(app.url(&format!("/jobs/{}/cancel", a["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    let (_, all) = app.get_json("/jobs").await;
    assert_eq!(all["items"][0]["id"], b["id"]);
    let (_, cancelled) = app.get_json("/jobs?status=cancelled").await;
    assert_eq!(cancelled["items"].as_array().unwrap().len(), 1);
    assert_eq!(cancelled["items"][0]["id"], a["id"]);
    let (_, by_model) = app
        .get_json(&format!("/jobs?model_id={}", m["id"].as_str().unwrap()))
        .await;
    assert_eq!(by_model["items"].as_array().unwrap().len(), 2);
    let (status, _) = app.get_json("/jobs?status=sleeping").await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn a_model_onnx_runtime_rejects_fails_at_once_as_invalid_input_without_retry() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("bad/unknown_op.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let spec =
        json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate"}]});
    let r = app.post_job(&spec).await;
    assert_eq!(r.status(), 202, "the graph parses, so the job is accepted");
    let job: Value = r.json().await.unwrap();
    app.drain().await;
    let (_, j) = app
        .get_json(&format!("/jobs/{}", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        (j["status"].as_str(), j["attempt"].as_i64()),
        (Some("failed"), Some(1)),
        "bad input never retries: {j}"
    );
    assert_eq!(j["error"]["type"], "invalid_input");
    let chain = j["error"]["causes"].as_array().unwrap();
    assert!(
        chain
            .iter()
            .any(|c| c.as_str().unwrap().contains("Frobnicate")),
        "the cause chain names the operator: {j}"
    );
    assert!(j["finished_at"].is_string());
}

#[tokio::test]
async fn the_dashboard_origin_may_call_the_api_from_a_browser() {
    let (mut settings, dir) = test_settings(Setup::Embedded).await;
    settings.cors_origins = vec!["https://dashboard.example".into()];
    let app = spawn_with(settings, dir, 0).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/jobs"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = preflight("https://dashboard.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://dashboard.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn a_quantize_job_returns_an_int8_model_that_onnxruntime_python_runs_with_the_reported_accuracy(
) {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let c = app.dataset("digits_train.npz").await;
    let spec = json!({
        "model_id": m["id"], "dataset_id": d["id"], "calibration_dataset_id": c["id"],
        "pipeline": [{"stage": "quantize", "mode": "static", "calibration": {"samples": 200}, "allow_slower": true}],
        "constraints": {"max_accuracy_drop": 0.01},
    });
    let r = app.post_job(&spec).await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    app.drain().await;
    let (_, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    assert_eq!(report["passed"], true, "{}", report["verdicts"]);
    let stage = &report["stages"][0];
    assert_eq!(stage["stage"], "quantize");
    let int8: Vec<&Value> = stage["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["precision"] == "int8")
        .collect();
    assert_eq!(int8.len(), 3, "{}", stage["layers"]);
    assert_eq!(report["calibration"]["source"], "calibration_dataset");
    assert_eq!(report["evaluated_samples"], 450);
    let size = report["final"]["size"]["bytes"].as_u64().unwrap();
    assert!(
        size * 3 < report["baseline"]["size"]["bytes"].as_u64().unwrap(),
        "int8 weights: {size} bytes"
    );

    let file = app.data_dir.path().join("quantized.onnx");
    let bytes = app
        .get_bytes(&format!("/jobs/{id}/artifacts/stage-0-quantize.onnx"))
        .await;
    std::fs::write(&file, &bytes).unwrap();
    let py = onnxruntime_python(&file, &fixture("digits_val.npz"), "probabilities");
    assert_eq!(
        py["top1"].as_f64(),
        report["final"]["task"]["top1_accuracy"].as_f64(),
        "the report's accuracy is what onnxruntime-Python measures"
    );
    assert!(
        py["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "QuantizeLinear"),
        "{py}"
    );
    let final_model = app
        .get_bytes(&format!("/jobs/{id}/artifacts/model.onnx"))
        .await;
    assert_eq!(final_model, bytes, "the final model is the quantized one");
}

#[tokio::test]
async fn without_a_calibration_dataset_a_seeded_split_calibrates_and_is_not_evaluated() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "seed": 7,
        "pipeline": [{"stage": "quantize", "mode": "static", "granularity": "per_tensor", "calibration": {"samples": 100, "method": "percentile", "percentile": 99.99}, "allow_slower": true},
                     {"stage": "evaluate", "latency_runs": 3}]});
    let first: Value = app.post_job(&spec).await.json().await.unwrap();
    let second: Value = app.post_job(&spec).await.json().await.unwrap();
    app.drain().await;
    let (_, a) = app
        .get_json(&format!("/jobs/{}/report", first["id"].as_str().unwrap()))
        .await;
    let (_, b) = app
        .get_json(&format!("/jobs/{}/report", second["id"].as_str().unwrap()))
        .await;
    let cal = &a["calibration"];
    assert_eq!(
        (cal["source"].as_str(), cal["samples"].as_u64()),
        (Some("split_of_dataset"), Some(100))
    );
    assert_eq!(cal["dataset_rows"].as_array().unwrap().len(), 100);
    assert_eq!(a["evaluated_samples"], 350);
    assert_eq!(
        a["baseline"]["task"]["samples"], 350,
        "the baseline is measured on the same rows"
    );
    assert_eq!(
        cal["dataset_rows"], b["calibration"]["dataset_rows"],
        "the same seed picks the same rows"
    );
    assert_eq!(
        a["final"]["task"]["top1_accuracy"], b["final"]["task"]["top1_accuracy"],
        "same spec and seed, same accuracy"
    );
    assert_eq!(a["stages"].as_array().unwrap().len(), 2);
    let notes = a["stages"][0]["notes"].to_string();
    assert!(
        notes.contains("the 99.99 percentile over 100 samples"),
        "{notes}"
    );
}

#[tokio::test]
async fn quantize_options_are_validated_with_pointers() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    for (stage, pointer, needle) in [
        (
            json!({"stage": "quantize", "mode": "int2"}),
            "/pipeline/0/mode",
            "weight_only",
        ),
        (
            json!({"stage": "quantize", "mode": "weight_only", "block_size": 48}),
            "/pipeline/0/block_size",
            "power of two",
        ),
        (
            json!({"stage": "quantize", "mode": "weight_only", "bits": 3}),
            "/pipeline/0/bits",
            "8 or 4",
        ),
        (
            json!({"stage": "quantize", "mode": "fp16", "max_accuracy_drop": 0.01}),
            "/pipeline/0/max_accuracy_drop",
            "auto, static, dynamic or qat",
        ),
        (
            json!({"stage": "quantize", "max_accuracy_drop": 2}),
            "/pipeline/0/max_accuracy_drop",
            "from 0 to 1",
        ),
        (
            json!({"stage": "quantize", "max_trials": 0}),
            "/pipeline/0/max_trials",
            "from 1 to 10000",
        ),
        (
            json!({"stage": "quantize", "mode": "weight_only", "max_trials": 20}),
            "/pipeline/0/max_trials",
            "auto, static, dynamic or qat",
        ),
        (
            json!({"stage": "quantize", "mode": "fp16", "keep_io_types": "no"}),
            "/pipeline/0/keep_io_types",
            "true or false",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "granularity": "per_row"}),
            "/pipeline/0/granularity",
            "per_channel",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "op_types": ["Relu"]}),
            "/pipeline/0/op_types/0",
            "Conv",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "calibration": {"method": "kl"}}),
            "/pipeline/0/calibration/method",
            "entropy, mse",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "calibration": {"samples": 0}}),
            "/pipeline/0/calibration/samples",
            "1 to 100000",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "bits": 4}),
            "/pipeline/0/bits",
            "weight_only",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "bitz": 4}),
            "/pipeline/0/bitz",
            "unknown option",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "allow_slower": "yes"}),
            "/pipeline/0/allow_slower",
            "true or false",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "calibration": {"method": "percentile", "percentile": 20}}),
            "/pipeline/0/calibration/percentile",
            "90 to 100",
        ),
    ] {
        let r = app
            .post_job(&json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [stage]}))
            .await;
        assert_eq!(r.status(), 422, "{stage}");
        let p: Value = r.json().await.unwrap();
        let e = p["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["pointer"] == pointer)
            .unwrap_or_else(|| panic!("{stage}: {p}"));
        assert!(
            e["detail"].as_str().unwrap().contains(needle),
            "{stage}: {e}"
        );
    }
}

#[tokio::test]
async fn the_latency_gate_keeps_the_float_model_when_int8_is_slower() {
    // 24 MatMuls of 4x4: int8 adds a QuantizeLinear per layer that costs more than the float
    // product (ONNX Runtime's own static int8 model runs ~3x slower than float here).
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("tanh_chain.onnx").await;
    let d = app.dataset("tanh_chain.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"],
        "pipeline": [{"stage": "quantize", "mode": "static", "max_accuracy_drop": 1,
                      "calibration": {"method": "minmax", "samples": 32}}]});
    let job: Value = app.post_job(&spec).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    app.drain().await;
    let (_, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    let stage = &report["stages"][0];
    assert!(
        stage["artifact"].is_null(),
        "the int8 model is not kept: {stage}"
    );
    let layers = stage["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 24, "{stage}");
    for l in layers {
        assert_eq!(l["precision"], "float", "{l}");
        assert!(l["reason"].as_str().unwrap().contains("slower"), "{l}");
    }
    assert!(
        stage["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("keeps the input model")),
        "{stage}"
    );
    assert_eq!(
        report["final"]["size"]["bytes"], report["baseline"]["size"]["bytes"],
        "the input model stays the job's model"
    );
}

#[tokio::test]
async fn the_latency_gate_keeps_the_int8_model_only_when_it_is_not_slower() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let c = app.dataset("digits_train.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "calibration_dataset_id": c["id"],
        "pipeline": [{"stage": "quantize", "mode": "static", "calibration": {"samples": 64}}]});
    let job: Value = app.post_job(&spec).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    app.drain().await;
    let (_, report) = app.get_json(&format!("/jobs/{id}/report")).await;
    let stage = &report["stages"][0];
    // "ONNX Runtime p50 at batch 32: input X ms, int8 Y ms (Zx)", and when that was slower,
    // "after the speed search: input X ms, int8 Y ms (Zx)" decides.
    let notes: Vec<&str> = stage["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let note = notes
        .iter()
        .find(|n| n.starts_with("after the speed search"))
        .or_else(|| {
            notes
                .iter()
                .find(|n| n.contains("ONNX Runtime p50 at batch 32"))
        })
        .unwrap_or_else(|| panic!("{stage}"));
    let number_after = |key: &str| -> f64 {
        note.split(key)
            .nth(1)
            .unwrap()
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (input_ms, int8_ms) = (number_after("input"), number_after("int8"));
    let kept = stage["artifact"].is_string();
    assert_eq!(
        kept,
        shrink::engine::quantize::keep_quantized(input_ms, int8_ms, false),
        "{note}"
    );
    let int8_layers = stage["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["precision"] == "int8")
        .count();
    assert_eq!(int8_layers > 0, kept, "{}", stage["layers"]);
    let same_as_input = report["final"]["size"]["bytes"] == report["baseline"]["size"]["bytes"];
    assert_eq!(
        same_as_input, !kept,
        "a rejected int8 model leaves the input model in place"
    );
}

/// Concurrent retries of one multipart request (model and dataset as file parts) with the same
/// Idempotency-Key: every retry gets the one job, and only that job's files stay stored.
async fn concurrent_retries_get_one_job_and_leave_no_files(setup: Setup) {
    let app = spawn_app(setup).await;
    let spec = json!({"pipeline": [{"stage": "evaluate", "latency_runs": 1}]});
    let form = || {
        let part = |file: &str| {
            reqwest::multipart::Part::bytes(std::fs::read(fixture(file)).unwrap())
                .file_name(file.to_string())
        };
        reqwest::multipart::Form::new()
            .text("spec", spec.to_string())
            .part("model", part("two_input.onnx"))
            .part("dataset", part("two_input.npz"))
    };
    let requests = (0..8).map(|_| {
        app.client
            .post(app.url("/jobs"))
            .header("idempotency-key", "ci-run-race")
            .multipart(form())
            .send()
    });
    let mut ids = Vec::new();
    for r in futures::future::join_all(requests).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 202, "every retry gets the job");
        let job: Value = r.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one job for one key: {ids:?}");
    let (_, models) = app.get_json("/models").await;
    let (_, datasets) = app.get_json("/datasets").await;
    assert_eq!(models["items"].as_array().unwrap().len(), 1, "{models}");
    assert_eq!(datasets["items"].as_array().unwrap().len(), 1, "{datasets}");
    let (_, job) = app.get_json(&format!("/jobs/{}", ids[0])).await;
    assert_eq!(job["spec"]["model_id"], models["items"][0]["id"]);
    if setup == Setup::Embedded {
        let blobs = files_under(&app.data_dir.path().join("blobs"));
        let stored = blobs
            .iter()
            .filter(|p| !p.to_string_lossy().contains(".readyz"))
            .count();
        assert_eq!(stored, 2, "the job's model and dataset only: {blobs:?}");
    }
}

#[tokio::test]
async fn concurrent_retries_with_one_idempotency_key_get_one_job_on_postgres() {
    concurrent_retries_get_one_job_and_leave_no_files(Setup::Production).await;
}

#[tokio::test]
async fn concurrent_retries_with_one_idempotency_key_get_one_job_on_sqlite() {
    concurrent_retries_get_one_job_and_leave_no_files(Setup::Embedded).await;
}
