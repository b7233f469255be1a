//! Semi-structured N:M sparsity: in every run of M consecutive weights along a layer's input
//! axis, at most N are non-zero (2:4 is what sparse tensor cores execute). Layers whose input
//! axis is not a multiple of M are left dense and named in the notes.
use super::magnitude::report;
use super::{prunable_weights, selected, values_of, LayerPruning, Masks, PrunableWeight, Pruned};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::{EngineError, Result};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct NmOptions {
    pub n: usize,
    pub m: usize,
    pub exclude: Vec<String>,
    pub skip_first: bool,
    pub skip_last: bool,
}

/// Keep flags for `values` of `w`: the N largest magnitudes of every group of M.
pub fn mask_of(w: &PrunableWeight, values: &[f32], n: usize, m: usize) -> Vec<bool> {
    let (lines, len, at) = w.lines();
    let mut keep = vec![false; values.len()];
    for line in 0..lines {
        for start in (0..len).step_by(m) {
            let mut group: Vec<usize> =
                (start..(start + m).min(len)).map(|j| at(line, j)).collect();
            // Largest first; ties by position so the choice is deterministic.
            group.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
            for &i in group.iter().take(n) {
                keep[i] = true;
            }
        }
    }
    keep
}

/// Whether every group of M along `w`'s input axis holds at most N non-zeros.
pub fn holds(w: &PrunableWeight, values: &[f32], n: usize, m: usize) -> bool {
    let (lines, len, at) = w.lines();
    len % m == 0
        && (0..lines).all(|line| {
            (0..len).step_by(m).all(|start| {
                (start..start + m)
                    .filter(|&j| values[at(line, j)] != 0.0)
                    .count()
                    <= n
            })
        })
}

/// One row per masked weight of `pruned`, verified when its zeros follow the mask and every
/// group of `m` holds at most `n` non-zeros.
pub fn checked(
    original: &ModelProto,
    pruned: &ModelProto,
    masks: &Masks,
    n: usize,
    m: usize,
) -> Vec<LayerPruning> {
    let weights = prunable_weights(pruned);
    let mut rows = report(original, pruned, masks, &format!("{n}:{m}"));
    for row in &mut rows {
        if let Some(w) = weights.iter().find(|w| w.weight == row.weight) {
            row.verified &= holds(w, &values_of(pruned, &w.weight), n, m);
        }
    }
    rows
}

pub fn prune(model: &ModelProto, opts: &NmOptions) -> Result<Pruned> {
    let (weights, mut notes) = selected(
        prunable_weights(model),
        &opts.exclude,
        opts.skip_first,
        opts.skip_last,
    );
    let mut masks = BTreeMap::new();
    for w in weights {
        let len = w.dims[w.input_axis];
        if len % opts.m != 0 {
            notes.push(format!(
                "{} ({}) left dense: its input axis ({len}) is not a multiple of {}",
                w.node, w.op, opts.m
            ));
            continue;
        }
        let values = values_of(model, &w.weight);
        masks.insert(w.weight.clone(), mask_of(&w, &values, opts.n, opts.m));
    }
    if masks.is_empty() {
        return Err(EngineError::InvalidOption {
            option: "m".into(),
            problem: format!(
                "no selected layer has an input axis that is a multiple of {}",
                opts.m
            ),
        });
    }
    let masks = Masks(masks);
    let mut pruned = model.clone();
    masks.apply(&mut pruned);
    let pattern = format!("{}:{}", opts.n, opts.m);
    let layers = checked(model, &pruned, &masks, opts.n, opts.m);
    notes.push(format!(
        "{pattern} sparsity along the input axis of {} layers (every group of {} checked)",
        layers.len(),
        opts.m
    ));
    Ok(Pruned {
        model: pruned,
        layers,
        masks,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_of_four_keeps_the_largest_two_of_every_group() {
        // Gemm transB=1 weight [N=2, K=8]: groups run along each row.
        let w = PrunableWeight {
            node: "g".into(),
            op: "Gemm".into(),
            weight: "w".into(),
            dims: vec![2, 8],
            input_axis: 1,
        };
        let v = [
            1., -4., 2., 3., 0.5, 0.1, -0.2, 0.3, //
            9., 8., 7., 6., 0., 0., 0., 1.,
        ];
        let keep = mask_of(&w, &v, 2, 4);
        let kept: Vec<f32> = v
            .iter()
            .zip(&keep)
            .map(|(x, k)| if *k { *x } else { 0. })
            .collect();
        assert_eq!(
            kept,
            vec![0., -4., 0., 3., 0.5, 0., 0., 0.3, 9., 8., 0., 0., 0., 0., 0., 1.]
        );
        assert!(holds(&w, &kept, 2, 4));
        assert!(!holds(&w, &v, 2, 4));
    }
}
