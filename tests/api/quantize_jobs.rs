//! Quantize jobs through the API: every mode, the accuracy budget and `mode: auto`.
use crate::helpers::{spawn_app, stage_artifact_in_python, Setup, TestApp};
use serde_json::{json, Value};

async fn run_job(app: &TestApp, spec: Value) -> Value {
    let r = app.post_job(&spec).await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    app.drain().await;
    let (_, report) = app
        .get_json(&format!("/jobs/{}/report", job["id"].as_str().unwrap()))
        .await;
    assert!(report["stages"].is_array(), "{report}");
    let mut report = report;
    report["job_id_for_test"] = job["id"].clone();
    report
}

async fn artifact_in_python(app: &TestApp, report: &Value, data: &str, output: &str) -> Value {
    let id = report["job_id_for_test"].as_str().unwrap();
    stage_artifact_in_python(app, id, &report["stages"][0], data, output)
        .await
        .1
}

#[tokio::test]
async fn jobs_in_every_mode_return_models_that_onnxruntime_python_runs_with_the_reported_accuracy()
{
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    for (stage, op, precision) in [
        (
            json!({"stage": "quantize", "mode": "dynamic", "allow_slower": true}),
            "MatMulInteger",
            "int8",
        ),
        (
            json!({"stage": "quantize", "mode": "weight_only", "bits": 4, "block_size": 16}),
            "MatMulNBits",
            "int4",
        ),
        (
            json!({"stage": "quantize", "mode": "weight_only"}),
            "DequantizeLinear",
            "int8",
        ),
        (
            json!({"stage": "quantize", "mode": "fp16"}),
            "Cast",
            "float16",
        ),
    ] {
        let report = run_job(
            &app,
            json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [stage.clone()]}),
        )
        .await;
        assert!(
            report["calibration"].is_null(),
            "{stage}: no calibration split without static mode"
        );
        assert_eq!(report["evaluated_samples"], 450, "{stage}");
        let layers = report["stages"][0]["layers"].as_array().unwrap();
        assert!(
            layers.iter().any(|l| l["precision"] == precision),
            "{stage}: {layers:?}"
        );
        let py = artifact_in_python(&app, &report, "digits_val.npz", "probabilities").await;
        assert!(
            py["ops"].as_array().unwrap().iter().any(|o| o == op),
            "{stage}: {py}"
        );
        assert_eq!(
            py["top1"].as_f64(),
            report["final"]["task"]["top1_accuracy"].as_f64(),
            "{stage}"
        );
        assert!(
            report["final"]["size"]["bytes"].as_u64()
                < report["baseline"]["size"]["bytes"].as_u64(),
            "{stage}"
        );
    }
}

#[tokio::test]
async fn a_budget_job_keeps_the_outlier_layers_float_explains_them_and_passes_its_verdict() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp_outlier.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let c = app.dataset("digits_train.npz").await;
    // Nearest rounding: the outlier layers cost more than the budget.
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "calibration_dataset_id": c["id"],
        "pipeline": [{"stage": "quantize", "mode": "static", "granularity": "per_tensor",
                      "weight_rounding": "nearest",
                      "max_accuracy_drop": 0.005, "allow_slower": true, "calibration": {"samples": 64}}]});
    let gptq_spec = {
        let mut s = spec.clone();
        s["pipeline"][0]
            .as_object_mut()
            .unwrap()
            .remove("weight_rounding");
        s
    };
    let report = run_job(&app, spec).await;
    let verdict = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["constraint"] == "stages/0/max_accuracy_drop")
        .unwrap_or_else(|| panic!("{}", report["verdicts"]))
        .clone();
    assert_eq!(verdict["passed"], true, "{verdict}");
    assert!(verdict["actual"].as_f64().unwrap() <= 0.005);
    let layers = report["stages"][0]["layers"].as_array().unwrap();
    let float: Vec<&Value> = layers
        .iter()
        .filter(|l| l["precision"] == "float")
        .collect();
    assert!(!float.is_empty(), "{layers:?}");
    for l in &float {
        assert!(
            l["reason"].as_str().unwrap().contains("accuracy budget"),
            "{l}"
        );
        assert!(l["sensitivity"].is_number(), "{l}");
    }
    assert!(
        layers.iter().any(|l| l["precision"] == "int8"),
        "{layers:?}"
    );
    let id = report["job_id_for_test"].as_str().unwrap();
    let log = String::from_utf8(
        app.get_bytes(&format!("/jobs/{id}/artifacts/job.log"))
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(log.contains("kept float for the accuracy budget"), "{log}");
    // GPTQ rounding (the default) holds the same budget with no more float layers.
    let report = run_job(&app, gptq_spec).await;
    let notes = report["stages"][0]["notes"].to_string();
    assert!(notes.contains("GPTQ weight rounding: "), "{notes}");
    let verdict = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["constraint"] == "stages/0/max_accuracy_drop")
        .unwrap()
        .clone();
    assert_eq!(verdict["passed"], true, "{verdict}");
    let gptq_float = report["stages"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["precision"] == "float")
        .count();
    assert!(
        gptq_float <= float.len(),
        "{gptq_float} vs {}: {notes}",
        float.len()
    );
}

