//! Pruning jobs through the API: unstructured and 2:4 masks checked weight by weight on the
//! artifact, structured channel and head removal with recovery, and a three-stage
//! distill -> prune -> quantize pipeline.
use crate::helpers::{
    run_job, spawn_app, spawn_with, stage_artifact_in_python, test_settings, top1, Setup, TestApp,
};
use serde_json::{json, Value};
use shrink::engine::onnx::load_model_bytes;
use shrink::engine::onnx::proto::ModelProto;
use shrink::engine::onnx::tensor::{dims, f32_values};

/// The stage's artifact: parsed here, and run in onnxruntime-Python, whose top-1 must be the
/// report's.
async fn artifact(app: &TestApp, id: &str, stage: &Value, data: &str, output: &str) -> ModelProto {
    let (bytes, py) = stage_artifact_in_python(app, id, stage, data, output).await;
    assert_eq!(py["top1"].as_f64().unwrap(), top1(&stage["metrics"]));
    load_model_bytes(bytes).unwrap().proto
}

fn weight(model: &ModelProto, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no initializer {name}"));
    (dims(t), f32_values(t).unwrap())
}

fn pruned_layers(stage: &Value) -> Vec<Value> {
    stage["pruning"]["layers"].as_array().unwrap().clone()
}

#[tokio::test]
async fn half_magnitude_pruning_zeroes_exactly_half_and_says_it_runs_no_faster() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    for scope in ["per_layer", "global"] {
        let (id, report) = run_job(
            &app,
            json!({"model_id": m["id"], "dataset_id": d["id"],
                   "pipeline": [{"stage": "prune", "sparsity": 0.5, "scope": scope, "skip_first": false}]}),
        )
        .await;
        let stage = &report["stages"][0];
        let p = &stage["pruning"];
        assert_eq!(p["method"], "magnitude");
        assert_eq!(p["verified"], true, "{p}");
        assert_eq!(p["runtime_speedup_expected"], false);
        assert!(p["runtime_note"]
            .as_str()
            .unwrap()
            .contains("do not make ONNX Runtime faster"));
        assert!(
            p["zstd_bytes_after"].as_u64().unwrap() * 10
                < p["zstd_bytes_before"].as_u64().unwrap() * 8,
            "half the weights zero compress better: {p}"
        );
        // The first two layers pruned, the classifier (last) left dense.
        let layers = pruned_layers(stage);
        assert_eq!(layers.len(), 2, "{p}");
        let model = artifact(&app, &id, stage, "digits_val.npz", "probabilities").await;
        let mut zeros_total = 0;
        let mut count_total = 0;
        for l in &layers {
            let (_, values) = weight(&model, l["weight"].as_str().unwrap());
            let zeros = values.iter().filter(|v| **v == 0.0).count();
            assert_eq!(
                l["nonzero_after"].as_u64().unwrap() as usize,
                values.len() - zeros
            );
            if scope == "per_layer" {
                assert_eq!(zeros, values.len() / 2, "{l}");
            }
            zeros_total += zeros;
            count_total += values.len();
        }
        assert_eq!(zeros_total, count_total / 2, "{scope}");
        let drop = report["deltas"]["accuracy_drop"].as_f64().unwrap();
        assert!(
            drop <= 0.02,
            "{scope}: half of a trained MLP's smallest weights cost {drop}"
        );
    }
}

#[tokio::test]
async fn two_four_sparsity_holds_in_every_group_of_four_along_the_input_axis() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"],
               "pipeline": [{"stage": "prune", "method": "n_m", "skip_first": false, "skip_last": false}]}),
    )
    .await;
    let stage = &report["stages"][0];
    let p = &stage["pruning"];
    assert_eq!(p["verified"], true, "{p}");
    assert!(p["runtime_note"]
        .as_str()
        .unwrap()
        .contains("2:4 sparsity runs no faster"));
    let layers = pruned_layers(stage);
    assert_eq!(layers.len(), 3, "{p}");
    let model = artifact(&app, &id, stage, "digits_val.npz", "probabilities").await;
    for l in &layers {
        assert_eq!(l["pattern"], "2:4");
        // sklearn's MatMul weights are [inputs, outputs]: groups run down each column.
        let (d, values) = weight(&model, l["weight"].as_str().unwrap());
        let (k, n) = (d[0], d[1]);
        for col in 0..n {
            for g in (0..k).step_by(4) {
                let nz = (g..g + 4).filter(|&r| values[r * n + col] != 0.0).count();
                assert!(nz <= 2, "{l}: column {col} rows {g}..{} hold {nz}", g + 4);
            }
        }
        let zeros = values.iter().filter(|v| **v == 0.0).count();
        assert_eq!(zeros, values.len() / 2);
    }
    assert!(p["zstd_bytes_after"].as_u64() < p["zstd_bytes_before"].as_u64());
}

