//! Channel groups: the output channels (neurons) of one layer, followed through the per-channel
//! ops after it (bias Adds, BatchNormalization, activations, depthwise convolutions, global
//! pooling) to the one layer that reads them. Removing a channel means slicing every tensor in
//! its group; this is how width-derived students are made, and what structured pruning removes.
//!
//! A layer whose channels also reach anything else (a residual Add of two activations, a Concat,
//! a Reshape, a graph output, a shared weight) forms no group and is left whole.
use crate::engine::onnx::proto::{ModelProto, NodeProto, TensorProto};
use crate::engine::onnx::tensor::{dims, f32_tensor, f32_values};
use std::collections::{HashMap, HashSet};

/// One prunable set of channels.
#[derive(Debug, Clone)]
pub struct ChannelGroup {
    /// The layer whose output channels these are.
    pub layer: String,
    pub channels: usize,
    /// Initializers to slice, and along which axis.
    pub slices: Vec<(String, usize)>,
    /// Depthwise convolutions inside the group (their `group` attribute follows the count).
    pub depthwise: Vec<usize>,
    /// L1 norm of each channel's weights in the producing layer, times its BatchNormalization
    /// scale when one follows.
    pub importance: Vec<f32>,
    /// |γ| / sqrt(var + ε) of a BatchNormalization in the group: what the channel's output is
    /// multiplied by after the layer, so weight norms alone misjudge its importance.
    pub bn_scale: Option<Vec<f32>>,
}

fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

const ACTIVATIONS: &[&str] = &[
    "Relu",
    "Clip",
    "HardSwish",
    "HardSigmoid",
    "Sigmoid",
    "Tanh",
    "LeakyRelu",
    "Identity",
    "Dropout",
    "Erf",
];

/// Every channel group of the model.
pub fn channel_groups(model: &ModelProto) -> Vec<ChannelGroup> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let inits = crate::engine::onnx::rewrite::initializers(graph);
    let mut uses: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for (k, input) in n.input.iter().enumerate() {
            uses.entry(input.as_str()).or_default().push((i, k));
        }
    }
    let outputs: Vec<&str> = graph
        .output
        .iter()
        .filter_map(|o| o.name.as_deref())
        .collect();
    // An initializer used once (slicing a shared one would change another layer).
    let own = |name: &str| -> Option<&TensorProto> {
        let t = inits.get(name)?;
        (uses.get(name).map_or(0, Vec::len) == 1 && f32_values(t).is_some()).then_some(*t)
    };
    let mut groups = Vec::new();
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or_default();
        let Some(w) = n.input.get(1).and_then(|w| own(w)) else {
            continue;
        };
        let wd = dims(w);
        let (channels, axis) = match op {
            "MatMul" if wd.len() == 2 => (wd[1], 1),
            "Gemm" if attr_i(n, "transB") == Some(1) => (wd[0], 0),
            "Gemm" => (wd[1], 1),
            "Conv" if attr_i(n, "group").unwrap_or(1) == 1 && wd.len() == 4 => (wd[0], 0),
            _ => continue,
        };
        if channels < 2 {
            continue;
        }
        let values = f32_values(w).unwrap_or_default();
        let importance = norms_along(&values, &wd, axis, Importance::L1);
        let mut group = ChannelGroup {
            layer: n.name.clone().unwrap_or_else(|| format!("{op}#{i}")),
            channels,
            slices: vec![(w.name.clone().unwrap_or_default(), axis)],
            depthwise: Vec::new(),
            importance,
            bn_scale: None,
        };
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            match own(b) {
                Some(t) if dims(t).iter().product::<usize>() == channels => {
                    group.slices.push((b.clone(), dims(t).len() - 1))
                }
                _ => continue,
            }
        }
        if follow(
            graph,
            &uses,
            &outputs,
            &own,
            &n.output[0],
            channels,
            &mut group,
        ) {
            if let Some(scale) = &group.bn_scale {
                for (i, s) in group.importance.iter_mut().zip(scale) {
                    *i *= s;
                }
            }
            groups.push(group);
        }
    }
    groups
}

