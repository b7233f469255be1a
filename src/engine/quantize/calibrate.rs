//! Calibration: run the float model on calibration samples with the activations to quantize
//! exposed as extra graph outputs, and record each one's range.
use crate::engine::dataset::{bind, Binding, Dataset};
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::{self, Runtime};
use crate::engine::{EngineError, Progress, Result, SubProgress};
use ort::session::Session;
use prost::Message;
use std::collections::BTreeMap;

/// Observed (min, max) of each calibrated tensor.
pub type Ranges = BTreeMap<String, (f32, f32)>;

/// Bins of the histograms built over each tensor's min/max range.
const BINS: usize = 2048;

/// How a range is chosen from a tensor's histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RangeMethod {
    /// Keep this percentage of the values, clipping both tails equally.
    Percentile(f64),
    /// The symmetric threshold whose 128-level quantization loses least information (KL
    /// divergence), as TensorRT calibrates.
    Entropy,
    /// The range scaling with the least mean squared error (rounding inside, clipping outside).
    Mse,
}

impl RangeMethod {
    pub fn describe(&self) -> String {
        match self {
            RangeMethod::Percentile(p) => format!("the {p} percentile"),
            RangeMethod::Entropy => "entropy (KL divergence)".into(),
            RangeMethod::Mse => "least squared error".into(),
        }
    }
}

pub use crate::domain::quantize::CalibrationMethod;

/// The range method a user's choice builds with (None: min/max) and the alternatives the
/// accuracy budget may score after it.
pub fn ranges_for(
    method: CalibrationMethod,
    percentile: f64,
) -> (Option<RangeMethod>, Vec<RangeMethod>) {
    match method {
        CalibrationMethod::Auto => (
            None,
            vec![
                RangeMethod::Percentile(percentile),
                RangeMethod::Entropy,
                RangeMethod::Mse,
            ],
        ),
        CalibrationMethod::Minmax => (None, Vec::new()),
        CalibrationMethod::Percentile => (Some(RangeMethod::Percentile(percentile)), Vec::new()),
        CalibrationMethod::Entropy => (Some(RangeMethod::Entropy), Vec::new()),
        CalibrationMethod::Mse => (Some(RangeMethod::Mse), Vec::new()),
    }
}

/// Describes a calibration: min/max when `method` is None.
pub fn describe(method: Option<RangeMethod>) -> String {
    method.map_or("min/max".into(), |m| m.describe())
}

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
            graph
                .output
                .push(crate::engine::onnx::tensor::float_value_info(name));
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
        self.observe(progress, |name, _, values| {
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

    /// Ranges chosen from histograms: a first pass finds min/max, a second builds histograms
    /// over those ranges, and `method` picks each tensor's range from its histogram.
    pub fn histogram_ranges(
        &mut self,
        method: RangeMethod,
        progress: &dyn Progress,
    ) -> Result<Ranges> {
        Ok(self.histograms(progress)?.ranges(method))
    }

    /// Every calibrated tensor's min/max and its histogram over that range (two passes), from
    /// which any method's ranges follow without running the model again.
    pub fn histograms(&mut self, progress: &dyn Progress) -> Result<Histograms> {
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
            |name, _, values| {
                let (Some(&(lo, hi)), Some(h)) = (full.get(name), hist.get_mut(name)) else {
                    return;
                };
                let width = (hi - lo).max(f32::MIN_POSITIVE);
                for v in values.iter().filter(|v| v.is_finite()) {
                    h[bin_of(*v, lo, width)] += 1;
                }
            },
        )?;
        Ok(Histograms { full, hist })
    }

    /// The mean of every calibrated tensor over each index of its axis 1 (a Conv's or Gemm's
    /// output channels), over all rows and positions; tensors of rank below 2 are left out.
    pub fn channel_means(&mut self, progress: &dyn Progress) -> Result<BTreeMap<String, Vec<f64>>> {
        let mut sums: BTreeMap<String, (Vec<f64>, Vec<u64>)> = BTreeMap::new();
        self.observe(progress, |name, shape, values| {
            if shape.len() < 2 {
                return;
            }
            let channels = shape[1].max(1) as usize;
            let inner: usize = shape[2..].iter().map(|d| *d as usize).product();
            let (sum, count) = sums
                .entry(name.to_string())
                .or_insert_with(|| (vec![0.0; channels], vec![0; channels]));
            if sum.len() != channels || inner == 0 {
                return;
            }
            for (i, chunk) in values.chunks(inner).enumerate() {
                let c = i % channels;
                sum[c] += chunk.iter().map(|v| *v as f64).sum::<f64>();
                count[c] += chunk.len() as u64;
            }
        })?;
        Ok(sums
            .into_iter()
            .map(|(name, (sum, count))| {
                let means = sum
                    .iter()
                    .zip(&count)
                    .map(|(s, n)| s / (*n).max(1) as f64)
                    .collect();
                (name, means)
            })
            .collect())
    }

    /// Calibration rows each pass runs over.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Runs the calibration rows once, handing each exposed tensor's shape and values to
    /// `visit` batch by batch.
    pub fn visit(
        &mut self,
        progress: &dyn Progress,
        visit: impl FnMut(&str, &[i64], &[f32]),
    ) -> Result<()> {
        self.observe(progress, visit)
    }

    /// Runs the calibration rows in batches and hands each exposed tensor's values to `visit`.
    fn observe(
        &mut self,
        progress: &dyn Progress,
        mut visit: impl FnMut(&str, &[i64], &[f32]),
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
                let Ok((shape, values)) = value.try_extract_tensor::<f32>() else {
                    continue;
                };
                visit(name, shape, values);
            }
            start = end;
            progress.update(start as f64 / self.rows as f64)?;
        }
        Ok(())
    }
}

