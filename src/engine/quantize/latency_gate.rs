//! The latency gate and the speed search: a default must never make a model slower in ONNX
//! Runtime. When quantizing every layer is slower than float (a CNN whose activations have no
//! integer kernel requantizes around every layer), the search keeps only the layers heavy
//! enough to gain from int8 and measures which choice is fastest.
use super::{LayerDecision, Prepared};
use crate::engine::dataset::{bind, Dataset};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::{self, Runtime};
use crate::engine::{Progress, Result};
use prost::Message;
use std::collections::{HashMap, HashSet};

/// How much slower than its input a quantized model may measure and still be kept: none. Timing
/// noise then sometimes returns a float model where int8 ties, never a slower one.
pub const SLOWER_TOLERANCE: f64 = 1.0;

/// The latency gate: keep the quantized model unless it is slower than the input beyond the
/// tolerance (p50 at the same batch size), or the user accepts a slower model.
pub fn keep_quantized(input_p50_ms: f64, quantized_p50_ms: f64, allow_slower: bool) -> bool {
    allow_slower || quantized_p50_ms <= input_p50_ms * SLOWER_TOLERANCE
}

/// Within this share of the input's latency a verdict is a close call on a shared machine: it is
/// measured again with more runs before the speed search replaces the int8 model.
pub const CLOSE_CALL_SHARE: f64 = 0.05;

/// Whether `quantized_p50_ms` is slower than `input_p50_ms` by less than [`CLOSE_CALL_SHARE`].
pub fn close_call(input_p50_ms: f64, quantized_p50_ms: f64) -> bool {
    quantized_p50_ms > input_p50_ms && quantized_p50_ms <= input_p50_ms * (1.0 + CLOSE_CALL_SHARE)
}

