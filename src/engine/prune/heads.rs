//! Attention heads: finds multi-head attention blocks in the form transformer exports write
//! them (query, key and value projections `MatMul (+ Add bias) -> Reshape [.., .., H, D] ->
//! Transpose`, scores `MatMul(q, k)`, context `MatMul(probs, v) -> Transpose -> Reshape
//! [.., .., H·D] -> MatMul` output projection) and removes whole heads: the heads' columns of
//! the three projections and biases, their rows of the output projection, and the head count
//! in both Reshape shapes.
use super::LayerPruning;
use crate::engine::channels::{kept_count, norms_along, select_along, top, Importance};
use crate::engine::onnx::proto::{GraphProto, ModelProto, TensorProto};
use crate::engine::onnx::tensor::{dims, f32_tensor, f32_values, i64_tensor, i64_values};
use crate::engine::Result;
use std::collections::HashMap;

/// One projection into heads.
#[derive(Debug, Clone)]
struct Projection {
    weight: String,
    bias: Option<String>,
    reshape: usize,
    /// The Transpose after the Reshape.
    transpose: usize,
}

/// One attention block.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    /// The output projection's node name (the block's name in the report).
    pub name: String,
    pub heads: usize,
    pub head_dim: usize,
    q: Projection,
    k: Projection,
    v: Projection,
    /// The Reshape merging heads back, and the output projection's weight.
    merge: usize,
    out_weight: String,
}

struct Index<'g> {
    graph: &'g GraphProto,
    inits: HashMap<&'g str, &'g TensorProto>,
    producer: HashMap<&'g str, usize>,
    uses: HashMap<&'g str, Vec<(usize, usize)>>,
}

impl<'g> Index<'g> {
    fn new(graph: &'g GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut uses: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for (k, input) in n.input.iter().enumerate() {
                uses.entry(input.as_str()).or_default().push((i, k));
            }
        }
        Self {
            graph,
            inits: graph
                .initializer
                .iter()
                .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
                .collect(),
            producer,
            uses,
        }
    }

    fn op(&self, i: usize) -> &str {
        self.graph.node[i].op_type.as_deref().unwrap_or_default()
    }

    /// The one node reading `tensor`, with the input slot.
    fn only_reader(&self, tensor: &str) -> Option<(usize, usize)> {
        match self.uses.get(tensor).map(Vec::as_slice) {
            Some([one]) => Some(*one),
            _ => None,
        }
    }

    /// A float initializer read by exactly one node.
    fn own_weight(&self, name: &str) -> Option<&'g TensorProto> {
        let t = self.inits.get(name)?;
        (self.uses.get(name).map_or(0, Vec::len) == 1 && f32_values(t).is_some()).then_some(*t)
    }

    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        i64_values(self.inits.get(name)?)
    }

    /// `Reshape` node `r` splitting heads: its input is `MatMul(x, W) (+ bias)` with W
    /// `[in, H·D]`; returns the projection and (H, D).
    fn projection(&self, r: usize) -> Option<(Projection, usize, usize)> {
        let node = &self.graph.node[r];
        let shape = self.shape(node.input.get(1)?)?;
        let [_, _, h, d] = shape.as_slice() else {
            return None;
        };
        let (h, d) = (usize::try_from(*h).ok()?, usize::try_from(*d).ok()?);
        if h < 2 || d < 1 {
            return None;
        }
        let mut src = self.producer.get(node.input[0].as_str()).copied()?;
        self.only_reader(&node.input[0])?;
        let mut bias = None;
        if self.op(src) == "Add" {
            let add = &self.graph.node[src];
            let (b, other) = if self.own_weight(&add.input[1]).is_some() {
                (&add.input[1], &add.input[0])
            } else {
                (&add.input[0], &add.input[1])
            };
            let bt = self.own_weight(b)?;
            if dims(bt).iter().product::<usize>() != h * d {
                return None;
            }
            bias = Some(b.clone());
            self.only_reader(other)?;
            src = self.producer.get(other.as_str()).copied()?;
        }
        let mm = &self.graph.node[src];
        if self.op(src) != "MatMul" {
            return None;
        }
        let w = self.own_weight(mm.input.get(1)?)?;
        if dims(w).len() != 2 || dims(w)[1] != h * d {
            return None;
        }
        let (transpose, _) = self.only_reader(&node.output[0])?;
        if self.op(transpose) != "Transpose" {
            return None;
        }
        Some((
            Projection {
                weight: mm.input[1].clone(),
                bias,
                reshape: r,
                transpose,
            },
            h,
            d,
        ))
    }
}

