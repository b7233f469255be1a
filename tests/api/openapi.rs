//! The committed OpenAPI document must be what the code generates.
#[test]
fn the_committed_openapi_document_is_current() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap_or_default();
    let generated = shrink::http::openapi::document_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale: run `cargo run -- openapi --output openapi/openapi.json` and commit it"
    );
}

#[test]
fn every_operation_documents_its_errors_as_problem_json() {
    let doc: serde_json::Value =
        serde_json::from_str(&shrink::http::openapi::document_json()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            // The public probes and /metrics answer no problems; everything else needs a key.
            let public = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .all(|r| r.as_object().is_some_and(|o| o.is_empty()))
            });
            if public {
                assert!(
                    ["/healthz", "/readyz", "/metrics"].contains(&path.as_str()),
                    "{method} {path} is public"
                );
                continue;
            }
            let responses = op["responses"].as_object().unwrap();
            for code in ["401", "429"] {
                assert!(
                    responses[code]["content"]["application/problem+json"].is_object(),
                    "{method} {path} does not document {code}"
                );
            }
            let has_problem = responses.iter().any(|(code, r)| {
                code.starts_with('4') && r["content"]["application/problem+json"].is_object()
            });
            assert!(
                has_problem,
                "{method} {path} documents no problem+json error"
            );
        }
    }
}

#[tokio::test]
async fn the_served_document_and_docs_page_are_available() {
    let app = crate::helpers::spawn_app(crate::helpers::Setup::Embedded).await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/jobs"].is_object());
    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(
        (status, ready["ready"].as_bool()),
        (200, Some(true)),
        "{ready}"
    );
    assert_eq!(ready["onnxruntime"], "onnxruntime 1.32.0");
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert!(r.headers().contains_key("x-request-id"));
}
