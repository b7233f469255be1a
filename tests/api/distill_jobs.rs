//! Training jobs through the API: distill (width, depth and uploaded students) and finetune,
//! and their spec validation.
use crate::helpers::{
    problem_pointers, run_job, spawn_app, spawn_with, stage_artifact_in_python, test_settings,
    top1, Setup, TestApp,
};
use serde_json::{json, Value};

/// The distilled artifact runs in onnxruntime-Python with the accuracy the report gives.
async fn check_artifact(app: &TestApp, id: &str, report: &Value) {
    let stage = &report["stages"][0];
    let (_, py) = stage_artifact_in_python(app, id, stage, "digits_val.npz", "probabilities").await;
    assert_eq!(py["top1"].as_f64().unwrap(), top1(&stage["metrics"]));
}

#[tokio::test]
async fn a_width_student_distilled_from_the_digits_mlp_keeps_97_percent_of_its_accuracy() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"], "seed": 3,
               "pipeline": [{"stage": "distill", "width": 0.25, "epochs": 25, "patience": 0}]}),
    )
    .await;
    let (base, stage) = (&report["baseline"], &report["stages"][0]);
    let notes = stage["notes"].to_string();
    assert!(
        notes.contains("student: the teacher at width 0.25"),
        "{notes}"
    );
    assert!(notes.contains("epoch 25:"), "{notes}");
    // The width-sliced student is validated before its first step, and it is not kept.
    assert!(notes.contains("before training: validation"), "{notes}");
    assert!(
        !notes.contains("kept the weights it started from"),
        "{notes}"
    );
    let (tb, ts) = (top1(base), top1(&stage["metrics"]));
    assert!(ts >= 0.97 * tb, "teacher {tb}, student {ts}: {notes}");
    let (pb, ps) = (
        base["size"]["parameters"].as_u64().unwrap(),
        stage["metrics"]["size"]["parameters"].as_u64().unwrap(),
    );
    assert!(ps * 4 <= pb, "{ps} vs {pb}");
    check_artifact(&app, &id, &report).await;
}

#[tokio::test]
async fn an_uploaded_student_is_distilled_and_the_same_seed_gives_the_same_report() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let s = app.model("digits_student.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
                      "student_model_id": s["id"], "seed": 4,
                      "pipeline": [{"stage": "distill", "epochs": 25, "patience": 0}]});
    let (id, report) = run_job(&app, spec.clone()).await;
    let stage = &report["stages"][0];
    assert!(stage["notes"]
        .to_string()
        .contains("the uploaded student_model_id"));
    let (tb, ts) = (top1(&report["baseline"]), top1(&stage["metrics"]));
    assert!(ts >= 0.97 * tb, "teacher {tb}, student {ts}");
    check_artifact(&app, &id, &report).await;
    // Determinism: the same spec and seed train the same student.
    let (_, again) = run_job(&app, spec).await;
    assert_eq!(
        again["stages"][0]["metrics"]["task"],
        stage["metrics"]["task"]
    );
    assert_eq!(again["stages"][0]["notes"], stage["notes"]);
}

#[tokio::test]
async fn distill_specs_are_validated_with_pointers() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    for (stage, needle_pointer) in [
        (json!({"stage": "distill"}), "/train_dataset_id"),
        (
            json!({"stage": "distill", "student": "uploaded"}),
            "/student_model_id",
        ),
        (
            json!({"stage": "distill", "width": 1.5}),
            "/pipeline/0/width",
        ),
        (
            json!({"stage": "distill", "multiple_of": 0}),
            "/pipeline/0/multiple_of",
        ),
        (
            json!({"stage": "distill", "epochs": 0}),
            "/pipeline/0/epochs",
        ),
        (
            json!({"stage": "distill", "temprature": 2}),
            "/pipeline/0/temprature",
        ),
        (
            json!({"stage": "distill", "schedule": "step"}),
            "/pipeline/0/schedule",
        ),
        (
            json!({"stage": "distill", "features": {"teacher": "h"}}),
            "/pipeline/0/features",
        ),
        (
            json!({"stage": "distill", "features": [{"student": "r1"}]}),
            "/pipeline/0/features/0/teacher",
        ),
        (
            json!({"stage": "distill", "features": [{"teacher": "h", "weight": 0}]}),
            "/pipeline/0/features/0/weight",
        ),
        (
            json!({"stage": "distill", "features": [{"teacher": "h", "layer": 2}]}),
            "/pipeline/0/features/0/layer",
        ),
    ] {
        let r = app
            .post_job(&json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [stage]}))
            .await;
        assert_eq!(r.status(), 422);
        assert!(r
            .headers()
            .get("content-type")
            .is_some_and(|c| c.to_str().unwrap().contains("problem+json")));
        let body: Value = r.json().await.unwrap();
        let pointers: Vec<&str> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["pointer"].as_str())
            .collect();
        assert!(pointers.contains(&needle_pointer), "{stage}: {body}");
    }
}

