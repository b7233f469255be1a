//! Groups whose channels meet: where one layer's channels and another's enter the same
//! elementwise op (a residual Add, a squeeze-and-excitation Mul), channel i of one meets channel i
//! of the other, so removing a channel from one means removing it from both. Every group that
//! reaches such an op joins every other group reaching it, and the joined groups are one: one
//! count of channels, kept or removed together, scored by the sum of their members' importance.
//! A joined group stands only when every input of every op where its members meet comes from one
//! of them; an input from anywhere else (a graph input, a layer that forms no group) leaves them
//! all whole.
use super::{norms_along, ChannelGroup, Importance};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::rewrite::initializer;
use crate::engine::onnx::tensor::{dims, f32_values};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A layer that keeps the same channels as its group's `layer`.
#[derive(Debug, Clone)]
pub struct JoinedLayer {
    pub layer: String,
    /// Its weight, and the axis that holds its channels.
    pub weight: (String, usize),
    /// As [`ChannelGroup::bn_scale`], for this layer.
    pub bn_scale: Option<Vec<f32>>,
    /// As [`ChannelGroup::gate`], for this layer.
    pub gate: String,
}

fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// The groups as they stand once joined: groups that meet nowhere as they were, each set of
/// groups that meet as one group (in graph order of its first layer), and none of a set whose
/// meeting ops read anything else.
pub(super) fn join(groups: Vec<ChannelGroup>) -> Vec<ChannelGroup> {
    let mut parent: Vec<usize> = (0..groups.len()).collect();
    let mut first_at: HashMap<usize, usize> = HashMap::new();
    for (g, group) in groups.iter().enumerate() {
        for &(node, _) in &group.joins {
            let other = *first_at.entry(node).or_insert(g);
            let (a, b) = (root(&mut parent, g), root(&mut parent, other));
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut sets: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for g in 0..groups.len() {
        let r = root(&mut parent, g);
        sets.entry(r).or_default().push(g);
    }
    let mut slots: Vec<Option<ChannelGroup>> = groups.into_iter().map(Some).collect();
    let mut out = Vec::new();
    for members in sets.into_values() {
        let mut members: Vec<ChannelGroup> = members
            .into_iter()
            .map(|g| slots[g].take().expect("each group in one set"))
            .collect();
        let entered: HashSet<(usize, usize)> = members
            .iter()
            .flat_map(|m| m.joins.iter().copied())
            .collect();
        // Every input of every meeting op is some member's channels.
        let complete = entered
            .iter()
            .all(|&(node, _)| (0..2).all(|k| entered.contains(&(node, k))));
        let channels = members[0].channels;
        if !complete || members.iter().any(|m| m.channels != channels) {
            continue;
        }
        let mut group = members.remove(0);
        for m in members {
            for (i, v) in group.importance.iter_mut().zip(&m.importance) {
                *i += v;
            }
            group.joined.push(JoinedLayer {
                layer: m.layer,
                weight: m.slices[0].clone(),
                bn_scale: m.bn_scale,
                gate: m.gate,
            });
            for s in m.slices {
                if !group.slices.contains(&s) {
                    group.slices.push(s);
                }
            }
            for w in m.windows {
                if !group.windows.contains(&w) {
                    group.windows.push(w);
                }
            }
            for d in m.depthwise {
                if !group.depthwise.contains(&d) {
                    group.depthwise.push(d);
                }
            }
            group.joins.extend(m.joins);
        }
        out.push(group);
    }
    out
}

impl ChannelGroup {
    /// Each channel's importance by the norms of its weights in every layer of the group (times
    /// each layer's BatchNormalization scale), summed over the joined layers.
    pub fn weight_scores(&self, model: &ModelProto, importance: Importance) -> Vec<f32> {
        let weight = |name: &str| {
            initializer(model, name).map(|t| (f32_values(t).unwrap_or_default(), dims(t)))
        };
        let layers = std::iter::once((&self.slices[0], &self.bn_scale))
            .chain(self.joined.iter().map(|j| (&j.weight, &j.bn_scale)));
        let mut scores = vec![0f32; self.channels];
        for ((name, axis), bn) in layers {
            let Some((values, d)) = weight(name) else {
                continue;
            };
            let mut s = norms_along(&values, &d, *axis, importance);
            if let Some(scale) = bn {
                s.iter_mut().zip(scale).for_each(|(s, b)| *s *= b);
            }
            for (acc, v) in scores.iter_mut().zip(s) {
                *acc += v;
            }
        }
        scores
    }

    /// Every layer of the group: `layer` and the joined ones.
    pub fn layers(&self) -> Vec<&str> {
        std::iter::once(self.layer.as_str())
            .chain(self.joined.iter().map(|j| j.layer.as_str()))
            .collect()
    }

    /// Every tensor that holds the group's channels whole (see [`ChannelGroup::gate`]).
    pub fn gates(&self) -> Vec<&str> {
        std::iter::once(self.gate.as_str())
            .chain(self.joined.iter().map(|j| j.gate.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{channel_groups, keep_channels};
    use crate::engine::onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    use crate::engine::onnx::rewrite::int_attr;
    use crate::engine::onnx::tensor::{dims, f32_tensor, f32_values, float_value_info, i64_tensor};
    use crate::engine::train::{Mode, TrainGraph};
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(output.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// Seeded weights in (-0.5, 0.5).
    fn weight(name: &str, d: &[usize], seed: u32) -> crate::engine::onnx::proto::TensorProto {
        let n: usize = d.iter().product();
        let v: Vec<f32> = (0..n as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000;
                h as f32 / 1000.0 - 0.5
            })
            .collect();
        f32_tensor(name, d, &v)
    }

    fn model(
        nodes: Vec<NodeProto>,
        inits: Vec<crate::engine::onnx::proto::TensorProto>,
    ) -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            }],
            graph: Some(GraphProto {
                node: nodes,
                initializer: inits,
                input: vec![float_value_info("x")],
                output: vec![float_value_info("logits")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// conv1 -> Relu, a bottleneck (conv2, conv3) added back to it (a residual Add), a
    /// squeeze-and-excitation block (se1, se2, Sigmoid) multiplying the sum, global pooling, a
    /// 1x1 head conv, a scalar Mul (dropout exported), a flatten through Shape/Slice/Concat/
    /// Reshape, and a Gemm (MobileNetV3's tail as paddle2onnx writes it).
    fn residual_se() -> ModelProto {
        let conv = |x: &str, w: &str, b: &str, out: &str, pad: bool| {
            let mut n = node("Conv", &[x, w, b], out);
            if pad {
                n.attribute.push(crate::engine::onnx::rewrite::ints_attr(
                    "pads",
                    &[1, 1, 1, 1],
                ));
            }
            n
        };
        let nodes = vec![
            conv("x", "w1", "b1", "conv1", true),
            node("Relu", &["conv1"], "r1"),
            conv("r1", "w2", "b2", "conv2", false),
            node("Relu", &["conv2"], "r2"),
            conv("r2", "w3", "b3", "conv3", false),
            node("Add", &["r1", "conv3"], "sum"),
            node("GlobalAveragePool", &["sum"], "p"),
            conv("p", "w4", "b4", "se1", false),
            node("Relu", &["se1"], "e"),
            conv("e", "w5", "b5", "se2", false),
            node("Sigmoid", &["se2"], "gate"),
            node("Mul", &["sum", "gate"], "excited"),
            node("GlobalAveragePool", &["excited"], "g"),
            conv("g", "w7", "b7", "head", false),
            node("HardSwish", &["head"], "h"),
            node("Mul", &["h", "keep_scale"], "dropped"),
            node("Shape", &["dropped"], "shape"),
            node("Slice", &["shape", "zero", "one", "zero_axis"], "batch"),
            {
                let mut n = node("Concat", &["batch", "minus_one"], "target");
                n.attribute.push(int_attr("axis", 0));
                n
            },
            node("Reshape", &["dropped", "target"], "flat"),
            node("Gemm", &["flat", "w6", "b6"], "logits"),
        ];
        let inits = vec![
            weight("w1", &[8, 3, 3, 3], 1),
            weight("b1", &[8], 2),
            weight("w2", &[4, 8, 1, 1], 3),
            weight("b2", &[4], 4),
            weight("w3", &[8, 4, 1, 1], 5),
            weight("b3", &[8], 6),
            weight("w4", &[2, 8, 1, 1], 7),
            weight("b4", &[2], 8),
            weight("w5", &[8, 2, 1, 1], 9),
            weight("b5", &[8], 10),
            weight("w7", &[6, 8, 1, 1], 13),
            weight("b7", &[6], 14),
            f32_tensor("keep_scale", &[], &[0.8]),
            weight("w6", &[6, 3], 11),
            weight("b6", &[3], 12),
            i64_tensor("zero", &[0]),
            i64_tensor("one", &[1]),
            i64_tensor("zero_axis", &[0]),
            i64_tensor("minus_one", &[-1]),
        ];
        model(nodes, inits)
    }

    fn run(m: &ModelProto, x: &Tensor) -> Vec<f32> {
        let g = TrainGraph::new(m, &[]).unwrap();
        let feeds = HashMap::from([("x".to_string(), x.clone())]);
        g.forward(&feeds, Mode::Eval).unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn layers_whose_channels_meet_in_a_residual_add_and_an_excitation_mul_form_one_group() {
        let m = residual_se();
        let groups = channel_groups(&m);
        let layers: Vec<Vec<&str>> = groups.iter().map(|g| g.layers()).collect();
        assert!(
            layers.contains(&vec!["conv1", "conv3", "se2"]),
            "{layers:?}"
        );
        for single in ["conv2", "se1", "head"] {
            assert!(layers.contains(&vec![single]), "{single}: {layers:?}");
        }
        assert_eq!(
            groups.len(),
            4,
            "the Gemm's neurons are the output: {layers:?}"
        );
        let joined = groups.iter().find(|g| g.layer == "conv1").unwrap();
        assert_eq!(joined.gates(), ["conv1", "conv3", "se2"]);
        // The flatten's reader (the Gemm's rows) and the squeeze's reader (se1's inputs) follow.
        for (name, axis) in [("w7", 1), ("w4", 1), ("w2", 1), ("b5", 0), ("w3", 0)] {
            assert!(
                joined.slices.contains(&(name.to_string(), axis)),
                "{name}: {:?}",
                joined.slices
            );
        }
        // The head's channels, on a pooled tensor, are flattened into the Gemm's rows.
        let head = groups.iter().find(|g| g.layer == "head").unwrap();
        assert!(
            head.slices.contains(&("w6".to_string(), 0)),
            "{:?}",
            head.slices
        );
    }

    #[test]
    fn removing_a_joined_channel_computes_what_the_model_computes_without_it() {
        let m = residual_se();
        let group = channel_groups(&m)
            .into_iter()
            .find(|g| g.layer == "conv1")
            .unwrap();
        let keep = [0, 2, 3, 5, 7];
        let gone = [1, 4, 6];
        // The same model with the gone channels silenced at every layer that makes them: each
        // is then zero wherever it goes, so the sliced model must compute the same logits.
        let mut silenced = m.clone();
        for t in silenced.graph.as_mut().unwrap().initializer.iter_mut() {
            let name = t.name.clone().unwrap();
            if !["w1", "b1", "w3", "b3", "w5", "b5"].contains(&name.as_str()) {
                continue;
            }
            let d = dims(t);
            let inner: usize = d[1..].iter().product();
            let mut v = f32_values(t).unwrap();
            for &c in &gone {
                v[c * inner..(c + 1) * inner]
                    .iter_mut()
                    .for_each(|x| *x = 0.0);
            }
            *t = f32_tensor(&name, &d, &v);
        }
        let mut sliced = m.clone();
        keep_channels(&mut sliced, &group, &keep);
        let w7 = sliced
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some("w7"))
            .unwrap();
        assert_eq!(dims(w7), [6, 5, 1, 1]);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &Device::Cpu).unwrap();
        let (a, b) = (run(&silenced, &x), run(&sliced, &x));
        assert_eq!(a.len(), 6);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        // And the silenced channels did matter to the original.
        let orig = run(&m, &x);
        assert!(orig.iter().zip(&a).any(|(p, q)| (p - q).abs() > 1e-4));
    }

    #[test]
    fn a_layer_added_to_the_graph_input_stays_whole() {
        let m = model(
            vec![
                node("Conv", &["x", "w", "b"], "conv"),
                node("Relu", &["conv"], "r"),
                node("Add", &["x", "r"], "sum"),
                node("GlobalAveragePool", &["sum"], "g"),
                node("Flatten", &["g"], "flat"),
                node("Gemm", &["flat", "w6", "b6"], "logits"),
            ],
            vec![
                weight("w", &[8, 8, 1, 1], 1),
                weight("b", &[8], 2),
                weight("w6", &[8, 3], 3),
                weight("b6", &[3], 4),
            ],
        );
        assert!(channel_groups(&m).is_empty());
    }
}
