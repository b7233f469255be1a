//! Channel groups: the output channels (neurons) of one layer, followed through the per-channel
//! ops after it (bias Adds, BatchNormalization, activations, depthwise convolutions, global
//! pooling, a flatten after it) to the layers that read them. Removing a channel means slicing
//! every tensor in its group; this is how width-derived students are made, and what structured
//! pruning removes.
//!
//! Channels may fan out to several readers (a U-Net's skip), pass through Resize, Upsample and
//! pools, and enter a Concat along the channel axis: there they are a window of the joined
//! tensor, and the readers after it are sliced in that window only, so both sides of a skip
//! connection stay consistent. Where two layers' channels meet in an elementwise op (a residual
//! Add, a squeeze-and-excitation Mul) channel i of one meets channel i of the other: the layers
//! form one group and keep the same channels together (see [`joined`]). A layer whose channels
//! also reach anything else (a Reshape that is not a flatten, a graph output, a shared weight, an
//! elementwise op with a tensor no layer of the group produces) forms no group and is left whole.
use crate::engine::onnx::proto::{ModelProto, NodeProto, TensorProto};
use crate::engine::onnx::tensor::{dims, f32_values};
use std::collections::{HashMap, HashSet};

mod flatten;
mod joined;
mod slicing;
use flatten::{constant_len, flat, pointwise};
pub use joined::JoinedLayer;
pub use slicing::*;

/// One prunable set of channels.
#[derive(Debug, Clone)]
pub struct ChannelGroup {
    /// The layer whose output channels these are.
    pub layer: String,
    pub channels: usize,
    /// Initializers to slice, and along which axis.
    pub slices: Vec<(String, usize)>,
    /// Initializers read after a Concat, whose axis holds these channels as a window among
    /// others: (name, axis, offset of the window, length of the axis).
    pub windows: Vec<(String, usize, usize, usize)>,
    /// Depthwise convolutions inside the group (their `group` attribute follows the count).
    pub depthwise: Vec<usize>,
    /// L1 norm of each channel's weights in the producing layer, times its BatchNormalization
    /// scale when one follows.
    pub importance: Vec<f32>,
    /// |γ| / sqrt(var + ε) of a BatchNormalization in the group: what the channel's output is
    /// multiplied by after the layer, so weight norms alone misjudge its importance.
    pub bn_scale: Option<Vec<f32>>,
    /// The tensor that holds the group's channels whole, as the rest of the graph reads them: the
    /// output of its BatchNormalization when one follows the layer, else the layer's output.
    /// Removing a channel removes its slice of this tensor (data-driven importance gates it).
    pub gate: String,
    /// The other layers whose channels meet this one's in elementwise ops (residual Adds,
    /// squeeze-and-excitation Muls), channel for channel: they keep the same channels as `layer`.
    /// `importance` already sums theirs; `slices` and `depthwise` hold theirs too.
    pub joined: Vec<JoinedLayer>,
    /// (node, input) where the channels meet another tensor in an elementwise op.
    joins: Vec<(usize, usize)>,
    /// Tensors already followed, with the place of the channels in them.
    followed: HashSet<(String, usize, usize)>,
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
    let scalar = |name: &str| constant_len(graph, &inits, name) == Some(1);
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
            "ConvTranspose" if attr_i(n, "group").unwrap_or(1) == 1 && wd.len() == 4 => (wd[1], 1),
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
            windows: Vec::new(),
            depthwise: Vec::new(),
            importance,
            bn_scale: None,
            gate: n.output[0].clone(),
            joined: Vec::new(),
            joins: Vec::new(),
            followed: HashSet::new(),
        };
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            match own(b) {
                Some(t) if dims(t).iter().product::<usize>() == channels => {
                    group.slices.push((b.clone(), dims(t).len() - 1))
                }
                _ => continue,
            }
        }
        let walk = Walk {
            graph,
            uses: &uses,
            outputs: &outputs,
            own: &own,
            scalar: &scalar,
            inits: &inits,
            channels,
        };
        let all = Place {
            offset: 0,
            total: channels,
            flat: match op {
                "Conv" => pointwise(graph, n) && flat(graph, &n.input[0], 0),
                _ => true,
            },
        };
        if walk.follow(&n.output[0], all, &mut group) {
            if let Some(scale) = &group.bn_scale {
                for (i, s) in group.importance.iter_mut().zip(scale) {
                    *i *= s;
                }
            }
            groups.push(group);
        }
    }
    joined::join(groups)
}

/// Where the group's channels sit in a tensor: `offset..offset + channels` of its `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Place {
    offset: usize,
    total: usize,
    /// Whether every axis after the channels has length 1 (after a global pool), so that a
    /// flatten keeps them where they are.
    flat: bool,
}

