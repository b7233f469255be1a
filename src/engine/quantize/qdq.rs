//! Static int8 quantization in QDQ form: QuantizeLinear/DequantizeLinear pairs around the
//! activations of Conv, MatMul and Gemm, int8 weights behind DequantizeLinear, and int32 biases
//! with scale = input scale x weight scale. ONNX Runtime fuses DQ -> op -> Q into integer kernels
//! (QLinearConv, QLinearMatMul); TensorRT and OpenVINO read the same form. A MatMul of two
//! activations (attention's Q·Kᵀ and scores·V) gets Q/DQ on both inputs and no weight.
use super::calibrate::{RangeMethod, Ranges};
use super::params::{
    activation_params, quantize, quantize_weights_bits, ActivationType, QParams, QuantizedWeights,
};
use super::LayerDecision;
use crate::engine::onnx::proto::{ModelProto, NodeProto, TensorProto};
use crate::engine::onnx::rewrite::{attr_i, int_attr, layer_name, node, scale_tensors};
use crate::engine::onnx::tensor::{
    dims, f32_le, f32_tensor, f32_values, i32_tensor, i8_tensor, i8_tensor_owned, is_f32, u8_tensor,
};
use crate::engine::{EngineError, Result};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Options of static quantization.
#[derive(Debug, Clone)]
pub struct StaticOptions {
    pub per_channel: bool,
    /// With `per_channel`: one scale per tensor for layers whose channels have similar ranges.
    pub auto_granularity: bool,
    /// Embedding tables with one scale per row (else one per table).
    pub tables_per_row: bool,
    pub activation: ActivationType,
    /// Operator types to quantize (Conv, MatMul, Gemm).
    pub op_types: Vec<String>,
    /// Node names to leave in float.
    pub exclude: Vec<String>,
    /// Int8 weights in 7 bits ([-63, 63]) for CPUs whose uint8 x int8 kernels saturate.
    pub reduce_range: bool,
    /// Symmetric activation ranges (uint8 centred on 128, int8 on 0).
    pub symmetric: bool,
    /// How activation ranges are chosen from histograms; min/max when None.
    pub calibration: Option<RangeMethod>,
    /// Histogram methods whose ranges are computed alongside (from the same histogram pass) for
    /// the accuracy budget to compare ([`super::budget::choose_calibration`]).
    pub also_try: Vec<RangeMethod>,
}

/// A node that will be quantized, and where its tensors are.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: usize,
    pub name: String,
    pub op: String,
    pub activation: String,
    pub weight: String,
    pub bias: Option<String>,
    pub output: String,
    /// Axis of the weight's output channels.
    pub axis: usize,
    /// A MatMul of two activations: `weight` names the second activation, quantized like the
    /// first (uint8 per tensor, calibrated), and there is no weight initializer or bias.
    pub activations_only: bool,
}

/// Finds the nodes to quantize: a listed op type whose weight is a float initializer of the right rank.
pub fn plan(model: &ModelProto, opts: &StaticOptions) -> (Vec<Target>, Vec<LayerDecision>) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = crate::engine::onnx::rewrite::initializers(graph);
    let (mut targets, mut decisions) = (Vec::new(), Vec::new());
    for (i, node) in graph.node.iter().enumerate() {
        let op = node.op_type.clone().unwrap_or_default();
        if !matches!(op.as_str(), "Conv" | "MatMul" | "Gemm") {
            continue;
        }
        let name = layer_name(node, i);
        let mut decide = |precision: &str, reason: String| {
            decisions.push(LayerDecision::new(&name, &op, precision, reason))
        };
        if !opts.op_types.contains(&op) {
            decide("float", format!("{op} is not in op_types"));
            continue;
        }
        if opts.exclude.contains(&name) {
            decide("float", "excluded by the spec".into());
            continue;
        }
        let weight = node.input.get(1).cloned().unwrap_or_default();
        let constant = |x: &str| inits.contains_key(x) || x.is_empty();
        if op == "MatMul" && !constant(&node.input[0]) && !constant(&weight) {
            decide(
                "int8",
                "quantized (both inputs are activations: uint8 x uint8)".into(),
            );
            targets.push(Target {
                node: i,
                name,
                op,
                activation: node.input[0].clone(),
                weight,
                bias: None,
                output: node.output[0].clone(),
                axis: 0,
                activations_only: true,
            });
            continue;
        }
        let Some(w) = inits.get(weight.as_str()).filter(|w| is_f32(w)) else {
            decide("float", "its weight is not a float32 initializer".into());
            continue;
        };
        let rank = w.dims.len();
        let axis = match op.as_str() {
            "Conv" if rank >= 3 => 0,
            "MatMul" if rank == 2 => 1,
            "Gemm" if rank == 2 => {
                if attr_i(node, "transB") == Some(1) {
                    0
                } else {
                    1
                }
            }
            _ => {
                decide(
                    "float",
                    format!("weight rank {rank} is not supported for {op}"),
                );
                continue;
            }
        };
        if op == "Gemm" && attr_i(node, "transA") == Some(1) {
            decide("float", "Gemm with transA is not supported".into());
            continue;
        }
        let channels = w.dims[axis] as usize;
        let bias = node
            .input
            .get(2)
            .filter(|b| {
                inits.get(b.as_str()).is_some_and(|t| {
                    t.dims.len() == 1 && t.dims[0] as usize == channels && is_f32(t)
                })
            })
            .cloned();
        decide("int8", "quantized".into());
        targets.push(Target {
            node: i,
            name,
            op,
            activation: node.input[0].clone(),
            weight,
            bias,
            output: node.output[0].clone(),
            axis,
            activations_only: false,
        });
    }
    (targets, decisions)
}