/// Every attention block of the model that can lose heads.
pub fn blocks(model: &ModelProto) -> Vec<AttentionBlock> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let ix = Index::new(graph);
    // Projections by the tensor their Transpose writes.
    let mut projections: HashMap<&str, (Projection, usize, usize)> = HashMap::new();
    for (r, n) in graph.node.iter().enumerate() {
        if n.op_type.as_deref() == Some("Reshape") {
            if let Some(p) = ix.projection(r) {
                projections.insert(graph.node[p.0.transpose].output[0].as_str(), p);
            }
        }
    }
    let mut out = Vec::new();
    for ctx in &graph.node {
        // The context MatMul(probs, v).
        if ctx.op_type.as_deref() != Some("MatMul") || ctx.input.len() != 2 {
            continue;
        }
        let Some((v, h, d)) = projections.get(ctx.input[1].as_str()).cloned() else {
            continue;
        };
        // probs come from a chain that starts at the scores MatMul(q, k).
        let Some(scores) = scores_of(&ix, &ctx.input[0]) else {
            continue;
        };
        let sn = &graph.node[scores];
        let (Some(q), Some(k)) = (
            projections.get(sn.input[0].as_str()).cloned(),
            projections.get(sn.input[1].as_str()).cloned(),
        ) else {
            continue;
        };
        if (q.1, q.2, k.1, k.2) != (h, d, h, d) {
            continue;
        }
        // Context -> Transpose -> Reshape [.., .., H·D] -> MatMul(·, W_o).
        let merged = ix
            .only_reader(&ctx.output[0])
            .filter(|(t, _)| ix.op(*t) == "Transpose")
            .and_then(|(t, _)| ix.only_reader(&graph.node[t].output[0]))
            .filter(|(m, k)| ix.op(*m) == "Reshape" && *k == 0);
        let Some((merge, _)) = merged else {
            continue;
        };
        if ix
            .shape(&graph.node[merge].input[1])
            .is_none_or(|s| s.last() != Some(&((h * d) as i64)))
        {
            continue;
        }
        let Some((o, 0)) = ix.only_reader(&graph.node[merge].output[0]) else {
            continue;
        };
        let on = &graph.node[o];
        let w_o = on.input.get(1).and_then(|w| ix.own_weight(w));
        if ix.op(o) != "MatMul" || w_o.is_none_or(|w| dims(w).first() != Some(&(h * d))) {
            continue;
        }
        out.push(AttentionBlock {
            name: super::node_name(on, o),
            heads: h,
            head_dim: d,
            q: q.0,
            k: k.0,
            v,
            merge,
            out_weight: on.input[1].clone(),
        });
    }
    out
}

/// Follows the probabilities tensor back (Softmax, scale, mask Add: one data input each) to the
/// scores MatMul.
fn scores_of(ix: &Index<'_>, probs: &str) -> Option<usize> {
    let mut at = *ix.producer.get(probs)?;
    for _ in 0..8 {
        let n = &ix.graph.node[at];
        match ix.op(at) {
            "MatMul" => return Some(at),
            "Softmax" | "Div" | "Mul" | "Add" | "Sub" | "Where" | "Cast" => {
                // The data input is the one produced by the chain (not an initializer or mask).
                let data = n
                    .input
                    .iter()
                    .filter_map(|i| ix.producer.get(i.as_str()).copied())
                    .find(|&p| {
                        matches!(
                            ix.op(p),
                            "MatMul" | "Softmax" | "Div" | "Mul" | "Add" | "Sub" | "Where"
                        ) && ix.only_reader(&ix.graph.node[p].output[0]).is_some()
                    })?;
                at = data;
            }
            _ => return None,
        }
    }
    None
}

fn tensor_of<'m>(model: &'m mut ModelProto, name: &str) -> Option<&'m mut TensorProto> {
    model
        .graph
        .as_mut()?
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some(name))
}

fn slice(model: &mut ModelProto, name: &str, axis: usize, keep: &[usize]) -> (u64, u64) {
    let Some(t) = tensor_of(model, name) else {
        return (0, 0);
    };
    let mut d = dims(t);
    let before = d.iter().product::<usize>() as u64;
    let values = select_along(&f32_values(t).unwrap_or_default(), &d, axis, keep);
    d[axis] = keep.len();
    *t = f32_tensor(name, &d, &values);
    (before, values.len() as u64)
}

