//! The accuracy budget (`max_accuracy_drop`): measure how much each layer costs alone in int8,
//! find by bisection the fewest most harmful layers that, kept float, make the drop fit, then
//! return to int8 every float layer the budget does not need; the same again with the layers
//! ordered by harm per weight, and the smaller model wins. About n + 2·(log2(n) + k) trial models
//! for n layers of which k end up float. Scores are the task's metric when the data has labels
//! (top-1 accuracy, mean IoU, per-position or sequence accuracy), else the scored output's
//! agreement with the float model (top-1 agreement, mask IoU, per-position agreement, or for a
//! named `ctc` task decoded-sequence agreement), measured in ONNX Runtime on the evaluation data.
use super::{LayerDecision, Prepared};
use crate::domain::report::primary_fidelity;
use crate::domain::spec::EvaluateOptions;
use crate::engine::dataset::Dataset;
use crate::engine::evaluate::{evaluate, Baseline};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::LoadedModel;
use crate::engine::runtime::Runtime;
use crate::engine::{NoProgress, Progress, Result};
use prost::Message;
use std::collections::HashSet;

/// Scores candidate models on the evaluation data.
pub struct Scorer<'a> {
    rt: &'a Runtime,
    data: &'a Dataset,
    opts: EvaluateOptions,
    reference: Baseline,
    /// The float model's score.
    pub float_score: f64,
    /// What the score measures: the task's metric, or the agreement with the float model.
    pub metric: String,
    labelled: bool,
}

impl<'a> Scorer<'a> {
    pub fn new(
        rt: &'a Runtime,
        float: &LoadedModel,
        data: &'a Dataset,
        opts: &EvaluateOptions,
    ) -> Result<Self> {
        // Only the accuracy pass matters here; one timed run keeps each trial cheap.
        let opts = EvaluateOptions {
            latency_runs: 1,
            warmup_runs: 0,
            ..opts.clone()
        };
        let e = evaluate(rt, float, data, &opts, None, &NoProgress)?;
        let labelled =
            e.metrics.task.as_ref().is_some_and(|t| t.samples > 0) && e.metrics.samples > 0;
        let metric = match (&e.metrics.task, primary_fidelity(&e.metrics)) {
            (Some(t), _) if labelled => t.metric.clone(),
            (_, Some(f)) => f.task.agreement().replace("baseline", "float model"),
            _ => "agreement with the float model".to_string(),
        };
        let mut s = Self {
            rt,
            data,
            opts,
            reference: e.as_baseline(),
            float_score: 0.0,
            metric,
            labelled,
        };
        s.float_score = s.score_of(&e.metrics);
        Ok(s)
    }

    fn score_of(&self, m: &crate::domain::report::Metrics) -> f64 {
        if self.labelled {
            m.task.as_ref().map_or(0.0, |t| t.score)
        } else {
            primary_fidelity(m).map_or(0.0, |f| f.agreement())
        }
    }

    pub fn score(&self, proto: &ModelProto) -> Result<f64> {
        Ok(self.score_and_error(proto)?.0)
    }

    /// The score and the mean absolute error of the scored output against the float model's.
    pub fn score_and_error(&self, proto: &ModelProto) -> Result<(f64, f64)> {
        let model = LoadedModel {
            bytes: proto.encode_to_vec().into(),
            proto: proto.clone(),
        };
        let e = evaluate(
            self.rt,
            &model,
            self.data,
            &self.opts,
            Some(&self.reference),
            &NoProgress,
        )?;
        let error = primary_fidelity(&e.metrics).map_or(0.0, |f| f.mean_abs_error);
        Ok((self.score_of(&e.metrics), error))
    }
}

/// Scores equal within this are a tie, broken by the smaller output error.
pub(super) const SCORE_TIE: f64 = 1e-9;

