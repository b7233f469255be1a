//! Knowledge distillation: the student learns from the teacher's softened outputs (KL at a
//! temperature) and, where the data has labels, from the labels (cross-entropy):
//! loss = α·CE(labels) + (1−α)·T²·KL(teacher_T ‖ student_T).
use super::fit::{fit, FitOptions, FitReport, Objective};
use super::graph::{Mode, TrainGraph};
use super::{candle_error, loss, tensors, units};
use crate::domain::task::TaskKind;
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

/// What turns an output's logits into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Softmax,
    Sigmoid,
}

/// The tensor holding an output's logits: `output` itself, or the input of the Softmax or
/// Sigmoid that produced it (through Identity nodes), and which of them it was.
pub fn logits_of(model: &ModelProto, output: &str) -> (String, Activation) {
    let Some(graph) = model.graph.as_ref() else {
        return (output.to_string(), Activation::None);
    };
    let mut name = output.to_string();
    loop {
        let Some(n) = graph.node.iter().find(|n| n.output.first() == Some(&name)) else {
            return (output.to_string(), Activation::None);
        };
        match n.op_type.as_deref() {
            Some("Identity") => name = n.input[0].clone(),
            Some("Softmax") => return (n.input[0].clone(), Activation::Softmax),
            Some("Sigmoid") => return (n.input[0].clone(), Activation::Sigmoid),
            _ => return (output.to_string(), Activation::None),
        }
    }
}

/// The teacher's logits in the output's own shape `[rows, ...]` on every row of `data`, from
/// ONNX Runtime: log-probabilities when its output is a softmax (they soften to the same
/// distribution), log-odds when it is a sigmoid.
pub fn teacher_logits(
    rt: &Runtime,
    teacher: &LoadedModel,
    data: &Dataset,
    output: &str,
) -> Result<Tensor> {
    let (_, activation) = logits_of(&teacher.proto, output);
    let t = teacher_outputs(rt, teacher, data, output)?;
    let ce = |e| candle_error("teacher logits", e);
    match activation {
        Activation::None => Ok(t),
        Activation::Softmax => t.clamp(1e-12f32, 1f32).and_then(|p| p.log()).map_err(ce),
        Activation::Sigmoid => {
            let p = t.clamp(1e-7f32, 1.0 - 1e-7f32).map_err(ce)?;
            let q = p.affine(-1.0, 1.0).map_err(ce)?;
            (p.log().map_err(ce)? - q.log().map_err(ce)?).map_err(ce)
        }
    }
}

/// The labels in their own shape (`[N]`, `[N, H, W]`, `[N, T]`), when the data has integer labels.
pub fn labels_of(data: &Dataset, model: &ModelProto) -> Result<Option<Tensor>> {
    let binding = bind(&summarize(model), &data.summary)?;
    let Some(name) = binding.labels else {
        return Ok(None);
    };
    let t = data.tensor(&name).expect("bind found it");
    let v = t.data.to_i64().ok_or_else(|| EngineError::InvalidDataset {
        tensor: name.clone(),
        problem: "training needs integer class labels (text labels score CTC models but do not train them)".into(),
    })?;
    Tensor::from_vec(v, t.shape.clone(), &candle_core::Device::Cpu)
        .map(Some)
        .map_err(|e| candle_error("labels", e))
}

/// Validation rows, their input binding, the class each unit should get and how to score it.
struct Validation<'a> {
    data: &'a Dataset,
    binding: Vec<(String, String)>,
    target: Vec<i64>,
    task: TaskKind,
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
        let raw = outputs.remove(0);
        let ce = |e| candle_error("distillation loss", e);
        let task = units::task_of(raw.dims());
        let student = units::unit_logits(&raw).map_err(ce)?;
        let teacher = units::unit_logits(&pick(&self.teacher, rows).map_err(ce)?).map_err(ce)?;
        let kl = loss::distillation_kl(&student, &teacher, self.opts.temperature).map_err(ce)?;
        let mut total = match &self.labels {
            Some(labels) if self.opts.alpha > 0.0 => {
                let (labels, mask) =
                    units::unit_labels(&pick(labels, rows).map_err(ce)?, task).map_err(ce)?;
                let hard = loss::masked_cross_entropy(&student, &labels, &mask).map_err(ce)?;
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
        Ok(self.validate_with_loss(graph)?.map(|(v, _)| v))
    }

    fn validate_with_loss(&self, graph: &TrainGraph) -> Result<Option<(f64, Option<f64>)>> {
        let Some(v) = &self.validation else {
            return Ok(None);
        };
        let target = Some((v.target.as_slice(), v.task));
        let (predicted, loss) = predict_with_loss(graph, v.data, &v.binding, target)?;
        Ok(Some((units::score(&predicted, &v.target, v.task), loss)))
    }
}

/// The class (arg-max of the graph's first output) the graph predicts for every unit (sample,
/// pixel or position) of every row of `data`.
pub fn predict(
    graph: &TrainGraph,
    data: &Dataset,
    binding: &[(String, String)],
) -> Result<Vec<i64>> {
    Ok(predict_with_loss(graph, data, binding, None)?.0)
}