#[tokio::test]
async fn a_model_whose_output_needs_ops_outside_the_training_subset_is_refused_at_creation() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    // The upload says which outputs training cannot reach: `label` goes through ArgMax.
    assert!(
        m["summary"]["untrainable_ops"]["label"]
            .to_string()
            .contains("ArgMax"),
        "{m}"
    );
    assert!(
        m["summary"]["untrainable_ops"]
            .get("probabilities")
            .is_none(),
        "{m}"
    );
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    for stage in [
        json!({"stage": "distill", "output": "label"}),
        json!({"stage": "quantize", "mode": "qat", "qat": {"output": "label"}}),
    ] {
        let r = app
            .post_job(
                &json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
                              "pipeline": [stage]}),
            )
            .await;
        assert_eq!(r.status(), 422);
        let body: Value = r.json().await.unwrap();
        let e = &body["errors"][0];
        assert_eq!(e["pointer"], "/model_id", "{body}");
        assert!(e["detail"].as_str().unwrap().contains("ArgMax"), "{body}");
    }
}

#[tokio::test]
async fn a_depth_student_of_minilm_keeps_every_other_encoder_layer() {
    // The 90 MB model needs a larger upload limit than the tests' default.
    let (mut settings, dir) = test_settings(Setup::Embedded).await;
    settings.max_upload_bytes = 128 * 1024 * 1024;
    let app = spawn_with(settings, dir, 0).await;
    let m = app.model("minilm6/minilm.onnx").await;
    let d = app.dataset("minilm6/polarity_eval.npz").await;
    let t = app.dataset("minilm6/polarity_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
               "pipeline": [{"stage": "distill", "student": "depth", "output": "logits",
                             "epochs": 1, "batch_size": 16, "learning_rate": 0.0001}]}),
    )
    .await;
    let stage = &report["stages"][0];
    let notes = stage["notes"].to_string();
    assert!(
        notes.contains("kept encoder layers [0, 2, 4] of 6"),
        "{notes}"
    );
    let (pb, ps) = (
        report["baseline"]["size"]["parameters"].as_u64().unwrap(),
        stage["metrics"]["size"]["parameters"].as_u64().unwrap(),
    );
    // Three of six encoder layers (the embeddings stay): about 5.3 M parameters fewer.
    assert!(pb - ps > 5_000_000, "{pb} -> {ps}");
    let name = stage["artifact"].as_str().unwrap();
    let bytes = app.get_bytes(&format!("/jobs/{id}/artifacts/{name}")).await;
    assert!(bytes.len() < 80_000_000, "{}", bytes.len());
}

#[tokio::test]
async fn finetuning_with_labels_recovers_accuracy_and_without_labels_keeps_it() {
    let app = spawn_app(Setup::Embedded).await;
    // Trained for 3 iterations only: room to improve.
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
               "pipeline": [{"stage": "finetune", "epochs": 5, "learning_rate": 0.001}]}),
    )
    .await;
    let stage = &report["stages"][0];
    assert!(stage["notes"]
        .to_string()
        .contains("cross-entropy on the labels"));
    let (before, after) = (top1(&report["baseline"]), top1(&stage["metrics"]));
    eprintln!("finetune with labels: {before} -> {after}");
    assert!(
        after >= before + 0.01,
        "{before} -> {after}: {}",
        stage["notes"]
    );
    check_artifact(&app, &id, &report).await;

    let u = app.dataset("digits_train_unlabelled.npz").await;
    let (_, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": u["id"],
               "pipeline": [{"stage": "finetune", "epochs": 2, "learning_rate": 0.0005}]}),
    )
    .await;
    let stage = &report["stages"][0];
    assert!(stage["notes"]
        .to_string()
        .contains("KL to the model before the stage"));
    let (before, after) = (top1(&report["baseline"]), top1(&stage["metrics"]));
    eprintln!("finetune without labels: {before} -> {after}");
    assert!(after >= before - 0.01, "{before} -> {after}");
}

