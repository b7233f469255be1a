//! Calibration: run the float model on calibration samples with the activations to quantize
//! exposed as extra graph outputs, and record each one's range.
use crate::engine::dataset::{bind, Dataset};
use crate::engine::onnx::proto::{type_proto, TypeProto, ValueInfoProto};
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::{self, Runtime};
use crate::engine::{EngineError, Progress, Result};
use prost::Message;
use std::collections::BTreeMap;

/// Observed (min, max) of each calibrated tensor.
pub type Ranges = BTreeMap<String, (f32, f32)>;

/// Runs `samples` rows of `data` through the model and returns the min/max of every tensor in `names`.
pub fn min_max(
    rt: &Runtime,
    model: &LoadedModel,
    data: &Dataset,
    names: &[String],
    samples: usize,
    progress: &dyn Progress,
) -> Result<Ranges> {
    let mut augmented = model.proto.clone();
    let graph = augmented
        .graph
        .as_mut()
        .ok_or_else(|| EngineError::InvalidModel("no graph".into()))?;
    let existing: Vec<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    for name in names.iter().filter(|n| !existing.contains(n)) {
        graph.output.push(ValueInfoProto {
            name: Some(name.clone()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let bytes = augmented.encode_to_vec();
    let binding = bind(&summarize(&model.proto), &data.summary)?;
    let mut session = rt.session(&bytes, 1)?;
    let rows = samples.min(binding.samples as usize).max(1);
    let batch = 16;
    let mut ranges = Ranges::new();
    let mut start = 0;
    while start < rows {
        let end = (start + batch).min(rows);
        // Read each exposed activation in place: copying 70+ activation maps per batch dominated the time.
        let outputs = session.run(runtime::feeds(data, &binding.inputs, start..end)?)?;
        for name in names {
            let Some(value) = outputs.get(name.as_str()) else {
                continue;
            };
            let Ok((_, values)) = value.try_extract_tensor::<f32>() else {
                continue;
            };
            let entry = ranges
                .entry(name.clone())
                .or_insert((f32::INFINITY, f32::NEG_INFINITY));
            for v in values.iter().filter(|v| v.is_finite()) {
                entry.0 = entry.0.min(*v);
                entry.1 = entry.1.max(*v);
            }
        }
        start = end;
        progress.update(start as f64 / rows as f64)?;
    }
    for (lo, hi) in ranges.values_mut() {
        if lo > hi {
            (*lo, *hi) = (0.0, 0.0);
        }
    }
    Ok(ranges)
}