/// [`predict`], and the mean cross-entropy of the graph's class scores against `target` (one
/// class per unit, and the task that says which units count), when given.
fn predict_with_loss(
    graph: &TrainGraph,
    data: &Dataset,
    binding: &[(String, String)],
    target: Option<(&[i64], TaskKind)>,
) -> Result<(Vec<i64>, Option<f64>)> {
    let ce = |e| candle_error("prediction", e);
    let rows = data.summary.samples as usize;
    let mut classes = Vec::with_capacity(rows);
    let chunk = prediction_rows(data, binding);
    let (mut loss_sum, mut counted) = (0f64, 0usize);
    for start in (0..rows).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(rows)).collect();
        let feeds = tensors::feeds(data, binding, &idx, graph.device())?;
        let out = units::unit_logits(&graph.forward(&feeds, Mode::Eval)?.remove(0)).map_err(ce)?;
        let pred = out
            .argmax(1)
            .map_err(ce)?
            .to_dtype(DType::I64)
            .map_err(ce)?;
        let first = classes.len();
        classes.extend(pred.to_vec1::<i64>().map_err(ce)?);
        if let Some((target, task)) = target {
            let units = classes.len() - first;
            let Some(t) = target.get(first..first + units) else {
                continue;
            };
            let (labels, mask) = units::unit_labels(
                &Tensor::from_vec(t.to_vec(), units, out.device()).map_err(ce)?,
                task,
            )
            .map_err(ce)?;
            let n = mask
                .sum_all()
                .and_then(|m| m.to_scalar::<f32>())
                .map_err(ce)? as usize;
            if n > 0 {
                let l = loss::masked_cross_entropy(&out, &labels, &mask)
                    .and_then(|l| l.to_scalar::<f32>())
                    .map_err(ce)?;
                loss_sum += l as f64 * n as f64;
                counted += n;
            }
        }
    }
    let loss = (counted > 0).then(|| loss_sum / counted as f64);
    Ok((classes, loss))
}

/// Input values one prediction pass feeds: candle keeps every intermediate value of a forward
/// pass alive while its output lives, so a pass over 256 text lines of 48x320 (PP-OCRv4's
/// recogniser) held over 20 GB.
const PREDICTION_VALUES: usize = 1 << 18;

/// Rows per prediction pass: as many as keep the inputs under [`PREDICTION_VALUES`] values, 1 to 256.
fn prediction_rows(data: &Dataset, binding: &[(String, String)]) -> usize {
    let per_row: usize = binding
        .iter()
        .filter_map(|(_, t)| data.tensor(t))
        .map(|t| t.row_len())
        .sum();
    (PREDICTION_VALUES / per_row.max(1)).clamp(1, 256)
}

/// The class of every unit of `logits` (an output in its own shape).
pub fn unit_classes(logits: &Tensor) -> Result<Vec<i64>> {
    units::unit_logits(logits)
        .and_then(|t| t.argmax(1))
        .and_then(|t| t.to_dtype(DType::I64))
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(|e| candle_error("predicted classes", e))
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

/// What training validates on: the rows' labels, else (rows without labels) the teacher's classes.
fn validation_of<'d>(
    rt: &Runtime,
    teacher: &LoadedModel,
    student: &ModelProto,
    v: &'d Dataset,
    output: &str,
) -> Result<Validation<'d>> {
    let vb = bind(&summarize(student), &v.summary)?;
    let logits = teacher_logits(rt, teacher, v, output)?;
    let task = units::task_of(logits.dims());
    let teacher_classes = unit_classes(&logits)?;
    let target = match labels_of(v, student)? {
        Some(l) => {
            let mut target = l
                .flatten_all()
                .and_then(|l| l.to_vec1::<i64>())
                .map_err(|e| candle_error("labels", e))?;
            // A row without a single label (an unlabelled row among labelled ones) is scored
            // against the teacher's classes.
            let per_row = target.len() / v.summary.samples.max(1) as usize;
            if per_row > 0 && teacher_classes.len() == target.len() {
                for (row, t) in target
                    .chunks_mut(per_row)
                    .zip(teacher_classes.chunks(per_row))
                {
                    if row.iter().all(|&l| l < 0) {
                        row.copy_from_slice(t);
                    }
                }
            }
            target
        }
        None => teacher_classes,
    };
    Ok(Validation {
        data: v,
        binding: vb.inputs,
        target,
        task,
    })
}

/// The validation score training picks epochs by (top-1, mean IoU or per-position accuracy
/// against the rows' labels, else against the teacher's classes) of `model` as it is.
pub fn validation_score(
    rt: &Runtime,
    teacher: &LoadedModel,
    model: &ModelProto,
    output: &str,
    validation: &Dataset,
) -> Result<f64> {
    let v = validation_of(rt, teacher, model, validation, output)?;
    let (logits, _) = logits_of(model, output);
    let graph = TrainGraph::new(model, &[logits])?;
    let predicted = predict(&graph, v.data, &v.binding)?;
    Ok(units::score(&predicted, &v.target, v.task))
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
    let validation = validation
        .map(|v| validation_of(rt, teacher, student, v, output))
        .transpose()?;
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
/// from the teacher's weights, rounded up to a multiple of `multiple_of` (1: the exact share).
/// Notes say what shrank.
pub fn width_student(
    teacher: &ModelProto,
    share: f64,
    multiple_of: usize,
) -> (ModelProto, Vec<String>) {
    let mut student = teacher.clone();
    let mut notes = Vec::new();
    for g in crate::engine::channels::channel_groups(teacher) {
        let keep = crate::engine::channels::most_important(&g, share, multiple_of);
        notes.push(format!(
            "{}: kept {} of {} channels (largest L1 norm)",
            g.layers().join(" + "),
            keep.len(),
            g.channels
        ));
        crate::engine::channels::keep_layer_channels(&mut student, &g.layer, &keep);
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
    validation: Option<FeatureValidation<'a>>,
}

/// Validation rows of a feature distillation and the teacher's features on them.
struct FeatureValidation<'a> {
    data: &'a Dataset,
    binding: Vec<(String, String)>,
    target: Tensor,
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
        let Some(FeatureValidation {
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
        Some(v) => Some(FeatureValidation {
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
