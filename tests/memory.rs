//! Peak memory is measured process-wide, so this test has a test binary of its own: other tests
//! loading and freeing models at the same time would blur what it measures.
use shrink::domain::spec::EvaluateOptions;
use shrink::engine::dataset;
use shrink::engine::evaluate::evaluate;
use shrink::engine::onnx::load_model_file;
use shrink::engine::runtime::Runtime;
use shrink::engine::NoProgress;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures-out")
        .join(name);
    assert!(
        path.exists(),
        "run scripts/test: it builds the fixtures first"
    );
    path
}

#[test]
fn peak_memory_counts_the_session_each_time_not_only_the_first() {
    // The big MLP holds 4.5 MB of weights that ONNX Runtime copies into its session.
    let rt = Runtime::global(None).expect("ONNX Runtime from the project's .venv");
    let m = load_model_file(&fixture("digits_mlp_big.onnx")).unwrap();
    let d = dataset::load(&fixture("digits_val.npz")).unwrap();
    let opts = EvaluateOptions {
        latency_runs: 5,
        warmup_runs: 1,
        ..Default::default()
    };
    for round in 0..2 {
        let e = evaluate(&rt, &m, &d, &opts, None, &NoProgress).unwrap();
        let peak = e.metrics.memory.peak_rss_growth_bytes;
        // A later session may be handed pages the first one released and the allocator kept
        // (seen: 1.15 MB in round 1), so later rounds only have to show real growth, not zero.
        let floor = if round == 0 { 4_000_000 } else { 512 * 1024 };
        assert!(
            peak >= floor,
            "round {round}: peak RSS growth {peak} bytes is below {floor}"
        );
        assert!(peak >= e.metrics.memory.load_rss_growth_bytes);
    }
}