#[tokio::test]
async fn mode_auto_quantizes_an_mlp_dynamically_and_a_cnn_statically() {
    let app = spawn_app(Setup::Embedded).await;
    let mlp = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let report = run_job(
        &app,
        json!({"model_id": mlp["id"], "dataset_id": d["id"],
        "pipeline": [{"stage": "quantize", "allow_slower": true}]}),
    )
    .await;
    let notes = report["stages"][0]["notes"].to_string();
    assert!(notes.contains("dynamic int8"), "{notes}");
    let cnn = app.model("digits_cnn.onnx").await;
    let images = app.dataset("digits_images.npz").await;
    let report = run_job(
        &app,
        json!({"model_id": cnn["id"], "dataset_id": images["id"],
        "pipeline": [{"stage": "quantize", "allow_slower": true, "calibration": {"samples": 32}}]}),
    )
    .await;
    let notes = report["stages"][0]["notes"].to_string();
    assert!(notes.contains("static int8 QDQ"), "{notes}");
    // The default calibration compares min/max with the histogram methods under the budget.
    assert!(
        notes.contains("calibration auto: every layer int8 scores"),
        "{notes}"
    );
    assert!(notes.contains("kept "), "{notes}");
    assert_eq!(report["calibration"]["source"], "split_of_dataset");
    // Bias correction of the budget's model: kept only when it scores no worse.
    let scored = bias_correction_scores(&notes);
    assert!(
        notes.contains("bias correction: moved the biases of"),
        "{notes}"
    );
    match scored {
        Some((with, without)) if with < without => assert!(notes.contains(": not kept"), "{notes}"),
        Some((with, without)) if with > without => {
            assert!(!notes.contains(": not kept"), "{notes}")
        }
        Some(_) => {}
        None => panic!("the bias correction note gives both scores: {notes}"),
    }
    // GPTQ rounding of the budget's model, before its bias correction.
    assert!(
        notes.contains("GPTQ weight rounding: ") && notes.contains("; bias correction: moved"),
        "{notes}"
    );
    let report = run_job(
        &app,
        json!({"model_id": cnn["id"], "dataset_id": images["id"],
        "pipeline": [{"stage": "quantize", "allow_slower": true, "bias_correction": false,
                      "weight_rounding": "nearest", "calibration": {"samples": 32}}]}),
    )
    .await;
    let notes = report["stages"][0]["notes"].to_string();
    assert!(notes.contains("static int8 QDQ"), "{notes}");
    assert!(!notes.contains("bias correction"), "{notes}");
    assert!(!notes.contains("GPTQ"), "{notes}");
}

/// The (with, without) scores of the bias correction note.
fn bias_correction_scores(notes: &str) -> Option<(f64, f64)> {
    let at = notes.find("bias correction:")?;
    let rest = &notes[at..];
    let rest = &rest[rest.find("the budget's model scores")?..];
    let numbers: Vec<f64> = rest
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| s.contains('.') && s.len() > 2)
        .filter_map(|s| s.parse().ok())
        .take(2)
        .collect();
    (numbers.len() == 2).then(|| (numbers[0], numbers[1]))
}

