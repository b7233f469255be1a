//! Teams: every route refuses other projects' ids (404), wrong roles (403), missing, unknown and
//! revoked keys (401), and none of those refusals changes the database or the blob store.
//! Quotas refuse with 413/429 naming the limit and store nothing; keys are rate limited.
use crate::helpers::*;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;
use std::collections::BTreeSet;

/// Every row of every table (minus `last_used_at`, which reads move), as text.
async fn db_snapshot(app: &TestApp) -> Vec<String> {
    let tables: &[(&str, &str)] = &[
        ("projects", "id, name, max_stored_bytes, max_queued_jobs, max_running_jobs, max_upload_bytes, created_at"),
        ("api_keys", "id, project, name, role, prefix, secret_sha256, created_at, revoked_at"),
        ("models", "id, project, name, format, size_bytes, sha256, blob_key, summary, created_at"),
        ("datasets", "id, project, name, format, size_bytes, sha256, blob_key, summary, created_at"),
        ("jobs", "id, project, status, spec, model_id, stage, progress, attempt, max_attempts, run_at, locked_by, \
            lease_expires_at, cancel_requested, error, passed, report_key, idempotency_key, request_sha256, request_id, \
            created_at, started_at, finished_at, updated_at"),
        ("job_inputs", "job_id, input_id"),
        ("job_artifacts", "job_id, name, blob_key, size_bytes, sha256, content_type, created_at"),
        ("job_runs", "job_id, attempt, worker_id, started_at, finished_at, outcome"),
    ];
    let mut out = Vec::new();
    for (table, columns) in tables {
        let cols: Vec<&str> = columns.split(',').map(str::trim).collect();
        let select = cols
            .iter()
            .map(|c| format!("CAST({c} AS TEXT)"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {select} FROM {table} ORDER BY 1, 2"
        )))
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        for row in rows {
            let values: Vec<String> = (0..cols.len())
                .map(|i| {
                    row.try_get::<Option<String>, _>(i)
                        .unwrap()
                        .unwrap_or_else(|| "NULL".into())
                })
                .collect();
            out.push(format!("{table}: {}", values.join(" | ")));
        }
    }
    out
}

/// The database and every object in the store.
async fn snapshot(app: &TestApp) -> (Vec<String>, Vec<(String, u64)>) {
    (
        db_snapshot(app).await,
        app.worker.blobs.list("").await.unwrap(),
    )
}

/// Every operation in the OpenAPI document: (method, path template, public?).
fn operations() -> Vec<(Method, String, bool)> {
    let doc: Value = serde_json::from_str(&shrink::http::openapi::document_json()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let public = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
            });
            out.push((method.to_uppercase().parse().unwrap(), path.clone(), public));
        }
    }
    assert!(out.len() >= 25, "{out:?}");
    out
}

/// A's resources that the templates' `{…}` stand for.
struct Owned {
    webhook: String,
    model: String,
    dataset: String,
    job: String,
    artifact: String,
    key: String,
}

fn fill(template: &str, a: &Owned) -> String {
    let id = if template.starts_with("/models/") {
        &a.model
    } else if template.starts_with("/datasets/") {
        &a.dataset
    } else if template.starts_with("/jobs/") {
        &a.job
    } else if template.starts_with("/webhooks/") {
        &a.webhook
    } else {
        "default"
    };
    template
        .replace("{id}", id)
        .replace("{name}", &a.artifact)
        .replace("{key_id}", &a.key)
}

/// A request that would succeed for A's admin: a real file for uploads, a valid spec for jobs.
async fn request(
    client: &Client,
    app: &TestApp,
    method: &Method,
    path: &str,
    a: &Owned,
) -> reqwest::Response {
    let mut req = client.request(method.clone(), app.url(path));
    match (method.as_str(), path) {
        ("POST", "/models") => {
            req = req
                .header("content-type", "application/octet-stream")
                .body(std::fs::read(fixture("two_input.onnx")).unwrap())
        }
        ("POST", "/datasets") => {
            req = req
                .header("content-type", "application/octet-stream")
                .body(std::fs::read(fixture("two_input.npz")).unwrap())
        }
        ("POST", "/jobs") => req = req.json(&TestApp::evaluate_spec(&a.model, &a.dataset)),
        ("POST", "/projects") => req = req.json(&json!({"id": "intruders"})),
        ("POST", "/webhooks") => req = req.json(&json!({"url": "http://127.0.0.1:9/hook"})),
        ("POST", p) if p.ends_with("/keys") => {
            req = req.json(&json!({"name": "x", "role": "admin"}))
        }
        ("PUT", p) if p.ends_with("/quotas") => req = req.json(&json!({"max_queued_jobs": 0})),
        _ => {}
    }
    req.send().await.unwrap()
}

