//! Quantization-aware training through the engine: on a model that static int8 PTQ hurts, QAT
//! wins back at least half of the loss, and the exported QDQ model scores in ONNX Runtime what
//! the fake-quantized training graph scored.
use crate::fixtures::{fixture, onnxruntime_python};
use shrink::engine::dataset::{self, Dataset};
use shrink::engine::onnx::{load_model_file, LoadedModel};
use shrink::engine::quantize::{self, qat, CalibrationData, Prepared, Scheme, StaticOptions};
use shrink::engine::runtime::Runtime;
use shrink::engine::train::distill::Recipe;
use shrink::engine::train::fit::FitOptions;
use shrink::engine::NoProgress;
use std::collections::HashSet;
use std::sync::Arc;

fn rt() -> Arc<Runtime> {
    Runtime::global(None).expect("ONNX Runtime from the project's .venv")
}

fn model(name: &str) -> LoadedModel {
    load_model_file(&fixture(name)).unwrap()
}

fn data(name: &str) -> Dataset {
    dataset::load(&fixture(name)).unwrap()
}

fn static_scheme() -> Scheme {
    Scheme::Static(StaticOptions {
        auto_granularity: true,
        tables_per_row: false,
        ..crate::evaluate::static_options(true)
    })
}

fn prepared(m: &LoadedModel, calib: &Dataset) -> Prepared {
    let c = CalibrationData {
        data: calib,
        samples: 128,
    };
    Prepared::new(&rt(), m, &static_scheme(), Some(c), &NoProgress).unwrap()
}

/// Top-1 of a model in onnxruntime-Python on the digits validation set.
fn python_top1(m: &LoadedModel) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, &m.bytes).unwrap();
    onnxruntime_python(&path, &fixture("digits_val.npz"), "probabilities")["top1"]
        .as_f64()
        .unwrap()
}

fn qat_options(seed: u64) -> Recipe {
    Recipe {
        alpha: 0.5,
        temperature: 2.0,
        fit: FitOptions {
            epochs: 8,
            batch_size: 32,
            learning_rate: 1e-3,
            patience: None,
            seed,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn qat_recovers_at_least_half_of_what_static_ptq_loses_and_its_export_matches_in_onnx_runtime() {
    let (float, train, val) = (
        model("digits_mlp_coarse.onnx"),
        data("digits_train.npz"),
        data("digits_val.npz"),
    );
    let runtime = rt();
    let prepared = prepared(&float, &train);
    let all = HashSet::new();
    let ptq = quantize::finish(&runtime, &prepared.build(&all).unwrap().0).unwrap();
    let (float_top1, ptq_top1) = (python_top1(&float), python_top1(&ptq));
    let lost = float_top1 - ptq_top1;
    assert!(
        lost >= 0.01,
        "the fixture must make static PTQ lose a point: {float_top1} -> {ptq_top1}"
    );

    let data = qat::QatData {
        rt: &runtime,
        float: &float,
        output: "probabilities",
        train: &train,
        validation: None,
    };
    let trained = qat::train(data, &prepared, &qat_options(1), &NoProgress).unwrap();
    let exported = quantize::finish(&runtime, &trained.prepared.build(&all).unwrap().0).unwrap();
    let qat_top1 = python_top1(&exported);
    assert!(
        qat_top1 - ptq_top1 >= lost / 2.0,
        "float {float_top1}, PTQ {ptq_top1}, QAT {qat_top1}"
    );

    let exports = qat::Exports {
        trained: &exported,
        untrained: &ptq,
    };
    let p = qat::parity(&runtime, &float, &trained, exports, &val, "probabilities").unwrap();
    assert_eq!(p.metric, "top-1 accuracy");
    assert_eq!(p.onnx_runtime, qat_top1, "our ORT run and Python's agree");
    assert_eq!(p.before_training, ptq_top1);
    assert!(
        (p.fake_quant - p.onnx_runtime).abs() <= 0.001,
        "fake-quant {} vs exported {}",
        p.fake_quant,
        p.onnx_runtime
    );
    assert!(p.agreement >= 0.99, "{p:?}");
}

#[test]
fn the_fake_quantized_graph_computes_what_the_ptq_export_computes_before_any_training() {
    let (float, calib, val) = (
        model("digits_mlp.onnx"),
        data("digits_train.npz"),
        data("digits_val.npz"),
    );
    let runtime = rt();
    let prepared = prepared(&float, &calib);
    let ptq = quantize::finish(&runtime, &prepared.build(&HashSet::new()).unwrap().0).unwrap();
    // No training step: the fake-quant graph must already be the PTQ model.
    let mut opts = qat_options(0);
    opts.fit.epochs = 1;
    opts.fit.learning_rate = 1e-12;
    let data = qat::QatData {
        rt: &runtime,
        float: &float,
        output: "probabilities",
        train: &calib,
        validation: None,
    };
    let trained = qat::train(data, &prepared, &opts, &NoProgress).unwrap();
    let exports = qat::Exports {
        trained: &ptq,
        untrained: &ptq,
    };
    let p = qat::parity(&runtime, &float, &trained, exports, &val, "probabilities").unwrap();
    assert!(
        p.agreement >= 0.995,
        "fake quantization must reproduce ONNX Runtime's QDQ arithmetic: {p:?}"
    );
    // The logits stay float (no integer op reads them): 3 weights, 5+ activations.
    assert!(
        trained.fake_quant.len() >= 8,
        "{}",
        trained.fake_quant.len()
    );
}
