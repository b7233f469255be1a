//! Bookkeeping shared by the graph rewrites: new nodes before or instead of existing ones, new
//! initializers, float weights that may become unread, and extra operator domains.
use crate::engine::onnx::proto::{
    attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto,
};
use std::collections::{HashMap, HashSet};

/// The domain of ONNX Runtime's contrib operators (MatMulNBits).
pub const MS_DOMAIN: &str = "com.microsoft";

#[derive(Default)]
pub struct Rewrite {
    new_inits: Vec<TensorProto>,
    /// Float initializers that were replaced; dropped when no node reads them any more.
    replaced: HashSet<String>,
    before: HashMap<usize, Vec<NodeProto>>,
    instead: HashMap<usize, Vec<NodeProto>>,
    domains: Vec<(String, i64)>,
}

impl Rewrite {
    pub fn init(&mut self, t: TensorProto) {
        self.new_inits.push(t);
    }

    pub fn replaced(&mut self, name: &str) {
        self.replaced.insert(name.to_string());
    }

    /// Inserts `node` right before node `at` (after everything `at`'s inputs depend on).
    pub fn before(&mut self, at: usize, node: NodeProto) {
        self.before.entry(at).or_default().push(node);
    }

    /// Replaces node `at` by `nodes`, which must produce its outputs.
    pub fn instead(&mut self, at: usize, nodes: Vec<NodeProto>) {
        self.instead.insert(at, nodes);
    }

    pub fn domain(&mut self, domain: &str, version: i64) {
        self.domains.push((domain.to_string(), version));
    }

    pub fn is_empty(&self) -> bool {
        self.before.is_empty() && self.instead.is_empty()
    }

    pub fn apply(mut self, model: &mut ModelProto) {
        for (domain, version) in self.domains.drain(..) {
            if !model
                .opset_import
                .iter()
                .any(|o| o.domain.as_deref() == Some(domain.as_str()))
            {
                model.opset_import.push(OperatorSetIdProto {
                    domain: Some(domain),
                    version: Some(version),
                });
            }
        }
        let graph = model.graph.as_mut().expect("loaded models have a graph");
        let mut nodes = Vec::with_capacity(graph.node.len());
        for (i, n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
            nodes.extend(self.before.remove(&i).unwrap_or_default());
            match self.instead.remove(&i) {
                Some(new) => nodes.extend(new),
                None => nodes.push(n),
            }
        }
        graph.node = nodes;
        graph.initializer.extend(self.new_inits);
        drop_unread(graph, &self.replaced);
    }
}

/// Fewer scales than this are not worth a Cast node.
const F16_MIN_SCALES: usize = 64;

/// Quantization scales under `name`: float16 behind a Cast to float32 when there are many and
/// every one is exactly a float16 value (per-channel weight scales in float16's normal range are
/// made so, see `quantize::params::channel_scale`): half the bytes, the same numbers, and ONNX
/// Runtime folds the Cast when it loads the model. Otherwise one float32 initializer. Returns the
/// initializer and the Cast node, if any, which must run before the first reader.
pub fn scale_tensors(
    name: &str,
    dims: &[usize],
    scales: &[f32],
) -> (TensorProto, Option<NodeProto>) {
    use crate::engine::onnx::tensor::{f16_tensor, f32_tensor};
    let exact = scales.iter().all(|&s| half::f16::from_f32(s).to_f32() == s);
    if scales.len() < F16_MIN_SCALES || !exact {
        return (f32_tensor(name, dims, scales), None);
    }
    let half = format!("{name}16");
    let cast = node(
        "Cast",
        format!("{name}_Cast"),
        vec![half.clone()],
        name.to_string(),
        vec![int_attr("to", 1)],
    );
    (f16_tensor(&half, dims, scales), Some(cast))
}

impl Rewrite {
    /// Stores quantization scales under `name` (see [`scale_tensors`]); the Cast, when there is
    /// one, goes before node `at`, the first reader.
    pub fn scales(&mut self, name: &str, dims: &[usize], scales: &[f32], at: usize) {
        let (t, cast) = scale_tensors(name, dims, scales);
        self.init(t);
        if let Some(c) = cast {
            self.before(at, c);
        }
    }
}

/// Removes the initializers in `names` that no node reads.
pub fn drop_unread(graph: &mut GraphProto, names: &HashSet<String>) {
    let read: HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .chain(graph.output.iter().filter_map(|o| o.name.as_deref()))
        .collect();
    let keep: Vec<bool> = graph
        .initializer
        .iter()
        .map(|t| {
            t.name
                .as_deref()
                .is_none_or(|n| !names.contains(n) || read.contains(n))
        })
        .collect();
    let mut k = keep.into_iter();
    graph.initializer.retain(|_| k.next().unwrap_or(true));
}

/// The initializer called `name`, if the model has one.
pub fn initializer<'a>(model: &'a ModelProto, name: &str) -> Option<&'a TensorProto> {
    model
        .graph
        .as_ref()?
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
}

/// Float initializers by name.
pub fn initializers(graph: &GraphProto) -> HashMap<&str, &TensorProto> {
    graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref().map(|n| (n, t)))
        .collect()
}

/// How many nodes read each value.
pub fn readers(graph: &GraphProto) -> HashMap<&str, usize> {
    let mut r: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *r.entry(i.as_str()).or_default() += 1;
        }
    }
    r
}

/// The node's name, or a stable stand-in for unnamed nodes.
pub fn layer_name(node: &NodeProto, index: usize) -> String {
    node.name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{}_{index}", node.op_type.as_deref().unwrap_or("node")))
}

pub fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

pub fn attr_f(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.f)
}

pub fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}

pub fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    output: String,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: inputs,
        output: vec![output],
        attribute: attrs,
        ..Default::default()
    }
}

/// The default-domain opset the model imports.
pub fn default_opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx")
        })
        .and_then(|o| o.version)
        .unwrap_or(0)
}
