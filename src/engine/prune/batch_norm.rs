//! BatchNormalization statistics re-estimated after pruning or narrowing: removing channels
//! shifts every later layer's input distribution, and the running mean and variance the model
//! was trained with no longer normalise it. One ONNX Runtime pass over the training rows per
//! BatchNormalization, in graph order, each measuring its input with the earlier ones already
//! re-estimated — no gradient step, no weight other than the statistics changes.
use crate::engine::dataset::Dataset;
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::tensor::{dims, f32_tensor, is_f32};
use crate::engine::onnx::LoadedModel;
use crate::engine::quantize::calibrate::Calibrator;
use crate::engine::runtime::Runtime;
use crate::engine::{Progress, Result, SubProgress};
use prost::Message;
use std::collections::HashMap;

/// What a re-estimation changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Reestimated {
    pub model: ModelProto,
    /// BatchNormalization nodes whose statistics were replaced.
    pub layers: usize,
    pub rows: usize,
}

/// Re-estimates every BatchNormalization's running mean and (biased) variance over the first
/// `rows` rows of `data`. None when the model has no BatchNormalization with its own float
/// statistics (statistics shared by several nodes are left alone).
pub fn reestimate(
    rt: &Runtime,
    model: &ModelProto,
    data: &Dataset,
    rows: usize,
    progress: &dyn Progress,
) -> Result<Option<Reestimated>> {
    let Some(graph) = model.graph.as_ref() else {
        return Ok(None);
    };
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    let stats: HashMap<&str, usize> = graph
        .initializer
        .iter()
        .filter(|t| is_f32(t) && dims(t).len() == 1)
        .filter_map(|t| Some((t.name.as_deref()?, dims(t)[0])))
        .collect();
    let nodes: Vec<(String, String, String, usize)> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("BatchNormalization") && n.input.len() == 5)
        .filter_map(|n| {
            let (mean, var) = (n.input[3].as_str(), n.input[4].as_str());
            let c = *stats.get(mean)?;
            (stats.get(var) == Some(&c) && readers[mean] == 1 && readers[var] == 1)
                .then(|| (n.input[0].clone(), mean.to_string(), var.to_string(), c))
        })
        .collect();
    if nodes.is_empty() {
        return Ok(None);
    }
    let mut current = model.clone();
    let (mut used, mut changed) = (0, 0);
    let step = 1.0 / nodes.len() as f64;
    for (k, (input, mean_name, var_name, channels)) in nodes.iter().enumerate() {
        let loaded = LoadedModel {
            bytes: current.encode_to_vec().into(),
            proto: current.clone(),
        };
        let names = [input.clone()];
        let mut calibrator = Calibrator::new(rt, &loaded, data, &names, rows)?;
        used = calibrator.rows();
        let (mut sum, mut squares, mut count) = (
            vec![0f64; *channels],
            vec![0f64; *channels],
            vec![0u64; *channels],
        );
        calibrator.visit(
            &SubProgress {
                parent: progress,
                start: step * k as f64,
                span: step,
            },
            |_, shape, values| {
                if shape.len() < 2 || shape[1] as usize != *channels {
                    return;
                }
                let inner: usize = shape[2..].iter().map(|d| *d as usize).product();
                if inner == 0 {
                    return;
                }
                for (i, chunk) in values.chunks(inner).enumerate() {
                    let c = i % channels;
                    for v in chunk {
                        let v = *v as f64;
                        sum[c] += v;
                        squares[c] += v * v;
                    }
                    count[c] += chunk.len() as u64;
                }
            },
        )?;
        if count.contains(&0) {
            continue;
        }
        let mean: Vec<f32> = sum
            .iter()
            .zip(&count)
            .map(|(s, n)| (s / *n as f64) as f32)
            .collect();
        let var: Vec<f32> = squares
            .iter()
            .zip(&sum)
            .zip(&count)
            .map(|((q, s), n)| {
                let m = s / *n as f64;
                (q / *n as f64 - m * m).max(0.0) as f32
            })
            .collect();
        changed += 1;
        let graph = current.graph.as_mut().expect("checked above");
        for init in graph.initializer.iter_mut() {
            match init.name.as_deref() {
                Some(n) if n == mean_name => *init = f32_tensor(n, &[*channels], &mean),
                Some(n) if n == var_name => *init = f32_tensor(n, &[*channels], &var),
                _ => {}
            }
        }
    }
    progress.update(1.0)?;
    Ok(Some(Reestimated {
        model: current,
        layers: changed,
        rows: used,
    }))
}
