//! `shrink quantize` on the command line: its exit status tells CI whether the budget held.
use crate::fixtures::fixture;
use std::process::{Command, Output};

fn quantize(model: &str, data: &str, extra: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shrink"))
        .arg("quantize")
        .arg(fixture(model))
        .arg(fixture(data))
        .arg(dir.path().join("out.onnx"))
        .args(extra)
        .output()
        .unwrap();
    (out, dir)
}

#[test]
fn a_model_that_misses_its_accuracy_budget_exits_3_and_says_so() {
    // A chaotic 100-layer chain: int8 rounding changes most rows' argmax, and a budget of 0
    // cannot be met in 40 trial models (the search runs out of them measuring layers).
    let (out, dir) = quantize(
        "chaotic_chain.onnx",
        "chaotic_chain.npz",
        &[
            "--mode",
            "static",
            "--max-accuracy-drop",
            "0",
            "--max-trials",
            "40",
            "--all-layers",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("budget: FAILED"), "{stdout}");
    assert!(
        dir.path().join("out.onnx").exists(),
        "the model is still written"
    );
}

#[test]
fn a_model_within_its_accuracy_budget_exits_0() {
    let (out, _dir) = quantize(
        "digits_mlp.onnx",
        "digits_val.npz",
        &[
            "--mode",
            "static",
            "--max-accuracy-drop",
            "0.01",
            "--all-layers",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("budget: passed"), "{stdout}");
}

#[test]
fn static_quantize_rounds_by_gptq_and_corrects_biases_unless_told_not_to() {
    let args = [
        "--mode",
        "static",
        "--max-accuracy-drop",
        "1",
        "--all-layers",
    ];
    let (out, _dir) = quantize("digits_cnn.onnx", "digits_images.npz", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("bias correction: moved the biases of 3 int8 layer(s)")
            && stdout.contains("not scored (no accuracy budget)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("GPTQ weight rounding: 3 layer(s)"),
        "{stdout}"
    );
    let off = [
        &args[..],
        &["--no-bias-correction", "--weight-rounding", "nearest"],
    ]
    .concat();
    let (out, _dir) = quantize("digits_cnn.onnx", "digits_images.npz", &off);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("bias correction"), "{stdout}");
    assert!(!stdout.contains("GPTQ"), "{stdout}");
    let bad = [&args[..], &["--weight-rounding", "round-half-up"]].concat();
    let (out, _dir) = quantize("digits_cnn.onnx", "digits_images.npz", &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("weight_rounding"), "{stderr}");
}
