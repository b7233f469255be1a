//! The training loop: AdamW, learning-rate warm-up then linear or cosine decay, gradient
//! clipping by global norm, a budget in epochs or optimizer steps, validation once per window
//! (an epoch, or whole epochs of at least `min_window` steps when epochs are short), early
//! stopping on the validation score (the best window's weights are kept, or the weights
//! training started from when no window scores better than they did), a seed that makes runs
//! repeatable, a time budget, and progress/cancellation between steps.
use super::candle_error;
use super::graph::TrainGraph;
use crate::engine::{Progress, Result};
use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::{Duration, Instant};

pub use crate::domain::training::LrSchedule as Schedule;

#[derive(Debug, Clone)]
pub struct FitOptions {
    pub epochs: usize,
    /// Optimizer steps in all, instead of `epochs` passes.
    pub steps: Option<usize>,
    /// Fewest steps between two validations: short epochs are validated every few epochs.
    pub min_window: usize,
    /// BatchNormalization normalises with its running statistics (left as they are) in training
    /// too; scale and shift still train.
    pub frozen_batch_norm: bool,
    pub batch_size: usize,
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
            frozen_batch_norm: false,
            batch_size: 32,
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
    graph.set_frozen_batch_norm(opts.frozen_batch_norm);
    // Training never returns weights that validate worse than those it was given.
    let start = objective.validate_with_loss(graph)?;
    let start_validation = start.map(|(v, _)| v);
    // ((score, loss), epoch, steps, weights)
    type Best = ((f64, Option<f64>), usize, usize, super::graph::Snapshot);
    let mut best: Option<Best> = match start {
        Some(v) if v.0.is_finite() => Some((v, 0, 0, graph.snapshot()?)),
        _ => None,
    };
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
            let loss = objective.loss(graph, chunk)?;
            let value = loss.to_scalar::<f32>().map_err(ce)? as f64;
            if !value.is_finite() {
                stopped = format!("the loss became {value} at step {step}; kept the best weights");
                break 'epochs;
            }
            let mut grads = loss.backward().map_err(ce)?;
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
    })
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
}
