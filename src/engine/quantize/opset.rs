//! Opset upgrade to 13 (per-channel DequantizeLinear needs its `axis`). Rewrites the operators
//! whose signature changed between opsets 11 and 13, so outputs stay equal:
//! Split / Squeeze / Unsqueeze / ReduceSum take their axes (or split sizes) as inputs instead of
//! attributes; Softmax / LogSoftmax / Hardmax no longer flatten to 2-D, so a Flatten before and a
//! Reshape back keep the old meaning; Dropout's ratio became an input in 12 (ignored at inference).
use crate::engine::onnx::proto::{AttributeProto, ModelProto, NodeProto};
use crate::engine::onnx::rewrite::{attr_i, int_attr, node, Rewrite};
use crate::engine::onnx::tensor::i64_tensor;
use crate::engine::{EngineError, Result};

fn ints_attr(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .map(|a| a.ints.clone())
}

fn without(attrs: &[AttributeProto], name: &str) -> Vec<AttributeProto> {
    attrs
        .iter()
        .filter(|a| a.name.as_deref() != Some(name))
        .cloned()
        .collect()
}

/// Upgrades an opset 11 or 12 model to 13 in place; returns false when it is already 13+.
pub fn upgrade_to_13(model: &mut ModelProto) -> Result<bool> {
    let opset = crate::engine::onnx::rewrite::default_opset(model);
    if opset >= 13 {
        return Ok(false);
    }
    if opset < 11 {
        return Err(EngineError::InvalidModel(format!(
            "opset {opset} is older than 11; upgrade it to 13 for per-channel quantization"
        )));
    }
    let graph = model.graph.as_ref().expect("loaded models have a graph");
    let mut rw = Rewrite::default();
    for (i, n) in graph.node.iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or("");
        if n.domain
            .as_deref()
            .is_some_and(|d| !d.is_empty() && d != "ai.onnx")
        {
            continue;
        }
        let name = n
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{op}_{i}"));
        match op {
            "Split" | "Squeeze" | "Unsqueeze" | "ReduceSum" => {
                let key = if op == "Split" { "split" } else { "axes" };
                let Some(values) = ints_attr(n, key) else {
                    continue; // absent: the defaults are the same in 13
                };
                let mut new = n.clone();
                new.attribute = without(&n.attribute, key);
                let c = format!("{name}_{key}_opset13");
                rw.init(i64_tensor(&c, &values));
                new.input.truncate(1);
                new.input.push(c);
                rw.instead(i, vec![new]);
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let axis = attr_i(n, "axis").unwrap_or(1);
                // 2-D coercion at `axis`, softmax over the flattened tail, then the shape back.
                let x = &n.input[0];
                let y = &n.output[0];
                let mut inner = n.clone();
                inner.attribute = vec![int_attr("axis", 1)];
                inner.input = vec![format!("{y}_flat")];
                inner.output = vec![format!("{y}_flat_out")];
                rw.instead(
                    i,
                    vec![
                        node(
                            "Shape",
                            format!("{name}_shape"),
                            vec![x.clone()],
                            format!("{y}_shape"),
                            vec![],
                        ),
                        node(
                            "Flatten",
                            format!("{name}_flatten"),
                            vec![x.clone()],
                            format!("{y}_flat"),
                            vec![int_attr("axis", axis)],
                        ),
                        inner,
                        node(
                            "Reshape",
                            format!("{name}_reshape"),
                            vec![format!("{y}_flat_out"), format!("{y}_shape")],
                            y.clone(),
                            vec![],
                        ),
                    ],
                );
            }
            "Dropout" if opset < 12 => {
                let mut new = n.clone();
                new.attribute = without(&n.attribute, "ratio");
                rw.instead(i, vec![new]);
            }
            _ => {}
        }
    }
    rw.apply(model);
    for o in model.opset_import.iter_mut() {
        if o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx") {
            o.version = Some(13);
        }
    }
    Ok(true)
}
