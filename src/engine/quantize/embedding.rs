//! Embedding tables as int8 rows: one scale per row, dequantized after the lookup, so only the
//! looked-up rows are ever converted (a 30k-row vocabulary shrinks 4x and costs nothing per run).
use super::layers::Embedding;
use super::params::{quantize_weights_per_channel, quantize_weights_per_tensor};
use crate::engine::onnx::proto::{NodeProto, TensorProto};
use crate::engine::onnx::rewrite::{int_attr, node, Rewrite};
use crate::engine::onnx::tensor::{f32_le, i8_tensor_owned};
use std::collections::HashMap;

/// Quantized tables already written, by table name (tables shared by several lookups stay shared).
pub type Tables = HashMap<String, (String, String)>;

/// The table of `e` in int8: its scales (one per row, or one) and values.
pub fn quantize_table(table: &TensorProto, e: &Embedding, per_row: bool) -> (Vec<f32>, Vec<i8>) {
    let values = f32_le(table).expect("embedding tables are float");
    if per_row {
        quantize_weights_per_channel(&values, &[e.rows, e.width], 0)
    } else {
        let (s, q) = quantize_weights_per_tensor(&values);
        (vec![s], q)
    }
}

/// Replaces the lookup `e` by Gather(int8 rows) times the table's scale, or with `per_row` the
/// rows' own scales (gathered with them).
pub fn quantize_lookup(
    rw: &mut Rewrite,
    tables: &mut Tables,
    e: &Embedding,
    table: &TensorProto,
    per_row: bool,
    quantized: Option<(Vec<f32>, Vec<i8>)>,
) {
    let (qname, sname) = tables
        .entry(e.table.clone())
        .or_insert_with(|| {
            let (scales, q) = quantized.unwrap_or_else(|| quantize_table(table, e, per_row));
            let sdims = if per_row { vec![e.rows, 1] } else { vec![] };
            let (qname, sname) = (
                format!("{}_q", e.table),
                format!("{}_{}", e.table, if per_row { "rs" } else { "s" }),
            );
            rw.init(i8_tensor_owned(&qname, &[e.rows, e.width], q));
            rw.scales(&sname, &sdims, &scales, e.node);
            rw.replaced(&e.table);
            (qname, sname)
        })
        .clone();
    let p = &e.output;
    let mut nodes: Vec<NodeProto> = vec![
        node(
            "Gather",
            format!("{}_q", e.name),
            vec![qname, e.ids.clone()],
            format!("{p}_i8"),
            vec![int_attr("axis", 0)],
        ),
        node(
            "Cast",
            format!("{}_Cast", e.name),
            vec![format!("{p}_i8")],
            format!("{p}_f"),
            vec![int_attr("to", 1)],
        ),
    ];
    // One scale per table multiplies directly; row scales are looked up with the rows.
    let scale = if per_row {
        nodes.push(node(
            "Gather",
            format!("{}_rs", e.name),
            vec![sname, e.ids.clone()],
            format!("{p}_rs"),
            vec![int_attr("axis", 0)],
        ));
        format!("{p}_rs")
    } else {
        sname
    };
    nodes.push(node(
        "Mul",
        format!("{}_Mul", e.name),
        vec![format!("{p}_f"), scale],
        p.clone(),
        vec![],
    ));
    rw.instead(e.node, nodes);
}

/// Quantizes every embedding lookup of `model` not in `exclude` (the pass static QDQ runs after
/// its rewrite; QDQ has no int8 form of a lookup that saves memory).
pub fn quantize_tables(
    model: &crate::engine::onnx::proto::ModelProto,
    exclude: &[String],
    per_row: bool,
) -> (
    crate::engine::onnx::proto::ModelProto,
    Vec<super::LayerDecision>,
) {
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let inits = crate::engine::onnx::rewrite::initializers(graph);
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
        quantize_lookup(
            &mut rw,
            &mut tables,
            &e,
            inits[e.table.as_str()],
            per_row,
            None,
        );
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