/// p50 latency of each model at `batch` rows of `data`, measured in turns so all see the same
/// machine conditions.
pub fn compare_many(
    rt: &Runtime,
    models: &[&[u8]],
    reference: &ModelProto,
    data: &Dataset,
    batch: usize,
    runs: usize,
) -> Result<Vec<f64>> {
    let binding = bind(&summarize(reference), &data.summary)?;
    let mut sessions = models
        .iter()
        .map(|m| rt.session(m, 1))
        .collect::<Result<Vec<_>>>()?;
    let mut times = vec![Vec::new(); models.len()];
    let batch = batch.min(binding.samples as usize).max(1);
    for round in 0..runs + 2 {
        for (s, t) in sessions.iter_mut().zip(times.iter_mut()) {
            let inputs = runtime::feeds(data, &binding.inputs, 0..batch)?;
            let t0 = std::time::Instant::now();
            drop(s.run(inputs)?);
            if round >= 2 {
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(times
        .iter_mut()
        .map(|t| crate::engine::latency::stats(batch, 2, t).p50_ms)
        .collect())
}

/// p50 latency of two models (see [`compare_many`]).
pub fn compare_latency(
    rt: &Runtime,
    a: &LoadedModel,
    b: &LoadedModel,
    data: &Dataset,
    batch: usize,
    runs: usize,
) -> Result<(f64, f64)> {
    let t = compare_many(rt, &[&a.bytes, &b.bytes], &a.proto, data, batch, runs)?;
    Ok((t[0], t[1]))
}

/// Multiply-adds per output value of each layer (the weight's elements per output channel):
/// what one int8 layer can save against the requantization it adds.
fn work_per_output(model: &ModelProto) -> HashMap<String, usize> {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = crate::engine::onnx::rewrite::initializers(graph);
    let mut out = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        let Some(w) = n.input.get(1).and_then(|w| inits.get(w.as_str())) else {
            continue;
        };
        let d: Vec<usize> = w.dims.iter().map(|&x| x.max(0) as usize).collect();
        let work = match n.op_type.as_deref() {
            Some("Conv") => d.iter().skip(1).product(),
            Some("MatMul") => d.first().copied().unwrap_or(0),
            Some("Gemm") => {
                let trans_b = crate::engine::onnx::rewrite::attr_i(n, "transB") == Some(1);
                d.get(if trans_b { 1 } else { 0 }).copied().unwrap_or(0)
            }
            _ => continue,
        };
        out.insert(crate::engine::onnx::rewrite::layer_name(n, i), work);
    }
    out
}

/// The outcome of the speed search.
pub struct SpeedChoice {
    pub model: ModelProto,
    pub layers: Vec<LayerDecision>,
    /// Layers returned to float for speed.
    pub float: HashSet<String>,
    pub input_ms: f64,
    pub chosen_ms: f64,
    pub notes: Vec<String>,
}

/// Ties within this share (plus [`TIE_MS`]) go to the choice with more int8 layers (smaller).
const TIE_SHARE: f64 = 0.05;
const TIE_MS: f64 = 0.05;

/// Among "int8 for every layer doing at least T multiply-adds per output" for a few thresholds T
/// (on top of the layers `keep_float` already keeps float), picks the fastest in ONNX Runtime.
#[allow(clippy::too_many_arguments)]
pub fn speed_search(
    rt: &Runtime,
    input: &LoadedModel,
    prepared: &Prepared,
    keep_float: &HashSet<String>,
    data: &Dataset,
    batch: usize,
    progress: &dyn Progress,
) -> Result<SpeedChoice> {
    let work = work_per_output(&prepared.model);
    let candidates: Vec<String> = prepared
        .candidates()?
        .into_iter()
        .filter(|c| !keep_float.contains(c) && work.contains_key(c))
        .collect();
    let mut levels: Vec<usize> = candidates
        .iter()
        .map(|c| work.get(c).copied().unwrap_or(0))
        .collect();
    levels.sort_unstable();
    let mut thresholds: Vec<usize> = [0.0, 0.25, 0.5, 0.75, 0.9]
        .iter()
        .map(|q| {
            levels
                .get((q * levels.len() as f64) as usize)
                .copied()
                .unwrap_or(0)
        })
        .collect();
    thresholds.dedup();
    let mut built = Vec::new();
    for &t in &thresholds {
        let mut float = keep_float.clone();
        float.extend(
            candidates
                .iter()
                .filter(|c| work.get(*c).copied().unwrap_or(0) < t)
                .cloned(),
        );
        let (proto, layers) = prepared.build(&float)?;
        built.push((t, float, proto.encode_to_vec(), proto, layers));
    }
    progress.update(0.3)?;
    let mut bytes: Vec<&[u8]> = vec![&input.bytes];
    bytes.extend(built.iter().map(|b| b.2.as_slice()));
    let times = compare_many(rt, &bytes, &input.proto, data, batch, 5)?;
    progress.update(1.0)?;
    let input_ms = times[0];
    let fastest = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
    // The most int8 layers among the choices tied with the fastest (thresholds ascend).
    let pick = (0..built.len())
        .find(|&i| times[i + 1] <= fastest * (1.0 + TIE_SHARE) + TIE_MS)
        .unwrap_or(0);
    let mut notes = vec![format!(
        "speed search at batch {batch}: input {input_ms:.3} ms; {}",
        built
            .iter()
            .zip(&times[1..])
            .map(|(b, t)| format!(
                "int8 where >= {} MACs/output ({} float): {t:.3} ms",
                b.0,
                b.1.len() - keep_float.len()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    )];
    let (t, float, _, model, mut layers) = built.swap_remove(pick);
    for l in layers.iter_mut() {
        if float.contains(&l.node) && !keep_float.contains(&l.node) {
            l.reason = format!(
                "kept float for speed: {} multiply-adds per output are below the {t} where int8 paid off",
                work.get(&l.node).copied().unwrap_or(0)
            );
        }
    }
    notes.push(format!(
        "chose int8 for layers with >= {t} multiply-adds per output ({} returned to float for speed)",
        float.len() - keep_float.len()
    ));
    Ok(SpeedChoice {
        model,
        layers,
        float,
        input_ms,
        chosen_ms: times[pick + 1],
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::keep_quantized;

    #[test]
    fn a_faster_or_equal_int8_model_is_kept() {
        assert!(keep_quantized(2.0, 1.0, false));
        assert!(
            keep_quantized(2.0, 2.0, false),
            "a tie keeps the smaller model"
        );
    }

    #[test]
    fn only_a_slightly_slower_model_is_a_close_call() {
        use super::close_call;
        assert!(close_call(100.0, 103.0));
        assert!(!close_call(100.0, 99.0), "faster is no call at all");
        assert!(!close_call(100.0, 110.0), "clearly slower");
    }

    #[test]
    fn a_slower_int8_model_is_not_kept_unless_allowed() {
        assert!(!keep_quantized(1.0, 1.5, false));
        assert!(
            !keep_quantized(1.0, 1.01, false),
            "no noise allowance: never slower"
        );
        assert!(keep_quantized(1.0, 1.5, true));
    }
}