/// Ops whose inputs and outputs also get Q/DQ when they sit between quantized tensors, so that
/// ONNX Runtime keeps the chain in integers (QLinearAdd; Relu/Clip vanish into the Q before them).
/// Mul, the pooling ops and Sigmoid/HardSigmoid/LeakyRelu have integer kernels too (QLinearMul,
/// QLinearGlobalAveragePool, ...); HardSigmoid runs in float between its Q/DQ, which still costs
/// less than leaving the chain.
const CHAIN_OPS: &[&str] = &[
    "Add",
    "Mul",
    "Relu",
    "Clip",
    "HardSigmoid",
    "Sigmoid",
    "LeakyRelu",
    "GlobalAveragePool",
    "AveragePool",
    "MaxPool",
];

/// Binary chained ops: both inputs quantized, or one quantized and one a float constant.
const BINARY_CHAIN_OPS: &[&str] = &["Add", "Mul"];

/// A float constant read by a chained op (an Add's bias): quantized like an activation.
#[derive(Debug, Clone)]
pub struct ConstInput {
    pub node: usize,
    pub slot: usize,
    pub name: String,
}

/// Tensors whose ranges calibration must observe, and constants to quantize for chained ops.
pub fn activations(model: &ModelProto, targets: &[Target]) -> (Vec<String>, Vec<ConstInput>) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let float_inits: HashSet<&str> = graph
        .initializer
        .iter()
        .filter(|t| is_f32(t))
        .filter_map(|t| t.name.as_deref())
        .collect();
    let mut set: HashSet<String> = targets
        .iter()
        .flat_map(|t| {
            let second = t.activations_only.then(|| t.weight.clone());
            [t.activation.clone(), t.output.clone()]
                .into_iter()
                .chain(second)
        })
        .collect();
    let mut constants = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        let op = node.op_type.as_deref().unwrap_or("");
        if !CHAIN_OPS.contains(&op) || node.output.len() != 1 {
            continue;
        }
        let ok = match op {
            _ if BINARY_CHAIN_OPS.contains(&op) => {
                node.input.len() == 2
                    && node.input.iter().any(|x| set.contains(x))
                    && node
                        .input
                        .iter()
                        .all(|x| set.contains(x) || float_inits.contains(x.as_str()))
            }
            _ => node.input.first().is_some_and(|x| set.contains(x)),
        };
        if !ok {
            continue;
        }
        if BINARY_CHAIN_OPS.contains(&op) {
            for (slot, x) in node
                .input
                .iter()
                .enumerate()
                .filter(|(_, x)| !set.contains(*x))
            {
                constants.push(ConstInput {
                    node: i,
                    slot,
                    name: x.clone(),
                });
            }
        }
        set.insert(node.output[0].clone());
    }
    // A Gemm or MatMul output that no integer op reads stays float: ONNX Runtime then writes it
    // from the integer kernel directly (QGemm with a float output, MatMulIntegerToFloat) instead
    // of quantizing it only to dequantize it again — one kernel fewer, and logits keep full
    // precision. (QLinearConv has no float output: Conv outputs stay quantized.)
    let integer_reader = |value: &str| {
        graph.node.iter().enumerate().any(|(i, n)| {
            n.input.iter().any(|x| x == value)
                && (targets.iter().any(|t| {
                    t.node == i
                        && (t.activation == value || (t.activations_only && t.weight == value))
                }) || (CHAIN_OPS.contains(&n.op_type.as_deref().unwrap_or(""))
                    && n.output.first().is_some_and(|o| set.contains(o))))
        })
    };
    let float_outputs: Vec<&str> = targets
        .iter()
        .filter(|t| matches!(t.op.as_str(), "Gemm" | "MatMul") && !integer_reader(&t.output))
        .map(|t| t.output.as_str())
        .collect();
    for o in float_outputs {
        set.remove(o);
    }
    let mut names: Vec<String> = set.into_iter().collect();
    names.sort();
    (names, constants)
}

