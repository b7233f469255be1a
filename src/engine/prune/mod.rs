//! Pruning: zeroing weights (unstructured magnitude, semi-structured N:M) and removing whole
//! channels, neurons and attention heads (structured), so that the graph itself gets smaller.
//!
//! What each kind buys in ONNX Runtime on CPU differs, and the report says so: zeros in a dense
//! tensor make the file compress better but run no faster (its kernels are dense); only removed
//! structure makes a model faster.
pub mod batch_norm;
pub mod heads;
pub mod magnitude;
pub mod mask;
pub mod n_m;
pub mod structured;
pub mod taylor;

use crate::engine::onnx::proto::{ModelProto, NodeProto};
use crate::engine::onnx::rewrite::{attr_i, initializer};
use crate::engine::onnx::tensor::{dims, f32_tensor, f32_values};
use std::collections::HashSet;

pub use mask::Masks;

/// What one pruned layer looks like afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPruning {
    pub node: String,
    pub op: String,
    /// The weight (initializer) pruned.
    pub weight: String,
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub nonzero_after: u64,
    /// `unstructured`, `2:4`, `channels 32 -> 16`, `heads 12 -> 6`.
    pub pattern: String,
    /// Whether the stated pattern was checked on the written weights and holds.
    pub verified: bool,
}

/// A pruned model and what happened to each layer.
pub struct Pruned {
    pub model: ModelProto,
    pub layers: Vec<LayerPruning>,
    /// Zero masks of unstructured and N:M pruning (weight name -> keep flags), which recovery
    /// training must hold.
    pub masks: Masks,
    pub notes: Vec<String>,
}

/// A weight that unstructured or N:M pruning may zero: the float weight of a Conv, Gemm or
/// MatMul, with the axis along which the layer reads its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunableWeight {
    pub node: String,
    pub op: String,
    pub weight: String,
    pub dims: Vec<usize>,
    /// The input (reduction) axis: rows of a MatMul weight, columns of a transposed Gemm weight,
    /// input channels of a Conv weight.
    pub input_axis: usize,
}

impl PrunableWeight {
    /// The weight's values as lines along the input axis: `(lines, length, index(line, j))`.
    /// N:M groups are consecutive runs of one line.
    pub fn lines(&self) -> (usize, usize, impl Fn(usize, usize) -> usize) {
        let d = &self.dims;
        let a = self.input_axis;
        let inner: usize = d[a + 1..].iter().product();
        let outer: usize = d[..a].iter().product();
        let len = d[a];
        (outer * inner, len, move |line: usize, j: usize| {
            let (o, s) = (line / inner, line % inner);
            (o * len + j) * inner + s
        })
    }

    pub fn count(&self) -> usize {
        self.dims.iter().product()
    }
}

pub(crate) fn node_name(n: &NodeProto, i: usize) -> String {
    n.name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}#{i}", n.op_type.as_deref().unwrap_or_default()))
}

/// Every prunable weight in graph order (a weight shared by several layers appears once, under
/// its first reader).
pub fn prunable_weights(model: &ModelProto) -> Vec<PrunableWeight> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let inits = crate::engine::onnx::rewrite::initializers(graph);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or_default();
        let Some(w) = n.input.get(1).and_then(|w| inits.get(w.as_str())) else {
            continue;
        };
        if !crate::engine::onnx::tensor::is_f32(w) {
            continue;
        }
        let d = dims(w);
        let input_axis = match op {
            "MatMul" if d.len() == 2 => 0,
            "Gemm" if attr_i(n, "transB") == Some(1) => 1,
            "Gemm" => 0,
            "Conv" if d.len() >= 3 => 1,
            _ => continue,
        };
        if d.iter().product::<usize>() < 2 || !seen.insert(n.input[1].clone()) {
            continue;
        }
        out.push(PrunableWeight {
            node: node_name(n, i),
            op: op.to_string(),
            weight: n.input[1].clone(),
            dims: d,
            input_axis,
        });
    }
    out
}

/// Which prunable weights a method touches: none named in `exclude`, and by default neither the
/// first layer (it sees raw inputs, few weights, large effect) nor the last (the classifier).
pub fn selected(
    weights: Vec<PrunableWeight>,
    exclude: &[String],
    skip_first: bool,
    skip_last: bool,
) -> (Vec<PrunableWeight>, Vec<String>) {
    let n = weights.len();
    let mut notes = Vec::new();
    let mut kept = Vec::new();
    for (i, w) in weights.into_iter().enumerate() {
        let why = if exclude.contains(&w.node) || exclude.contains(&w.weight) {
            Some("excluded by name")
        } else if skip_first && i == 0 && n > 1 {
            Some("the first layer (skip_first)")
        } else if skip_last && i + 1 == n && n > 1 {
            Some("the last layer (skip_last)")
        } else {
            None
        };
        match why {
            Some(why) => notes.push(format!("{} ({}) left dense: {why}", w.node, w.op)),
            None => kept.push(w),
        }
    }
    (kept, notes)
}

/// The float values of initializer `name`.
pub fn values_of(model: &ModelProto, name: &str) -> Vec<f32> {
    initializer(model, name)
        .and_then(f32_values)
        .unwrap_or_default()
}

/// Replaces initializer `name`'s values (same dims).
pub(crate) fn set_values(model: &mut ModelProto, name: &str, values: &[f32]) {
    if let Some(t) = model.graph.as_mut().and_then(|g| {
        g.initializer
            .iter_mut()
            .find(|t| t.name.as_deref() == Some(name))
    }) {
        let d = dims(t);
        *t = f32_tensor(name, &d, values);
    }
}

/// Indices of the `k` smallest magnitudes of `values` (ties broken by position, so the choice is
/// deterministic and the count exact).
pub(crate) fn smallest(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let key = |&i: &usize| (values[i].abs(), i);
    order.select_nth_unstable_by(k - 1, |a, b| {
        let (x, i) = key(a);
        let (y, j) = key(b);
        x.total_cmp(&y).then(i.cmp(&j))
    });
    order.truncate(k);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_walk_the_input_axis_of_each_layout() {
        // MatMul [K=3, N=2]: line n reads column n.
        let w = PrunableWeight {
            node: "m".into(),
            op: "MatMul".into(),
            weight: "w".into(),
            dims: vec![3, 2],
            input_axis: 0,
        };
        let (lines, len, at) = w.lines();
        assert_eq!((lines, len), (2, 3));
        assert_eq!((0..3).map(|j| at(1, j)).collect::<Vec<_>>(), vec![1, 3, 5]);
        // Conv [O=2, I=4, 1, 2]: line (o, s) reads input channels at spatial position s.
        let c = PrunableWeight {
            dims: vec![2, 4, 1, 2],
            input_axis: 1,
            ..w
        };
        let (lines, len, at) = c.lines();
        assert_eq!((lines, len), (4, 4));
        assert_eq!(
            (0..4).map(|j| at(3, j)).collect::<Vec<_>>(),
            vec![9, 11, 13, 15]
        );
    }

    #[test]
    fn smallest_is_exact_under_ties() {
        let v = [0.0, 1.0, -1.0, 1.0, 0.5, 2.0];
        let mut got = smallest(&v, 3);
        got.sort_unstable();
        assert_eq!(got, vec![0, 1, 4]);
    }
}
