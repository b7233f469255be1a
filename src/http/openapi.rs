//! The OpenAPI document, generated from the handlers' annotations. `shrink openapi` prints it and
//! a test keeps the committed `openapi/openapi.json` equal to it.
use super::{health, jobs, results, teams, uploads, webhooks, AppState};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "Shrink", description = "Distill, prune, quantize and measure ONNX models. Errors are RFC 9457 problem+json. \
Every route except the health probes and `/metrics` needs `Authorization: Bearer <API key>`; a key sees only its project."),
    modifiers(&BearerAuth),
    tags(
        (name = "models", description = "Uploaded ONNX models"),
        (name = "datasets", description = "Uploaded datasets (.npz, .safetensors)"),
        (name = "jobs", description = "Optimization jobs, their reports and artifacts"),
        (name = "webhooks", description = "Endpoints told when the project's jobs end (signed, retried, at least once)"),
        (name = "projects", description = "Projects (teams), their API keys and quotas; the calling key"),
        (name = "health", description = "Liveness, readiness and metrics (no key needed)")
    )
)]
struct ApiDoc;

/// The `bearer` scheme, required by every operation that does not say otherwise.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("shrk_…")
                    .description(Some("An API key: `Authorization: Bearer shrk_…`"))
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// Completes the document once every route is in: response descriptions, the 401, 403 and 429
/// answers of every operation under the bearer scheme, and named variants for tagged unions.
pub fn finish(openapi: &mut utoipa::openapi::OpenApi) {
    name_union_variants(openapi);
    {
        // Every operation under the bearer scheme can answer 401, 403 and 429.
        for item in openapi.paths.paths.values_mut() {
            for (method, op) in [
                ("get", &mut item.get),
                ("post", &mut item.post),
                ("put", &mut item.put),
                ("delete", &mut item.delete),
            ] {
                let Some(op) = op.as_mut() else { continue };
                // OpenAPI requires a description on every response; default to the reason phrase.
                for (status, response) in op.responses.responses.iter_mut() {
                    if let utoipa::openapi::RefOr::T(r) = response {
                        if r.description.is_empty() {
                            r.description = status
                                .parse::<u16>()
                                .ok()
                                .and_then(|s| axum::http::StatusCode::from_u16(s).ok())
                                .and_then(|s| s.canonical_reason())
                                .unwrap_or("Response")
                                .to_string();
                        }
                    }
                }
                if op.security.is_some() {
                    continue; // public: `security(())`
                }
                let mut add = |status: &str, description: &str| {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| problem(description).into());
                };
                add("401", "No API key, or an unknown or revoked one");
                add(
                    "429",
                    "Over the key's request rate (see `Retry-After`) or a project quota",
                );
                if method != "get"
                    || op
                        .tags
                        .as_ref()
                        .is_some_and(|t| t.iter().any(|t| t == "projects"))
                {
                    add(
                        "403",
                        "The key's role may not do this (viewers read; projects need an admin)",
                    );
                }
            }
        }
    }
}

/// Gives each inline variant of a tagged union (`Stage`: `{"stage": "evaluate", …options}`) its
/// own component (`EvaluateStage`) and the union a discriminator, the shape client generators
/// (openapi-python-client) turn into one class per variant.
fn name_union_variants(openapi: &mut utoipa::openapi::OpenApi) {
    use serde_json::{json, Value};
    let Ok(mut doc) = serde_json::to_value(&*openapi) else {
        return;
    };
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut hoisted = Vec::new();
    for (parent, schema) in schemas.iter_mut() {
        let Some(variants) = schema.get_mut("oneOf").and_then(Value::as_array_mut) else {
            continue;
        };
        let mut mapping = serde_json::Map::new();
        let mut tag_name = None;
        for variant in variants.iter_mut() {
            // The tag: an object part with one property that allows exactly one string.
            let tag = variant["allOf"].as_array().and_then(|parts| {
                parts.iter().find_map(|p| {
                    let props = p["properties"].as_object()?;
                    let (name, prop) = props.iter().next().filter(|_| props.len() == 1)?;
                    let value = prop["enum"].as_array().filter(|e| e.len() == 1)?[0].as_str()?;
                    Some((name.clone(), value.to_string()))
                })
            });
            let Some((name, value)) = tag else { continue };
            let mut pascal = value[..1].to_uppercase();
            pascal.push_str(&value[1..]);
            let component = format!("{pascal}{parent}");
            let reference = format!("#/components/schemas/{component}");
            hoisted.push((
                component,
                std::mem::replace(variant, json!({"$ref": reference})),
            ));
            mapping.insert(value, Value::String(reference));
            tag_name = Some(name);
        }
        if let Some(name) = tag_name {
            schema["discriminator"] = json!({"propertyName": name, "mapping": mapping});
        }
    }
    for (name, schema) in hoisted {
        schemas.insert(name, schema);
    }
    if let Ok(done) = serde_json::from_value(doc) {
        *openapi = done;
    }
}

fn problem(description: &str) -> utoipa::openapi::Response {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// Every route with its OpenAPI operation.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(uploads::upload_model, uploads::list_models))
        .routes(routes!(uploads::get_model, uploads::delete_model))
        .routes(routes!(uploads::model_file))
        .routes(routes!(uploads::upload_dataset, uploads::list_datasets))
        .routes(routes!(uploads::get_dataset, uploads::delete_dataset))
        .routes(routes!(uploads::dataset_file))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(results::job_events))
        .routes(routes!(results::job_report))
        .routes(routes!(results::job_log))
        .routes(routes!(results::list_artifacts))
        .routes(routes!(results::get_artifact))
        .routes(routes!(teams::me))
        .routes(routes!(teams::create_project, teams::list_projects))
        .routes(routes!(teams::get_project))
        .routes(routes!(teams::set_quotas))
        .routes(routes!(teams::create_key, teams::list_keys))
        .routes(routes!(teams::revoke_key))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::delete_webhook))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
}

/// The complete document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = api_router().into_openapi();
    finish(&mut doc);
    doc
}

/// The document as pretty JSON with a trailing newline (the committed file's form).
pub fn document_json() -> String {
    let mut doc = document();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut s = doc
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    s.push('\n');
    s
}