/// Calibration `auto`: the model with every layer int8 is built from each calibration the
/// preparation holds (min/max and its `also_try` methods, all from one histogram pass) and the
/// best scoring one is kept (ties: the smaller output error against the float model).
pub fn choose_calibration(
    prepared: Prepared,
    scorer: &Scorer<'_>,
) -> Result<(Prepared, Vec<String>)> {
    let alternatives = prepared.alternatives();
    if alternatives.is_empty() {
        return Ok((prepared, Vec::new()));
    }
    let mut scored = Vec::new();
    for p in std::iter::once(prepared).chain(alternatives) {
        let (model, _) = p.build(&HashSet::new())?;
        let (score, error) = scorer.score_and_error(&model)?;
        scored.push((p, score, error));
    }
    let best = (0..scored.len())
        .reduce(|b, i| {
            let (s, e) = (scored[i].1, scored[i].2);
            let (bs, be) = (scored[b].1, scored[b].2);
            if s > bs + SCORE_TIE || (s >= bs - SCORE_TIE && e < be) {
                i
            } else {
                b
            }
        })
        .expect("at least the preparation itself");
    let summary: Vec<String> = scored
        .iter()
        .map(|(p, s, e)| {
            format!(
                "{} {s:.4} (output error {e:.3e})",
                super::calibrate::describe(p.calibration())
            )
        })
        .collect();
    let (chosen, ..) = scored.swap_remove(best);
    let note = format!(
        "calibration auto: every layer int8 scores {} {}: kept {}",
        scorer.metric,
        summary.join(", "),
        super::calibrate::describe(chosen.calibration())
    );
    Ok((chosen, vec![note]))
}

/// How much more output error than per-channel scales one scale per tensor may add and still be
/// chosen for its smaller size (within the accuracy budget).
pub const PER_TENSOR_ERROR_RATIO: f64 = 1.5;

/// A smaller model with one scale per tensor, chosen because it measured as good.
pub struct PerTensorChoice {
    pub prepared: Prepared,
    pub model: ModelProto,
    pub layers: Vec<LayerDecision>,
}

/// With granularity `auto`, the budget's choice may still carry per-channel (and per-row) scales.
/// One scale per tensor everywhere, else per embedding table only (same float layers), wins when
/// it also fits the budget and its output error stays within [`PER_TENSOR_ERROR_RATIO`] of the
/// chosen model's: it is the smaller model of the same quality. (Not "scores no lower than the
/// chosen model": on a small evaluation set that one may beat the float model by a sample or two
/// of luck.) Returns the winner, if any, and a note for each model tried.
pub fn prefer_per_tensor(
    prepared: &Prepared,
    scorer: &Scorer<'_>,
    float: &HashSet<String>,
    chosen: &ModelProto,
    max_drop: f64,
) -> Result<(Option<PerTensorChoice>, Vec<String>)> {
    let mut notes = Vec::new();
    let mut reference: Option<(f64, f64)> = None;
    for (tables_only, what) in [(false, "every layer"), (true, "embedding tables")] {
        let Some(per_tensor) = prepared.per_tensor(tables_only) else {
            break;
        };
        let (model, layers) = per_tensor.build(float)?;
        let (small, large) = (model.encoded_len(), chosen.encoded_len());
        if small >= large {
            continue;
        }
        let (s0, e0) = match reference {
            Some(r) => r,
            None => *reference.insert(scorer.score_and_error(chosen)?),
        };
        let (s1, e1) = scorer.score_and_error(&model)?;
        let fits = scorer.float_score - s1 <= max_drop + 1e-9;
        let wins = fits && e1 <= e0 * PER_TENSOR_ERROR_RATIO;
        notes.push(format!(
            "granularity auto: one scale per tensor for {what} scores {s1:.4} {} with output error {e1:.3e}, the per-channel model {s0:.4} with {e0:.3e}: {} ({} bytes smaller)",
            scorer.metric,
            if wins { "kept" } else { "not kept" },
            large - small
        ));
        if wins {
            let choice = PerTensorChoice {
                prepared: per_tensor,
                model,
                layers,
            };
            return Ok((Some(choice), notes));
        }
    }
    Ok((None, notes))
}