async fn assert_problem(r: reqwest::Response, status: StatusCode, what: &str) -> Value {
    assert_eq!(r.status(), status, "{what}");
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
    r.json().await.unwrap()
}

async fn isolation_matrix(setup: Setup) {
    let (mut settings, dir) = test_settings(setup).await;
    settings.s3_presign = setup == Setup::Production;
    // A webhook on loopback (allowed here), whose deliveries never run during the walk: the
    // delivery loop looks once at start-up, then not for an hour.
    settings.webhook_allow_private = true;
    settings.webhook_poll_ms = 3_600_000;
    let app = spawn_with(settings, dir, 0).await;
    // Project A is `default` (the admin key's); B is another team.
    let r = post_json(&app.client, &app.url("/projects"), &json!({"id": "team-b"})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let key = |project: &'static str, role: &'static str| {
        let app = &app;
        async move {
            let r = post_json(
                &app.client,
                &app.url(&format!("/projects/{project}/keys")),
                &json!({"name": format!("{role} key"), "role": role}),
            )
            .await;
            assert_eq!(r.status(), 201);
            let k: Value = r.json().await.unwrap();
            (
                k["id"].as_str().unwrap().to_string(),
                k["secret"].as_str().unwrap().to_string(),
            )
        }
    };
    let (_, b_member) = key("team-b", "member").await;
    let (viewer_id, a_viewer) = key("default", "viewer").await;
    let (revoked_id, revoked) = key("default", "member").await;
    let r = app
        .client
        .delete(app.url(&format!("/projects/default/keys/{revoked_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (model, dataset) = app.two_input().await;
    let (job, _) = run_job(&app, TestApp::evaluate_spec(&model, &dataset)).await;
    let (_, artifacts) = app.get_json(&format!("/jobs/{job}/artifacts")).await;
    let hook = post_json(
        &app.client,
        &app.url("/webhooks"),
        &json!({"url": "http://127.0.0.1:9/hook"}),
    )
    .await;
    assert_eq!(hook.status(), 201);
    let webhook = hook.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = Owned {
        webhook,
        model,
        dataset,
        job,
        artifact: artifacts[0]["name"].as_str().unwrap().to_string(),
        key: viewer_id,
    };

    let b = client_with_key(Some(&b_member));
    let viewer = client_with_key(Some(&a_viewer));
    let outsiders = [
        ("no key", client_with_key(None)),
        ("revoked key", client_with_key(Some(&revoked))),
        (
            "unknown key",
            client_with_key(Some(
                "shrk_0000000000000000000000000000000000000000000000000000000000000000",
            )),
        ),
    ];
    let before = snapshot(&app).await;
    let mut covered = BTreeSet::new();
    for (method, template, public) in operations() {
        if public {
            let r = client_with_key(None)
                .request(method.clone(), app.url(&template))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{method} {template} is public");
            continue;
        }
        covered.insert(format!("{method} {template}"));
        let path = fill(&template, &a);
        let what = format!("{method} {path}");
        for (who, client) in &outsiders {
            let r = request(client, &app, &method, &path, &a).await;
            assert!(
                r.headers().contains_key("www-authenticate"),
                "{who}: {what}"
            );
            assert_problem(r, StatusCode::UNAUTHORIZED, &format!("{who}: {what}")).await;
        }

        // Another project's member.
        let r = request(&b, &app, &method, &path, &a).await;
        let admin_only = template.starts_with("/projects");
        match (method.as_str(), template.as_str()) {
            _ if admin_only => {
                assert_problem(r, StatusCode::FORBIDDEN, &format!("B: {what}")).await;
            }
            (_, t) if t.contains('{') => {
                let p = assert_problem(r, StatusCode::NOT_FOUND, &format!("B: {what}")).await;
                assert!(!p.to_string().contains("default"), "{p}");
            }
            ("GET", "/me") => {
                let me: Value = r.json().await.unwrap();
                assert_eq!(me["project"], "team-b");
                assert_eq!(me["role"], "member");
            }
            ("GET", _) => {
                assert_eq!(r.status(), 200, "B: {what}");
                let page: Value = r.json().await.unwrap();
                let items = page["items"].as_array().or(page.as_array()).unwrap();
                assert!(items.is_empty(), "B sees A's {items:?}");
            }
            ("POST", "/jobs") => {
                // A's ids answer exactly as ids that never existed.
                let pointers = problem_pointers(r).await;
                assert_eq!(pointers, ["/model_id", "/dataset_id"], "{what}");
            }
            ("POST", "/models" | "/datasets" | "/webhooks") => {
                // Creates in B (checked below); B's own upload changes nothing of A's.
                assert_eq!(r.status(), 201, "B: {what}");
                let created: Value = r.json().await.unwrap();
                let id = created["id"].as_str().unwrap();
                let r = b
                    .delete(app.url(&format!("{template}/{id}")))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204);
                let (_, mine) = app.get_json(&template).await;
                assert!(!mine.to_string().contains(id), "A sees B's upload");
            }
            other => panic!("no expectation for {other:?}"),
        }

        // A's viewer: reads, never writes, never manages.
        let r = request(&viewer, &app, &method, &path, &a).await;
        if method == Method::GET && !admin_only {
            assert!(
                matches!(r.status().as_u16(), 200 | 307),
                "viewer: {what}: {}",
                r.status()
            );
        } else {
            assert_problem(r, StatusCode::FORBIDDEN, &format!("viewer: {what}")).await;
        }
        assert_eq!(snapshot(&app).await, before, "{what} changed something");
    }
    for expected in [
        "GET /models/{id}/file",
        "DELETE /datasets/{id}",
        "POST /jobs/{id}/cancel",
        "GET /jobs/{id}/events",
        "GET /jobs/{id}/artifacts/{name}",
        "DELETE /projects/{id}/keys/{key_id}",
        "PUT /projects/{id}/quotas",
        "GET /webhooks/{id}/deliveries",
        "DELETE /webhooks/{id}",
    ] {
        assert!(
            covered.contains(expected),
            "{expected} not covered: {covered:?}"
        );
    }
    // A still has its own work.
    for path in [
        format!("/models/{}", a.model),
        format!("/datasets/{}", a.dataset),
        format!("/jobs/{}/report", a.job),
    ] {
        assert_eq!(app.get_json(&path).await.0, 200, "{path}");
    }
}

#[tokio::test]
async fn another_projects_key_sees_nothing_and_changes_nothing_embedded() {
    isolation_matrix(Setup::Embedded).await;
}

#[tokio::test]
async fn another_projects_key_sees_nothing_and_changes_nothing_production() {
    isolation_matrix(Setup::Production).await;
}

#[tokio::test]
async fn keys_are_stored_as_hashes_shown_once_and_record_their_use() {
    let app = spawn_app(Setup::Embedded).await;
    let r = post_json(
        &app.client,
        &app.url("/projects/default/keys"),
        &json!({"name": "ci", "role": "member"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(
        secret.starts_with("shrk_") && secret.len() >= 60,
        "{secret}"
    );
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()));
    // Nowhere in the database in clear.
    assert!(!db_snapshot(&app)
        .await
        .iter()
        .any(|row| row.contains(secret)));
    let (_, keys) = app.get_json("/projects/default/keys").await;
    assert!(!keys.to_string().contains(secret), "{keys}");
    let listed = |keys: &Value| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == created["id"])
            .cloned()
            .unwrap()
    };
    assert!(listed(&keys)["last_used_at"].is_null());
    let me = client_with_key(Some(secret))
        .get(app.url("/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let (_, keys) = app.get_json("/projects/default/keys").await;
    assert!(listed(&keys)["last_used_at"].is_string(), "{keys}");

    // Bad requests name the field; unknown projects and keys are 404.
    let r = post_json(
        &app.client,
        &app.url("/projects/default/keys"),
        &json!({"name": "x", "role": "owner"}),
    )
    .await;
    assert_eq!(problem_pointers(r).await, ["/role"]);
    let r = post_json(&app.client, &app.url("/projects"), &json!({"id": "Bad/Id"})).await;
    assert_eq!(problem_pointers(r).await, ["/id"]);
    let r = post_json(
        &app.client,
        &app.url("/projects"),
        &json!({"id": "default"}),
    )
    .await;
    assert_eq!(r.status(), 409);
    let r = post_json(
        &app.client,
        &app.url("/projects/nope/keys"),
        &json!({"name": "x", "role": "viewer"}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = app
        .client
        .delete(app.url("/projects/default/keys/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app
        .client
        .put(app.url("/projects/default/quotas"))
        .json(&json!({"max_stored_bytes": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(problem_pointers(r).await, ["/max_stored_bytes"]);
    let r = client_with_key(Some(secret))
        .get(app.url("/models"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_project() {
    let app = spawn_app(Setup::Embedded).await;
    let r = post_json(&app.client, &app.url("/projects"), &json!({"id": "team-b"})).await;
    assert_eq!(r.status(), 201);
    let k: Value = post_json(
        &app.client,
        &app.url("/projects/team-b/keys"),
        &json!({"name": "ci", "role": "member"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let b = client_with_key(k["secret"].as_str());
    let spec = json!({"pipeline": [{"stage": "evaluate", "latency_runs": 5}]});
    let post = |client: &Client| {
        let form = reqwest::multipart::Form::new()
            .text("spec", spec.to_string())
            .part(
                "model",
                reqwest::multipart::Part::bytes(std::fs::read(fixture("two_input.onnx")).unwrap())
                    .file_name("m.onnx"),
            )
            .part(
                "dataset",
                reqwest::multipart::Part::bytes(std::fs::read(fixture("two_input.npz")).unwrap())
                    .file_name("d.npz"),
            );
        client
            .post(app.url("/jobs"))
            .header("idempotency-key", "build-42")
            .multipart(form)
            .send()
    };
    let a_job: Value = post(&app.client).await.unwrap().json().await.unwrap();
    let b_job: Value = post(&b).await.unwrap().json().await.unwrap();
    assert_ne!(a_job["id"], b_job["id"]);
    assert_eq!(b_job["project"], "team-b");
    let again: Value = post(&b).await.unwrap().json().await.unwrap();
    assert_eq!(again["id"], b_job["id"]);
    // B's files live under B's prefix in the store.
    let keys = app.worker.blobs.list("team-b/").await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
}

async fn set_quotas(app: &TestApp, quotas: Value) {
    let r = app
        .client
        .put(app.url("/projects/default/quotas"))
        .json(&quotas)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn uploads_over_a_quota_are_refused_and_leave_nothing_behind() {
    for setup in [Setup::Embedded, Setup::Production] {
        let app = spawn_app(setup).await;
        let size = std::fs::metadata(fixture("two_input.onnx")).unwrap().len() as i64;
        set_quotas(&app, json!({"max_stored_bytes": size + 100})).await;
        app.model("two_input.onnx").await;
        let before = snapshot(&app).await;
        let tmp_before = files_under(&app.data_dir.path().join("tmp")).len();

        let r = app
            .upload_raw("/models", &fixture("two_input.onnx"), None)
            .await;
        let p = assert_problem(r, StatusCode::PAYLOAD_TOO_LARGE, "over max_stored_bytes").await;
        assert_eq!(p["limit"], "max_stored_bytes", "{p}");
        assert_eq!(p["type"], "/problems/quota");
        // A job with two file parts of which only the first fits: neither stays.
        let both = size + std::fs::metadata(fixture("two_input.npz")).unwrap().len() as i64;
        set_quotas(&app, json!({"max_stored_bytes": size + both - 1})).await;
        let before = (
            before
                .0
                .into_iter()
                .filter(|r| !r.starts_with("projects:"))
                .collect::<Vec<_>>(),
            before.1,
        );
        let r = app
            .post_job_multipart(
                &json!({"pipeline": [{"stage": "evaluate"}]}),
                &[("model", "two_input.onnx"), ("dataset", "two_input.npz")],
            )
            .await;
        let p = assert_problem(
            r,
            StatusCode::PAYLOAD_TOO_LARGE,
            "job over max_stored_bytes",
        )
        .await;
        assert_eq!(p["limit"], "max_stored_bytes");
        let (rows, blobs) = snapshot(&app).await;
        let rows: Vec<String> = rows
            .into_iter()
            .filter(|r| !r.starts_with("projects:"))
            .collect();
        assert_eq!(
            (rows, blobs),
            before,
            "{setup:?}: a refused upload left something"
        );
        assert_eq!(
            files_under(&app.data_dir.path().join("tmp")).len(),
            tmp_before
        );

        // The per-upload limit.
        set_quotas(&app, json!({"max_upload_bytes": 100})).await;
        let r = app
            .upload_raw("/datasets", &fixture("two_input.npz"), None)
            .await;
        let p = assert_problem(r, StatusCode::PAYLOAD_TOO_LARGE, "over max_upload_bytes").await;
        assert_eq!(p["limit"], "max_upload_bytes", "{p}");
        let (_, project) = app.get_json("/projects/default").await;
        assert_eq!(project["usage"]["stored_bytes"], size, "{project}");
    }
}

#[tokio::test]
async fn job_quotas_cap_queued_and_running_jobs() {
    let app = spawn_app(Setup::Production).await;
    let (m, d) = app.two_input().await;
    set_quotas(&app, json!({"max_queued_jobs": 2, "max_running_jobs": 1})).await;
    let spec = TestApp::evaluate_spec(&m, &d);
    for _ in 0..2 {
        assert_eq!(app.post_job(&spec).await.status(), 202);
    }
    let before = snapshot(&app).await;
    let r = app.post_job(&spec).await;
    let p = assert_problem(r, StatusCode::TOO_MANY_REQUESTS, "over max_queued_jobs").await;
    assert_eq!(p["limit"], "max_queued_jobs", "{p}");
    assert_eq!(snapshot(&app).await, before);

    // One runs; the other waits while it does, then runs.
    let now = shrink::store::now_ms();
    let first = app
        .db
        .claim_next_job("w1", now, now + 60_000)
        .await
        .unwrap();
    assert!(first.is_some());
    let second = app
        .db
        .claim_next_job("w2", now, now + 60_000)
        .await
        .unwrap();
    assert!(second.is_none(), "a second job of the project ran at once");
    let (_, project) = app.get_json("/projects/default").await;
    assert_eq!(project["usage"]["running_jobs"], 1);
    assert_eq!(project["usage"]["queued_jobs"], 1);
    // Jobs of a project without limits are not held back by it.
    set_quotas(&app, json!({})).await;
    let second = app
        .db
        .claim_next_job("w2", now, now + 60_000)
        .await
        .unwrap();
    assert!(second.is_some());
}

#[tokio::test]
async fn a_key_over_its_request_rate_gets_429_with_retry_after() {
    let (mut settings, dir) = test_settings(Setup::Embedded).await;
    settings.rate_limit_per_second = 1;
    settings.rate_limit_burst = 3;
    let app = spawn_with(settings, dir, 0).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let r = app.client.get(app.url("/models")).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let p: Value = r.json().await.unwrap();
            assert_eq!(p["type"], "/problems/rate_limited");
        }
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    // Probes are not limited; another key has its own budget.
    for _ in 0..5 {
        assert_eq!(
            client_with_key(None)
                .get(app.url("/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn quotas_hold_exactly_under_concurrent_requests() {
    for setup in [Setup::Embedded, Setup::Production] {
        let app = spawn_app(setup).await;
        let (m, d) = app.two_input().await;
        let spec = TestApp::evaluate_spec(&m, &d);
        set_quotas(&app, json!({"max_queued_jobs": 3})).await;
        let posts = (0..12).map(|_| app.post_job(&spec));
        let statuses: Vec<u16> = futures::future::join_all(posts)
            .await
            .into_iter()
            .map(|r| r.status().as_u16())
            .collect();
        let accepted = statuses.iter().filter(|s| **s == 202).count();
        assert_eq!(accepted, 3, "{setup:?}: {statuses:?}");
        assert!(
            statuses.iter().all(|s| matches!(s, 202 | 429)),
            "{statuses:?}"
        );
        let (_, project) = app.get_json("/projects/default").await;
        assert_eq!(project["usage"]["queued_jobs"], 3, "{project}");

        // Room for exactly two more copies of the model.
        let size = std::fs::metadata(fixture("two_input.onnx")).unwrap().len() as i64;
        let used = project["usage"]["stored_bytes"].as_i64().unwrap();
        set_quotas(
            &app,
            json!({"max_stored_bytes": used + 2 * size + size / 2}),
        )
        .await;
        let file = fixture("two_input.onnx");
        let uploads = (0..8).map(|_| app.upload_raw("/models", &file, None));
        let statuses: Vec<u16> = futures::future::join_all(uploads)
            .await
            .into_iter()
            .map(|r| r.status().as_u16())
            .collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            2,
            "{setup:?}: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| matches!(s, 201 | 413)),
            "{statuses:?}"
        );
        let (_, project) = app.get_json("/projects/default").await;
        assert_eq!(
            project["usage"]["stored_bytes"],
            used + 2 * size,
            "{project}"
        );
        // Every refused upload's object is gone too.
        let objects = app.worker.blobs.list("default/models/").await.unwrap();
        assert_eq!(objects.len(), 3, "{objects:?}");
    }
}