#[tokio::test]
async fn half_of_the_digits_cnn_channels_go_and_recovery_keeps_accuracy_within_a_point() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_cnn_trained.onnx").await;
    let d = app.dataset("digits_images.npz").await;
    let t = app.dataset("digits_images_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"], "seed": 1,
               "pipeline": [{"stage": "prune", "method": "structured", "sparsity": 0.5,
                             "finetune": {"epochs": 8, "patience": 0}}]}),
    )
    .await;
    let stage = &report["stages"][0];
    let p = &stage["pruning"];
    assert_eq!(p["verified"], true, "{p}");
    assert_eq!(p["runtime_speedup_expected"], true);
    let patterns: Vec<String> = pruned_layers(stage)
        .iter()
        .map(|l| l["pattern"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        patterns,
        vec![
            "channels 64 -> 32",
            "channels 128 -> 64",
            "channels 128 -> 64"
        ]
    );
    let drop = report["deltas"]["accuracy_drop"].as_f64().unwrap();
    let notes = stage["notes"].to_string();
    assert!(drop <= 0.01, "accuracy drop {drop}: {notes}");
    // Before recovery's first step: the BatchNormalization statistics re-estimated and scored.
    assert!(
        notes.contains("BatchNorm re-estimation (no gradient step): 1 BatchNormalization layer(s)"),
        "{notes}"
    );
    let (pb, pa) = (
        report["baseline"]["size"]["parameters"].as_u64().unwrap(),
        stage["metrics"]["size"]["parameters"].as_u64().unwrap(),
    );
    assert!(pa * 3 < pb, "parameters {pb} -> {pa}");
    // The slimmer graph, BatchNormalization sliced with its convolution, runs in ONNX Runtime.
    let model = artifact(&app, &id, stage, "digits_images.npz", "logits").await;
    for (name, want) in [
        ("w1", vec![32, 1, 3, 3]),
        ("bn_scale", vec![32]),
        ("w2", vec![64, 32, 3, 3]),
        ("w3", vec![64, 64, 3, 3]),
        ("wf", vec![10, 64]),
    ] {
        assert_eq!(weight(&model, name).0, want, "{name}");
    }
}

/// Sixty labelled images and six hundred without labels: recovery learns the dense model's
/// outputs on all of them (KL alone on the unlabelled ones), validates on held-out rows of both,
/// and says so; unlabelled rows that do not fit the model are refused before the job is queued.
#[tokio::test]
async fn recovery_learns_from_unlabelled_rows_beside_a_few_labelled_ones() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_cnn_trained.onnx").await;
    let d = app.dataset("digits_images.npz").await;
    let t = app.dataset("digits_images_few.npz").await;
    let u = app.dataset("digits_images_unlabelled.npz").await;
    let wrong = app.dataset("digits_unlabelled.npz").await;
    let spec = |unlabelled: &Value| {
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
               "unlabelled_dataset_id": unlabelled, "seed": 1,
               "pipeline": [{"stage": "prune", "method": "structured", "sparsity": 0.5,
                             "finetune": {"optimizer_steps": 150}}]})
    };
    let r = app.post_job(&spec(&wrong["id"])).await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        crate::helpers::problem_pointers(r).await,
        vec!["/unlabelled_dataset_id"]
    );
    let (_, report) = run_job(&app, spec(&u["id"])).await;
    let stage = &report["stages"][0];
    let notes = stage["notes"].to_string();
    assert!(
        notes.contains("561 rows, 510 of them from `unlabelled_dataset_id` (KL alone) (99 held out to pick the weights to keep, 90 of them unlabelled"),
        "{notes}"
    );
    assert!(
        notes.contains("schedule: 150 optimizer steps (`optimizer_steps` 150, 18 per epoch)"),
        "{notes}"
    );
    assert!(notes.contains("T²·KL alone on unlabelled ones"), "{notes}");
    let drop = report["deltas"]["accuracy_drop"].as_f64().unwrap();
    assert!(drop <= 0.02, "accuracy drop {drop}: {notes}");
}

