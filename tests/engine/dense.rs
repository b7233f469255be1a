//! Dense and sequence outputs: segmentation, per-position and CTC metrics equal what numpy
//! computes from ONNX Runtime's outputs, and the accuracy budget measures them.
use crate::fixtures::{fixture, reference};
use shrink::domain::report::TaskKind;
use shrink::domain::spec::EvaluateOptions;
use shrink::engine::dataset::{self, Dataset, Tensor, TensorData};
use shrink::engine::evaluate::{evaluate, Evaluation};
use shrink::engine::onnx::{load_model_file, LoadedModel};
use shrink::engine::quantize::{self, budget, CalibrationData, Prepared, Scheme};
use shrink::engine::runtime::Runtime;
use shrink::engine::{EngineError, NoProgress};
use std::sync::Arc;

fn rt() -> Arc<Runtime> {
    Runtime::global(None).expect("ONNX Runtime from the project's .venv")
}

fn quick() -> EvaluateOptions {
    EvaluateOptions {
        latency_runs: 2,
        warmup_runs: 0,
        ..Default::default()
    }
}

fn model(name: &str) -> LoadedModel {
    load_model_file(&fixture(name)).unwrap()
}

fn data(name: &str) -> Dataset {
    dataset::load(&fixture(name)).unwrap()
}

fn eval_with(
    m: &LoadedModel,
    d: &Dataset,
    opts: &EvaluateOptions,
) -> Result<Evaluation, EngineError> {
    evaluate(&rt(), m, d, opts, None, &NoProgress)
}

fn close(got: f64, want: &serde_json::Value, what: &str) {
    let want = want
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no reference"));
    assert!((got - want).abs() <= 1e-9, "{what}: {got} vs numpy {want}");
}

#[test]
fn segmentation_metrics_equal_numpy_on_onnx_runtime_outputs() {
    for (m, d, key, channels) in [
        ("seg.onnx", "seg_val.npz", "seg", 3),
        ("seg_binary.onnx", "seg_binary_val.npz", "seg_binary", 2),
    ] {
        let want = &reference()[key];
        let e = eval_with(&model(m), &data(d), &quick()).unwrap();
        let t = e.metrics.task.expect("labels give task metrics");
        assert_eq!(t.task, TaskKind::Segmentation, "{key}");
        assert_eq!(t.metric, "mean IoU");
        let s = t.segmentation.expect("segmentation metrics");
        assert_eq!(s.pixels, want["pixels"].as_u64().unwrap(), "{key}");
        close(s.pixel_accuracy, &want["pixel_accuracy"], key);
        close(s.mean_iou, &want["mean_iou"], key);
        close(s.mean_dice, &want["mean_dice"], key);
        close(t.score, &want["mean_iou"], key);
        close(t.top1_accuracy, &want["pixel_accuracy"], key);
        assert_eq!(s.per_class_iou.len(), channels);
        for (c, v) in s.per_class_iou.iter().enumerate() {
            close(
                v.unwrap(),
                &want["per_class_iou"][c],
                &format!("{key} class {c}"),
            );
        }
        assert!(
            e.notes.iter().any(|n| n.contains("scored as segmentation")),
            "{:?}",
            e.notes
        );
        // A model compared with itself: masks agree everywhere.
        let f = &e.metrics.fidelity[0];
        assert_eq!((f.mask_iou, f.top1_agreement), (Some(1.0), 1.0));
    }
}

/// The first `h` x `w` pixels of every image and label map.
fn crop(d: &Dataset, h: usize, w: usize) -> Dataset {
    let mut out = d.clone();
    for t in out.tensors.iter_mut() {
        let (rank, oh, ow) = (
            t.shape.len(),
            t.shape[t.shape.len() - 2],
            t.shape[t.shape.len() - 1],
        );
        let planes = t.shape[..rank - 2].iter().product::<usize>();
        let pick = |i: usize| {
            (0..planes)
                .flat_map(move |p| {
                    (0..h).flat_map(move |y| (0..w).map(move |x| p * oh * ow + y * ow + x))
                })
                .nth(i)
        };
        let n = planes * h * w;
        t.data = match &t.data {
            TensorData::F32(v) => TensorData::F32((0..n).map(|i| v[pick(i).unwrap()]).collect()),
            TensorData::I64(v) => TensorData::I64((0..n).map(|i| v[pick(i).unwrap()]).collect()),
            other => panic!("unexpected {}", other.dtype()),
        };
        t.shape[rank - 2] = h;
        t.shape[rank - 1] = w;
    }
    for info in out.summary.tensors.iter_mut() {
        let r = info.shape.len();
        info.shape[r - 2] = h as u64;
        info.shape[r - 1] = w as u64;
    }
    out
}

