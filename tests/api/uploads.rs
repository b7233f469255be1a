//! Uploading, reading back and deleting models and datasets.
use crate::helpers::{files_under, fixture, sha256_file, spawn_app, Setup, TestApp};
use serde_json::Value;

async fn assert_nothing_stored(app: &TestApp) {
    let (_, models) = app.get_json("/models").await;
    let (_, datasets) = app.get_json("/datasets").await;
    assert_eq!(models["items"].as_array().unwrap().len(), 0, "{models}");
    assert_eq!(datasets["items"].as_array().unwrap().len(), 0, "{datasets}");
    let blobs = files_under(&app.data_dir.path().join("blobs"));
    assert!(
        blobs.iter().all(|p| p
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".readyz")),
        "{blobs:?}"
    );
    assert!(
        files_under(&app.data_dir.path().join("tmp")).is_empty(),
        "temporary upload files remain"
    );
}

#[tokio::test]
async fn an_uploaded_model_round_trips_with_its_hash_and_summary() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    assert_eq!(m["sha256"], sha256_file(&fixture("digits_mlp.onnx")));
    assert_eq!(
        m["size_bytes"],
        std::fs::metadata(fixture("digits_mlp.onnx")).unwrap().len()
    );
    assert_eq!(m["format"], "onnx");
    let s = &m["summary"];
    assert_eq!(
        s["opset"],
        crate::helpers::reference()["digits_mlp"]["opset"],
        "the opset the onnx package reads"
    );
    assert_eq!(s["inputs"][0]["name"], "input");
    assert_eq!(s["inputs"][0]["dtype"], "float32");
    assert_eq!(s["inputs"][0]["shape"][1], 64);
    assert_eq!(s["outputs"].as_array().unwrap().len(), 2);
    // 64*256 + 256 + 256*128 + 128 + 128*10 + 10 weights, plus skl2onnx's small constants.
    assert!(s["parameters"].as_u64().unwrap() >= 50_698, "{s}");
    assert!(s["op_counts"]["MatMul"].as_u64().unwrap() >= 3, "{s}");

    let id = m["id"].as_str().unwrap();
    let (status, got) = app.get_json(&format!("/models/{id}")).await;
    assert_eq!((status, &got["sha256"]), (200, &m["sha256"]));
    let file = app
        .client
        .get(app.url(&format!("/models/{id}/file")))
        .send()
        .await
        .unwrap();
    assert_eq!(file.status(), 200);
    assert_eq!(
        file.bytes().await.unwrap().to_vec(),
        std::fs::read(fixture("digits_mlp.onnx")).unwrap()
    );
}

#[tokio::test]
async fn a_file_whose_object_is_gone_is_a_404_not_a_500() {
    // A DELETE can remove the object between a download reading the row and opening the file.
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let id = m["id"].as_str().unwrap();
    let blobs = files_under(&app.data_dir.path().join("blobs"));
    let stored: Vec<_> = blobs
        .iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(".readyz")
        })
        .collect();
    assert_eq!(stored.len(), 1, "{blobs:?}");
    std::fs::remove_file(stored[0]).unwrap();
    let r = app
        .client
        .get(app.url(&format!("/models/{id}/file")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let p: serde_json::Value = r.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("deleted"), "{p}");
}

#[tokio::test]
async fn a_multipart_upload_is_stored_like_a_raw_one() {
    let app = spawn_app(Setup::Embedded).await;
    let bytes = std::fs::read(fixture("digits_val.npz")).unwrap();
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(bytes).file_name("val.npz"),
    );
    let r = app
        .client
        .post(app.url("/datasets"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let d: Value = r.json().await.unwrap();
    assert_eq!(
        (
            d["name"].as_str(),
            d["format"].as_str(),
            d["samples"].as_u64()
        ),
        (Some("val.npz"), Some("npz"), Some(450))
    );
    let names: Vec<&str> = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["input", "labels"]);
}