#[tokio::test]
async fn distill_then_prune_then_quantize_reports_every_stage() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_cnn_trained.onnx").await;
    let d = app.dataset("digits_images.npz").await;
    let t = app.dataset("digits_images_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
               "calibration_dataset_id": t["id"], "seed": 2,
               "pipeline": [
                   {"stage": "distill", "width": 0.5, "epochs": 6, "patience": 0},
                   {"stage": "prune", "method": "structured", "sparsity": 0.25,
                    "finetune": {"epochs": 3, "patience": 0}},
                   {"stage": "quantize", "mode": "static", "allow_slower": true}]}),
    )
    .await;
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(
        stages
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["distill", "prune", "quantize"]
    );
    let mut bytes = report["baseline"]["size"]["bytes"].as_u64().unwrap();
    for s in stages {
        let metrics = &s["metrics"];
        let acc = top1(metrics);
        assert!(acc >= 0.9, "{}: top-1 {acc}: {}", s["stage"], s["notes"]);
        let now = metrics["size"]["bytes"].as_u64().unwrap();
        assert!(now < bytes, "{}: {now} bytes after {bytes}", s["stage"]);
        bytes = now;
        assert!(metrics["latency"]["batch_1"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(metrics["latency"]["batch_n"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(stages[1]["pruning"]["verified"].as_bool().unwrap());
    let last = &stages[2];
    let model = artifact(&app, &id, last, "digits_images.npz", "logits").await;
    let ops: Vec<&str> = model
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter_map(|n| n.op_type.as_deref())
        .collect();
    assert!(ops.contains(&"QuantizeLinear"), "{ops:?}");
    // The per-stage table is in the job log.
    let log = String::from_utf8(
        app.get_bytes(&format!("/jobs/{id}/artifacts/job.log"))
            .await
            .to_vec(),
    )
    .unwrap_or_default();
    assert!(log.contains("(prune, structured)"), "{log}");
}

#[tokio::test]
async fn half_of_minilm_heads_go_and_the_model_stays_valid() {
    let (mut settings, dir) = test_settings(Setup::Embedded).await;
    settings.max_upload_bytes = 128 * 1024 * 1024;
    let app = spawn_with(settings, dir, 0).await;
    let m = app.model("minilm1/minilm.onnx").await;
    let d = app.dataset("minilm1/polarity_eval.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"],
               "pipeline": [{"stage": "evaluate", "output": "logits"},
                            {"stage": "prune", "method": "structured", "targets": ["heads"]}]}),
    )
    .await;
    let stage = &report["stages"][1];
    let p = &stage["pruning"];
    assert_eq!(p["verified"], true, "{p}");
    let layers = pruned_layers(stage);
    assert_eq!(layers.len(), 1, "one encoder layer: {p}");
    assert_eq!(layers[0]["pattern"], "heads 12 -> 6");
    // A quarter of the layer's attention weights (q, k, v, output: 4 x 384 x 384) went.
    let removed = layers[0]["parameters_before"].as_u64().unwrap()
        - layers[0]["parameters_after"].as_u64().unwrap();
    assert_eq!(removed, 4 * 384 * 192 + 3 * 192);
    let emb = stage["metrics"]["fidelity"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["output"] == "sentence_embedding")
        .unwrap_or_else(|| panic!("{}", stage["metrics"]));
    let cosine = emb["cosine_mean"].as_f64().unwrap();
    assert!(cosine > 0.5 && cosine < 1.0, "cosine {cosine}");
    let (_, py) =
        stage_artifact_in_python(&app, &id, stage, "minilm1/polarity_eval.npz", "logits").await;
    assert_eq!(py["top1"].as_f64().unwrap(), top1(&stage["metrics"]));

    // FFN neurons: the intermediate MatMul's outputs pass a GELU written out as
    // x·0.5·(1 + erf(x/√2)) (two branches that join) before the output MatMul reads them.
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"],
               "pipeline": [{"stage": "evaluate", "output": "logits"},
                            {"stage": "prune", "method": "structured", "targets": ["neurons"], "multiple_of": 64}]}),
    )
    .await;
    let stage = &report["stages"][1];
    let layers = pruned_layers(stage);
    assert_eq!(layers.len(), 1, "{}", stage["pruning"]);
    assert_eq!(layers[0]["pattern"], "neurons 1536 -> 768");
    let (_, py) =
        stage_artifact_in_python(&app, &id, stage, "minilm1/polarity_eval.npz", "logits").await;
    assert_eq!(py["top1"].as_f64().unwrap(), top1(&stage["metrics"]));
}

#[tokio::test]
async fn a_model_with_nothing_to_prune_fails_the_job_with_a_clear_reason() {
    let app = spawn_app(Setup::Embedded).await;
    // Every weight of the two-input model feeds an output directly: no channel group.
    let m = app.model("two_input.onnx").await;
    let d = app.dataset("two_input.npz").await;
    let r = app
        .post_job(&json!({"model_id": m["id"], "dataset_id": d["id"],
                          "pipeline": [{"stage": "prune", "method": "structured"}]}))
        .await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    app.drain().await;
    let (_, status) = app
        .get_json(&format!("/jobs/{}", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["error"]["type"], "invalid_input", "{status}");
    let err = status["error"].to_string();
    assert!(
        err.contains("nothing in this model can be removed"),
        "{err}"
    );
}
