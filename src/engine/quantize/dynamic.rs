//! Dynamic int8: weights int8 ahead of time, activations quantized at run time. Each MatMul (and
//! Gemm) becomes DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scales), the pattern ONNX
//! Runtime fuses into its DynamicQuantizeMatMul kernel. Convolutions stay float: ONNX Runtime runs
//! dynamic int8 convolutions several times slower than float ones.
use super::embedding::{quantize_lookup, Tables};
use super::layers::{candidate, embedding, linear, Candidate, Linear};
use super::params::{quantize_weights, QuantizedWeights};
use super::rewrite::{initializers, int_attr, node, Rewrite};
use super::LayerDecision;
use crate::engine::onnx::proto::{ModelProto, TensorProto};
use crate::engine::onnx::tensor::i8_tensor_owned;
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct DynamicOptions {
    pub per_channel: bool,
    /// With `per_channel`: one scale per tensor for layers whose channels have similar ranges.
    pub auto_granularity: bool,
    /// Operator types to quantize (MatMul, Gemm, Gather).
    pub op_types: Vec<String>,
    /// Node names to leave in float.
    pub exclude: Vec<String>,
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
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or("");
        let name = super::rewrite::layer_name(n, i);
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
                    quantize_lookup(&mut rw, &mut tables, &e, inits[e.table.as_str()]);
                    decide("int8", "embedding rows in int8, dequantized after the lookup".into());
                }
                Err(_) => continue, // index arithmetic, not an embedding: not a layer
            },
            _ => match linear(n, i, &inits) {
                Ok(l) => {
                    let w = inits[l.weight.as_str()];
                    let (q, s) = weights
                        .entry((l.weight.clone(), l.transposed))
                        .or_insert_with(|| store_weight(&mut rw, &l, w, opts, i))
                        .clone();
                    let x = quantized_inputs
                        .entry(l.input.clone())
                        .or_insert_with(|| {
                            let outs = ["quantized", "scale", "zero_point"]
                                .map(|s| format!("{}_dynamic_{s}", l.input));
                            let mut dql = node(
                                "DynamicQuantizeLinear",
                                format!("{}_DynamicQuantizeLinear", l.input),
                                vec![l.input.clone()],
                                outs[0].clone(),
                                vec![],
                            );
                            dql.output = outs.to_vec();
                            rw.before(i, dql);
                            outs
                        })
                        .clone();
                    emit_matmul_integer(&mut rw, &l, &x, &q, &s);
                    decide("int8", "int8 weights, activations quantized at run time".into());
                }
                Err(reason) => decide("float", reason),
            },
        }
    }
    let mut out = model.clone();
    rw.apply(&mut out);
    (out, decisions)
}

/// Stores W as int8 [K, N] with its scales (one per column, or one).
fn store_weight(
    rw: &mut Rewrite,
    l: &Linear,
    w: &TensorProto,
    opts: &DynamicOptions,
    at: usize,
) -> (String, String) {
    let kn = l.weight_kn(w);
    let QuantizedWeights {
        scales,
        values: q,
        per_channel,
    } = quantize_weights(&kn, &[l.k, l.n], 1, opts.per_channel, opts.auto_granularity);
    let suffix = if l.transposed { "_t" } else { "" };
    let (qname, sname) = (
        format!("{}{suffix}_quantized", l.weight),
        format!("{}{suffix}_scale", l.weight),
    );
    let sdims: Vec<usize> = if per_channel { vec![l.n] } else { vec![] };
    rw.init(i8_tensor_owned(&qname, &[l.k, l.n], q));
    rw.scales(&sname, &sdims, &scales, at);
    rw.replaced(&l.weight);
    (qname, sname)
}

fn emit_matmul_integer(rw: &mut Rewrite, l: &Linear, x: &[String; 3], q: &str, s: &str) {
    let y = &l.output;
    let product = if l.bias.is_some() {
        format!("{y}_unbiased")
    } else {
        y.clone()
    };
    let mut nodes = vec![
        node(
            "MatMulInteger",
            format!("{}_MatMulInteger", l.name),
            // Symmetric weights: B's zero point is 0, MatMulInteger's default, so none is stored.
            vec![x[0].clone(), q.into(), x[2].clone()],
            format!("{y}_int32"),
            vec![],
        ),
        node(
            "Cast",
            format!("{}_cast", l.name),
            vec![format!("{y}_int32")],
            format!("{y}_int32_float"),
            vec![int_attr("to", 1)],
        ),
        node(
            "Mul",
            format!("{}_scales", l.name),
            vec![x[1].clone(), s.into()],
            format!("{y}_scales"),
            vec![],
        ),
        node(
            "Mul",
            format!("{}_rescale", l.name),
            vec![format!("{y}_int32_float"), format!("{y}_scales")],
            product.clone(),
            vec![],
        ),
    ];
    if let Some(b) = &l.bias {
        nodes.push(node(
            "Add",
            format!("{}_bias", l.name),
            vec![product, b.clone()],
            y.clone(),
            vec![],
        ));
    }
    rw.instead(l.node, nodes);
}
