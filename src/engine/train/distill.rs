//! Knowledge distillation: the student learns from the teacher's softened outputs (KL at a
//! temperature) and, where the data has labels, from the labels (cross-entropy):
//! loss = α·CE(labels) + (1−α)·T²·KL(teacher_T ‖ student_T).
use super::fit::{fit, FitOptions, FitReport, Objective};
use super::graph::{Mode, TrainGraph};
use super::{candle_error, loss, tensors};
use crate::engine::dataset::{bind, Dataset};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::{summarize, LoadedModel};
use crate::engine::runtime::{self, Runtime};
use crate::engine::{EngineError, Progress, Result};
use candle_core::{DType, Tensor};
use prost::Message;

pub use crate::domain::distill::FeatureHint;

/// How a student is trained: the loss weights, the temperature, feature hints and the
/// training schedule.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Weight of the hard-label cross-entropy (ignored without labels).
    pub alpha: f64,
    pub temperature: f64,
    pub fit: FitOptions,
    /// Intermediate-feature MSE terms added to the loss.
    pub features: Vec<FeatureHint>,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            temperature: 4.0,
            fit: FitOptions::default(),
            features: Vec::new(),
        }
    }
}

/// The tensor holding a classifier's logits: `output` itself, or the input of the Softmax that
/// produced it (through Identity nodes). The bool says whether `output` is a softmax.
pub fn logits_of(model: &ModelProto, output: &str) -> (String, bool) {
    let Some(graph) = model.graph.as_ref() else {
        return (output.to_string(), false);
    };
    let mut name = output.to_string();
    loop {
        let Some(n) = graph.node.iter().find(|n| n.output.first() == Some(&name)) else {
            return (output.to_string(), false);
        };
        match n.op_type.as_deref() {
            Some("Identity") => name = n.input[0].clone(),
            Some("Softmax") => return (n.input[0].clone(), true),
            _ => return (output.to_string(), false),
        }
    }
}

/// The teacher's logits (log-probabilities when its output is a softmax, which soften to the
/// same distribution) on every row of `data`, from ONNX Runtime.
pub fn teacher_logits(
    rt: &Runtime,
    teacher: &LoadedModel,
    data: &Dataset,
    output: &str,
) -> Result<Tensor> {
    let binding = bind(&summarize(&teacher.proto), &data.summary)?;
    let (_, softmax) = logits_of(&teacher.proto, output);
    let mut session = rt.session(&teacher.bytes, 1)?;
    let rows = binding.samples as usize;
    let (mut values, mut classes) = (Vec::new(), 0);
    for start in (0..rows).step_by(64) {
        let end = (start + 64).min(rows);
        let out = session.run(runtime::feeds(data, &binding.inputs, start..end)?)?;
        let value = out.get(output).ok_or_else(|| EngineError::InvalidOption {
            option: "output".into(),
            problem: format!("the teacher has no output `{output}`"),
        })?;
        let (shape, v) = value.try_extract_tensor::<f32>()?;
        classes = shape.last().copied().unwrap_or(1) as usize;
        values.extend(
            v.iter()
                .map(|&p| if softmax { p.max(1e-12).ln() } else { p }),
        );
    }
    Tensor::from_vec(values, (rows, classes), &candle_core::Device::Cpu)
        .map_err(|e| candle_error("teacher logits", e))
}

pub fn labels_of(data: &Dataset, model: &ModelProto) -> Result<Option<Tensor>> {
    let binding = bind(&summarize(model), &data.summary)?;
    let Some(name) = binding.labels else {
        return Ok(None);
    };
    let t = data.tensor(&name).expect("bind found it");
    let v = t.data.to_i64().ok_or_else(|| EngineError::InvalidDataset {
        tensor: name.clone(),
        problem: "labels must be integers".into(),
    })?;
    let n = v.len();
    Tensor::from_vec(v, n, &candle_core::Device::Cpu)
        .map(Some)
        .map_err(|e| candle_error("labels", e))
}

/// Validation rows, their input binding and the class each should get.
struct Validation<'a> {
    data: &'a Dataset,
    binding: Vec<(String, String)>,
    target: Tensor,
}

