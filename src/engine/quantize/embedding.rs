//! Embedding tables as int8 rows: one scale per row, dequantized after the lookup, so only the
//! looked-up rows are ever converted (a 30k-row vocabulary shrinks 4x and costs nothing per run).
use super::layers::Embedding;
use super::params::quantize_weights_per_channel;
use super::rewrite::{int_attr, node, Rewrite};
use crate::engine::onnx::proto::{NodeProto, TensorProto};
use crate::engine::onnx::tensor::{f32_view, i8_tensor_owned};
use std::collections::HashMap;

/// Quantized tables already written, by table name (tables shared by several lookups stay shared).
pub type Tables = HashMap<String, (String, String)>;

/// Replaces the lookup `e` by Gather(int8 rows) and Gather(row scales), multiplied together.
pub fn quantize_lookup(rw: &mut Rewrite, tables: &mut Tables, e: &Embedding, table: &TensorProto) {
    let (qname, sname) = tables
        .entry(e.table.clone())
        .or_insert_with(|| {
            let values = f32_view(table).expect("embedding tables are float");
            let (scales, q) = quantize_weights_per_channel(&values, &[e.rows, e.width], 0);
            let (qname, sname) = (
                format!("{}_quantized", e.table),
                format!("{}_row_scale", e.table),
            );
            rw.init(i8_tensor_owned(&qname, &[e.rows, e.width], q));
            rw.scales(&sname, &[e.rows, 1], &scales, e.node);
            rw.replaced(&e.table);
            (qname, sname)
        })
        .clone();
    let p = &e.output;
    let nodes: Vec<NodeProto> = vec![
        node(
            "Gather",
            format!("{}_int8", e.name),
            vec![qname, e.ids.clone()],
            format!("{p}_int8"),
            vec![int_attr("axis", 0)],
        ),
        node(
            "Gather",
            format!("{}_scale", e.name),
            vec![sname, e.ids.clone()],
            format!("{p}_row_scale"),
            vec![int_attr("axis", 0)],
        ),
        node(
            "Cast",
            format!("{}_cast", e.name),
            vec![format!("{p}_int8")],
            format!("{p}_float"),
            vec![int_attr("to", 1)],
        ),
        node(
            "Mul",
            format!("{}_dequantize", e.name),
            vec![format!("{p}_float"), format!("{p}_row_scale")],
            p.clone(),
            vec![],
        ),
    ];
    rw.instead(e.node, nodes);
}

/// Quantizes every embedding lookup of `model` not in `exclude` (the pass static QDQ runs after
/// its rewrite; QDQ has no int8 form of a lookup that saves memory).
pub fn quantize_tables(
    model: &crate::engine::onnx::proto::ModelProto,
    exclude: &[String],
) -> (
    crate::engine::onnx::proto::ModelProto,
    Vec<super::LayerDecision>,
) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = super::rewrite::initializers(graph);
    let (mut rw, mut tables, mut decisions) = (Rewrite::default(), Tables::new(), Vec::new());
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type.as_deref() != Some("Gather") {
            continue;
        }
        let Ok(e) = super::layers::embedding(n, i, &inits) else {
            continue;
        };
        if exclude.contains(&e.name) {
            decisions.push(super::LayerDecision::new(
                &e.name,
                "Gather",
                "float",
                "excluded".into(),
            ));
            continue;
        }
        quantize_lookup(&mut rw, &mut tables, &e, inits[e.table.as_str()]);
        decisions.push(super::LayerDecision::new(
            &e.name,
            "Gather",
            "int8",
            "embedding rows in int8, dequantized after the lookup".into(),
        ));
    }
    let mut out = model.clone();
    rw.apply(&mut out);
    (out, decisions)
}