#[tokio::test]
async fn a_qat_job_wins_back_what_static_ptq_loses_and_reports_its_export_parity() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp_coarse.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    let c = app.dataset("digits_train.npz").await;
    let spec = json!({"model_id": m["id"], "dataset_id": d["id"], "train_dataset_id": t["id"],
        "calibration_dataset_id": c["id"], "seed": 7,
        "pipeline": [{"stage": "quantize", "mode": "qat", "max_accuracy_drop": 1, "allow_slower": true,
                      "calibration": {"method": "minmax"},
                      "qat": {"epochs": 8, "learning_rate": 0.001, "patience": 0}}]});
    let report = run_job(&app, spec.clone()).await;
    let stage = &report["stages"][0];
    let parity = &stage["qat"];
    assert_eq!(parity["metric"], "top-1 accuracy", "{stage}");
    let (fq, ort, before) = (
        parity["fake_quant"].as_f64().unwrap(),
        parity["onnx_runtime"].as_f64().unwrap(),
        parity["before_training"].as_f64().unwrap(),
    );
    assert!(
        parity["difference_points"].as_f64().unwrap() <= 0.1,
        "{parity}"
    );
    assert!((fq - ort).abs() <= 0.001, "{parity}");
    let float = report["baseline"]["task"]["top1_accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        float - before >= 0.01,
        "the fixture makes PTQ lose a point: {parity}"
    );
    assert!(
        ort - before >= (float - before) / 2.0,
        "float {float}: {parity}"
    );
    // The stage's model is the exported QDQ model, and ONNX Runtime in Python agrees.
    let top1 = stage["metrics"]["task"]["top1_accuracy"].as_f64().unwrap();
    assert_eq!(top1, ort, "{stage}");
    let py = artifact_in_python(&app, &report, "digits_val.npz", "probabilities").await;
    assert_eq!(py["top1"].as_f64().unwrap(), top1);
    assert!(
        py["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "QuantizeLinear"),
        "{py}"
    );
    let notes = stage["notes"].to_string();
    assert!(notes.contains("quantization-aware training"), "{notes}");
    assert!(notes.contains("epoch 8:"), "{notes}");
    // Determinism: the same spec and seed give the same report.
    let again = run_job(&app, spec.clone()).await;
    assert_eq!(again["stages"][0]["qat"], stage["qat"]);
    assert_eq!(
        again["stages"][0]["metrics"]["task"],
        stage["metrics"]["task"]
    );
    // The stage's own defaults: a small learning rate and a short schedule for a model that is
    // already trained, said in the notes; never worse than static PTQ.
    let mut defaults = spec;
    defaults["pipeline"][0]["qat"] = json!({});
    let report = run_job(&app, defaults).await;
    let stage = &report["stages"][0];
    let schedule = stage["training"]["schedule"].as_str().unwrap();
    assert!(
        schedule.contains("5 epochs of 36 steps") && schedule.contains("peak learning rate 1.0e-4"),
        "{schedule}"
    );
    let parity = &stage["qat"];
    assert!(
        parity["onnx_runtime"].as_f64().unwrap() >= before - 0.01,
        "{parity}"
    );
}