struct Distillation<'a> {
    train: &'a Dataset,
    binding: Vec<(String, String)>,
    teacher: Tensor,
    labels: Option<Tensor>,
    validation: Option<Validation<'a>>,
    opts: &'a Recipe,
    /// The teacher's value of each feature hint on every training row.
    hints: Vec<Tensor>,
}

fn pick(t: &Tensor, rows: &[usize]) -> candle_core::Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    let n = idx.len();
    t.index_select(&Tensor::from_vec(idx, n, t.device())?, 0)
}

impl Objective for Distillation<'_> {
    fn loss(&self, graph: &TrainGraph, rows: &[usize]) -> Result<Tensor> {
        let feeds = tensors::feeds(self.train, &self.binding, rows, graph.device())?;
        let mut outputs = graph.forward(&feeds, Mode::Train)?;
        let student = outputs.remove(0);
        let ce = |e| candle_error("distillation loss", e);
        let teacher = pick(&self.teacher, rows).map_err(ce)?;
        let kl = loss::distillation_kl(&student, &teacher, self.opts.temperature).map_err(ce)?;
        let mut total = match &self.labels {
            Some(labels) if self.opts.alpha > 0.0 => {
                let hard =
                    loss::cross_entropy(&student, &pick(labels, rows).map_err(ce)?).map_err(ce)?;
                ((hard * self.opts.alpha).map_err(ce)?
                    + (kl * (1.0 - self.opts.alpha)).map_err(ce)?)
                .map_err(ce)?
            }
            _ => kl,
        };
        for ((hint, value), target) in self.opts.features.iter().zip(outputs).zip(&self.hints) {
            let target = pick(target, rows).map_err(ce)?;
            if value.dims() != target.dims() {
                return Err(EngineError::InvalidOption {
                    option: "features".into(),
                    problem: format!(
                        "the student's `{}` has shape {:?} but the teacher's `{}` has {:?}",
                        hint.student_tensor(),
                        value.dims(),
                        hint.teacher,
                        target.dims()
                    ),
                });
            }
            let mse = loss::feature_mse(&value, &target).map_err(ce)?;
            total = (total + (mse * hint.weight).map_err(ce)?).map_err(ce)?;
        }
        Ok(total)
    }

    fn validate(&self, graph: &TrainGraph) -> Result<Option<f64>> {
        let Some(v) = &self.validation else {
            return Ok(None);
        };
        Ok(Some(accuracy(graph, v.data, &v.binding, &v.target)?))
    }
}

/// The class (argmax of the graph's first output) the graph predicts for every row of `data`.
pub fn predict(
    graph: &TrainGraph,
    data: &Dataset,
    binding: &[(String, String)],
) -> Result<Vec<i64>> {
    let ce = |e| candle_error("prediction", e);
    let rows = data.summary.samples as usize;
    let mut classes = Vec::with_capacity(rows);
    for start in (0..rows).step_by(256) {
        let idx: Vec<usize> = (start..(start + 256).min(rows)).collect();
        let feeds = tensors::feeds(data, binding, &idx, graph.device())?;
        let out = graph.forward(&feeds, Mode::Eval)?.remove(0);
        let pred = out
            .argmax(1)
            .map_err(ce)?
            .to_dtype(DType::I64)
            .map_err(ce)?;
        classes.extend(pred.to_vec1::<i64>().map_err(ce)?);
    }
    Ok(classes)
}

/// Top-1 accuracy of the graph's first output against `target` class indices.
fn accuracy(
    graph: &TrainGraph,
    data: &Dataset,
    binding: &[(String, String)],
    target: &Tensor,
) -> Result<f64> {
    let want = target
        .to_vec1::<i64>()
        .map_err(|e| candle_error("validation", e))?;
    let got = predict(graph, data, binding)?;
    let correct = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    Ok(correct as f64 / want.len().max(1) as f64)
}