#[test]
fn other_spatial_sizes_run_through_the_same_dynamic_model_and_mismatched_labels_are_refused() {
    let m = model("seg.onnx");
    let small = crop(
        &data("seg_val.npz").select(&(0..8).collect::<Vec<_>>()),
        24,
        32,
    );
    let e = eval_with(&m, &small, &quick()).unwrap();
    let s = e.metrics.task.unwrap().segmentation.unwrap();
    assert!(s.pixels > 0 && s.pixels <= 8 * 24 * 32);
    assert!(s.pixel_accuracy > 0.9, "{s:?}");

    // Labels of another size than the output's map.
    let mut bad = small.clone();
    let labels = data("seg_val.npz").select(&(0..8).collect::<Vec<_>>());
    let l = labels.tensor("labels").unwrap().clone();
    *bad.tensors.iter_mut().find(|t| t.name == "labels").unwrap() = l;
    let err = eval_with(&m, &bad, &quick()).unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidDataset { problem, .. } if problem.contains("[N, 24, 32]")),
        "{err}"
    );
    // A named task the output cannot serve.
    let opts = EvaluateOptions {
        task: Some(TaskKind::Sequence),
        ..quick()
    };
    let err = eval_with(&m, &small, &opts).unwrap_err();
    assert!(err.to_string().contains("not a sequence output"), "{err}");
}

#[test]
fn per_position_and_ctc_metrics_equal_numpy() {
    let want = &reference()["tagger"];
    let e = eval_with(&model("tagger.onnx"), &data("tagger_val.npz"), &quick()).unwrap();
    let t = e.metrics.task.unwrap();
    assert_eq!(t.task, TaskKind::Sequence);
    let s = t.sequence.unwrap();
    assert_eq!(s.positions, want["positions"].as_u64().unwrap());
    close(
        s.position_accuracy.unwrap(),
        &want["position_accuracy"],
        "tagger",
    );
    close(t.score, &want["position_accuracy"], "tagger score");

    // String labels make it CTC; the characters come from the model's metadata.
    let want = &reference()["ctc"];
    let e = eval_with(&model("ctc.onnx"), &data("ctc_val.npz"), &quick()).unwrap();
    let t = e.metrics.task.unwrap();
    assert_eq!(
        (t.task, t.metric.as_str()),
        (TaskKind::Ctc, "sequence accuracy")
    );
    let s = t.sequence.unwrap();
    close(
        s.sequence_accuracy.unwrap(),
        &want["sequence_accuracy"],
        "ctc",
    );
    close(
        s.character_error_rate.unwrap(),
        &want["character_error_rate"],
        "ctc cer",
    );
    // Characters named in the spec win over the metadata: shifting them breaks every line.
    let opts = EvaluateOptions {
        task: Some(TaskKind::Ctc),
        characters: Some(["b", "c", "d", "e", "a"].map(String::from).to_vec()),
        ..quick()
    };
    let e = eval_with(&model("ctc.onnx"), &data("ctc_val.npz"), &opts).unwrap();
    let s = e.metrics.task.unwrap().sequence.unwrap();
    assert!(s.sequence_accuracy.unwrap() < 0.2, "{s:?}");
}

#[test]
fn time_major_ctc_outputs_score_exactly_as_batch_major_ones() {
    let val = data("ctc_val.npz");
    let want = eval_with(&model("ctc.onnx"), &val, &quick()).unwrap();
    let want_seq = want
        .metrics
        .task
        .as_ref()
        .unwrap()
        .sequence
        .clone()
        .unwrap();
    // Batches of 32 and 16 rows over 16 steps: the second batch alone could be either layout.
    for name in ["ctc_time_major.onnx", "ctc_time_major_b1.onnx"] {
        let e = evaluate(
            &rt(),
            &model(name),
            &val,
            &quick(),
            Some(&want.as_baseline()),
            &NoProgress,
        )
        .unwrap();
        assert!(
            e.notes.iter().any(|n| n.contains("`probs` is time-major")),
            "{name}: {:?}",
            e.notes
        );
        let t = e.metrics.task.unwrap();
        assert_eq!(t.task, TaskKind::Ctc, "{name}");
        let s = t.sequence.unwrap();
        assert_eq!(s.sequence_accuracy, want_seq.sequence_accuracy, "{name}");
        assert_eq!(
            s.character_error_rate, want_seq.character_error_rate,
            "{name}"
        );
        assert_eq!(e.outputs[0].shape, want.outputs[0].shape, "{name}");
        assert_eq!(e.outputs[0].values, want.outputs[0].values, "{name}");
        let f = &e.metrics.fidelity[0];
        assert_eq!(
            (f.top1_agreement, f.sequence_agreement),
            (1.0, Some(1.0)),
            "{name}"
        );
    }
    // The batch-major model is never read as time-major, even where a batch is as long as its
    // sequences.
    assert!(want.notes.iter().all(|n| !n.contains("time-major")));
}

