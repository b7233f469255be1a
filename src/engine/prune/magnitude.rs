//! Unstructured magnitude pruning: the smallest weights by absolute value become zero, either
//! the same share of every layer or the smallest of all selected layers together (global), which
//! prunes over-parameterised layers harder.
use super::{prunable_weights, selected, smallest, values_of, LayerPruning, Masks, Pruned};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::{EngineError, Result};
use std::collections::BTreeMap;

pub use crate::domain::prune::PruneScope as Scope;

#[derive(Debug, Clone)]
pub struct MagnitudeOptions {
    /// Share of the selected weights to zero (0..1).
    pub sparsity: f64,
    pub scope: Scope,
    pub exclude: Vec<String>,
    pub skip_first: bool,
    pub skip_last: bool,
}

/// The masks magnitude pruning would apply to `model` (weights already zero count as pruned).
pub fn masks(model: &ModelProto, opts: &MagnitudeOptions) -> Result<(Masks, Vec<String>)> {
    let (weights, notes) = selected(
        prunable_weights(model),
        &opts.exclude,
        opts.skip_first,
        opts.skip_last,
    );
    if weights.is_empty() {
        return Err(EngineError::InvalidOption {
            option: "exclude".into(),
            problem: "no Conv, Gemm or MatMul weight is left to prune".into(),
        });
    }
    let mut out = BTreeMap::new();
    match opts.scope {
        Scope::PerLayer => {
            for w in &weights {
                let values = values_of(model, &w.weight);
                let k = (values.len() as f64 * opts.sparsity).round() as usize;
                let mut keep = vec![true; values.len()];
                for i in smallest(&values, k) {
                    keep[i] = false;
                }
                out.insert(w.weight.clone(), keep);
            }
        }
        Scope::Global => {
            let per: Vec<Vec<f32>> = weights
                .iter()
                .map(|w| values_of(model, &w.weight))
                .collect();
            let all: Vec<f32> = per.iter().flatten().copied().collect();
            let k = (all.len() as f64 * opts.sparsity).round() as usize;
            let mut keep_all = vec![true; all.len()];
            for i in smallest(&all, k) {
                keep_all[i] = false;
            }
            let mut at = 0;
            for (w, v) in weights.iter().zip(&per) {
                out.insert(w.weight.clone(), keep_all[at..at + v.len()].to_vec());
                at += v.len();
            }
        }
    }
    Ok((Masks(out), notes))
}

/// Prunes `model` by magnitude.
pub fn prune(model: &ModelProto, opts: &MagnitudeOptions) -> Result<Pruned> {
    let (masks, mut notes) = masks(model, opts)?;
    let mut pruned = model.clone();
    masks.apply(&mut pruned);
    let layers = report(model, &pruned, &masks, "unstructured");
    notes.push(format!(
        "magnitude pruning ({}) to {:.0}% zeros in {} layers",
        match opts.scope {
            Scope::PerLayer => "per layer",
            Scope::Global => "one global threshold",
        },
        opts.sparsity * 100.0,
        layers.len()
    ));
    Ok(Pruned {
        model: pruned,
        layers,
        masks,
        notes,
    })
}

/// One row per masked weight: its zeros on `pruned` checked against the mask (every masked-out
/// weight is zero).
pub fn report(
    original: &ModelProto,
    pruned: &ModelProto,
    masks: &Masks,
    pattern: &str,
) -> Vec<LayerPruning> {
    let by_weight: BTreeMap<String, super::PrunableWeight> = prunable_weights(original)
        .into_iter()
        .map(|w| (w.weight.clone(), w))
        .collect();
    masks
        .0
        .iter()
        .filter_map(|(name, keep)| {
            let w = by_weight.get(name)?;
            let values = values_of(pruned, name);
            let nonzero = values.iter().filter(|v| **v != 0.0).count() as u64;
            let verified =
                values.len() == keep.len() && values.iter().zip(keep).all(|(v, k)| *k || *v == 0.0);
            Some(LayerPruning {
                node: w.node.clone(),
                op: w.op.clone(),
                weight: name.clone(),
                parameters_before: w.count() as u64,
                parameters_after: values.len() as u64,
                nonzero_after: nonzero,
                pattern: pattern.to_string(),
                verified,
            })
        })
        .collect()
}

/// The sparsity of step `step` (1-based) of `steps` in a gradual schedule towards `target`:
/// the cubic schedule of Zhu & Gupta (2017), pruning fast while many weights are redundant and
/// slowly near the end.
pub fn gradual_sparsity(target: f64, step: usize, steps: usize) -> f64 {
    let t = (step as f64 / steps.max(1) as f64).clamp(0.0, 1.0);
    target * (1.0 - (1.0 - t).powi(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradual_schedule_is_cubic_and_ends_at_the_target() {
        assert_eq!(gradual_sparsity(0.5, 4, 4), 0.5);
        let s: Vec<f64> = (1..=4).map(|k| gradual_sparsity(0.5, k, 4)).collect();
        assert!(s.windows(2).all(|w| w[1] > w[0]));
        assert!((s[0] - 0.5 * (1.0 - 0.75f64.powi(3))).abs() < 1e-12);
        assert_eq!(gradual_sparsity(0.8, 1, 1), 0.8);
    }
}