#[tokio::test]
async fn a_feature_hint_trains_through_the_api_and_a_wrong_tensor_fails_the_job_naming_it() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let s = app.model("digits_student.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let spec = |teacher: &str| {
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
               "student_model_id": s["id"], "seed": 4,
               "pipeline": [{"stage": "distill", "epochs": 10, "patience": 0,
                             "features": [{"teacher": teacher, "student": "r1", "weight": 0.5}]}]})
    };
    let (_, report) = run_job(&app, spec("next_activations1")).await;
    let stage = &report["stages"][0];
    let notes = stage["notes"].to_string();
    assert!(
        notes.contains("feature hint: + 0.5·MSE(student `r1`, teacher `next_activations1`)"),
        "{notes}"
    );
    let (tb, ts) = (top1(&report["baseline"]), top1(&stage["metrics"]));
    assert!(ts >= 0.97 * tb, "teacher {tb}, student {ts}");

    let r = app.post_job(&spec("next_activations")).await;
    assert_eq!(
        r.status(),
        202,
        "tensor shapes are known only to the worker"
    );
    let job: Value = r.json().await.unwrap();
    app.drain().await;
    let (_, j) = app
        .get_json(&format!("/jobs/{}", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error"]["type"], "invalid_input", "{j}");
    let text = j["error"].to_string();
    assert!(text.contains("features") && text.contains("shape"), "{j}");
}

#[tokio::test]
async fn an_uploaded_teacher_distils_the_jobs_model_as_the_student() {
    let app = spawn_app(Setup::Embedded).await;
    let teacher = app.model("digits_mlp.onnx").await;
    let student = app.model("digits_student.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": student["id"], "teacher_model_id": teacher["id"],
               "dataset_id": d["id"], "train_dataset_id": t["id"], "seed": 4,
               "pipeline": [{"stage": "distill", "epochs": 25, "patience": 0}]}),
    )
    .await;
    let (base, stage) = (&report["baseline"], &report["stages"][0]);
    assert!(
        stage["notes"]
            .to_string()
            .contains("teacher: the uploaded teacher_model_id; student: the job's model"),
        "{stage}"
    );
    // The job's model was trained, not replaced: same architecture, new weights.
    assert_eq!(
        stage["metrics"]["size"]["parameters"],
        base["size"]["parameters"]
    );
    assert_ne!(
        stage["metrics"]["task"], base["task"],
        "the student changed"
    );
    // It learned from the teacher: at least 97% of the teacher's accuracy on the same rows.
    let (_, teacher_eval) = run_job(
        &app,
        json!({"model_id": teacher["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate"}]}),
    )
    .await;
    let (tt, ts) = (top1(&teacher_eval["baseline"]), top1(&stage["metrics"]));
    assert!(ts >= 0.97 * tt, "teacher {tt}, student {ts}");
    check_artifact(&app, &id, &report).await;
}

#[tokio::test]
async fn a_teacher_without_a_distill_stage_or_with_a_derived_student_is_refused() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_student.onnx").await;
    let teacher = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    for (stage, pointer) in [
        (json!({"stage": "evaluate"}), "/teacher_model_id"),
        (
            json!({"stage": "distill", "student": "width"}),
            "/pipeline/0/student",
        ),
    ] {
        let r = app
            .post_job(&json!({"model_id": m["id"], "teacher_model_id": teacher["id"],
                              "dataset_id": d["id"], "train_dataset_id": t["id"], "pipeline": [stage]}))
            .await;
        let pointers = problem_pointers(r).await;
        assert!(
            pointers.iter().any(|p| p == pointer),
            "{stage}: {pointers:?}"
        );
    }
}