#[test]
fn text_labels_cannot_feed_a_model_input() {
    let mut d = data("ctc_val.npz");
    let texts = d.tensor("labels").unwrap().clone();
    d.tensors.retain(|t| t.name != "x");
    d.tensors.push(Tensor {
        name: "x".into(),
        ..texts
    });
    let info = d
        .summary
        .tensors
        .iter_mut()
        .find(|t| t.name == "x")
        .unwrap();
    info.dtype = "str".into();
    info.shape = vec![info.shape[0]];
    let err = eval_with(&model("ctc.onnx"), &d, &quick()).unwrap_err();
    assert!(err.to_string().contains("holds text"), "{err}");
}

#[test]
fn the_accuracy_budget_on_a_segmenter_measures_mean_iou_and_keeps_it() {
    let (m, val, calib) = (
        model("seg.onnx"),
        data("seg_val.npz"),
        data("seg_train.npz"),
    );
    let scheme = Scheme::Static(crate::evaluate::static_options(true));
    let prepared = Prepared::new(
        &rt(),
        &m,
        &scheme,
        Some(CalibrationData {
            data: &calib,
            samples: 32,
        }),
        &NoProgress,
    )
    .unwrap();
    let runtime = rt();
    let scorer = budget::Scorer::new(&runtime, &m, &val, &quick()).unwrap();
    assert_eq!(scorer.metric, "mean IoU");
    let choice = budget::search(&prepared, &scorer, 0.01, budget::MAX_TRIALS, &NoProgress).unwrap();
    assert!(choice.holds, "{:?}", choice.notes);
    let q = quantize::finish(&rt(), &choice.model).unwrap();
    let base = eval_with(&m, &val, &quick()).unwrap();
    let e = evaluate(
        &rt(),
        &q,
        &val,
        &quick(),
        Some(&base.as_baseline()),
        &NoProgress,
    )
    .unwrap();
    let (b, a) = (
        base.metrics.task.unwrap().score,
        e.metrics.task.unwrap().score,
    );
    assert!(b - a <= 0.01, "mean IoU {b} -> {a}");
    let f = &e.metrics.fidelity[0];
    assert!(f.mask_iou.unwrap() > 0.9, "{f:?}");
    let int8 = choice
        .layers
        .iter()
        .filter(|l| l.precision == "int8")
        .count();
    assert!(int8 * 2 > choice.layers.len(), "{:?}", choice.layers);
}

#[test]
fn the_budget_scores_sequences_by_their_own_metric_with_labels_and_without() {
    let runtime = rt();
    let (ctc, lines) = (model("ctc.onnx"), data("ctc_val.npz"));
    let scorer = budget::Scorer::new(&runtime, &ctc, &lines, &quick()).unwrap();
    assert_eq!(scorer.metric, "sequence accuracy");
    close(
        scorer.float_score,
        &reference()["ctc"]["sequence_accuracy"],
        "ctc float score",
    );
    let mut unlabelled = data("tagger_val.npz");
    unlabelled.tensors.retain(|t| t.name != "labels");
    unlabelled.summary.tensors.retain(|t| t.name != "labels");
    let scorer =
        budget::Scorer::new(&runtime, &model("tagger.onnx"), &unlabelled, &quick()).unwrap();
    assert_eq!(scorer.metric, "per-position agreement with the float model");
    assert_eq!(scorer.float_score, 1.0);
    // Unlabelled lines: per position, unless the spec names the task `ctc` (the decoded text).
    let mut unlabelled = lines.clone();
    unlabelled.tensors.retain(|t| t.name != "labels");
    unlabelled.summary.tensors.retain(|t| t.name != "labels");
    let scorer = budget::Scorer::new(&runtime, &ctc, &unlabelled, &quick()).unwrap();
    assert_eq!(scorer.metric, "per-position agreement with the float model");
    let named = EvaluateOptions {
        task: Some(TaskKind::Ctc),
        ..quick()
    };
    let scorer = budget::Scorer::new(&runtime, &ctc, &unlabelled, &named).unwrap();
    assert_eq!(
        scorer.metric,
        "decoded-sequence agreement with the float model"
    );
    assert_eq!(scorer.float_score, 1.0);
}
