//! Training through decoders: ConvTranspose, Resize/Upsample and Concat skips run in candle as
//! ONNX Runtime runs them, and their gradients match central differences.
use crate::fixtures::fixture;
use crate::train::{check_gradients, parity};
use shrink::engine::dataset;
use shrink::engine::onnx::load_model_file;
use shrink::engine::train::Mode;

#[test]
fn decoder_ops_match_onnx_runtime_and_their_gradients_match_finite_differences() {
    for (model, data) in [
        ("dense_ops.onnx", "dense_ops.npz"),
        ("upsample9.onnx", "upsample9.npz"),
        ("strided_ops.onnx", "strided_ops.npz"),
        ("strided1d.onnx", "strided1d.npz"),
    ] {
        let m = load_model_file(&fixture(model)).unwrap();
        let d = dataset::load(&fixture(data)).unwrap();
        let worst = parity(&m, &d, 8, &["y"]);
        assert!(worst < 1e-4, "{model}: {worst}");
        check_gradients(&m, &d, 8, "y", 3, Mode::Eval);
    }
}

#[test]
fn channel_groups_follow_a_u_nets_skip_connections_through_concat() {
    use shrink::engine::channels::channel_groups;
    use shrink::engine::train::distill::width_student;
    let m = load_model_file(&fixture("unet_teacher.onnx")).unwrap();
    let mut layers: Vec<String> = channel_groups(&m.proto)
        .into_iter()
        .map(|g| g.layer)
        .collect();
    layers.sort();
    // Every layer but the head (a graph output): the skip sources and the decoder's
    // ConvTranspose, whose channels enter a Concat, included.
    assert_eq!(
        layers,
        ["dec1", "dec2", "enc1a", "enc1b", "enc2a", "enc2b", "mid", "up1"]
    );
    let (student, _) = width_student(&m.proto, 0.5, 1);
    let params = |p: &shrink::engine::onnx::proto::ModelProto| {
        shrink::engine::onnx::params::parameter_counts(p.graph.as_ref().unwrap()).0
    };
    // A quarter of every layer's weights, but half of the first's and the head's.
    let (s, t) = (params(&student), params(&m.proto));
    assert!(s as f64 <= 0.26 * t as f64, "{s} vs {t}");
    // The half-width student runs in ONNX Runtime on the scenes, at their size.
    let student =
        shrink::engine::onnx::load_model_bytes(prost::Message::encode_to_vec(&student).into())
            .unwrap();
    let d = dataset::load(&fixture("seg_val.npz")).unwrap();
    let e = shrink::engine::evaluate::evaluate(
        &shrink::engine::runtime::Runtime::global(None).unwrap(),
        &student,
        &d,
        &shrink::domain::spec::EvaluateOptions {
            latency_runs: 1,
            warmup_runs: 0,
            ..Default::default()
        },
        None,
        &shrink::engine::NoProgress,
    )
    .unwrap();
    assert_eq!(e.outputs[0].shape, vec![48, 3, 40, 56]);
}