/// The outcome of the budget search.
pub struct BudgetChoice {
    pub model: ModelProto,
    pub layers: Vec<LayerDecision>,
    pub float: HashSet<String>,
    /// Whether the drop fits the budget.
    pub holds: bool,
    pub drop: f64,
    pub trials: usize,
    pub notes: Vec<String>,
}

/// Most trial models the search builds by default before it returns the best one found.
pub const MAX_TRIALS: usize = 200;

pub fn search(
    prepared: &Prepared,
    scorer: &Scorer<'_>,
    max_drop: f64,
    max_trials: usize,
    progress: &dyn Progress,
) -> Result<BudgetChoice> {
    let candidates = prepared.candidates()?;
    let f = scorer.float_score;
    let count = std::cell::Cell::new(0usize);
    let trial = |float: &HashSet<String>| -> Result<f64> {
        count.set(count.get() + 1);
        scorer.score(&prepared.build(float)?.0)
    };
    let none: HashSet<String> = HashSet::new();
    let all_int8 = trial(&none)?;
    let mut notes = vec![format!(
        "accuracy budget {max_drop}: {} float {f:.4}, every layer int8 {all_int8:.4}",
        scorer.metric
    )];
    let within = |s: f64| f - s <= max_drop + 1e-9;
    if within(all_int8) {
        notes.push("every layer fits the budget in int8".into());
        let (model, layers) = prepared.build(&none)?;
        return Ok(BudgetChoice {
            model,
            layers,
            float: none,
            holds: true,
            drop: f - all_int8,
            trials: count.get(),
            notes,
        });
    }
    // Sensitivity: what each layer loses alone in int8 (one trial per layer, while trials last).
    let mut alone: Vec<Option<f64>> = vec![None; candidates.len()];
    for (i, c) in candidates.iter().enumerate() {
        if count.get() >= max_trials {
            break;
        }
        let only: HashSet<String> = candidates.iter().filter(|o| *o != c).cloned().collect();
        alone[i] = Some(f - trial(&only)?);
        progress.update(0.6 * (i + 1) as f64 / candidates.len() as f64)?;
    }
    let weights = prepared.weight_elements(&candidates);
    let bytes =
        |float: &HashSet<String>| -> Result<usize> { Ok(prepared.build(float)?.0.encoded_len()) };
    let search = Search {
        candidates: &candidates,
        alone: &alone,
        weights: &weights,
        all_int8,
        float_score: f,
        metric: &scorer.metric,
    };
    let (score, float, note) =
        search.smallest_fit(&within, &trial, &bytes, &|| count.get() < max_trials)?;
    notes.extend(note);
    progress.update(0.9)?;
    let trials = count.get();
    let holds = within(score);
    let (model, mut layers) = prepared.build(&float)?;
    for l in layers.iter_mut() {
        if let Some(i) = candidates.iter().position(|c| *c == l.node) {
            l.sensitivity = alone[i];
            let measured = alone[i].map_or("not measured (trials ran out)".to_string(), |a| {
                format!("alone in int8 it loses {a:.4} of {}", scorer.metric)
            });
            l.reason = if float.contains(&l.node) {
                format!("kept float for the accuracy budget: {measured}")
            } else {
                format!("int8 within the budget ({measured})")
            };
        }
    }
    notes.push(format!(
        "{} layer(s) kept float; {} {score:.4} (drop {:.4}) after {trials} trial models",
        float.len(),
        scorer.metric,
        f - score
    ));
    if !holds {
        notes.push(format!(
            "no configuration found within the budget of {max_drop}: returning the best model found"
        ));
    }
    progress.update(1.0)?;
    Ok(BudgetChoice {
        model,
        layers,
        float,
        holds,
        drop: f - score,
        trials,
        notes,
    })
}

/// Candidate indices sorted by `key` descending (unmeasured layers, -inf, last); equal keys keep
/// the graph's order.
fn order_by(n: usize, key: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    order
}

