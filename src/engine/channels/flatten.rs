//! What the walk needs to know of shapes without shape inference: whether a tensor is flat
//! (every axis after the channels has length 1, after a global pool), whether a Reshape flattens
//! it, and the constants that say so.
use super::{Walk, ACTIVATIONS};
use crate::engine::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::engine::onnx::tensor::{dims, int_values};
use std::collections::HashMap;

/// Whether a Conv maps each position to itself: 1x1 kernels, no padding.
pub(super) fn pointwise(graph: &GraphProto, n: &NodeProto) -> bool {
    let attr = |name: &str| n.attribute.iter().find(|a| a.name.as_deref() == Some(name));
    let kernel_1x1 = graph
        .initializer
        .iter()
        .find(|t| Some(t.name.as_deref().unwrap_or_default()) == n.input.get(1).map(String::as_str))
        .is_some_and(|w| dims(w).iter().skip(2).all(|&x| x == 1));
    kernel_1x1
        && attr("pads").is_none_or(|a| a.ints.iter().all(|&x| x == 0))
        && attr("auto_pad")
            .and_then(|a| a.s.as_deref())
            .is_none_or(|s| s == b"NOTSET" || s == b"VALID")
}

/// Whether every axis of `tensor` after the channels has length 1: it comes from a global pool
/// through per-position ops (activations, BatchNormalization, elementwise ops with constants or
/// other such tensors, 1x1 convolutions).
pub(super) fn flat(graph: &GraphProto, tensor: &str, depth: usize) -> bool {
    if depth > 64 {
        return false;
    }
    if graph
        .initializer
        .iter()
        .any(|t| t.name.as_deref() == Some(tensor))
    {
        return true;
    }
    let Some(n) = graph
        .node
        .iter()
        .find(|n| n.output.iter().any(|o| o == tensor))
    else {
        return false;
    };
    let op = n.op_type.as_deref().unwrap_or_default();
    match op {
        "GlobalAveragePool" | "GlobalMaxPool" => true,
        "Conv" => pointwise(graph, n) && flat(graph, &n.input[0], depth + 1),
        "BatchNormalization" => flat(graph, &n.input[0], depth + 1),
        "Add" | "Sub" | "Mul" | "Div" => n.input.iter().all(|i| flat(graph, i, depth + 1)),
        _ if ACTIVATIONS.contains(&op) => flat(graph, &n.input[0], depth + 1),
        _ => false,
    }
}

/// How many values the constant `name` holds (an initializer or a Constant node's output).
pub(super) fn constant_len(
    graph: &GraphProto,
    inits: &HashMap<&str, &TensorProto>,
    name: &str,
) -> Option<usize> {
    constant(graph, inits, name).map(|t| dims(t).iter().product())
}

/// The constant tensor `name`: an initializer or a Constant node's `value`.
pub(super) fn constant<'g>(
    graph: &'g GraphProto,
    inits: &HashMap<&str, &'g TensorProto>,
    name: &str,
) -> Option<&'g TensorProto> {
    if let Some(t) = inits.get(name) {
        return Some(t);
    }
    let n = graph.node.iter().find(|n| {
        n.op_type.as_deref() == Some("Constant")
            && n.output.first().map(String::as_str) == Some(name)
    })?;
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some("value"))
        .and_then(|a| a.t.as_ref())
}

impl<'g> Walk<'g, '_> {
    /// Whether the shape `shape` (a Reshape's second input) flattens `[N, C, 1, ...]` to
    /// `[N, C]`: a constant `[0 or N, -1]`, or `[-1]` joined after the data's batch size.
    pub(super) fn flattens(&self, shape: &str) -> bool {
        let ints = |name: &str| constant(self.graph, self.inits, name).and_then(int_values);
        if let Some(v) = ints(shape) {
            return v.len() == 2 && v[0] >= 0 && v[1] == -1;
        }
        let Some(concat) = self.producer(shape) else {
            return false;
        };
        concat.op_type.as_deref() == Some("Concat")
            && concat.input.len() == 2
            && ints(&concat.input[1]).as_deref() == Some(&[-1][..])
            && self.producer(&concat.input[0]).is_some_and(|s| {
                s.op_type.as_deref() == Some("Slice")
                    && self
                        .producer(&s.input[0])
                        .is_some_and(|p| p.op_type.as_deref() == Some("Shape"))
                    && self.batch_slice(s)
            })
    }

    /// Whether a Shape's output `shape` is read only by Slices taking its first value (the
    /// batch size).
    pub(super) fn reads_batch_only(&self, shape: &str) -> bool {
        !self.outputs.contains(&shape)
            && self.uses.get(shape).is_some_and(|uses| {
                uses.iter().all(|&(i, k)| {
                    let n = &self.graph.node[i];
                    k == 0 && n.op_type.as_deref() == Some("Slice") && self.batch_slice(n)
                })
            })
    }

    /// Whether a Slice (opset 10 and later: starts, ends and axes as inputs) takes `[0:1]` of
    /// axis 0.
    fn batch_slice(&self, n: &NodeProto) -> bool {
        let ints = |k: usize| {
            n.input
                .get(k)
                .filter(|x| !x.is_empty())
                .and_then(|x| constant(self.graph, self.inits, x))
                .and_then(int_values)
        };
        ints(1).as_deref() == Some(&[0][..])
            && ints(2).as_deref() == Some(&[1][..])
            && ints(3).is_none_or(|a| a == [0])
            && ints(4).is_none_or(|s| s == [1])
    }

    fn producer(&self, tensor: &str) -> Option<&'g NodeProto> {
        self.graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == tensor))
    }
}