/// Min/max and histogram of each calibrated tensor.
pub struct Histograms {
    full: Ranges,
    hist: BTreeMap<String, Vec<u64>>,
}

impl Histograms {
    /// The observed min/max of every tensor.
    pub fn min_max(&self) -> Ranges {
        self.full.clone()
    }

    /// The range `method` picks from each tensor's histogram.
    pub fn ranges(&self, method: RangeMethod) -> Ranges {
        self.full
            .iter()
            .map(|(name, &(lo, hi))| {
                let h = &self.hist[name];
                let range = match method {
                    RangeMethod::Percentile(p) => {
                        clip_tails(h, lo, hi, (100.0 - p.clamp(50.0, 100.0)) / 200.0)
                    }
                    RangeMethod::Entropy => entropy_range(h, lo, hi),
                    RangeMethod::Mse => mse_range(h, lo, hi),
                };
                (name.clone(), range)
            })
            .collect()
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
    (center(low.min(high), lo, hi), center(high.max(low), lo, hi))
}

/// Center of bin `i` of a histogram over [lo, hi].
fn center(i: usize, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * i as f32 / (BINS as f32 - 1.0)
}

fn entropy_range(h: &[u64], lo: f32, hi: f32) -> (f32, f32) {
    const LEVELS: usize = 128;
    let m = lo.abs().max(hi.abs());
    if m == 0.0 {
        return (lo, hi);
    }
    // Fold the signed histogram into one of |x|.
    let mut abs = vec![0f64; BINS];
    for (i, &c) in h.iter().enumerate().filter(|(_, c)| **c > 0) {
        let b = ((center(i, lo, hi).abs() / m) * BINS as f32) as usize;
        abs[b.min(BINS - 1)] += c as f64;
    }
    let mut best = (f64::INFINITY, BINS);
    for t in (LEVELS..=BINS).step_by(16) {
        // Reference: the first t bins, with everything beyond folded into the last one.
        let mut p: Vec<f64> = abs[..t].to_vec();
        p[t - 1] += abs[t..].iter().sum::<f64>();
        // Candidate: the first t bins merged into LEVELS groups, each spread over its nonempty bins.
        let mut q = vec![0f64; t];
        for g in 0..LEVELS {
            let (a, b) = (
                g * t / LEVELS,
                ((g + 1) * t / LEVELS).max(g * t / LEVELS + 1),
            );
            let sum: f64 = abs[a..b].iter().sum();
            let nonzero = p[a..b].iter().filter(|v| **v > 0.0).count();
            if nonzero > 0 {
                for i in a..b {
                    if p[i] > 0.0 {
                        q[i] = sum / nonzero as f64;
                    }
                }
            }
        }
        let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
        if ps == 0.0 || qs == 0.0 {
            continue;
        }
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(p, _)| **p > 0.0)
            .map(|(p, q)| {
                let (p, q) = (p / ps, (q / qs).max(1e-12));
                p * (p / q).ln()
            })
            .sum();
        if kl < best.0 {
            best = (kl, t);
        }
    }
    let threshold = m * best.1 as f32 / BINS as f32;
    (lo.max(-threshold), hi.min(threshold))
}

fn mse_range(h: &[u64], lo: f32, hi: f32) -> (f32, f32) {
    let mut best = (f64::INFINITY, (lo, hi));
    for step in 1..=40 {
        let s = step as f32 / 40.0;
        let (a, b) = (lo * s, hi * s);
        let q = ((b - a) / 255.0) as f64;
        let err: f64 = h
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| {
                let x = center(i, lo, hi);
                let e = if x < a {
                    ((a - x) as f64).powi(2)
                } else if x > b {
                    ((x - b) as f64).powi(2)
                } else {
                    q * q / 12.0
                };
                c as f64 * e
            })
            .sum();
        if err < best.0 {
            best = (err, (a, b));
        }
    }
    best.1
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

    fn heavy_tailed() -> (Vec<u64>, f32, f32) {
        // A Laplace-shaped bulk of a million values (scale 0.3) and four outliers out to ±20.
        let (lo, hi) = (-20.0f32, 20.0f32);
        let mut h = vec![0u64; BINS];
        for i in 0..10_000 {
            let u = (i as f32 + 0.5) / 10_000.0;
            let v = -0.3 * u.ln() * if i % 2 == 0 { 1.0 } else { -1.0 };
            h[bin_of(v, lo, hi - lo)] += 100;
        }
        for v in [-20.0f32, -15.0, 12.0, 20.0] {
            h[bin_of(v, lo, hi - lo)] += 1;
        }
        (h, lo, hi)
    }

    #[test]
    fn entropy_and_mse_clip_a_thin_tail_but_keep_the_bulk() {
        let (h, lo, hi) = heavy_tailed();
        for (name, (a, b)) in [
            ("entropy", entropy_range(&h, lo, hi)),
            ("mse", mse_range(&h, lo, hi)),
        ] {
            assert!(b < 10.0 && a > -10.0, "{name} kept the tail: [{a}, {b}]");
            assert!(b >= 0.9 && a <= -0.9, "{name} clipped the bulk: [{a}, {b}]");
            assert!(b <= 10.0, "{name}: [{a}, {b}]");
        }
    }
}