/// Gives the input of each Relu/Clip (when nothing else reads it) the range of the Relu's output:
/// quantizing with that range clips like the Relu does, so ONNX Runtime drops the Relu and the
/// requantization around it, and the integer chain continues. Gives each MaxPool's output its
/// input's range.
pub fn fold_activation_ranges(model: &ModelProto, ranges: &mut Ranges) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    let outputs: HashSet<&str> = graph
        .output
        .iter()
        .filter_map(|o| o.name.as_deref())
        .collect();
    for n in &graph.node {
        if !matches!(n.op_type.as_deref(), Some("Relu" | "Clip"))
            || n.input.is_empty()
            || n.output.len() != 1
        {
            continue;
        }
        let (x, y) = (n.input[0].as_str(), n.output[0].as_str());
        if readers.get(x) != Some(&1) || outputs.contains(x) {
            continue;
        }
        if let Some(r) = ranges.get(y).copied() {
            if ranges.contains_key(x) {
                ranges.insert(x.to_string(), r);
            }
        }
    }
    // MaxPool picks values of its input: quantized with its input's parameters it is exact, and
    // ONNX Runtime then drops the DequantizeLinear/QuantizeLinear around it and pools the uint8
    // values directly instead of in float.
    for n in &graph.node {
        if n.op_type.as_deref() != Some("MaxPool") || n.input.is_empty() || n.output.len() != 1 {
            continue;
        }
        let (x, y) = (n.input[0].as_str(), n.output[0].as_str());
        if let (Some(r), true) = (ranges.get(x).copied(), ranges.contains_key(y)) {
            ranges.insert(y.to_string(), r);
        }
    }
}

/// Output channels of a weight of `shape` whose channel axis is `axis`.
fn w_channels(shape: &[usize], axis: usize) -> usize {
    shape.get(axis).copied().unwrap_or(0)
}

/// uint8 parameters of a constant read by a chained op: its whole range, and zero.
pub fn constant_params(values: &[f32]) -> QParams {
    let (lo, hi) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(l, h), v| (l.min(*v), h.max(*v)));
    activation_params(lo, hi, ActivationType::Uint8, false)
}

/// The integer range QuantizeLinear saturates to for activations of type `ty`.
pub fn activation_limits(ty: ActivationType) -> (i32, i32) {
    match ty {
        ActivationType::Uint8 => (0, 255),
        ActivationType::Int8 => (-128, 127),
    }
}

/// Int8 weights rounded otherwise than to nearest (GPTQ, the `gptq` module), by weight initializer
/// name: written in place of nearest rounding.
pub type RoundedWeights = HashMap<String, QuantizedWeights>;

/// Per-output-channel shifts to subtract from quantized layers' biases, by layer name
/// ([`super::bias_correction`]).
pub type BiasCorrections = HashMap<String, Vec<f32>>;