/// What the sensitivity pass measured, for choosing the layers to keep float.
struct Search<'a> {
    candidates: &'a [String],
    /// What each candidate loses alone in int8 (None: trials ran out first).
    alone: &'a [Option<f64>],
    /// Each candidate's weight count.
    weights: &'a [usize],
    all_int8: f64,
    float_score: f64,
    metric: &'a str,
}

/// A score and the layers kept float for it.
type Fit = (f64, HashSet<String>);

impl Search<'_> {
    /// Searches two orders of keeping layers float the same way ([`Self::fewest_float`]): most
    /// harmful first (the fewest float layers) and most harmful per weight first (the fewest
    /// float weights: a network's small high-resolution layers often cost the most accuracy in
    /// int8 and the least size in float). The smaller fitting model wins (`bytes` measures it);
    /// when neither fits, the better scoring. Returns it and a note comparing the two, when
    /// both orders were searched.
    fn smallest_fit(
        &self,
        within: &dyn Fn(f64) -> bool,
        trial: &dyn Fn(&HashSet<String>) -> Result<f64>,
        bytes: &dyn Fn(&HashSet<String>) -> Result<usize>,
        trials_left: &dyn Fn() -> bool,
    ) -> Result<(f64, HashSet<String>, Option<String>)> {
        let n = self.candidates.len();
        let loss = |i: usize| self.alone[i].unwrap_or(f64::NEG_INFINITY);
        let by_loss = order_by(n, loss);
        let by_loss_per_weight = order_by(n, |i| loss(i) / self.weights[i].max(1) as f64);
        let first = self.fewest_float(&by_loss, within, trial, trials_left)?;
        if by_loss_per_weight == by_loss || !trials_left() {
            return Ok((first.0, first.1, None));
        }
        let second = self.fewest_float(&by_loss_per_weight, within, trial, trials_left)?;
        let (b1, b2) = (bytes(&first.1)?, bytes(&second.1)?);
        let wins = match (within(first.0), within(second.0)) {
            (true, true) => b2 < b1,
            (false, true) => true,
            (true, false) => false,
            (false, false) => second.0 > first.0,
        };
        let note = format!(
            "keeping layers float most harmful first: {} float, {b1} bytes, {} {:.4}; most harmful per weight first: {} float, {b2} bytes, {:.4}: kept {}",
            first.1.len(),
            self.metric,
            first.0,
            second.1.len(),
            second.0,
            if wins {
                "the fewest float weights"
            } else {
                "the fewest float layers"
            }
        );
        let (score, float) = if wins { second } else { first };
        Ok((score, float, Some(note)))
    }

    /// The shortest prefix of `order` that, kept float, fits the budget (by bisection: every
    /// layer float fits, it is the float model; none does not, `all_int8` measured that), then
    /// every float layer the budget does not need given back to int8, the last in `order` first.
    /// The best scoring prefix tried when trials ran out before one fit.
    fn fewest_float(
        &self,
        order: &[usize],
        within: &dyn Fn(f64) -> bool,
        trial: &dyn Fn(&HashSet<String>) -> Result<f64>,
        trials_left: &dyn Fn() -> bool,
    ) -> Result<Fit> {
        let candidates = self.candidates;
        let prefix = |k: usize| -> HashSet<String> {
            order[..k].iter().map(|&i| candidates[i].clone()).collect()
        };
        let (mut lo, mut hi) = (0, candidates.len());
        let mut best = (self.all_int8, HashSet::new());
        let mut fitting: Option<Fit> = None;
        while hi - lo > 1 && trials_left() {
            let mid = (lo + hi) / 2;
            let float = prefix(mid);
            let s = trial(&float)?;
            if within(s) {
                hi = mid;
                fitting = Some((s, float));
            } else {
                lo = mid;
                if s > best.0 {
                    best = (s, float);
                }
            }
        }
        if let Some(fit) = fitting {
            best = fit;
        } else if hi - lo <= 1 {
            best = (self.float_score, prefix(candidates.len()));
        }
        if within(best.0) {
            for &i in order.iter().rev() {
                if !trials_left() {
                    break;
                }
                let mut fewer = best.1.clone();
                if !fewer.remove(&candidates[i]) {
                    continue;
                }
                let s = trial(&fewer)?;
                if within(s) {
                    best = (s, fewer);
                }
            }
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Harms that add up: the score is 1 minus the losses of the layers left in int8.
    fn additive<'a>(
        names: &'a [String],
        loss: &'a [f64],
    ) -> impl Fn(&HashSet<String>) -> Result<f64> + 'a {
        move |float| {
            Ok(1.0
                - names
                    .iter()
                    .zip(loss)
                    .filter(|(n, _)| !float.contains(*n))
                    .map(|(_, l)| l)
                    .sum::<f64>())
        }
    }

    #[test]
    fn the_search_keeps_the_small_harmful_layers_float_when_that_makes_the_smaller_model() {
        let names: Vec<String> = ["big", "small1", "small2", "tiny"].map(String::from).into();
        let loss = [0.05, 0.045, 0.04, 0.001];
        let weights = [10_000, 100, 100, 10];
        let alone: Vec<Option<f64>> = loss.iter().map(|&l| Some(l)).collect();
        let trial = additive(&names, &loss);
        let bytes = |float: &HashSet<String>| -> Result<usize> {
            Ok(names
                .iter()
                .zip(weights)
                .map(|(n, w)| if float.contains(n) { 4 * w } else { w })
                .sum())
        };
        let search = Search {
            candidates: &names,
            alone: &alone,
            weights: &weights,
            all_int8: trial(&HashSet::new()).unwrap(),
            float_score: 1.0,
            metric: "accuracy",
        };
        let within = |s: f64| 1.0 - s <= 0.06 + 1e-9;
        let trials = Cell::new(0);
        let counted = |f: &HashSet<String>| {
            trials.set(trials.get() + 1);
            trial(f)
        };
        let (score, float, note) = search
            .smallest_fit(&within, &counted, &bytes, &|| true)
            .unwrap();
        // Most harmful first needs "big" and "small1" float (40,510 bytes); the two small
        // layers alone fit too, at 10,810 bytes.
        let want: HashSet<String> = ["small1", "small2"].map(String::from).into();
        assert_eq!(float, want);
        // Per order: two bisection steps over four layers, then two give-back trials.
        assert_eq!(trials.get(), 8);
        assert!((score - 0.949).abs() < 1e-9, "{score}");
        let note = note.unwrap();
        assert!(
            note.contains("2 float, 40510 bytes")
                && note.contains("2 float, 10810 bytes")
                && note.ends_with("kept the fewest float weights"),
            "{note}"
        );

        // With no trials left after the first order, only it is searched.
        let left = Cell::new(3);
        let (_, float, note) = search
            .smallest_fit(&within, &trial, &bytes, &|| {
                left.set(left.get() - 1);
                left.get() > 0
            })
            .unwrap();
        assert!(note.is_none());
        assert!(float.contains("big"), "{float:?}");
    }

    #[test]
    fn layers_of_one_size_are_searched_in_one_order() {
        let names: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let loss = [0.02, 0.05, 0.01];
        let alone: Vec<Option<f64>> = vec![Some(0.02), Some(0.05), None];
        let trial = additive(&names, &loss);
        let search = Search {
            candidates: &names,
            alone: &alone,
            weights: &[64, 64, 64],
            all_int8: trial(&HashSet::new()).unwrap(),
            float_score: 1.0,
            metric: "accuracy",
        };
        let within = |s: f64| 1.0 - s <= 0.03 + 1e-9;
        let (score, float, note) = search
            .smallest_fit(&within, &trial, &|_| Ok(0), &|| true)
            .unwrap();
        assert!(note.is_none());
        assert_eq!(float, HashSet::from(["b".to_string()]));
        assert!((score - 0.97).abs() < 1e-9);
    }
}
