//! Reading a model's scored output as the task it serves: one class per sample, per pixel or per
//! position, or a CTC-decoded sequence; scoring it against labels, and against a baseline's output.
//!
//! Every metric here is defined so that numpy computes the same number from ONNX Runtime's
//! outputs: arg-max takes the first maximum, IoU and Dice are averaged over the classes present
//! in either the labels or the predictions.
use crate::domain::report::{OutputFidelity, SegmentationMetrics, SequenceMetrics, TaskMetrics};
use crate::domain::task::TaskKind;
use crate::engine::dataset::{Tensor, TensorData};
use crate::engine::metrics::{argmax, cosine, in_top_k, macro_f1};
use crate::engine::runtime::OutputValue;
use crate::engine::{EngineError, Result};

/// Label values that segmentation ignores (and every negative value).
pub const IGNORE_LABEL: i64 = 255;

/// How one output is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub kind: TaskKind,
    /// Foreground threshold of single-channel probability maps.
    pub threshold: f64,
    /// CTC blank class.
    pub blank: usize,
    /// CTC: the text of each non-blank class in index order.
    pub characters: Option<Vec<String>>,
}

impl Reading {
    pub fn new(kind: TaskKind) -> Self {
        Reading {
            kind,
            threshold: 0.5,
            blank: 0,
            characters: None,
        }
    }
}

/// The task an output of `shape` (axis 0: samples) serves: the named one, else what the labels'
/// shape says, else what the output's shape says. Fails when a named task does not fit.
pub fn infer(
    output: &str,
    shape: &[usize],
    named: Option<TaskKind>,
    labels: Option<&Tensor>,
) -> Result<TaskKind> {
    let rank = shape.len();
    let bad = |problem: String| EngineError::InvalidOption {
        option: "task".into(),
        problem,
    };
    if let Some(kind) = named {
        let fits = match kind {
            TaskKind::Classification => true,
            TaskKind::Segmentation => rank == 4,
            TaskKind::Sequence | TaskKind::Ctc => rank == 3,
        };
        if !fits {
            return Err(bad(format!(
                "output `{output}` has shape {shape:?}, which is not a {} output ({})",
                kind.name(),
                match kind {
                    TaskKind::Segmentation => "[N, C, H, W] or [N, 1, H, W]",
                    _ => "[N, T, C]",
                }
            )));
        }
        return Ok(kind);
    }
    if let Some(l) = labels {
        if matches!(l.data, TensorData::Str(_)) {
            return Ok(TaskKind::Ctc);
        }
        let per_sample = l.shape.len() == 1 || (l.shape.len() == 2 && l.shape[1] == 1);
        if per_sample {
            return Ok(TaskKind::Classification);
        }
        if l.shape.len() == 3 && rank == 4 {
            return Ok(TaskKind::Segmentation);
        }
        if l.shape.len() == 2 && rank == 3 {
            return Ok(TaskKind::Sequence);
        }
        return Err(EngineError::InvalidDataset {
            tensor: l.name.clone(),
            problem: format!(
                "labels of shape {:?} fit no task of output `{output}` {shape:?}: classification takes [N], \
                 segmentation [N, H, W] for a [N, C, H, W] output, sequence [N, T] for a [N, T, C] output",
                l.shape
            ),
        });
    }
    Ok(match shape {
        [_, _, h, w] if h * w > 1 => TaskKind::Segmentation,
        [_, t, _] if *t > 1 => TaskKind::Sequence,
        _ => TaskKind::Classification,
    })
}

/// Values per sample.
fn row_len(shape: &[usize]) -> usize {
    shape.iter().skip(1).product::<usize>().max(1)
}

/// How far outside [0, 1] a probability map's values may stray and still read as probabilities:
/// a quantized model's DequantizeLinear after its Sigmoid gives 255 x (1/255) = 1.0000001.
const PROBABILITY_SLACK: f32 = 1e-3;

/// Whether a single-channel map holds logits (a value clearly outside [0, 1]) rather than
/// probabilities.
fn is_logit_map(values: &[f32]) -> bool {
    values
        .iter()
        .any(|&v| !(-PROBABILITY_SLACK..=1.0 + PROBABILITY_SLACK).contains(&v))
}