#[tokio::test]
async fn safetensors_datasets_are_accepted() {
    let app = spawn_app(Setup::Embedded).await;
    let d = app.dataset("digits_val.safetensors").await;
    assert_eq!(
        (d["format"].as_str(), d["samples"].as_u64()),
        (Some("safetensors"), Some(450))
    );
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_with_413_and_leaves_nothing() {
    let app = spawn_app(Setup::Embedded).await;
    // Over the 8 MiB test limit, streamed without a Content-Length so the streaming check is what refuses it.
    let chunks = (0..12).map(|_| Ok::<_, std::io::Error>(vec![0u8; 1024 * 1024]));
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let r = app.post_stream("/models", body).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn an_upload_aborted_mid_stream_leaves_nothing() {
    let app = spawn_app(Setup::Embedded).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(vec![1u8; 256 * 1024]),
        Ok(vec![2u8; 256 * 1024]),
        Err(std::io::Error::other("client went away")),
    ];
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let r = app.post_stream("/models", body).await;
    assert!(r.is_err() || r.unwrap().status().is_client_error());
    // The server notices the broken body asynchronously, and may not even have started on it
    // when the client gives up: wait until no temporary file has been seen for a whole second
    // (at most 15 s; the whole suite runs on 2 cores).
    let mut quiet = 0;
    for _ in 0..750 {
        if crate::helpers::files_under(&app.data_dir.path().join("tmp")).is_empty() {
            quiet += 1;
            if quiet == 50 {
                break;
            }
        } else {
            quiet = 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_refused_before_reading() {
    let app = spawn_app(Setup::Embedded).await;
    let r = app
        .client
        .post(app.url("/datasets"))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8; 9 * 1024 * 1024])
        .send()
        .await;
    // The server may close the connection before the client finishes sending; either way nothing is stored.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn corrupt_models_are_refused_with_422_naming_the_problem() {
    let app = spawn_app(Setup::Embedded).await;
    for bad in ["bad/truncated.onnx", "bad/garbage.onnx", "digits_val.npz"] {
        let r = app.upload_raw("/models", &fixture(bad), None).await;
        assert_eq!(r.status(), 422, "{bad}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["type"], "/problems/validation");
        assert!(
            p["detail"].as_str().unwrap().contains("invalid model"),
            "{bad}: {p}"
        );
        assert_eq!(p["errors"][0]["pointer"], "/file");
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn a_model_with_external_data_is_refused_for_now() {
    let app = spawn_app(Setup::Embedded).await;
    let r = app
        .upload_raw("/models", &fixture("bad/external_data.onnx"), None)
        .await;
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("external data"),
        "{p}"
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn datasets_whose_tensors_disagree_on_samples_are_refused() {
    let app = spawn_app(Setup::Embedded).await;
    for (bad, needle) in [
        ("bad/sample_mismatch.npz", "all tensors must agree"),
        ("bad/scalar.npz", "scalar"),
        ("bad/not_a_dataset.npz", "safetensors"),
    ] {
        let r = app.upload_raw("/datasets", &fixture(bad), None).await;
        assert_eq!(r.status(), 422, "{bad}");
        let p: Value = r.json().await.unwrap();
        assert!(p["detail"].as_str().unwrap().contains(needle), "{bad}: {p}");
    }
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn listing_pages_newest_first_with_a_cursor() {
    let app = spawn_app(Setup::Embedded).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.model("two_input.onnx").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (_, p1) = app.get_json("/models?limit=2").await;
    let got: Vec<&str> = p1["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app
        .get_json(&format!("/models?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(p2["items"][0]["id"], ids[0].as_str());
    let (status, bad) = app.get_json("/models?limit=0").await;
    assert_eq!(
        (status, bad["errors"][0]["pointer"].as_str()),
        (422, Some("/limit"))
    );
}

#[tokio::test]
async fn a_model_used_by_a_queued_job_cannot_be_deleted_until_the_job_ends() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let (mid, did) = (m["id"].as_str().unwrap(), d["id"].as_str().unwrap());
    let r = app.post_job(&TestApp::evaluate_spec(mid, did)).await;
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .delete(app.url(&format!("/models/{mid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let r = app
        .client
        .delete(app.url(&format!("/datasets/{did}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    app.drain().await;
    let r = app
        .client
        .delete(app.url(&format!("/models/{mid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, _) = app.get_json(&format!("/models/{mid}")).await;
    assert_eq!(status, 404);
    let r = app
        .client
        .delete(app.url(&format!("/models/{mid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