/// The teacher's value of each hint's tensor on every row of `data` (ONNX Runtime, with the
/// tensors exposed as extra graph outputs).
pub fn feature_targets(
    rt: &Runtime,
    teacher: &LoadedModel,
    data: &Dataset,
    hints: &[FeatureHint],
) -> Result<Vec<Tensor>> {
    if hints.is_empty() {
        return Ok(Vec::new());
    }
    let mut proto = teacher.proto.clone();
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| EngineError::InvalidModel("no graph".into()))?;
    for h in hints {
        let produced = graph.node.iter().any(|n| n.output.contains(&h.teacher));
        if !produced {
            return Err(EngineError::InvalidOption {
                option: "features".into(),
                problem: format!("the teacher computes no tensor `{}`", h.teacher),
            });
        }
        if !graph
            .output
            .iter()
            .any(|o| o.name.as_ref() == Some(&h.teacher))
        {
            graph
                .output
                .push(crate::engine::onnx::tensor::float_value_info(&h.teacher));
        }
    }
    let exposed = crate::engine::onnx::load_model_bytes(proto.encode_to_vec().into())?;
    hints
        .iter()
        .map(|h| teacher_outputs(rt, &exposed, data, &h.teacher))
        .collect()
}

/// The outcome of a distillation.
pub struct Distilled {
    pub model: ModelProto,
    pub report: FitReport,
    pub student_parameters: usize,
}

/// What a distillation works on.
pub struct Pair<'a> {
    pub rt: &'a Runtime,
    pub teacher: &'a LoadedModel,
    /// Same inputs as the teacher, and an output named `output` too.
    pub student: &'a ModelProto,
    pub output: &'a str,
    pub train: &'a Dataset,
    /// Rows that pick the epoch to keep.
    pub validation: Option<&'a Dataset>,
}

/// Distils the teacher into the student through the classifier output; validation rows (with
/// labels, else scored as agreement with the teacher) pick the epoch to keep. The trained
/// student is returned as ONNX.
pub fn distill(pair: Pair<'_>, opts: &Recipe, progress: &dyn Progress) -> Result<Distilled> {
    distill_with(pair, None, opts, progress)
}

/// [`distill`] with every value of the student's forward pass run through `hook` (fake
/// quantization makes this quantization-aware training).
pub fn distill_with(
    pair: Pair<'_>,
    hook: Option<std::sync::Arc<dyn super::ValueHook>>,
    opts: &Recipe,
    progress: &dyn Progress,
) -> Result<Distilled> {
    let Pair {
        rt,
        teacher,
        student,
        output,
        train,
        validation,
    } = pair;
    let (logits, _) = logits_of(student, output);
    let mut computed = vec![logits];
    computed.extend(opts.features.iter().map(|f| f.student_tensor().to_string()));
    let mut graph = TrainGraph::new(student, &computed)?;
    if let Some(h) = hook {
        graph.set_hook(h);
    }
    let binding = bind(&summarize(student), &train.summary)?;
    let validation = match validation {
        Some(v) => {
            let vb = bind(&summarize(student), &v.summary)?;
            let target = match labels_of(v, student)? {
                Some(l) => l,
                None => teacher_logits(rt, teacher, v, output)?
                    .argmax(1)
                    .and_then(|t| t.to_dtype(DType::I64))
                    .map_err(|e| candle_error("teacher labels", e))?,
            };
            Some(Validation {
                data: v,
                binding: vb.inputs,
                target,
            })
        }
        None => None,
    };
    let objective = Distillation {
        train,
        binding: binding.inputs,
        teacher: teacher_logits(rt, teacher, train, output)?,
        labels: labels_of(train, student)?,
        validation,
        opts,
        hints: feature_targets(rt, teacher, train, &opts.features)?,
    };
    let report = fit(
        &graph,
        &objective,
        binding.samples as usize,
        &opts.fit,
        progress,
    )?;
    Ok(Distilled {
        model: graph.export()?,
        report,
        student_parameters: graph.parameters(),
    })
}

/// A student derived from the teacher by width: every channel group (see
/// [`crate::engine::channels`]) keeps its `share` most important channels by L1 norm, initialised
/// from the teacher's weights. Notes say what shrank.
pub fn width_student(teacher: &ModelProto, share: f64) -> (ModelProto, Vec<String>) {
    let mut student = teacher.clone();
    let mut notes = Vec::new();
    for g in crate::engine::channels::channel_groups(teacher) {
        let keep = crate::engine::channels::most_important(&g, share);
        notes.push(format!(
            "{}: kept {} of {} channels (largest L1 norm)",
            g.layer,
            keep.len(),
            g.channels
        ));
        crate::engine::channels::keep_channels(&mut student, &g, &keep);
    }
    (student, notes)
}

