//! Empirical bias correction of static int8 models. Rounding weights and activations to int8 does
//! not only add noise to a layer's output, it shifts its mean per output channel (a depthwise
//! Conv's nine weights round the same way at every pixel, an input clipped to its calibrated
//! range loses its tail), and each shift travels on through the layers after it. For each int8
//! Conv and Gemm in graph order, the model (earlier layers already corrected) and the float model
//! run on a few calibration rows, and the layer's bias moves by the difference of its output's
//! per-channel means. One layer after another: correcting every layer from one pass over the
//! uncorrected model counts earlier layers' shifts twice, and correcting each by the shift it
//! adds itself (beside a float twin on the same input) misses what the QDQ of Add, Mul and Clip
//! between layers adds — both scored below no correction on PP-OCRv4's detector (foreground IoU
//! 0.74 against 0.81; one after another: 0.96).
//!
//! A correction measured with every layer int8 over-corrects a layer whose inputs stay float, so
//! the accuracy budget searches without it ([`refine`] corrects the model it chose, then returns
//! float layers to int8 while the budget holds). Weights and activation scales are untouched;
//! only int32 biases change.
use super::budget::{BudgetChoice, Scorer, SCORE_TIE};
use super::calibrate::Calibrator;
use super::gptq;
use super::qdq::{self, BiasCorrections};
use super::{Prepared, Scheme};
use crate::engine::dataset::Dataset;
use crate::engine::onnx::LoadedModel;
use crate::engine::runtime::Runtime;
use crate::engine::{Progress, Result, SubProgress};
use prost::Message;
use std::collections::HashSet;

/// Calibration rows the means are taken over: the difference of two models on the same rows, so
/// a few rows measure it well, and a pass runs the model once per layer.
pub const ROWS: usize = 8;

/// What a correction pass did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Layers whose bias moved.
    pub layers: usize,
    /// Calibration rows the means were taken over.
    pub rows: usize,
    /// The layer with the largest channel shift, and that shift (in the layer's output units).
    pub largest: Option<(String, f64)>,
}

/// Measures the bias corrections of the quantized Conv and Gemm layers of a static `prepared`
/// model built with the layers in `float` kept float, one after another in graph order, over the
/// first rows of `data`, and stores them in it: its models are built corrected from then on.
/// With `only`, just those layers are measured (in place, the others' corrections kept); else
/// every layer, replacing what was held. Returns None for other schemes and graphs without such
/// layers.
pub fn correct(
    prepared: &mut Prepared,
    rt: &Runtime,
    data: &Dataset,
    samples: usize,
    float: &HashSet<String>,
    only: Option<&[String]>,
    progress: &dyn Progress,
) -> Result<Option<Summary>> {
    let Scheme::Static(o) = &prepared.scheme else {
        return Ok(None);
    };
    let (targets, _) = qdq::plan(&prepared.model, o);
    // A MatMul has no bias input, and its output channels are its last axis.
    let targets: Vec<_> = targets
        .into_iter()
        .filter(|t| t.op != "MatMul" && !float.contains(&t.name))
        .filter(|t| only.is_none_or(|names| names.contains(&t.name)))
        .collect();
    if targets.is_empty() {
        return Ok(None);
    }
    let rows = samples.clamp(1, ROWS);
    let outputs: Vec<String> = targets.iter().map(|t| t.output.clone()).collect();
    let reference_model = LoadedModel {
        bytes: prepared.model.encode_to_vec().into(),
        proto: prepared.model.clone(),
    };
    let step = 1.0 / (targets.len() + 1) as f64;
    let reference = Calibrator::new(rt, &reference_model, data, &outputs, rows)?.channel_means(
        &SubProgress {
            parent: progress,
            start: 0.0,
            span: step,
        },
    )?;
    if only.is_none() {
        prepared.corrections = BiasCorrections::new();
    }
    let mut largest: Option<(String, f64)> = None;
    for (k, t) in targets.iter().enumerate() {
        let Some(want) = reference.get(&t.output) else {
            continue;
        };
        prepared.corrections.remove(&t.name);
        let (proto, _) = prepared.build(float)?;
        let model = LoadedModel {
            bytes: proto.encode_to_vec().into(),
            proto,
        };
        let name = [t.output.clone()];
        let got = Calibrator::new(rt, &model, data, &name, rows)?.channel_means(&SubProgress {
            parent: progress,
            start: step * (k + 1) as f64,
            span: step,
        })?;
        let Some(got) = got.get(&t.output).filter(|g| g.len() == want.len()) else {
            continue;
        };
        let shift: Vec<f64> = got.iter().zip(want).map(|(g, w)| g - w).collect();
        let most = shift.iter().fold(0.0f64, |m, s| m.max(s.abs()));
        if largest.as_ref().is_none_or(|(_, m)| most > *m) {
            largest = Some((t.name.clone(), most));
        }
        prepared
            .corrections
            .insert(t.name.clone(), shift.iter().map(|s| *s as f32).collect());
    }
    progress.update(1.0)?;
    Ok(Some(Summary {
        layers: targets.len(),
        rows,
        largest,
    }))
}