/// What following a group's channels through the graph needs.
struct Walk<'g, 'a> {
    graph: &'g crate::engine::onnx::proto::GraphProto,
    uses: &'a HashMap<&'g str, Vec<(usize, usize)>>,
    outputs: &'a [&'g str],
    own: &'a dyn Fn(&str) -> Option<&'g TensorProto>,
    /// Whether a name is a constant of one value (an elementwise op with it keeps the channels).
    scalar: &'a dyn Fn(&str) -> bool,
    inits: &'a HashMap<&'g str, &'g TensorProto>,
    channels: usize,
}

impl<'g> Walk<'g, '_> {
    /// Records that `name` holds the channels along `axis` at `at`.
    fn slice(&self, group: &mut ChannelGroup, name: &str, axis: usize, at: Place) {
        if at.total == self.channels {
            group.slices.push((name.to_string(), axis));
        } else {
            group
                .windows
                .push((name.to_string(), axis, at.offset, at.total));
        }
    }

    /// A per-channel constant over the `at.total` channels (a bias, a BatchNormalization
    /// parameter): its name and channel axis.
    fn per_channel(&self, name: &str, at: Place) -> Option<(String, usize)> {
        let t = (self.own)(name)?;
        let d = dims(t);
        (d.iter().product::<usize>() == at.total).then(|| {
            let axis = d.iter().position(|&x| x == at.total).unwrap_or(0);
            (name.to_string(), axis)
        })
    }

    /// Follows `tensor` (holding the group's channels at `at`) to every layer reading them;
    /// false when the channels reach anything the group cannot slice.
    fn follow(&self, tensor: &str, at: Place, group: &mut ChannelGroup) -> bool {
        if self.outputs.contains(&tensor) {
            return false;
        }
        // Two paths that meet again (x * sigmoid(x)) reach what follows twice; once is enough.
        if !group
            .followed
            .insert((tensor.to_string(), at.offset, at.total))
        {
            return true;
        }
        let Some(consumers) = self.uses.get(tensor) else {
            return false;
        };
        // Every reader must take the channels somewhere the group can slice.
        let before = group.clone();
        if consumers
            .iter()
            .all(|&(i, k)| self.enter_node(i, k, at, group))
        {
            return true;
        }
        *group = before;
        if consumers.len() < 2 || at.total != self.channels {
            return false;
        }
        // An elementwise region that joins again (GELU written out) passes the channels on
        // through the one tensor it ends in.
        match region_exit(
            self.graph,
            self.uses,
            self.outputs,
            self.own,
            tensor,
            self.channels,
            group,
        ) {
            Some(exit) if exit != tensor => self.follow(&exit, at, group),
            _ => false,
        }
    }

    /// Follows the channels into input `k` of node `i`.
    fn enter_node(&self, i: usize, k: usize, at: Place, group: &mut ChannelGroup) -> bool {
        let n = &self.graph.node[i];
        let op = n.op_type.as_deref().unwrap_or_default();
        let next = |group: &mut ChannelGroup, at: Place| self.follow(&n.output[0], at, group);
        match op {
            _ if ACTIVATIONS.contains(&op) && k == 0 => next(group, at),
            "GlobalAveragePool" | "GlobalMaxPool" => next(group, Place { flat: true, ..at }),
            "MaxPool" | "AveragePool" => next(group, at),
            "Flatten" if at.total == self.channels => next(group, at),
            // Flattening [N, C, 1, 1] to [N, C] keeps the channels.
            "Reshape" if k == 0 && at.flat && self.flattens(&n.input[1]) => next(group, at),
            // Reading only the batch size of the tensor (to flatten it) does not see channels.
            "Shape" if self.reads_batch_only(&n.output[0]) => true,
            // Resampling keeps the channels where they are (scales and sizes are not data).
            "Resize" | "Upsample" if k == 0 => next(group, Place { flat: false, ..at }),
            "Concat" => {
                let rank_axis = attr_i(n, "axis").unwrap_or(0);
                if rank_axis != 1 {
                    return false;
                }
                let mut offset = 0;
                for input in &n.input[..k] {
                    match self.channel_count(input, 0) {
                        Some(c) => offset += c,
                        None => return false,
                    }
                }
                let mut total = offset;
                for input in &n.input[k..] {
                    match self.channel_count(input, 0) {
                        Some(c) => total += c,
                        None => return false,
                    }
                }
                next(
                    group,
                    Place {
                        offset: offset + at.offset,
                        total,
                        flat: at.flat,
                    },
                )
            }
            "Add" | "Sub" | "Mul" | "Div" if n.input.len() == 2 => {
                let other = &n.input[1 - k];
                if (self.scalar)(other) {
                    return next(group, at);
                }
                match self.per_channel(other, at) {
                    Some((name, axis)) => {
                        self.slice(group, &name, axis, at);
                        next(group, at)
                    }
                    // Another tensor, channel for channel: the layers producing it join the
                    // group (checked when the groups are joined).
                    None if at.total == self.channels
                        && !self.inits.contains_key(other.as_str()) =>
                    {
                        group.joins.push((i, k));
                        next(group, at)
                    }
                    None => false,
                }
            }
            "BatchNormalization" if k == 0 => {
                for p in &n.input[1..] {
                    match self.per_channel(p, at) {
                        Some((name, axis)) => self.slice(group, &name, axis, at),
                        None => return false,
                    }
                }
                if group.bn_scale.is_none() && n.input.len() == 5 && at.total == self.channels {
                    let eps = n
                        .attribute
                        .iter()
                        .find(|a| a.name.as_deref() == Some("epsilon"))
                        .and_then(|a| a.f)
                        .unwrap_or(1e-5);
                    let gamma = (self.own)(&n.input[1])
                        .and_then(f32_values)
                        .unwrap_or_default();
                    let var = (self.own)(&n.input[4])
                        .and_then(f32_values)
                        .unwrap_or_default();
                    if gamma.len() == self.channels && var.len() == self.channels {
                        group.gate = n.output[0].clone();
                        group.bn_scale = Some(
                            gamma
                                .iter()
                                .zip(&var)
                                .map(|(g, v)| g.abs() / (v + eps).sqrt())
                                .collect(),
                        );
                    }
                }
                next(group, at)
            }
            "Conv" if k == 0 => {
                let Some(w) = (self.own)(&n.input[1]) else {
                    return false;
                };
                let wd = dims(w);
                let groups = attr_i(n, "group").unwrap_or(1) as usize;
                let whole = at.total == self.channels;
                if whole
                    && groups == at.total
                    && wd.first() == Some(&at.total)
                    && wd.get(1) == Some(&1)
                {
                    // Depthwise: its channels are the same ones, on to its reader.
                    group.slices.push((n.input[1].clone(), 0));
                    if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
                        match self.per_channel(b, at) {
                            Some(s) => group.slices.push(s),
                            None => return false,
                        }
                    }
                    group.depthwise.push(i);
                    return next(group, at);
                }
                if groups != 1 || wd.get(1) != Some(&at.total) {
                    return false;
                }
                self.slice(group, &n.input[1], 1, at);
                true
            }
            "ConvTranspose" if k == 0 => match (self.own)(&n.input[1]) {
                Some(w)
                    if attr_i(n, "group").unwrap_or(1) == 1
                        && dims(w).first() == Some(&at.total) =>
                {
                    self.slice(group, &n.input[1], 0, at);
                    true
                }
                _ => false,
            },
            "MatMul" if k == 0 => match (self.own)(&n.input[1]) {
                Some(w) if dims(w).first() == Some(&at.total) && dims(w).len() == 2 => {
                    self.slice(group, &n.input[1], 0, at);
                    true
                }
                _ => false,
            },
            "Gemm" if k == 0 && attr_i(n, "transA").unwrap_or(0) == 0 => {
                let Some(w) = (self.own)(&n.input[1]) else {
                    return false;
                };
                let axis = if attr_i(n, "transB") == Some(1) { 1 } else { 0 };
                if dims(w).get(axis) != Some(&at.total) {
                    return false;
                }
                self.slice(group, &n.input[1], axis, at);
                true
            }
            _ => false,
        }
    }

    /// The channel count of a tensor, from the layer that produced it (through per-channel ops
    /// and Concats), or from the graph input's declared shape.
    fn channel_count(&self, tensor: &str, depth: usize) -> Option<usize> {
        if depth > 64 {
            return None;
        }
        let Some(n) = self
            .graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == tensor))
        else {
            let input = self
                .graph
                .input
                .iter()
                .find(|v| v.name.as_deref() == Some(tensor))?;
            return match crate::engine::onnx::summary::signature(input).shape.get(1) {
                Some(crate::domain::model::Dim::Fixed(c)) if *c > 0 => Some(*c as usize),
                _ => None,
            };
        };
        let op = n.op_type.as_deref().unwrap_or_default();
        let weight = || {
            n.input.get(1).and_then(|w| {
                crate::engine::onnx::rewrite::initializers(self.graph)
                    .get(w.as_str())
                    .map(|t| dims(t))
            })
        };
        match op {
            "Conv" => weight()?.first().copied(),
            "ConvTranspose" => Some(weight()?.get(1)? * attr_i(n, "group").unwrap_or(1) as usize),
            "Concat" if attr_i(n, "axis") == Some(1) => n
                .input
                .iter()
                .map(|i| self.channel_count(i, depth + 1))
                .sum(),
            "Relu" | "Clip" | "HardSwish" | "HardSigmoid" | "Sigmoid" | "Tanh" | "LeakyRelu"
            | "Identity" | "Dropout" | "Erf" | "BatchNormalization" | "MaxPool" | "AveragePool"
            | "GlobalAveragePool" | "GlobalMaxPool" | "Resize" | "Upsample" | "Add" | "Sub"
            | "Mul" | "Div" => self.channel_count(&n.input[0], depth + 1),
            _ => None,
        }
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