/// Gives Reshape node `r` its own shape initializer with `from` replaced by `to`.
fn reshape_to(model: &mut ModelProto, r: usize, from: i64, to: i64) {
    let graph = model.graph.as_mut().expect("a graph");
    let old = graph.node[r].input[1].clone();
    let Some(values) = graph
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(&old))
        .and_then(i64_values)
    else {
        return;
    };
    let pos = if values.len() == 4 {
        2
    } else {
        values.len() - 1
    };
    let mut values = values;
    if values[pos] == from {
        values[pos] = to;
    }
    let name = format!("{}_pruned_{r}", old);
    graph.initializer.push(i64_tensor(&name, &values));
    graph.node[r].input[1] = name;
    // The old shape may now be unused.
    if !graph.node.iter().any(|n| n.input.contains(&old)) {
        graph
            .initializer
            .retain(|t| t.name.as_deref() != Some(&old));
    }
}

/// Head scores from the weights: a head's value columns times its output rows (what it can add
/// to the residual stream) plus its query columns times its key columns (how sharply it attends).
fn scores(model: &ModelProto, b: &AttentionBlock, importance: Importance) -> Vec<f32> {
    let per_head = |name: &str, axis: usize| -> Vec<f32> {
        let graph = model.graph.as_ref().expect("a graph");
        let Some(t) = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
        else {
            return vec![0.0; b.heads];
        };
        let cols = norms_along(
            &f32_values(t).unwrap_or_default(),
            &dims(t),
            axis,
            importance,
        );
        cols.chunks(b.head_dim).map(|c| c.iter().sum()).collect()
    };
    let (q, k, v) = (
        per_head(&b.q.weight, 1),
        per_head(&b.k.weight, 1),
        per_head(&b.v.weight, 1),
    );
    let o = per_head(&b.out_weight, 0);
    (0..b.heads).map(|h| v[h] * o[h] + q[h] * k[h]).collect()
}

/// Which heads to remove.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    /// Share of every block's heads removed.
    pub sparsity: f64,
    pub importance: Importance,
    /// Attention blocks (by name) left whole.
    pub exclude: Vec<String>,
}

/// Removes `opts.sparsity` of every block's heads.
pub fn prune(
    model: &mut ModelProto,
    opts: &HeadOptions,
) -> Result<(Vec<LayerPruning>, Vec<String>)> {
    let found = blocks(model);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if found.is_empty() {
        notes.push("no attention block in the MatMul -> Reshape [.., .., H, D] -> Transpose form: no head removed".into());
        return Ok((rows, notes));
    }
    for b in &found {
        if opts.exclude.contains(&b.name) {
            notes.push(format!("{}: heads kept (excluded by name)", b.name));
            continue;
        }
        let keep_heads = top(
            &scores(model, b, opts.importance),
            kept_count(b.heads, opts.sparsity, 1),
        );
        if keep_heads.len() == b.heads {
            continue;
        }
        let cols: Vec<usize> = keep_heads
            .iter()
            .flat_map(|h| h * b.head_dim..(h + 1) * b.head_dim)
            .collect();
        let (mut before, mut after) = (0, 0);
        for p in [&b.q, &b.k, &b.v] {
            let (x, y) = slice(model, &p.weight, 1, &cols);
            before += x;
            after += y;
            if let Some(bias) = &p.bias {
                let (x, y) = slice(model, bias, 0, &cols);
                before += x;
                after += y;
            }
            reshape_to(model, p.reshape, b.heads as i64, keep_heads.len() as i64);
        }
        let (x, y) = slice(model, &b.out_weight, 0, &cols);
        before += x;
        after += y;
        reshape_to(
            model,
            b.merge,
            (b.heads * b.head_dim) as i64,
            (keep_heads.len() * b.head_dim) as i64,
        );
        rows.push(LayerPruning {
            node: b.name.clone(),
            op: "attention".into(),
            weight: b.out_weight.clone(),
            parameters_before: before,
            parameters_after: after,
            nonzero_after: after,
            pattern: format!("heads {} -> {}", b.heads, keep_heads.len()),
            verified: tensor_of(model, &b.out_weight)
                .is_some_and(|t| dims(t).first() == Some(&cols.len())),
        });
        notes.push(format!(
            "{}: kept heads {:?} of {}",
            b.name, keep_heads, b.heads
        ));
    }
    if let Some(g) = model.graph.as_mut() {
        g.value_info.clear();
    }
    Ok((rows, notes))
}