/// Per-unit predicted classes: one per sample, per pixel (N·H·W, row-major) or per position (N·T).
pub fn predictions(out: &OutputValue, r: &Reading) -> Vec<i64> {
    match r.kind {
        TaskKind::Classification => {
            let row = row_len(&out.shape);
            if row > 1 {
                out.values
                    .chunks_exact(row)
                    .map(|v| argmax(v) as i64)
                    .collect()
            } else {
                out.values.iter().map(|v| v.round() as i64).collect()
            }
        }
        TaskKind::Segmentation => {
            let (n, c, hw) = (out.shape[0], out.shape[1], out.shape[2] * out.shape[3]);
            if c == 1 {
                let logits = is_logit_map(&out.values);
                out.values
                    .iter()
                    .map(|&v| {
                        let p = if logits {
                            1.0 / (1.0 + (-(v as f64)).exp())
                        } else {
                            v as f64
                        };
                        (p >= r.threshold) as i64
                    })
                    .collect()
            } else {
                let mut pred = Vec::with_capacity(n * hw);
                for s in 0..n {
                    let base = s * c * hw;
                    for p in 0..hw {
                        let mut best = 0;
                        let mut best_v = out.values[base + p];
                        for k in 1..c {
                            let v = out.values[base + k * hw + p];
                            if v > best_v {
                                best = k;
                                best_v = v;
                            }
                        }
                        pred.push(best as i64);
                    }
                }
                pred
            }
        }
        TaskKind::Sequence | TaskKind::Ctc => {
            let c = *out.shape.last().unwrap_or(&1);
            out.values
                .chunks_exact(c.max(1))
                .map(|v| argmax(v) as i64)
                .collect()
        }
    }
}

/// Classes of an output read this way (a probability map has two).
fn classes(out: &OutputValue, kind: TaskKind) -> usize {
    match kind {
        TaskKind::Segmentation => out.shape[1].max(2),
        TaskKind::Sequence | TaskKind::Ctc => *out.shape.last().unwrap_or(&1),
        TaskKind::Classification => row_len(&out.shape),
    }
}

/// A confusion matrix over `k` classes, `m[truth * k + predicted]`.
struct Confusion {
    k: usize,
    m: Vec<u64>,
}

impl Confusion {
    fn new(k: usize) -> Self {
        Confusion {
            k,
            m: vec![0; k * k],
        }
    }

    fn add(&mut self, truth: usize, predicted: usize) {
        self.m[truth * self.k + predicted] += 1;
    }

    fn total(&self) -> u64 {
        self.m.iter().sum()
    }

    fn correct(&self) -> u64 {
        (0..self.k).map(|i| self.m[i * self.k + i]).sum()
    }

    /// (IoU, Dice) per class; None where the class is neither a label nor a prediction.
    fn per_class(&self) -> Vec<Option<(f64, f64)>> {
        (0..self.k)
            .map(|c| {
                let tp = self.m[c * self.k + c];
                let truth: u64 = self.m[c * self.k..(c + 1) * self.k].iter().sum();
                let pred: u64 = (0..self.k).map(|t| self.m[t * self.k + c]).sum();
                let (fn_, fp) = (truth - tp, pred - tp);
                (tp + fp + fn_ > 0).then(|| {
                    (
                        tp as f64 / (tp + fp + fn_) as f64,
                        2.0 * tp as f64 / (2 * tp + fp + fn_) as f64,
                    )
                })
            })
            .collect()
    }

