//! Dynamic int8: weights int8 ahead of time, activations quantized at run time. Each MatMul (and
//! Gemm) becomes DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scales), the pattern ONNX
//! Runtime fuses into its DynamicQuantizeMatMul kernel. Convolutions stay float: ONNX Runtime runs
//! dynamic int8 convolutions several times slower than float ones.
use super::embedding::{quantize_lookup, quantize_table, Tables};
use super::layers::{candidate, embedding, linear, Candidate, Embedding, Linear};
use super::params::{quantize_weights_bits, QuantizedWeights};
use super::LayerDecision;
use crate::engine::onnx::proto::{GraphProto, ModelProto, TensorProto};
use crate::engine::onnx::rewrite::{initializers, int_attr, node, Rewrite};
use crate::engine::onnx::tensor::{dims, f16_tensor, f32_le, f32_view, i8_tensor_owned};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct DynamicOptions {
    pub per_channel: bool,
    /// With `per_channel`: one scale per tensor for layers whose channels have similar ranges.
    pub auto_granularity: bool,
    /// Embedding tables with one scale per row (else one per table).
    pub tables_per_row: bool,
    /// Operator types to quantize (MatMul, Gemm, Gather).
    pub op_types: Vec<String>,
    /// Node names to leave in float.
    pub exclude: Vec<String>,
    /// Int8 weights in 7 bits ([-63, 63]) for CPUs whose uint8 x int8 kernels saturate
    /// ([`super::params::u8s8_saturates`]).
    pub reduce_range: bool,
}

/// Rewrites `model` for dynamic int8; returns the model and what happened to each candidate layer.
pub fn quantize_dynamic(
    model: &ModelProto,
    opts: &DynamicOptions,
) -> (ModelProto, Vec<LayerDecision>) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = initializers(graph);
    let mut rw = Rewrite::default();
    let mut decisions = Vec::new();
    let mut tables = Tables::new();
    // One DynamicQuantizeLinear per activation, shared by every layer that reads it (Q, K, V).
    let mut quantized_inputs: HashMap<String, [String; 3]> = HashMap::new();
    let mut weights: HashMap<(String, bool), (String, String)> = HashMap::new();
    let mut biases: HashMap<String, String> = HashMap::new();
    // Output of each int8 layer -> the layer.
    let mut int8_outputs: HashMap<String, String> = HashMap::new();
    let mut pre = precompute(graph, &inits, opts);
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or("");
        let name = crate::engine::onnx::rewrite::layer_name(n, i);
        let mut decide = |precision: &str, reason: String| {
            decisions.push(LayerDecision::new(&name, op, precision, reason));
        };
        match candidate(n, &name, &opts.op_types, &opts.exclude) {
            Candidate::Skip => continue,
            Candidate::Float(reason) => {
                decide("float", reason);
                continue;
            }
            Candidate::Take => {}
        }
        match op {
            "Conv" => decide(
                "float",
                "dynamic int8 convolutions run slower than float ones in ONNX Runtime; use mode static".into(),
            ),
            "Gather" => match embedding(n, i, &inits) {
                Ok(e) => {
                    let done = pre.tables.remove(&e.table);
                    let table = inits[e.table.as_str()];
                    quantize_lookup(&mut rw, &mut tables, &e, table, opts.tables_per_row, done);
                    decide("int8", "embedding rows in int8, dequantized after the lookup".into());
                }
                Err(_) => continue, // index arithmetic, not an embedding: not a layer
            },
            _ => match linear(n, i, &inits) {
                Ok(l) => {
                    let w = inits[l.weight.as_str()];
                    let (q, s) = weights
                        .entry((l.weight.clone(), l.transposed))
                        .or_insert_with(|| {
                            let done = pre.weights.remove(&(l.weight.clone(), l.transposed));
                            let qw = done.unwrap_or_else(|| quantize_linear(&l, w, opts));
                            store_weight(&mut rw, &l, qw, i)
                        })
                        .clone();
                    let x = quantized_inputs
                        .entry(l.input.clone())
                        .or_insert_with(|| {
                            let outs = ["q", "s", "zp"].map(|s| format!("{}_{s}", l.input));
                            let mut dql = node(
                                "DynamicQuantizeLinear",
                                format!("{}_DQL", l.input),
                                vec![l.input.clone()],
                                outs[0].clone(),
                                vec![],
                            );
                            dql.output = outs.to_vec();
                            rw.before(i, dql);
                            outs
                        })
                        .clone();
                    let bias = l.bias.as_ref().map(|b| {
                        biases
                            .entry(b.clone())
                            .or_insert_with(|| half_bias(&mut rw, b, &inits, i))
                            .clone()
                    });
                    let half = bias.is_some() && bias != l.bias;
                    emit_matmul_integer(&mut rw, &l, &x, &q, &s, bias);
                    int8_outputs.insert(l.output.clone(), name.clone());
                    decide("int8", reason(half));
                }
                Err(reason) => decide("float", reason),
            },
        }
    }
    // A bias added by a separate Add (MatMul + Add graphs) is the int8 layer's bias as well.
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type.as_deref() != Some("Add") || n.input.len() != 2 {
            continue;
        }
        let (slot, layer) = match (int8_outputs.get(&n.input[0]), int8_outputs.get(&n.input[1])) {
            (Some(d), None) => (1, d),
            (None, Some(d)) => (0, d),
            _ => continue,
        };
        let b = &n.input[slot];
        if !inits.contains_key(b.as_str()) {
            continue;
        }
        let full = biases
            .entry(b.clone())
            .or_insert_with(|| half_bias(&mut rw, b, &inits, i))
            .clone();
        if full != *b {
            let mut add = n.clone();
            add.input[slot] = full;
            rw.instead(i, vec![add]);
            for d in decisions.iter_mut().filter(|d| d.node == *layer) {
                d.reason = reason(true);
            }
        }
    }
    let mut out = model.clone();
    rw.apply(&mut out);
    (out, decisions)
}

