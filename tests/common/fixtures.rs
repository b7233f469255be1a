//! Fixtures shared by the test binaries: built once per run by `scripts/make_fixtures.py`, and
//! the onnxruntime-Python cross-check.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where test fixtures live; built once per test run by `scripts/make_fixtures.py`.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures-out");
        if !dir.join("reference.json").exists() {
            let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
            let status = std::process::Command::new(&python)
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/make_fixtures.py"))
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("run scripts/setup-python.sh first: the fixtures need the project's .venv");
            assert!(status.success(), "scripts/make_fixtures.py failed");
        }
        dir
    })
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

/// Runs a model file in the onnxruntime Python package (scripts/check_onnx.py) on an .npz file:
/// outputs, op types before and after ONNX Runtime's optimizations, input types, top-1 on labels.
pub fn onnxruntime_python(model: &Path, data: &Path, output: &str) -> Value {
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/check_onnx.py"
        ))
        .arg(model)
        .arg(data)
        .arg(output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
