//! Structured pruning: whole Conv filters, Gemm/MatMul neurons and attention heads are removed,
//! with every tensor that depends on them sliced to match (see [`crate::engine::channels`] and
//! [`super::heads`]), so the written graph is smaller and ONNX Runtime runs fewer operations.
use super::{heads, LayerPruning, Pruned};
use crate::engine::channels::{channel_groups, keep_layer_channels, kept_count, top, ChannelGroup};
pub use crate::engine::channels::{norms_along, Importance};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::tensor::dims;
use crate::engine::{EngineError, Result};

#[derive(Debug, Clone)]
pub struct StructuredOptions {
    /// Share of every group's channels (or heads) to remove.
    pub sparsity: f64,
    pub importance: Importance,
    /// Remove Conv output channels.
    pub channels: bool,
    /// Remove Gemm/MatMul output neurons.
    pub neurons: bool,
    /// Remove attention heads.
    pub heads: bool,
    /// Kept channel counts are rounded up to a multiple of this (SIMD-friendly widths).
    pub multiple_of: usize,
    pub exclude: Vec<String>,
    /// Data-driven channel scores by layer (Taylor importance), instead of weight norms.
    pub scores: Option<std::collections::HashMap<String, Vec<f32>>>,
}

fn group_op(model: &ModelProto, group: &ChannelGroup) -> String {
    let graph = model.graph.as_ref().expect("groups come from a graph");
    graph
        .node
        .iter()
        .enumerate()
        .find(|(i, n)| super::node_name(n, *i) == group.layer)
        .and_then(|(_, n)| n.op_type.clone())
        .unwrap_or_default()
}

fn sizes(model: &ModelProto, names: &[String]) -> u64 {
    let graph = model.graph.as_ref().expect("a graph");
    names
        .iter()
        .filter_map(|n| {
            graph
                .initializer
                .iter()
                .find(|t| t.name.as_deref() == Some(n))
        })
        .map(|t| dims(t).iter().product::<usize>() as u64)
        .sum()
}

/// The layers whose channels go with the group's (residual Adds, squeeze-and-excitation Muls).
fn joined_note(group: &ChannelGroup) -> String {
    if group.joined.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = group.joined.iter().map(|j| j.layer.as_str()).collect();
    format!(", with {} (joined by elementwise ops)", names.join(", "))
}

pub fn prune(model: &ModelProto, opts: &StructuredOptions) -> Result<Pruned> {
    let mut pruned = model.clone();
    let mut layers = Vec::new();
    let mut notes = Vec::new();
    if opts.channels || opts.neurons {
        let groups = channel_groups(model);
        for group in &groups {
            let op = group_op(model, group);
            let wanted = match op.as_str() {
                "Conv" | "ConvTranspose" => opts.channels,
                _ => opts.neurons,
            };
            if !wanted {
                continue;
            }
            if group
                .layers()
                .iter()
                .any(|l| opts.exclude.iter().any(|e| e == l))
            {
                notes.push(format!(
                    "{} ({op}) kept whole: excluded by name",
                    group.layer
                ));
                continue;
            }
            let weight = group.slices[0].0.clone();
            let scores = match opts.scores.as_ref().and_then(|s| s.get(&group.layer)) {
                Some(s) if s.len() == group.channels => s.clone(),
                _ => group.weight_scores(model, opts.importance),
            };
            let keep = top(
                &scores,
                kept_count(group.channels, opts.sparsity, opts.multiple_of),
            );
            if keep.len() == group.channels {
                continue;
            }
            let names: Vec<String> = group.slices.iter().map(|(n, _)| n.clone()).collect();
            let before = sizes(&pruned, &names);
            if keep_layer_channels(&mut pruned, &group.layer, &keep).is_none() {
                notes.push(format!(
                    "{} ({op}) kept whole: its channels no longer form a group",
                    group.layer
                ));
                continue;
            }
            let after = sizes(&pruned, &names);
            let verified = group.slices.iter().all(|(n, a)| {
                pruned
                    .graph
                    .as_ref()
                    .and_then(|g| g.initializer.iter().find(|t| t.name.as_deref() == Some(n)))
                    .is_some_and(|t| dims(t).get(*a) == Some(&keep.len()))
            });
            layers.push(LayerPruning {
                node: group.layer.clone(),
                op: op.clone(),
                weight,
                parameters_before: before,
                parameters_after: after,
                nonzero_after: after,
                pattern: format!(
                    "{} {} -> {}{}",
                    if op.starts_with("Conv") {
                        "channels"
                    } else {
                        "neurons"
                    },
                    group.channels,
                    keep.len(),
                    joined_note(group)
                ),
                verified,
            });
        }
        if groups.is_empty() {
            notes.push(
                "no channel group: every layer's channels reach a Reshape, an output, or an elementwise op with a tensor no layer produces, which keep them whole"
                    .into(),
            );
        }
    }
    if opts.heads {
        let head_opts = heads::HeadOptions {
            sparsity: opts.sparsity,
            importance: opts.importance,
            exclude: opts.exclude.clone(),
        };
        let (rows, head_notes) = heads::prune(&mut pruned, &head_opts)?;
        layers.extend(rows);
        notes.extend(head_notes);
    }
    if layers.is_empty() {
        return Err(EngineError::InvalidOption {
            option: "targets".into(),
            problem: "nothing in this model can be removed with these options (no channel group, neuron group or attention block qualifies)".into(),
        });
    }
    let removed: u64 = layers
        .iter()
        .map(|l| l.parameters_before - l.parameters_after)
        .sum();
    notes.push(format!(
        "structured pruning removed {removed} parameters in {} groups (importance: {}{})",
        layers.len(),
        match (opts.importance, &opts.scores) {
            (Importance::Taylor, Some(_)) =>
                "first-order Taylor, activation × gradient on the training rows".to_string(),
            (i, _) => format!("{i:?} norm of the weights"),
        },
        if opts.multiple_of > 1 {
            format!(", widths rounded up to multiples of {}", opts.multiple_of)
        } else {
            String::new()
        }
    ));
    Ok(Pruned {
        model: pruned,
        layers,
        masks: Default::default(),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_round_and_never_reach_zero() {
        assert_eq!(kept_count(32, 0.5, 1), 16);
        assert_eq!(kept_count(10, 0.5, 8), 8);
        assert_eq!(kept_count(12, 0.5, 8), 8);
        assert_eq!(kept_count(20, 0.5, 8), 16);
        assert_eq!(kept_count(3, 0.99, 1), 1);
        assert_eq!(kept_count(6, 0.5, 8), 6);
    }

    #[test]
    fn norms_score_slices_along_an_axis() {
        // [2, 3]: axis 0 rows, axis 1 columns.
        let v = [3., -4., 0., 1., 1., 1.];
        assert_eq!(norms_along(&v, &[2, 3], 0, Importance::L1), vec![7., 3.]);
        assert_eq!(norms_along(&v, &[2, 3], 1, Importance::L2)[0], 10f32.sqrt());
        assert_eq!(top(&[0.5, 2.0, 1.0, 2.0], 2), vec![1, 3]);
    }
}