/// W as int8 [K, N] with one scale per column, or one.
fn quantize_linear(l: &Linear, w: &TensorProto, opts: &DynamicOptions) -> QuantizedWeights {
    let shape = [l.k, l.n];
    let (per_channel, auto, seven) = (opts.per_channel, opts.auto_granularity, opts.reduce_range);
    if l.transposed {
        let kn = l.weight_kn(w);
        return quantize_weights_bits(&kn, &shape, 1, per_channel, auto, seven);
    }
    let kn = f32_le(w).expect("linear weights are float");
    quantize_weights_bits(&kn, &shape, 1, per_channel, auto, seven)
}

/// Weights and tables quantized ahead of the rewrite, on every core (the rewrite itself only
/// files the results).
#[derive(Default)]
struct Precomputed {
    weights: HashMap<(String, bool), QuantizedWeights>,
    tables: HashMap<String, (Vec<f32>, Vec<i8>)>,
}

enum Work<'a> {
    Weight(Linear, &'a TensorProto),
    Table(Embedding, &'a TensorProto),
}

fn precompute(
    graph: &GraphProto,
    inits: &HashMap<&str, &TensorProto>,
    opts: &DynamicOptions,
) -> Precomputed {
    let mut work = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, n) in graph.node.iter().enumerate() {
        let name = crate::engine::onnx::rewrite::layer_name(n, i);
        if !matches!(
            candidate(n, &name, &opts.op_types, &opts.exclude),
            Candidate::Take
        ) {
            continue;
        }
        match n.op_type.as_deref() {
            Some("Conv") => {}
            Some("Gather") => {
                if let Ok(e) = embedding(n, i, inits) {
                    if seen.insert((e.table.clone(), None)) {
                        let t = inits[e.table.as_str()];
                        work.push(Work::Table(e, t));
                    }
                }
            }
            _ => {
                if let Ok(l) = linear(n, i, inits) {
                    if seen.insert((l.weight.clone(), Some(l.transposed))) {
                        let t = inits[l.weight.as_str()];
                        work.push(Work::Weight(l, t));
                    }
                }
            }
        }
    }
    let size = |w: &Work| match w {
        Work::Weight(_, t) | Work::Table(_, t) => dims(t).iter().product::<usize>(),
    };
    work.sort_by_key(|w| std::cmp::Reverse(size(w)));
    let done = crate::engine::parallel::map(&work, |w| match w {
        Work::Weight(l, t) => (Some(quantize_linear(l, t, opts)), None),
        Work::Table(e, t) => (None, Some(quantize_table(t, e, opts.tables_per_row))),
    });
    let mut pre = Precomputed::default();
    for (w, d) in work.into_iter().zip(done) {
        match (w, d) {
            (Work::Weight(l, _), (Some(q), _)) => {
                pre.weights.insert((l.weight, l.transposed), q);
            }
            (Work::Table(e, _), (_, Some(t))) => {
                pre.tables.insert(e.table, t);
            }
            _ => unreachable!("each item gives its own kind"),
        }
    }
    pre
}