/// Follows `tensor` (whose channels are the group's) to the one layer reading them; false when
/// the channels reach anything the group cannot slice.
fn follow<'g>(
    graph: &'g crate::engine::onnx::proto::GraphProto,
    uses: &HashMap<&str, Vec<(usize, usize)>>,
    outputs: &[&str],
    own: &dyn Fn(&str) -> Option<&'g TensorProto>,
    tensor: &str,
    channels: usize,
    group: &mut ChannelGroup,
) -> bool {
    if outputs.contains(&tensor) {
        return false;
    }
    let Some(consumers) = uses.get(tensor) else {
        return false;
    };
    let [(i, k)] = consumers.as_slice() else {
        // Several readers: an elementwise region that joins again (GELU written out) passes
        // the channels on through the one tensor it ends in.
        return match region_exit(graph, uses, outputs, own, tensor, channels, group) {
            Some(exit) => follow(graph, uses, outputs, own, &exit, channels, group),
            None => false,
        };
    };
    let n = &graph.node[*i];
    let op = n.op_type.as_deref().unwrap_or_default();
    let per_channel = |name: &str| -> Option<(String, usize)> {
        let t = own(name)?;
        let d = dims(t);
        (d.iter().product::<usize>() == channels).then(|| {
            let axis = d.iter().position(|&x| x == channels).unwrap_or(0);
            (name.to_string(), axis)
        })
    };
    let next =
        |group: &mut ChannelGroup| follow(graph, uses, outputs, own, &n.output[0], channels, group);
    match op {
        _ if ACTIVATIONS.contains(&op) && *k == 0 => next(group),
        "GlobalAveragePool" | "GlobalMaxPool" | "MaxPool" | "AveragePool" | "Flatten" => {
            next(group)
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let other = &n.input[1 - k];
            match per_channel(other) {
                Some(s) => {
                    group.slices.push(s);
                    next(group)
                }
                None => false,
            }
        }
        "BatchNormalization" if *k == 0 => {
            for p in &n.input[1..] {
                match per_channel(p) {
                    Some(s) => group.slices.push(s),
                    None => return false,
                }
            }
            if group.bn_scale.is_none() && n.input.len() == 5 {
                let eps = n
                    .attribute
                    .iter()
                    .find(|a| a.name.as_deref() == Some("epsilon"))
                    .and_then(|a| a.f)
                    .unwrap_or(1e-5);
                let gamma = own(&n.input[1]).and_then(f32_values).unwrap_or_default();
                let var = own(&n.input[4]).and_then(f32_values).unwrap_or_default();
                if gamma.len() == channels && var.len() == channels {
                    group.bn_scale = Some(
                        gamma
                            .iter()
                            .zip(&var)
                            .map(|(g, v)| g.abs() / (v + eps).sqrt())
                            .collect(),
                    );
                }
            }
            next(group)
        }
        "Conv" if *k == 0 => {
            let Some(w) = own(&n.input[1]) else {
                return false;
            };
            let wd = dims(w);
            let groups = attr_i(n, "group").unwrap_or(1) as usize;
            if groups == channels && wd.first() == Some(&channels) && wd.get(1) == Some(&1) {
                // Depthwise: its channels are the same ones, on to its reader.
                group.slices.push((n.input[1].clone(), 0));
                if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
                    match per_channel(b) {
                        Some(s) => group.slices.push(s),
                        None => return false,
                    }
                }
                group.depthwise.push(*i);
                return next(group);
            }
            if groups != 1 || wd.get(1) != Some(&channels) {
                return false;
            }
            group.slices.push((n.input[1].clone(), 1));
            true
        }
        "MatMul" if *k == 0 => match own(&n.input[1]) {
            Some(w) if dims(w).first() == Some(&channels) && dims(w).len() == 2 => {
                group.slices.push((n.input[1].clone(), 0));
                true
            }
            _ => false,
        },
        "Gemm" if *k == 0 && attr_i(n, "transA").unwrap_or(0) == 0 => {
            let Some(w) = own(&n.input[1]) else {
                return false;
            };
            let axis = if attr_i(n, "transB") == Some(1) { 1 } else { 0 };
            if dims(w).get(axis) != Some(&channels) {
                return false;
            }
            group.slices.push((n.input[1].clone(), axis));
            true
        }
        _ => false,
    }
}