    fn mean_iou(&self) -> f64 {
        mean(self.per_class().iter().flatten().map(|p| p.0))
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Task metrics of `out` read as `r` against `labels` (the first `samples` rows).
pub fn task_metrics(
    out: &OutputValue,
    r: &Reading,
    labels: &Tensor,
    samples: usize,
) -> Result<TaskMetrics> {
    let pred = predictions(out, r);
    let k = classes(out, r.kind);
    let mut m = TaskMetrics {
        output: out.name.clone(),
        task: r.kind,
        metric: r.kind.metric().to_string(),
        score: 0.0,
        samples: samples as u64,
        classes: k as u64,
        top1_accuracy: 0.0,
        top5_accuracy: None,
        macro_f1: None,
        segmentation: None,
        sequence: None,
    };
    let ints = || -> Result<Vec<i64>> {
        labels
            .data
            .to_i64()
            .ok_or_else(|| EngineError::InvalidDataset {
                tensor: labels.name.clone(),
                problem: format!(
                    "labels must be integer class ids for {}, got {}",
                    r.kind.name(),
                    labels.data.dtype()
                ),
            })
    };
    match r.kind {
        TaskKind::Classification => {
            let labels = ints()?;
            let labels = &labels[..samples.min(labels.len())];
            let row = row_len(&out.shape);
            let n = labels.len().min(pred.len()).max(1);
            let correct = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
            m.classes = if row > 1 {
                row as u64
            } else {
                labels.iter().chain(&pred).copied().max().unwrap_or(0) as u64 + 1
            };
            m.top1_accuracy = correct as f64 / n as f64;
            m.top5_accuracy = (row >= 5).then(|| {
                let hits = out
                    .values
                    .chunks_exact(row)
                    .zip(labels)
                    .filter(|(v, &l)| l >= 0 && in_top_k(v, l as usize, 5))
                    .count();
                hits as f64 / n as f64
            });
            m.macro_f1 = Some(macro_f1(&pred[..n.min(pred.len())], &labels[..n]));
            m.samples = n as u64;
            m.score = m.top1_accuracy;
        }
        TaskKind::Segmentation => {
            let (h, w) = (out.shape[2], out.shape[3]);
            if labels.shape.len() != 3 || labels.shape[1] != h || labels.shape[2] != w {
                return Err(EngineError::InvalidDataset {
                    tensor: labels.name.clone(),
                    problem: format!(
                        "per-pixel labels must have shape [N, {h}, {w}] like output `{}` {:?}, got {:?}",
                        out.name, out.shape, labels.shape
                    ),
                });
            }
            let labels = ints()?;
            let mut conf = Confusion::new(k);
            for (&p, &l) in pred.iter().zip(&labels[..samples * h * w]) {
                if l < 0 || l == IGNORE_LABEL {
                    continue;
                }
                if l as usize >= k {
                    return Err(EngineError::InvalidDataset {
                        tensor: "labels".into(),
                        problem: format!(
                            "holds class {l}, but output `{}` scores {k} classes (use {IGNORE_LABEL} for pixels to ignore)",
                            out.name
                        ),
                    });
                }
                conf.add(l as usize, p as usize);
            }
            let pixels = conf.total();
            let per = conf.per_class();
            let seg = SegmentationMetrics {
                pixels,
                pixel_accuracy: conf.correct() as f64 / pixels.max(1) as f64,
                mean_iou: mean(per.iter().flatten().map(|p| p.0)),
                per_class_iou: per.iter().map(|p| p.map(|p| p.0)).collect(),
                mean_dice: mean(per.iter().flatten().map(|p| p.1)),
                per_class_dice: per.iter().map(|p| p.map(|p| p.1)).collect(),
                threshold: (out.shape[1] == 1).then_some(r.threshold),
            };
            m.top1_accuracy = seg.pixel_accuracy;
            m.macro_f1 = Some(seg.mean_dice);
            m.score = seg.mean_iou;
            m.segmentation = Some(seg);
        }
        TaskKind::Sequence => {
            let t = out.shape[1];
            if labels.shape.len() != 2 || labels.shape[1] != t {
                return Err(EngineError::InvalidDataset {
                    tensor: labels.name.clone(),
                    problem: format!(
                        "per-position labels must have shape [N, {t}] like output `{}` {:?}, got {:?}",
                        out.name, out.shape, labels.shape
                    ),
                });
            }
            let labels = ints()?;
            let (p, l): (Vec<i64>, Vec<i64>) = pred
                .iter()
                .zip(&labels[..samples * t])
                .filter(|(_, &l)| l >= 0)
                .map(|(&p, &l)| (p, l))
                .unzip();
            let correct = p.iter().zip(&l).filter(|(a, b)| a == b).count();
            let acc = correct as f64 / l.len().max(1) as f64;
            m.top1_accuracy = acc;
            m.macro_f1 = Some(macro_f1(&p, &l));
            m.score = acc;
            m.sequence = Some(SequenceMetrics {
                positions: l.len() as u64,
                position_accuracy: Some(acc),
                sequence_accuracy: None,
                character_error_rate: None,
                blank: None,
            });
        }
        TaskKind::Ctc => {
            let decoded = ctc_decode(out, r.blank);
            let (exact, edits, length) = match &labels.data {
                TensorData::Str(texts) => {
                    let chars = r.characters.as_ref().ok_or_else(|| EngineError::InvalidOption {
                        option: "characters".into(),
                        problem: "string labels need the model's character list: name it in `characters` (the model has no `character` metadata)".into(),
                    })?;
                    let text = |ids: &[usize]| -> Vec<char> {
                        ids.iter()
                            .filter_map(|&i| {
                                let at = if i > r.blank { i - 1 } else { i };
                                chars.get(at)
                            })
                            .flat_map(|s| s.chars())
                            .collect()
                    };
                    score_sequences(
                        decoded.iter().map(|d| text(d)),
                        texts.iter().map(|t| t.chars().collect()),
                        samples,
                    )
                }
                _ => {
                    let ints = ints()?;
                    let l = labels.row_len();
                    let rows: Vec<Vec<usize>> = ints
                        .chunks_exact(l.max(1))
                        .map(|r| r.iter().filter(|&&v| v >= 0).map(|&v| v as usize).collect())
                        .collect();
                    score_sequences(decoded.into_iter(), rows.into_iter(), samples)
                }
            };
            let acc = exact as f64 / samples.max(1) as f64;
            m.top1_accuracy = acc;
            m.score = acc;
            m.sequence = Some(SequenceMetrics {
                positions: 0,
                position_accuracy: None,
                sequence_accuracy: Some(acc),
                character_error_rate: Some(edits as f64 / length.max(1) as f64),
                blank: Some(r.blank as u64),
            });
        }
    }
    Ok(m)
}

/// (exact matches, total edit distance, total label length) over the first `samples` pairs.
fn score_sequences<T: PartialEq>(
    predicted: impl Iterator<Item = Vec<T>>,
    labels: impl Iterator<Item = Vec<T>>,
    samples: usize,
) -> (usize, usize, usize) {
    let (mut exact, mut edits, mut length) = (0, 0, 0);
    for (p, l) in predicted.zip(labels).take(samples) {
        exact += (p == l) as usize;
        edits += levenshtein(&p, &l);
        length += l.len();
    }
    (exact, edits, length)
}

/// Greedy CTC decoding: arg-max per step, repeats merged, blanks dropped.
pub fn ctc_decode(out: &OutputValue, blank: usize) -> Vec<Vec<usize>> {
    let (t, c) = (out.shape[1], out.shape[2].max(1));
    out.values
        .chunks_exact(t * c)
        .map(|sample| {
            let mut seq = Vec::new();
            let mut prev = usize::MAX;
            for step in sample.chunks_exact(c) {
                let k = argmax(step);
                if k != prev && k != blank {
                    seq.push(k);
                }
                prev = k;
            }
            seq
        })
        .collect()
}

/// Edit distance (insertions, deletions, substitutions of one element each).
pub fn levenshtein<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y {
                diag
            } else {
                1 + diag.min(up).min(row[j])
            };
            diag = up;
        }
    }
    row[b.len()]
}

