//! Calibration: run the float model on calibration samples with the activations to quantize
//! exposed as extra graph outputs, and record each one's range.
use crate::engine::dataset::{bind, Binding, Dataset};
use crate::engine::onnx::proto::{type_proto, TypeProto, ValueInfoProto};
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::{self, Runtime};
use crate::engine::{EngineError, Progress, Result, SubProgress};
use ort::session::Session;
use prost::Message;
use std::collections::BTreeMap;

/// Observed (min, max) of each calibrated tensor.
pub type Ranges = BTreeMap<String, (f32, f32)>;

/// Bins of the histograms the percentile method builds over each tensor's min/max range.
const BINS: usize = 2048;

/// One ONNX Runtime session of the model with `names` exposed as outputs, built once and run
/// over the calibration rows as often as a method needs.
pub struct Calibrator<'a> {
    session: Session,
    binding: Binding,
    data: &'a Dataset,
    names: &'a [String],
    rows: usize,
}

impl<'a> Calibrator<'a> {
    /// Prepares calibration of `names` over the first `samples` rows of `data`.
    pub fn new(
        rt: &Runtime,
        model: &LoadedModel,
        data: &'a Dataset,
        names: &'a [String],
        samples: usize,
    ) -> Result<Self> {
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
        let session = rt.session(&augmented.encode_to_vec(), 1)?;
        let binding = bind(&summarize(&model.proto), &data.summary)?;
        let rows = samples.min(binding.samples as usize).max(1);
        Ok(Self {
            session,
            binding,
            data,
            names,
            rows,
        })
    }

    /// The min/max of every calibrated tensor.
    pub fn min_max(&mut self, progress: &dyn Progress) -> Result<Ranges> {
        let mut ranges = Ranges::new();
        self.observe(progress, |name, values| {
            let entry = ranges
                .entry(name.to_string())
                .or_insert((f32::INFINITY, f32::NEG_INFINITY));
            for v in values.iter().filter(|v| v.is_finite()) {
                entry.0 = entry.0.min(*v);
                entry.1 = entry.1.max(*v);
            }
        })?;
        for (lo, hi) in ranges.values_mut() {
            if lo > hi {
                (*lo, *hi) = (0.0, 0.0);
            }
        }
        Ok(ranges)
    }

    /// Ranges that drop the most extreme values: the `(100 - percentile) / 2` % tail on each side
    /// is clipped, so a rare outlier does not stretch the scale every other value is quantized
    /// with. Two passes: min/max, then histograms over those ranges.
    pub fn percentile(&mut self, percentile: f64, progress: &dyn Progress) -> Result<Ranges> {
        let full = self.min_max(&SubProgress {
            parent: progress,
            start: 0.0,
            span: 0.5,
        })?;
        let mut hist: BTreeMap<String, Vec<u64>> =
            full.keys().map(|k| (k.clone(), vec![0; BINS])).collect();
        self.observe(
            &SubProgress {
                parent: progress,
                start: 0.5,
                span: 0.5,
            },
            |name, values| {
                let (Some(&(lo, hi)), Some(h)) = (full.get(name), hist.get_mut(name)) else {
                    return;
                };
                let width = (hi - lo).max(f32::MIN_POSITIVE);
                for v in values.iter().filter(|v| v.is_finite()) {
                    h[bin_of(*v, lo, width)] += 1;
                }
            },
        )?;
        let tail = (100.0 - percentile.clamp(50.0, 100.0)) / 200.0;
        Ok(full
            .iter()
            .map(|(name, &(lo, hi))| (name.clone(), clip_tails(&hist[name], lo, hi, tail)))
            .collect())
    }

    /// Runs the calibration rows in batches and hands each exposed tensor's values to `visit`.
    fn observe(
        &mut self,
        progress: &dyn Progress,
        mut visit: impl FnMut(&str, &[f32]),
    ) -> Result<()> {
        let batch = 16;
        let mut start = 0;
        while start < self.rows {
            let end = (start + batch).min(self.rows);
            // Read each exposed activation in place: copying 70+ activation maps per batch dominated the time.
            let outputs =
                self.session
                    .run(runtime::feeds(self.data, &self.binding.inputs, start..end)?)?;
            for name in self.names {
                let Some(value) = outputs.get(name.as_str()) else {
                    continue;
                };
                let Ok((_, values)) = value.try_extract_tensor::<f32>() else {
                    continue;
                };
                visit(name, values);
            }
            start = end;
            progress.update(start as f64 / self.rows as f64)?;
        }
        Ok(())
    }
}

fn bin_of(v: f32, lo: f32, width: f32) -> usize {
    (((v - lo) / width) * (BINS as f32 - 1.0))
        .round()
        .clamp(0.0, BINS as f32 - 1.0) as usize
}

/// The range left after removing `tail` (a fraction) of the counts from each end of a histogram over [lo, hi].
fn clip_tails(h: &[u64], lo: f32, hi: f32, tail: f64) -> (f32, f32) {
    let total: u64 = h.iter().sum();
    let cut = (total as f64 * tail) as u64;
    let first_past = |order: &mut dyn Iterator<Item = usize>| {
        let mut acc = 0u64;
        for i in order {
            acc += h[i];
            if acc > cut {
                return Some(i);
            }
        }
        None
    };
    let low = first_past(&mut (0..h.len())).unwrap_or(0);
    let high = first_past(&mut (0..h.len()).rev()).unwrap_or(h.len() - 1);
    let at = |bin: usize| lo + (hi - lo) * bin as f32 / (h.len() as f32 - 1.0);
    (at(low.min(high)), at(high.max(low)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_tails_drops_a_lone_outlier() {
        // 999 values spread over [0, 1] and one at 100: clipping 0.1% per side (percentile 99.8) drops it.
        let (lo, hi) = (0.0f32, 100.0f32);
        let mut h = vec![0u64; BINS];
        for i in 0..999 {
            h[bin_of(i as f32 / 999.0, lo, hi - lo)] += 1;
        }
        h[bin_of(100.0, lo, hi - lo)] += 1;
        let (_, top) = clip_tails(&h, lo, hi, 0.001);
        assert!(top < 2.0, "the outlier still stretches the range to {top}");
        let (_, all) = clip_tails(&h, lo, hi, 0.0);
        assert_eq!(all, 100.0, "with no tail removed the range is min/max");
    }
}