impl Summary {
    /// The start of the report's note on a correction pass.
    pub fn describe(&self) -> String {
        let mut note = format!(
            "bias correction: moved the biases of {} int8 layer(s) by the mean shift of their outputs over {} calibration row(s), one layer after another in graph order",
            self.layers, self.rows
        );
        if let Some((layer, shift)) = &self.largest {
            note.push_str(&format!(" (largest channel shift {shift:.3e}, {layer})"));
        }
        note
    }
}

/// Forgets the bias corrections: models are built from the calibrated ranges alone again.
pub fn clear(prepared: &mut Prepared) {
    prepared.corrections.clear();
}

/// The post-training corrections [`refine`] measures anew for each model it scores: GPTQ weight
/// rounding ([`gptq`]), then bias correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Post {
    pub gptq: bool,
    pub bias: bool,
}

/// What the corrections of a preparation hold, to put back after a probe.
type Held = (BiasCorrections, gptq::RoundedWeights);

fn held(prepared: &Prepared) -> Held {
    (prepared.corrections.clone(), prepared.rounded.clone())
}

fn restore(prepared: &mut Prepared, (corrections, rounded): Held) {
    prepared.corrections = corrections;
    prepared.rounded = rounded;
}

/// Measures `post`'s corrections for the model with the layers in `float` kept float (with
/// `only`, for those layers alone); the description of what was done, None when nothing was.
#[allow(clippy::too_many_arguments)]
fn apply(
    prepared: &mut Prepared,
    rt: &Runtime,
    data: &Dataset,
    samples: usize,
    float: &HashSet<String>,
    only: Option<&[String]>,
    post: Post,
) -> Result<Option<String>> {
    let none = crate::engine::NoProgress;
    let mut parts = Vec::new();
    if post.gptq {
        // Biases measured for other weights would mislead the fit of the layers after them.
        match only {
            None => prepared.corrections.clear(),
            Some(names) => names.iter().for_each(|n| {
                prepared.corrections.remove(n);
            }),
        }
        if let Some(s) = gptq::run(prepared, rt, data, samples, float, only, &none)? {
            parts.push(s.describe());
        }
    }
    if post.bias {
        if let Some(s) = correct(prepared, rt, data, samples, float, only, &none)? {
            parts.push(s.describe());
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("; ")))
}

/// The corrections held, by layer name.
pub fn corrections(prepared: &Prepared) -> &BiasCorrections {
    &prepared.corrections
}

impl Post {
    /// "GPTQ rounding and bias correction", "bias correction", "GPTQ rounding".
    pub fn describe(&self) -> &'static str {
        match (self.gptq, self.bias) {
            (true, true) => "GPTQ rounding and bias correction",
            (true, false) => "GPTQ rounding",
            _ => "bias correction",
        }
    }
}

/// Whether the corrected model's (score, output error) is no worse than the uncorrected one's:
/// a higher score, or the same score and no more error.
fn no_worse(with: (f64, f64), without: (f64, f64)) -> bool {
    with.0 > without.0 + SCORE_TIE || (with.0 >= without.0 - SCORE_TIE && with.1 <= without.1)
}

