//! Segmentation through the API: per-pixel metrics in evaluate jobs, a mean-IoU accuracy budget
//! in quantize jobs, and the edge practice pipeline: Shrink trains a U-Net teacher on rendered
//! scenes, then distils it into a student a quarter of its size, prunes 20% of every block's
//! channels (skip connections kept consistent) and trains int8 with QAT.
use crate::fixtures::{fixture, reference};
use crate::helpers::{run_job, spawn_app, Setup, TestApp};
use serde_json::{json, Value};

fn miou(metrics: &Value) -> f64 {
    metrics["task"]["segmentation"]["mean_iou"]
        .as_f64()
        .unwrap()
}

#[tokio::test]
async fn evaluate_reports_the_pixel_metrics_numpy_computes_and_the_budget_reads_mean_iou() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("seg.onnx").await;
    let d = app.dataset("seg_val.npz").await;
    let c = app.dataset("seg_train.npz").await;
    let (_, report) = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "calibration_dataset_id": c["id"],
               "pipeline": [{"stage": "evaluate", "latency_runs": 3},
                            {"stage": "quantize", "mode": "static", "max_accuracy_drop": 0.01}],
               "constraints": {"max_accuracy_drop": 0.01}}),
    )
    .await;
    let want = &reference()["seg"];
    let task = &report["baseline"]["task"];
    assert_eq!(task["task"], "segmentation");
    assert_eq!(task["metric"], "mean IoU");
    for key in ["pixel_accuracy", "mean_iou", "mean_dice"] {
        let got = task["segmentation"][key].as_f64().unwrap();
        assert!(
            (got - want[key].as_f64().unwrap()).abs() <= 1e-9,
            "{key}: {got} vs {}",
            want[key]
        );
    }
    let verdict = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["constraint"] == "max_accuracy_drop")
        .unwrap();
    assert!(
        verdict["detail"]
            .as_str()
            .unwrap()
            .starts_with("mean IoU drop"),
        "{verdict}"
    );
    assert_eq!(verdict["passed"], true, "{verdict}");
    assert_eq!(report["deltas"]["metric"], "mean IoU");
    let q = &report["stages"][1];
    assert!(
        q["metrics"]["fidelity"][0]["mask_iou"].as_f64().unwrap() > 0.9,
        "{q}"
    );
}

/// Trains the fixture's untrained U-Net on the rendered scenes (Shrink's own finetune stage)
/// and uploads the result as a model.
async fn trained_teacher(app: &TestApp) -> (Value, Value) {
    let m = app.model("unet_teacher.onnx").await;
    let d = app.dataset("scenes_val.npz").await;
    let t = app.dataset("scenes_train.npz").await;
    let (id, report) = run_job(
        app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"], "seed": 1,
               "pipeline": [{"stage": "evaluate", "latency_runs": 3},
                            {"stage": "finetune", "epochs": 8, "learning_rate": 0.005, "batch_size": 16,
                             "patience": 0}]}),
    )
    .await;
    let stage = &report["stages"][1];
    let name = stage["artifact"].as_str().expect("the trained teacher");
    let bytes = app.get_bytes(&format!("/jobs/{id}/artifacts/{name}")).await;
    let file = app.data_dir.path().join("unet_trained.onnx");
    std::fs::write(&file, &bytes).unwrap();
    let r = app.upload_raw("/models", &file, None).await;
    assert_eq!(r.status(), 201);
    (r.json().await.unwrap(), stage["metrics"].clone())
}

