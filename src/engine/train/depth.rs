//! Depth students: a transformer encoder with some of its layers removed, the rest initialised
//! from the teacher (as DistilBERT keeps every other layer).
//!
//! Encoder layers are found from their LayerNormalization nodes: a post-LN encoder (BERT,
//! MiniLM) normalises after the attention block and after the feed-forward block, so with an
//! embedding LayerNormalization in front, layer k runs from the output of LayerNormalization
//! 2k to that of 2k + 2. Removing a layer feeds its input to whatever read its output.
use crate::engine::onnx::proto::ModelProto;
use crate::engine::{EngineError, Result};
use std::collections::HashSet;

/// (input, output) tensor of each encoder layer, in order.
pub fn encoder_layers(model: &ModelProto) -> Vec<(String, String)> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    let norms: Vec<&str> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("LayerNormalization"))
        .filter_map(|n| n.output.first().map(String::as_str))
        .collect();
    if norms.len() < 3 || norms.len() % 2 == 0 {
        return Vec::new();
    }
    (0..norms.len() / 2)
        .map(|k| (norms[2 * k].to_string(), norms[2 * k + 2].to_string()))
        .collect()
}

/// The model with only the encoder layers `keep` (indices into [`encoder_layers`]); nodes and
/// initializers nothing reads any more are removed.
pub fn keep_layers(model: &ModelProto, keep: &[usize]) -> Result<ModelProto> {
    let layers = encoder_layers(model);
    if layers.is_empty() {
        return Err(EngineError::InvalidOption {
            option: "student".into(),
            problem: "no transformer encoder layers found (post-LN LayerNormalization pairs)"
                .into(),
        });
    }
    if keep.is_empty() || keep.iter().any(|&k| k >= layers.len()) {
        return Err(EngineError::InvalidOption {
            option: "student".into(),
            problem: format!("layers to keep must be some of 0..{}", layers.len()),
        });
    }
    let mut out = model.clone();
    let graph = out.graph.as_mut().expect("layers came from a graph");
    // From the last layer back, so each removed layer's input is already final.
    for k in (0..layers.len()).rev().filter(|k| !keep.contains(k)) {
        let (input, output) = &layers[k];
        for n in graph.node.iter_mut() {
            for i in n.input.iter_mut().filter(|i| *i == output) {
                *i = input.clone();
            }
        }
        if graph
            .output
            .iter()
            .any(|o| o.name.as_deref() == Some(output))
        {
            // A graph output keeps its name: it becomes a copy of the layer's input.
            for n in graph.node.iter_mut() {
                for o in n.output.iter_mut().filter(|o| *o == output) {
                    *o = format!("{output}_dropped");
                }
            }
            graph.node.push(crate::engine::onnx::proto::NodeProto {
                op_type: Some("Identity".into()),
                input: vec![input.clone()],
                output: vec![output.clone()],
                name: Some(format!("{output}_skipped")),
                ..Default::default()
            });
        }
    }
    // Drop what no graph output needs any more.
    let mut live: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    let mut keep_node = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep_node[i] = true;
            live.extend(n.input.iter().cloned());
        }
    }
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        keep_node[i - 1]
    });
    graph
        .initializer
        .retain(|t| t.name.as_ref().is_some_and(|n| live.contains(n)));
    graph.value_info.clear();
    Ok(out)
}

/// Keeps every `every`-th encoder layer, starting with the first.
pub fn every_other(model: &ModelProto, every: usize) -> Result<(ModelProto, String)> {
    let n = encoder_layers(model).len();
    let keep: Vec<usize> = (0..n).step_by(every.max(1)).collect();
    let student = keep_layers(model, &keep)?;
    Ok((
        student,
        format!("kept encoder layers {keep:?} of {n} (initialised from the teacher's)"),
    ))
}