/// The teacher's `output` on every row of `data` (ONNX Runtime), as one [rows, ...] tensor.
pub fn teacher_outputs(
    rt: &Runtime,
    teacher: &LoadedModel,
    data: &Dataset,
    output: &str,
) -> Result<Tensor> {
    let binding = bind(&summarize(&teacher.proto), &data.summary)?;
    let mut session = rt.session(&teacher.bytes, 1)?;
    let rows = binding.samples as usize;
    let (mut values, mut shape) = (Vec::new(), Vec::new());
    for start in (0..rows).step_by(32) {
        let end = (start + 32).min(rows);
        let out = session.run(runtime::feeds(data, &binding.inputs, start..end)?)?;
        let value = out.get(output).ok_or_else(|| EngineError::InvalidOption {
            option: "output".into(),
            problem: format!("the teacher has no output `{output}`"),
        })?;
        let (s, v) = value.try_extract_tensor::<f32>()?;
        shape = s.iter().map(|&d| d as usize).collect();
        values.extend_from_slice(v);
    }
    if let Some(first) = shape.first_mut() {
        *first = rows;
    }
    Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
        .map_err(|e| candle_error("teacher outputs", e))
}

/// Mean cosine similarity between matching rows.
fn mean_cosine(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = (a.flatten_from(1)?, b.flatten_from(1)?);
    let dot = (&a * &b)?.sum(1)?;
    let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?;
    (dot / (norms + 1e-12)?)?.mean_all()
}

struct FeatureDistillation<'a> {
    train: &'a Dataset,
    binding: Vec<(String, String)>,
    teacher: Tensor,
    validation: Option<Validation<'a>>,
}

impl Objective for FeatureDistillation<'_> {
    fn loss(&self, graph: &TrainGraph, rows: &[usize]) -> Result<Tensor> {
        let ce = |e| candle_error("feature distillation loss", e);
        let feeds = tensors::feeds(self.train, &self.binding, rows, graph.device())?;
        let student = graph.forward(&feeds, Mode::Train)?.remove(0);
        let teacher = pick(&self.teacher, rows).map_err(ce)?;
        // 1 − cosine: the direction of an embedding is what retrieval and similarity use.
        (mean_cosine(&student, &teacher)
            .map_err(ce)?
            .neg()
            .map_err(ce)?
            + 1.0)
            .map_err(ce)
    }

    fn validate(&self, graph: &TrainGraph) -> Result<Option<f64>> {
        let Some(Validation {
            data,
            binding,
            target,
        }) = &self.validation
        else {
            return Ok(None);
        };
        let ce = |e| candle_error("validation", e);
        let rows: Vec<usize> = (0..target.dim(0).map_err(ce)?).collect();
        let mut sum = 0f64;
        for chunk in rows.chunks(32) {
            let feeds = tensors::feeds(data, binding, chunk, graph.device())?;
            let out = graph.forward(&feeds, Mode::Eval)?.remove(0);
            let c = mean_cosine(&out, &pick(target, chunk).map_err(ce)?).map_err(ce)?;
            sum += c.to_scalar::<f32>().map_err(ce)? as f64 * chunk.len() as f64;
        }
        Ok(Some(sum / rows.len().max(1) as f64))
    }
}

/// Distils the teacher's `output` (an embedding or any feature tensor) into the student's
/// output of the same name by cosine similarity, on unlabelled training rows; validation rows
/// (scored by mean cosine to the teacher) pick the epoch to keep.
pub fn distill_features(
    pair: Pair<'_>,
    opts: &FitOptions,
    progress: &dyn Progress,
) -> Result<Distilled> {
    let Pair {
        rt,
        teacher,
        student,
        output,
        train,
        validation,
    } = pair;
    let graph = TrainGraph::new(student, &[output.to_string()])?;
    let binding = bind(&summarize(student), &train.summary)?;
    let validation = match validation {
        Some(v) => Some(Validation {
            data: v,
            binding: bind(&summarize(student), &v.summary)?.inputs,
            target: teacher_outputs(rt, teacher, v, output)?,
        }),
        None => None,
    };
    let objective = FeatureDistillation {
        train,
        binding: binding.inputs,
        teacher: teacher_outputs(rt, teacher, train, output)?,
        validation,
    };
    let report = fit(&graph, &objective, binding.samples as usize, opts, progress)?;
    Ok(Distilled {
        model: graph.export()?,
        report,
        student_parameters: graph.parameters(),
    })
}