/// Compares one output of a model with the baseline's: agreement of the predictions (per
/// sample, pixel or position as `r` reads the output), mask IoU for segmentation, and cosine and
/// absolute errors of the raw values per sample.
pub fn fidelity(base: &OutputValue, now: &OutputValue, r: &Reading) -> OutputFidelity {
    let row = row_len(&base.shape);
    let samples = (base.values.len().min(now.values.len()) / row).max(1);
    let (mut cos_sum, mut cos_min, mut abs_sum, mut abs_max) =
        (0.0f64, f64::INFINITY, 0.0f64, 0.0f64);
    for (b, c) in base
        .values
        .chunks_exact(row)
        .zip(now.values.chunks_exact(row))
    {
        let cos = cosine(b, c);
        cos_sum += cos;
        cos_min = cos_min.min(cos);
        for (x, y) in b.iter().zip(c) {
            let d = (*x as f64 - *y as f64).abs();
            abs_sum += d;
            abs_max = abs_max.max(d);
        }
    }
    let (pb, pn) = (predictions(base, r), predictions(now, r));
    let agree = pb.iter().zip(&pn).filter(|(a, b)| a == b).count();
    let mask_iou = (r.kind == TaskKind::Segmentation).then(|| {
        let mut conf = Confusion::new(classes(base, r.kind));
        for (&b, &n) in pb.iter().zip(&pn) {
            conf.add(b as usize, n as usize);
        }
        conf.mean_iou()
    });
    let sequence_agreement = (r.kind == TaskKind::Ctc).then(|| {
        let (db, dn) = (ctc_decode(base, r.blank), ctc_decode(now, r.blank));
        let same = db.iter().zip(&dn).filter(|(a, b)| a == b).count();
        same as f64 / db.len().min(dn.len()).max(1) as f64
    });
    OutputFidelity {
        output: base.name.clone(),
        task: r.kind,
        top1_agreement: agree as f64 / pb.len().min(pn.len()).max(1) as f64,
        mask_iou,
        sequence_agreement,
        cosine_mean: cos_sum / samples as f64,
        cosine_min: if cos_min.is_finite() { cos_min } else { 1.0 },
        mean_abs_error: abs_sum / (samples * row) as f64,
        max_abs_error: abs_max,
    }
}

#[cfg(test)]
#[path = "task_tests.rs"]
mod tests;