#[tokio::test]
async fn the_practice_pipeline_distils_prunes_and_trains_int8_a_u_net_keeping_its_mean_iou() {
    let app = spawn_app(Setup::Embedded).await;
    let (teacher, trained) = trained_teacher(&app).await;
    let teacher_miou = miou(&trained);
    assert!(
        teacher_miou > 0.8,
        "the teacher trained to mean IoU {teacher_miou}"
    );
    let d = app.dataset("scenes_val.npz").await;
    let t = app.dataset("scenes_train.npz").await;
    let (id, report) = run_job(
        &app,
        json!({"model_id": teacher["id"], "dataset_id": d["id"], "train_dataset_id": t["id"], "seed": 2,
               "pipeline": [
                   {"stage": "evaluate", "latency_runs": 3},
                   {"stage": "distill", "width": 0.45, "epochs": 24, "learning_rate": 0.01, "batch_size": 16,
                    "patience": 0},
                   {"stage": "prune", "method": "structured", "sparsity": 0.2,
                    "finetune": {"epochs": 4, "learning_rate": 0.002, "batch_size": 16, "patience": 0}},
                   {"stage": "quantize", "mode": "qat", "allow_slower": true,
                    "qat": {"epochs": 3, "learning_rate": 0.0005, "batch_size": 16}}]}),
    )
    .await;
    let stages = report["stages"].as_array().unwrap();
    let (distilled, pruned, int8) = (&stages[1], &stages[2], &stages[3]);
    let params = |m: &Value| m["size"]["parameters"].as_u64().unwrap();
    let base = &report["baseline"];
    assert!(
        params(&distilled["metrics"]) * 4 <= params(base),
        "student {} vs teacher {}",
        params(&distilled["metrics"]),
        params(base)
    );
    // Every block lost a fifth of its channels, skip connections included.
    let layers = pruned["pruning"]["layers"].as_array().unwrap();
    for block in ["enc1b", "enc2b", "mid", "up1"] {
        assert!(
            layers.iter().any(|l| l["node"] == block),
            "{block} was not pruned: {}",
            pruned["notes"]
        );
    }
    let final_miou = miou(&int8["metrics"]);
    assert!(
        final_miou >= 0.95 * miou(base),
        "teacher {} -> distilled {} -> pruned {} -> int8 {final_miou}",
        miou(base),
        miou(&distilled["metrics"]),
        miou(&pruned["metrics"])
    );
    let bytes = |m: &Value| m["size"]["bytes"].as_u64().unwrap();
    assert!(
        bytes(&int8["metrics"]) * 4 <= bytes(base),
        "{} vs {}",
        bytes(&int8["metrics"]),
        bytes(base)
    );
    // The int8 artifact runs in onnxruntime-Python.
    let name = int8["artifact"].as_str().unwrap();
    let file = app.data_dir.path().join(name);
    std::fs::write(
        &file,
        app.get_bytes(&format!("/jobs/{id}/artifacts/{name}")).await,
    )
    .unwrap();
    let py = crate::fixtures::onnxruntime_python(&file, &fixture("scenes_val.npz"), "logits");
    assert!(
        py["optimized_ops"].to_string().contains("QLinearConv"),
        "{}",
        py["optimized_ops"]
    );
}

#[tokio::test]
async fn task_options_that_do_not_fit_the_model_are_refused_with_pointers() {
    use crate::helpers::problem_pointers;
    let app = spawn_app(Setup::Embedded).await;
    let seg = app.model("seg.onnx").await;
    let d = app.dataset("seg_val.npz").await;
    for (stage, pointer) in [
        (
            json!({"stage": "evaluate", "task": "sequence"}),
            "/pipeline/0/task",
        ),
        (
            json!({"stage": "evaluate", "threshold": 1.5}),
            "/pipeline/0/threshold",
        ),
        (
            json!({"stage": "evaluate", "blank": 0}),
            "/pipeline/0/blank",
        ),
        (
            json!({"stage": "evaluate", "task": "ctc", "characters": []}),
            "/pipeline/0/characters",
        ),
    ] {
        let r = app
            .post_job(&json!({"model_id": seg["id"], "dataset_id": d["id"], "pipeline": [stage]}))
            .await;
        assert_eq!(r.status(), 422);
        let pointers = problem_pointers(r).await;
        assert!(
            pointers.iter().any(|p| p == pointer),
            "{stage}: {pointers:?}"
        );
    }
    // Text labels score a CTC model but cannot train it.
    let ctc = app.model("ctc.onnx").await;
    let text = app.dataset("ctc_val.npz").await;
    let r = app
        .post_job(
            &json!({"model_id": ctc["id"], "dataset_id": text["id"], "train_dataset_id": text["id"],
                          "pipeline": [{"stage": "finetune", "epochs": 1}]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert!(problem_pointers(r)
        .await
        .contains(&"/train_dataset_id".to_string()));
    // And nothing was queued by any of them.
    let (_, jobs) = app.get_json("/jobs").await;
    assert_eq!(jobs["items"].as_array().map_or(0, Vec::len), 0, "{jobs}");
}