/// Corrects every int8 layer of `prepared` when nothing scores the result (no accuracy budget).
/// Returns the note for the report.
pub fn run(
    prepared: &mut Prepared,
    rt: &Runtime,
    data: &Dataset,
    samples: usize,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let Some(summary) = correct(prepared, rt, data, samples, &HashSet::new(), None, progress)?
    else {
        return Ok(Vec::new());
    };
    let mut note = summary.describe();
    note.push_str("; not scored (no accuracy budget)");
    Ok(vec![note])
}

/// After the accuracy budget's search: corrects the chosen model's int8 layers (`post`: GPTQ
/// rounding for its float layers, then bias correction) and keeps that when it scores no worse
/// (when both together do not, each alone is measured and the better kept on the same terms);
/// then (either way), while the budget holds, returns float layers to int8 in order of least
/// harm per weight — a bisection for the longest prefix of that order (each probe corrected
/// anew), then the rest one at a time (each with its own correction measured in place), at most
/// `trials` trial models — and corrects the whole result again when that scores no worse.
/// `choice` is updated; returns the notes.
#[allow(clippy::too_many_arguments)]
pub fn refine(
    prepared: &mut Prepared,
    rt: &Runtime,
    data: &Dataset,
    samples: usize,
    scorer: &Scorer<'_>,
    choice: &mut BudgetChoice,
    max_drop: f64,
    trials: usize,
    post: Post,
) -> Result<Vec<String>> {
    let within = |s: f64| scorer.float_score - s <= max_drop + 1e-9;
    let before = scorer.score_and_error(&choice.model)?;
    let Some(mut note) = apply(prepared, rt, data, samples, &choice.float, None, post)? else {
        return Ok(Vec::new());
    };
    let mut after = scorer.score_and_error(&prepared.build(&choice.float)?.0)?;
    let mut kept = no_worse(after, before);
    note.push_str(&format!(
        "; the budget's model scores {} {:.4} with it, {:.4} without: {}",
        scorer.metric,
        after.0,
        before.0,
        if kept { "kept" } else { "not kept" }
    ));
    let mut notes = vec![note];
    let mut post = post;
    if !kept && post.gptq && post.bias {
        // Together they may score worse than either alone: GPTQ that does not pay on this model
        // (its int8 layers read float inputs, where the fit has little to make up for) may hide
        // what bias correction gives, and biases measured on a few rows may undo what GPTQ gives.
        // Each alone is measured; the better is kept when it scores no worse than the model
        // without corrections.
        let mut best: Option<(Post, (f64, f64), Held)> = None;
        for alone in [
            Post {
                gptq: true,
                bias: false,
            },
            Post {
                gptq: false,
                bias: true,
            },
        ] {
            prepared.corrections.clear();
            prepared.rounded.clear();
            let Some(mut note) = apply(prepared, rt, data, samples, &choice.float, None, alone)?
            else {
                continue;
            };
            let scored = scorer.score_and_error(&prepared.build(&choice.float)?.0)?;
            note.push_str(&format!(
                "; {} alone: the budget's model scores {:.4}",
                alone.describe(),
                scored.0
            ));
            notes.push(note);
            if best.as_ref().is_none_or(|(_, b, _)| !no_worse(*b, scored)) {
                best = Some((alone, scored, held(prepared)));
            }
        }
        if let Some((alone, scored, corrections)) = best {
            kept = no_worse(scored, before);
            if kept {
                (post, after) = (alone, scored);
                restore(prepared, corrections);
            }
            notes.push(format!(
                "{} alone {}",
                alone.describe(),
                if kept { "kept" } else { "not kept either" }
            ));
        }
        if !kept {
            post.gptq = false;
        }
    }
    // Not kept on the budget's model (whose shifts its float layers already avoid), bias
    // corrections may still let more layers go int8: every probe below is corrected and scored
    // anew (with bias correction on, GPTQ only when it paid on the budget's model: each probe
    // rounds every int8 layer).
    let mut score = if kept {
        after.0
    } else {
        prepared.corrections.clear();
        prepared.rounded.clear();
        before.0
    };
    let mut float = choice.float.clone();
    let mut returned = Vec::new();
    if within(score) && !float.is_empty() {
        // Least harm (measured alone, uncorrected) per weight first: the big layers the budget
        // kept float for a small loss before the small early ones that lose most.
        let mut names: Vec<String> = float.iter().cloned().collect();
        names.sort();
        let weights = prepared.weight_elements(&names);
        let harm = |n: &str| {
            choice
                .layers
                .iter()
                .find(|l| l.node == n)
                .and_then(|l| l.sensitivity)
                .unwrap_or(f64::INFINITY)
        };
        let key: Vec<f64> = names
            .iter()
            .zip(&weights)
            .map(|(n, w)| harm(n).max(0.0) / *w as f64)
            .collect();
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| key[a].total_cmp(&key[b]).then(weights[b].cmp(&weights[a])));
        let order: Vec<String> = order.into_iter().map(|i| names[i].clone()).collect();
        let mut left = trials;
        // Bisection for the longest prefix of that order that can go back to int8, every probe
        // corrected anew (a returned layer changes the shifts of every layer after it).
        let (mut lo, mut hi) = (0usize, order.len());
        let mut best = None;
        while lo < hi && left > 0 {
            left -= 1;
            let mid = (lo + hi).div_ceil(2);
            let probe: HashSet<String> = float
                .iter()
                .filter(|n| !order[..mid].contains(n))
                .cloned()
                .collect();
            let saved = held(prepared);
            apply(prepared, rt, data, samples, &probe, None, post)?;
            let s = scorer.score(&prepared.build(&probe)?.0)?;
            if within(s) {
                lo = mid;
                best = Some((probe, held(prepared), s));
            } else {
                hi = mid - 1;
            }
            restore(prepared, saved);
        }
        if let Some((probe, corrections, s)) = best {
            (float, score) = (probe, s);
            restore(prepared, corrections);
            returned.extend(order[..lo].iter().cloned());
        }
        // Then one at a time, each with its own correction measured in place.
        for name in order[lo..].iter() {
            if left == 0 {
                break;
            }
            left -= 1;
            let mut fewer = float.clone();
            fewer.remove(name);
            let saved = held(prepared);
            let only = Some(std::slice::from_ref(name));
            apply(prepared, rt, data, samples, &fewer, only, post)?;
            let s = scorer.score(&prepared.build(&fewer)?.0)?;
            if within(s) {
                (float, score) = (fewer, s);
                returned.push(name.clone());
            } else {
                restore(prepared, saved);
            }
        }
    }
    if !returned.is_empty() {
        let saved = held(prepared);
        apply(prepared, rt, data, samples, &float, None, post)?;
        let s = scorer.score(&prepared.build(&float)?.0)?;
        if within(s) && s >= score - SCORE_TIE {
            score = s;
        } else {
            restore(prepared, saved);
        }
        notes.push(format!(
            "after {} {} float layer(s) went back to int8 within the budget (least harm per weight first: a bisection, every probe corrected anew, then one at a time): {}; {} {score:.4}, {} layer(s) float",
            post.describe(),
            returned.len(),
            returned.join(", "),
            scorer.metric,
            float.len()
        ));
    }
    let (model, layers) = prepared.build(&float)?;
    for l in choice.layers.iter_mut() {
        if returned.contains(&l.node) {
            l.precision = layers
                .iter()
                .find(|n| n.node == l.node)
                .map_or_else(|| "int8".into(), |n| n.precision.clone());
            l.reason = format!(
                "int8 within the budget once corrected: {} ({})",
                post.describe(),
                l.reason
                    .strip_prefix("kept float for the accuracy budget: ")
                    .unwrap_or(&l.reason)
            );
        }
    }
    choice.model = model;
    choice.float = float;
    choice.holds = within(score);
    choice.drop = scorer.float_score - score;
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::no_worse;

    #[test]
    fn the_correction_is_kept_only_when_it_scores_no_worse() {
        assert!(no_worse((0.95, 0.2), (0.90, 0.1)), "a higher score wins");
        assert!(
            no_worse((0.90, 0.1), (0.90, 0.2)),
            "a tie goes to less error"
        );
        assert!(no_worse((0.90, 0.1), (0.90, 0.1)));
        assert!(!no_worse((0.90, 0.3), (0.90, 0.2)), "a tie with more error");
        assert!(!no_worse((0.89, 0.01), (0.90, 0.2)), "a lower score loses");
    }
}