/// The elementwise nodes reading `tensor` and each other's outputs (unary activations; Add, Sub,
/// Mul, Div whose other operand is inside, a scalar or a per-channel constant, which is sliced
/// with the group): the one tensor through which the channels leave them, or None when they
/// leave through several, reach an output, or mix with anything else.
fn region_exit<'g>(
    graph: &'g crate::engine::onnx::proto::GraphProto,
    uses: &HashMap<&str, Vec<(usize, usize)>>,
    outputs: &[&str],
    own: &dyn Fn(&str) -> Option<&'g TensorProto>,
    tensor: &str,
    channels: usize,
    group: &mut ChannelGroup,
) -> Option<String> {
    let mut inside: HashSet<&str> = HashSet::from([tensor]);
    let mut nodes: HashSet<usize> = HashSet::new();
    let mut frontier = vec![tensor];
    let mut exits: HashSet<&str> = HashSet::new();
    while let Some(t) = frontier.pop() {
        if outputs.contains(&t) {
            return None;
        }
        for &(i, k) in uses.get(t)? {
            let n = &graph.node[i];
            let op = n.op_type.as_deref().unwrap_or_default();
            let elementwise = (ACTIVATIONS.contains(&op) && k == 0)
                || matches!(op, "Add" | "Sub" | "Mul" | "Div");
            if !elementwise {
                exits.insert(t);
                continue;
            }
            if nodes.insert(i) {
                if nodes.len() > 32 {
                    return None;
                }
                inside.insert(n.output[0].as_str());
                frontier.push(n.output[0].as_str());
            }
        }
    }
    let [exit] = exits.into_iter().collect::<Vec<_>>()[..] else {
        return None;
    };
    // The exit tensor feeds nothing inside the region, so everything ends there.
    if uses.get(exit)?.iter().any(|(i, _)| nodes.contains(i)) {
        return None;
    }
    let mut slices = Vec::new();
    for &i in &nodes {
        for input in graph.node[i]
            .input
            .iter()
            .filter(|x| !inside.contains(x.as_str()))
        {
            let t = own(input).or_else(|| {
                graph
                    .initializer
                    .iter()
                    .find(|t| t.name.as_deref() == Some(input.as_str()))
            })?;
            let d = dims(t);
            match d.iter().product::<usize>() {
                1 => {}
                c if c == channels && own(input).is_some() => {
                    let axis = d.iter().position(|&x| x == channels).unwrap_or(0);
                    slices.push((input.clone(), axis));
                }
                _ => return None,
            }
        }
    }
    group.slices.extend(slices);
    Some(exit.to_string())
}

pub use crate::domain::prune::PruneImportance as Importance;

/// How many of `total` to keep when removing `sparsity` of them, rounded up to `multiple_of`.
pub fn kept_count(total: usize, sparsity: f64, multiple_of: usize) -> usize {
    let keep = ((total as f64) * (1.0 - sparsity)).round().max(1.0) as usize;
    let m = multiple_of.max(1);
    keep.div_ceil(m).saturating_mul(m).clamp(1, total)
}

/// The `keep` highest-scoring indices, ascending.
pub fn top(scores: &[f32], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = order[..keep.min(scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// The norm of each slice along `axis` of a row-major tensor.
pub fn norms_along(values: &[f32], d: &[usize], axis: usize, importance: Importance) -> Vec<f32> {
    let inner: usize = d[axis + 1..].iter().product();
    let mut out = vec![0f32; d[axis]];
    for (i, v) in values.iter().enumerate() {
        let c = (i / inner) % d[axis];
        out[c] += match importance {
            Importance::L1 => v.abs(),
            Importance::L2 => v * v,
        };
    }
    if importance == Importance::L2 {
        out.iter_mut().for_each(|x| *x = x.sqrt());
    }
    out
}

pub(crate) fn select_along(values: &[f32], d: &[usize], axis: usize, keep: &[usize]) -> Vec<f32> {
    let inner: usize = d[axis + 1..].iter().product();
    let outer: usize = d[..axis].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &c in keep {
            let start = (o * d[axis] + c) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    out
}

/// Keeps only the channels `keep` (ascending indices) of `group`.
pub fn keep_channels(model: &mut ModelProto, group: &ChannelGroup, keep: &[usize]) {
    let graph = model.graph.as_mut().expect("groups come from a graph");
    for (name, axis) in &group.slices {
        let Some(t) = graph
            .initializer
            .iter_mut()
            .find(|t| t.name.as_deref() == Some(name))
        else {
            continue;
        };
        let mut d = dims(t);
        let values = select_along(&f32_values(t).unwrap_or_default(), &d, *axis, keep);
        d[*axis] = keep.len();
        *t = f32_tensor(name, &d, &values);
    }
    for &i in &group.depthwise {
        for a in graph.node[i].attribute.iter_mut() {
            if a.name.as_deref() == Some("group") {
                a.i = Some(keep.len() as i64);
            }
        }
    }
    // Declared intermediate shapes no longer hold; they are optional.
    graph.value_info.clear();
}

/// The `share` most important channels (by L1 norm) of a group, ascending.
pub fn most_important(group: &ChannelGroup, share: f64) -> Vec<usize> {
    let count = ((group.channels as f64 * share).round() as usize).clamp(1, group.channels);
    let mut order: Vec<usize> = (0..group.channels).collect();
    order.sort_by(|&a, &b| group.importance[b].total_cmp(&group.importance[a]));
    let mut keep = order[..count].to_vec();
    keep.sort_unstable();
    keep
}