/// Rewrites the model in QDQ form. `per_channel` needs opset 13 (the `axis` attribute of
/// DequantizeLinear). A layer in `corrections` gets its bias shifted (a Conv or Gemm without one
/// gets one); a weight in `rounded` takes those integers and scales instead of nearest rounding.
pub fn rewrite(
    model: &ModelProto,
    targets: &[Target],
    constants: &[ConstInput],
    ranges: &Ranges,
    opts: &StaticOptions,
    corrections: &BiasCorrections,
    rounded: &RoundedWeights,
) -> Result<ModelProto> {
    let mut out = model.clone();
    let graph = out.graph.as_mut().expect("loaded models have a graph");
    let inits: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.clone().map(|n| (n, t.clone())))
        .collect();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut prologue: Vec<NodeProto> = Vec::new();

    // Activation parameters, one per tensor.
    let mut act: BTreeMap<String, QParams> = BTreeMap::new();
    let names: Vec<String> = ranges.keys().cloned().collect();
    for name in names {
        let (lo, hi) = ranges.get(&name).copied().ok_or_else(|| {
            EngineError::InvalidModel(format!("no calibration range for `{name}`"))
        })?;
        let p = activation_params(lo, hi, opts.activation, opts.symmetric);
        new_inits.push(f32_tensor(&format!("{name}_s"), &[], &[p.scale]));
        new_inits.push(match opts.activation {
            ActivationType::Uint8 => u8_tensor(&format!("{name}_zp"), &[], &[p.zero_point as u8]),
            ActivationType::Int8 => i8_tensor(&format!("{name}_zp"), &[], &[p.zero_point as i8]),
        });
        act.insert(name, p);
    }

    // Weights and biases: int8/int32 initializers behind DequantizeLinear, quantized once even when shared.
    // Weight name -> its dequantized value, scale tensor and scales (shared weights are quantized once).
    let mut weight_dq: HashMap<String, (String, String, Vec<f32>)> = HashMap::new();
    let mut replaced: HashSet<String> = HashSet::new();
    let mut rename: Vec<(usize, usize, String)> = Vec::new(); // (node, input slot, new name)
    for t in targets.iter().filter(|t| !t.activations_only) {
        let w = &inits[&t.weight];
        let shape = dims(w);
        let (w_sname, w_scales) = if let Some((dq, sname, scales)) = weight_dq.get(&t.weight) {
            rename.push((t.node, 1, dq.clone()));
            (sname.clone(), scales.clone())
        } else {
            let QuantizedWeights {
                scales,
                values: q,
                per_channel,
            } = match rounded.get(&t.weight) {
                Some(q) => (*q).clone(),
                None => quantize_weights_bits(
                    &f32_le(w).expect("planned weights are float"),
                    &shape,
                    t.axis,
                    opts.per_channel,
                    opts.auto_granularity,
                    opts.reduce_range,
                ),
            };
            let (qname, sname, dqname) = (
                format!("{}_q", t.weight),
                format!("{}_s", t.weight),
                format!("{}_dq", t.weight),
            );
            let sdims: Vec<usize> = if per_channel {
                vec![scales.len()]
            } else {
                vec![]
            };
            new_inits.push(i8_tensor_owned(&qname, &shape, q));
            let (st, cast) = scale_tensors(&sname, &sdims, &scales);
            new_inits.push(st);
            prologue.extend(cast);
            let attrs = if per_channel {
                vec![int_attr("axis", t.axis as i64)]
            } else {
                vec![]
            };
            // Symmetric: the zero point is 0, DequantizeLinear's default for int8, so none is
            // stored, except for Gemm: ONNX Runtime fuses QGemm only with an explicit one.
            let mut inputs = vec![qname, sname.clone()];
            if t.op == "Gemm" {
                let zname = format!("{}_zp", t.weight);
                new_inits.push(i8_tensor_owned(&zname, &sdims, vec![0; scales.len()]));
                inputs.push(zname);
            }
            prologue.push(node(
                "DequantizeLinear",
                format!("{}_DQ", t.weight),
                inputs,
                dqname.clone(),
                attrs,
            ));
            weight_dq.insert(
                t.weight.clone(),
                (dqname.clone(), sname.clone(), scales.clone()),
            );
            replaced.insert(t.weight.clone());
            rename.push((t.node, 1, dqname));
            (sname, scales)
        };
        let correction = corrections
            .get(&t.name)
            .filter(|c| c.len() == w_channels(&shape, t.axis) && t.op != "MatMul");
        let bias = match (&t.bias, correction) {
            (Some(b), _) => Some((
                b.clone(),
                f32_values(&inits[b]).expect("planned biases are float"),
            )),
            (None, Some(c)) => Some((format!("{}_bias", t.name), vec![0.0; c.len()])),
            (None, None) => None,
        };
        if let Some((b, mut bias)) = bias {
            let b = &b;
            if let Some(c) = correction {
                for (v, d) in bias.iter_mut().zip(c) {
                    *v -= d;
                }
            }
            let x = act[&t.activation];
            let scales: Vec<f32> = (0..bias.len())
                .map(|c| x.scale * w_scales[if w_scales.len() == 1 { 0 } else { c }])
                .collect();
            let q: Vec<i32> = bias
                .iter()
                .zip(&scales)
                .map(|(v, s)| {
                    quantize(
                        *v,
                        QParams {
                            scale: *s,
                            zero_point: 0,
                        },
                        i32::MIN + 1,
                        i32::MAX,
                    )
                })
                .collect();
            let (qname, sname, dqname) = (
                format!("{b}_{}_q", t.name),
                format!("{b}_{}_s", t.name),
                format!("{b}_{}_dq", t.name),
            );
            new_inits.push(i32_tensor(&qname, &[q.len()], &q));
            if w_scales.len() == 1 {
                new_inits.push(f32_tensor(&sname, &[], &scales[..1]));
            } else {
                // x_scale * w_scale[c], the same float32 products the bias was quantized with,
                // computed by one Mul that ONNX Runtime folds at load instead of stored per channel.
                prologue.push(node(
                    "Mul",
                    format!("{sname}_Mul"),
                    vec![format!("{}_s", t.activation), w_sname],
                    sname.clone(),
                    vec![],
                ));
            }
            // int32 with zero point 0, DequantizeLinear's default, so none is stored.
            prologue.push(node(
                "DequantizeLinear",
                format!("{b}_{}_DQ", t.name),
                vec![qname, sname],
                dqname.clone(),
                vec![int_attr("axis", 0)],
            ));
            replaced.insert(b.clone());
            if graph.node[t.node].input.len() < 3 {
                graph.node[t.node].input.push(String::new());
            }
            rename.push((t.node, 2, dqname));
        }
    }
    // Constants read by chained ops (biases of Add): uint8 per tensor, like the activation beside
    // them; one quantized copy however many ops read it.
    let mut emitted: HashSet<&str> = HashSet::new();
    for c in constants {
        let base = format!("{}_const", c.name);
        rename.push((c.node, c.slot, format!("{base}_dq")));
        if !emitted.insert(c.name.as_str()) {
            continue;
        }
        let values = f32_values(&inits[&c.name]).expect("chained constants are float");
        let p = constant_params(&values);
        let q: Vec<u8> = values
            .iter()
            .map(|v| quantize(*v, p, 0, 255) as u8)
            .collect();
        let (qname, sname, zname, dqname) = (
            format!("{base}_q"),
            format!("{base}_s"),
            format!("{base}_zp"),
            format!("{base}_dq"),
        );
        new_inits.push(u8_tensor(&qname, &dims(&inits[&c.name]), &q));
        new_inits.push(f32_tensor(&sname, &[], &[p.scale]));
        new_inits.push(u8_tensor(&zname, &[], &[p.zero_point as u8]));
        prologue.push(node(
            "DequantizeLinear",
            format!("{base}_DQ"),
            vec![qname, sname, zname],
            dqname.clone(),
            vec![],
        ));
        replaced.insert(c.name.clone());
    }
    for (n, slot, name) in rename {
        graph.node[n].input[slot] = name;
    }

    // Activations: Q -> DQ right after the producer; every consumer reads the dequantized value.
    let qdq = |name: &str| -> [NodeProto; 2] {
        let (s, z) = (format!("{name}_s"), format!("{name}_zp"));
        [
            node(
                "QuantizeLinear",
                format!("{name}_Q"),
                vec![name.into(), s.clone(), z.clone()],
                format!("{name}_q"),
                vec![],
            ),
            node(
                "DequantizeLinear",
                format!("{name}_DQ"),
                vec![format!("{name}_q"), s, z],
                format!("{name}_dq"),
                vec![],
            ),
        ]
    };
    for n in graph.node.iter_mut() {
        for input in n.input.iter_mut() {
            if act.contains_key(input.as_str()) {
                *input = format!("{input}_dq");
            }
        }
    }
    let mut nodes = prologue;
    let produced: HashSet<String> = graph.node.iter().flat_map(|n| n.output.clone()).collect();
    for name in act.keys().filter(|n| !produced.contains(*n)) {
        nodes.extend(qdq(name)); // graph inputs
    }
    for n in std::mem::take(&mut graph.node) {
        let outs = n.output.clone();
        nodes.push(n);
        for o in outs.iter().filter(|o| act.contains_key(o.as_str())) {
            nodes.extend(qdq(o));
        }
    }
    graph.node = nodes;

    // Drop float weights no float node reads any more, then add the quantized ones.
    let still_read: HashSet<String> = graph.node.iter().flat_map(|n| n.input.clone()).collect();
    graph.initializer.retain(|t| {
        t.name
            .as_ref()
            .is_none_or(|n| !replaced.contains(n) || still_read.contains(n))
    });
    graph.initializer.extend(new_inits);
    Ok(out)
}
