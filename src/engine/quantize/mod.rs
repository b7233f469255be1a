//! Quantization schemes, one file each. Every output is checked by loading it in ONNX Runtime
//! before it is returned.
pub mod calibrate;
pub mod params;
pub mod prepare;
pub mod qdq;

use crate::engine::dataset::Dataset;
use crate::engine::onnx::{load_model_bytes, LoadedModel};
use crate::engine::runtime::Runtime;
use crate::engine::{EngineError, Progress, Result, SubProgress};
use prost::Message;
pub use qdq::{LayerDecision, StaticOptions};

/// A quantized model and how it was made.
pub struct Quantized {
    pub model: LoadedModel,
    pub layers: Vec<LayerDecision>,
    pub notes: Vec<String>,
    pub calibration_samples: usize,
}

fn default_opset(model: &LoadedModel) -> i64 {
    model
        .proto
        .opset_import
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx")
        })
        .and_then(|o| o.version)
        .unwrap_or(0)
}

/// Static int8 quantization in QDQ form, calibrated with min/max over `samples` rows of `calibration`.
pub fn quantize_static(
    rt: &Runtime,
    model: &LoadedModel,
    calibration: &Dataset,
    samples: usize,
    opts: &StaticOptions,
    progress: &dyn Progress,
) -> Result<Quantized> {
    let opset = default_opset(model);
    if opset < 10 {
        return Err(EngineError::InvalidModel(format!(
            "opset {opset} has no QuantizeLinear/DequantizeLinear (needs 10 or later)"
        )));
    }
    let mut opts = opts.clone();
    let mut notes = Vec::new();
    if opts.per_channel && opset < 13 {
        opts.per_channel = false;
        notes.push(format!("the model's opset {opset} predates per-channel DequantizeLinear (13): weights were quantized per tensor"));
    }
    let mut prepared = model.proto.clone();
    let folded = prepare::fold_batch_norms(&mut prepared);
    if folded > 0 {
        notes.push(format!(
            "folded {folded} BatchNormalization node(s) into the preceding Conv"
        ));
    }
    let model = &LoadedModel {
        bytes: prepared.encode_to_vec().into(),
        proto: prepared,
    };
    let (targets, layers) = qdq::plan(&model.proto, &opts);
    if targets.is_empty() {
        notes.push("no layer could be quantized; the model is unchanged".into());
        return Ok(Quantized {
            model: load_model_bytes(model.bytes.clone())?,
            layers,
            notes,
            calibration_samples: 0,
        });
    }
    let (names, constants) = qdq::activations(&model.proto, &targets);
    let mut calibrator = calibrate::Calibrator::new(rt, model, calibration, &names, samples)?;
    let progress_so_far = SubProgress {
        parent: progress,
        start: 0.0,
        span: 0.9,
    };
    let mut ranges = match opts.percentile {
        Some(p) => calibrator.percentile(p, &progress_so_far)?,
        None => calibrator.min_max(&progress_so_far)?,
    };
    qdq::fold_activation_ranges(&model.proto, &mut ranges);
    let proto = qdq::rewrite(&model.proto, &targets, &constants, &ranges, &opts)?;
    let bytes = proto.encode_to_vec();
    // ONNX Runtime must accept what we wrote before anyone sees it.
    rt.session(&bytes, 1)
        .map_err(|e| EngineError::Runtime(format!("the quantized model does not load: {e}")))?;
    progress.update(1.0)?;
    let calibration_samples = samples.min(calibration.summary.samples as usize);
    Ok(Quantized {
        model: load_model_bytes(bytes.into())?,
        layers,
        notes,
        calibration_samples,
    })
}

/// Timing noise tolerated before a quantized model counts as slower than its input.
pub const SLOWER_TOLERANCE: f64 = 1.10;

/// The latency gate: keep the quantized model unless it is slower than the input beyond the
/// tolerance (p50 at the same batch size), or the user accepts a slower model.
pub fn keep_quantized(input_p50_ms: f64, quantized_p50_ms: f64, allow_slower: bool) -> bool {
    allow_slower || quantized_p50_ms <= input_p50_ms * SLOWER_TOLERANCE
}

/// p50 latency of two models at `batch` rows of `data`, measured alternately so both see the
/// same machine conditions.
pub fn compare_latency(
    rt: &Runtime,
    a: &LoadedModel,
    b: &LoadedModel,
    data: &Dataset,
    batch: usize,
    runs: usize,
) -> Result<(f64, f64)> {
    let binding =
        crate::engine::dataset::bind(&crate::engine::onnx::summarize(&a.proto), &data.summary)?;
    let mut sa = rt.session(&a.bytes, 1)?;
    let mut sb = rt.session(&b.bytes, 1)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for round in 0..runs + 2 {
        for (session, times) in [(&mut sa, &mut ta), (&mut sb, &mut tb)] {
            let inputs = crate::engine::runtime::feeds(data, &binding.inputs, 0..batch)?;
            let t0 = std::time::Instant::now();
            drop(session.run(inputs)?);
            if round >= 2 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let p50 = |t: &mut Vec<f64>| crate::engine::latency::stats(batch, 2, t).p50_ms;
    Ok((p50(&mut ta), p50(&mut tb)))
}

#[cfg(test)]
mod tests {
    use super::keep_quantized;

    #[test]
    fn a_faster_or_equal_int8_model_is_kept() {
        assert!(keep_quantized(2.0, 1.0, false));
        assert!(
            keep_quantized(2.0, 2.1, false),
            "within the noise tolerance"
        );
    }

    #[test]
    fn a_slower_int8_model_is_not_kept_unless_allowed() {
        assert!(!keep_quantized(1.0, 1.5, false));
        assert!(keep_quantized(1.0, 1.5, true));
    }
}