/// Stores W as int8 [K, N] with its scales (one per column, or one).
fn store_weight(rw: &mut Rewrite, l: &Linear, qw: QuantizedWeights, at: usize) -> (String, String) {
    let QuantizedWeights {
        scales,
        values: q,
        per_channel,
    } = qw;
    let suffix = if l.transposed { "_t" } else { "" };
    let (qname, sname) = (
        format!("{}{suffix}_q", l.weight),
        format!("{}{suffix}_s", l.weight),
    );
    let sdims: Vec<usize> = if per_channel { vec![l.n] } else { vec![] };
    rw.init(i8_tensor_owned(&qname, &[l.k, l.n], q));
    rw.scales(&sname, &sdims, &scales, at);
    rw.replaced(&l.weight);
    (qname, sname)
}

fn reason(half_bias: bool) -> String {
    if half_bias {
        "int8 weights (bias stored as float16), activations quantized at run time".into()
    } else {
        "int8 weights, activations quantized at run time".into()
    }
}

/// Fewer bias values than this are not worth a Cast node.
const HALF_BIAS_MIN: usize = 64;

/// The bias of an int8 layer stored as float16 behind a Cast that ONNX Runtime folds at load:
/// half the bytes, and its rounding (2^-11 of each value) is far below the int8 weights' own.
/// Returns the float32 tensor the Add reads (the bias itself when it stays float32).
fn half_bias(
    rw: &mut Rewrite,
    bias: &str,
    inits: &HashMap<&str, &TensorProto>,
    at: usize,
) -> String {
    let Some(values) = inits.get(bias).and_then(|t| f32_view(t)) else {
        return bias.to_string();
    };
    if values.len() < HALF_BIAS_MIN || values.iter().any(|v| v.is_nan() || v.abs() > 65504.0) {
        return bias.to_string();
    }
    let (half, full) = (format!("{bias}16"), format!("{bias}_f32"));
    rw.init(f16_tensor(&half, &dims(inits[bias]), &values));
    rw.before(
        at,
        node(
            "Cast",
            format!("{bias}_Cast"),
            vec![half],
            full.clone(),
            vec![int_attr("to", 1)],
        ),
    );
    rw.replaced(bias);
    full
}

fn emit_matmul_integer(
    rw: &mut Rewrite,
    l: &Linear,
    x: &[String; 3],
    q: &str,
    s: &str,
    bias: Option<String>,
) {
    let y = &l.output;
    let product = if bias.is_some() {
        format!("{y}_nb")
    } else {
        y.clone()
    };
    let mut nodes = vec![
        node(
            "MatMulInteger",
            format!("{}_MMI", l.name),
            // Symmetric weights: B's zero point is 0, MatMulInteger's default, so none is stored.
            vec![x[0].clone(), q.into(), x[2].clone()],
            format!("{y}_i32"),
            vec![],
        ),
        node(
            "Cast",
            format!("{}_Cast", l.name),
            vec![format!("{y}_i32")],
            format!("{y}_f"),
            vec![int_attr("to", 1)],
        ),
        node(
            "Mul",
            format!("{}_Mul_s", l.name),
            vec![x[1].clone(), s.into()],
            format!("{y}_s"),
            vec![],
        ),
        node(
            "Mul",
            format!("{}_Mul", l.name),
            vec![format!("{y}_f"), format!("{y}_s")],
            product.clone(),
            vec![],
        ),
    ];
    if let Some(b) = bias {
        nodes.push(node(
            "Add",
            format!("{}_Add", l.name),
            vec![product, b],
            y.clone(),
            vec![],
        ));
    }
    rw.instead(l.node, nodes);
}