#[tokio::test]
async fn qat_and_reduce_range_specs_are_validated_with_pointers() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let t = app.dataset("digits_train.npz").await;
    for (stage, train, pointer) in [
        (
            json!({"stage": "quantize", "mode": "qat"}),
            false,
            "/train_dataset_id",
        ),
        (
            json!({"stage": "quantize", "mode": "static", "qat": {"epochs": 2}}),
            true,
            "/pipeline/0/qat",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "qat": {"alpha": 2}}),
            true,
            "/pipeline/0/qat/alpha",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "qat": {"epochs": 0}}),
            true,
            "/pipeline/0/qat/epochs",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "qat": {"epoch": 3}}),
            true,
            "/pipeline/0/qat/epoch",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "qat": 3}),
            true,
            "/pipeline/0/qat",
        ),
        (
            json!({"stage": "quantize", "reduce_range": "yes"}),
            false,
            "/pipeline/0/reduce_range",
        ),
        (
            json!({"stage": "quantize", "mode": "fp16", "reduce_range": true}),
            false,
            "/pipeline/0/reduce_range",
        ),
        (
            json!({"stage": "quantize", "mode": "dynamic", "bias_correction": true}),
            false,
            "/pipeline/0/bias_correction",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "bias_correction": true}),
            true,
            "/pipeline/0/bias_correction",
        ),
        (
            json!({"stage": "quantize", "bias_correction": "on"}),
            false,
            "/pipeline/0/bias_correction",
        ),
        (
            json!({"stage": "quantize", "mode": "dynamic", "weight_rounding": "gptq"}),
            false,
            "/pipeline/0/weight_rounding",
        ),
        (
            json!({"stage": "quantize", "mode": "qat", "weight_rounding": "gptq"}),
            true,
            "/pipeline/0/weight_rounding",
        ),
        (
            json!({"stage": "quantize", "weight_rounding": "adaround"}),
            false,
            "/pipeline/0/weight_rounding",
        ),
    ] {
        let mut spec = json!({"model_id": m["id"], "dataset_id": d["id"], "pipeline": [stage]});
        if train {
            spec["train_dataset_id"] = t["id"].clone();
        }
        let r = app.post_job(&spec).await;
        assert_eq!(r.status(), 422, "{spec}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["pointer"] == pointer),
            "{spec}: {body}"
        );
    }
    let (_, jobs) = app.get_json("/jobs").await;
    assert_eq!(
        jobs["items"].as_array().map_or(0, Vec::len),
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn mode_auto_on_an_mlp_with_calibration_data_measures_both_int8_forms_and_keeps_one() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp_big.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    let c = app.dataset("digits_train.npz").await;
    let report = run_job(
        &app,
        json!({"model_id": m["id"], "dataset_id": d["id"], "calibration_dataset_id": c["id"],
               "pipeline": [{"stage": "quantize", "calibration": {"samples": 64}}]}),
    )
    .await;
    let stage = &report["stages"][0];
    let notes = stage["notes"].to_string();
    assert!(
        notes.contains("built both int8 forms and kept")
            && notes.contains("dynamic ")
            && notes.contains("static "),
        "{notes}"
    );
    let kept_static = notes.contains("kept static (");
    let py = artifact_in_python(&app, &report, "digits_val.npz", "probabilities").await;
    let ops = py["optimized_ops"].to_string();
    if kept_static {
        // Every MatMul + bias pair became one Gemm, which ONNX Runtime fuses to QGemm; the
        // logits leave the last QGemm as float (no DequantizeLinear before the Softmax).
        assert!(
            ops.contains("QGemm") && !ops.contains("QLinearAdd"),
            "{ops}"
        );
        assert!(!ops.contains("DequantizeLinear"), "{ops}");
    } else {
        assert!(ops.contains("DynamicQuantizeMatMul"), "{ops}");
    }
    // The label lookup over classes 0..9 is one ArgMax.
    assert!(
        !ops.contains("ArrayFeatureExtractor") && ops.contains("ArgMax"),
        "{ops}"
    );
    assert!(notes.contains("label lookup"), "{notes}");
    assert_eq!(
        py["top1"].as_f64().unwrap(),
        stage["metrics"]["task"]["top1_accuracy"].as_f64().unwrap()
    );
    assert_eq!(report["calibration"]["source"], "calibration_dataset");
}

#[tokio::test]
async fn reduce_range_in_the_spec_decides_the_weight_bits_on_every_worker() {
    let app = spawn_app(Setup::Embedded).await;
    let m = app.model("digits_mlp.onnx").await;
    let d = app.dataset("digits_val.npz").await;
    for reduce in [true, false] {
        let report = run_job(
            &app,
            json!({"model_id": m["id"], "dataset_id": d["id"],
                   "pipeline": [{"stage": "quantize", "mode": "dynamic", "reduce_range": reduce,
                                 "allow_slower": true, "max_accuracy_drop": 1}]}),
        )
        .await;
        let stage = &report["stages"][0];
        let notes = stage["notes"].to_string();
        assert_eq!(notes.contains("7 bits, [-63, 63]"), reduce, "{notes}");
        let py = artifact_in_python(&app, &report, "digits_val.npz", "probabilities").await;
        assert_eq!(
            py["top1"].as_f64().unwrap(),
            stage["metrics"]["task"]["top1_accuracy"].as_f64().unwrap()
        );
        let drop = report["baseline"]["task"]["top1_accuracy"]
            .as_f64()
            .unwrap()
            - stage["metrics"]["task"]["top1_accuracy"].as_f64().unwrap();
        assert!(drop <= 0.01, "{reduce}: dropped {drop}");
    }
}
