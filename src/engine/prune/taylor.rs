//! Data-driven channel importance: the first-order Taylor estimate of how much the loss changes
//! when a channel is removed (Molchanov et al., "Importance Estimation for Neural Network
//! Pruning", 2019). Each channel group's tensor (see [`ChannelGroup::gate`]) is multiplied by a
//! gate of ones; the gradient of the loss by a channel's gate is Σ activation × gradient over
//! the batch and positions, and the channel's importance is the mean over batches of its square.
//! The loss is the cross-entropy on the training rows' labels, and on the model's own class
//! where a row has none.
use crate::engine::channels::ChannelGroup;
use crate::engine::dataset::{bind, Dataset};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::summarize;
use crate::engine::train::{self, candle_error, loss, units, Mode, TrainGraph, ValueHook};
use crate::engine::{Progress, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::sync::Arc;

/// Rows per gradient pass.
const BATCH: usize = 8;

/// One gate of ones per group tensor, broadcast along the axis that holds its channels.
struct Gates(HashMap<String, Var>);

impl ValueHook for Gates {
    fn apply(&self, name: &str, value: Tensor, _mode: Mode) -> Result<Tensor> {
        let Some(gate) = self.0.get(name) else {
            return Ok(value);
        };
        let ce = |e| candle_error("Taylor gate", e);
        let c = gate.dim(0).map_err(ce)?;
        let dims = value.dims();
        // Conv outputs [B, C, ...] and Gemm outputs [B, C] hold channels on axis 1; MatMul
        // outputs [B, T, C] on the last.
        let axis = if dims.len() == 3 && dims[2] == c {
            2
        } else {
            1
        };
        let mut shape = vec![1; dims.len()];
        shape[axis] = c;
        gate.as_tensor()
            .reshape(shape)
            .and_then(|g| value.broadcast_mul(&g))
            .map_err(ce)
    }
}

/// The Taylor importance of every channel of every group (by layer name), over the first `rows`
/// rows of `data`, through the classifier logits `logits`.
pub fn importance(
    model: &ModelProto,
    logits: &str,
    groups: &[ChannelGroup],
    data: &Dataset,
    rows: usize,
    progress: &dyn Progress,
) -> Result<HashMap<String, Vec<f32>>> {
    let ce = |e| candle_error("Taylor importance", e);
    let mut graph = TrainGraph::new(model, &[logits.to_string()])?;
    // One gate per group, on every tensor of its layers (joined layers share their group's).
    let mut gates: HashMap<String, Var> = HashMap::new();
    let mut by_gate: Vec<(String, Var)> = Vec::new();
    for g in groups {
        let gate = Var::ones(g.channels, DType::F32, graph.device()).map_err(ce)?;
        for name in g.gates() {
            gates.insert(name.to_string(), gate.clone());
        }
        by_gate.push((g.layer.clone(), gate));
    }
    graph.set_hook(Arc::new(Gates(gates)));
    let binding = bind(&summarize(model), &data.summary)?;
    let labels = train::distill::labels_of(data, model)?;
    let rows = rows.min(data.summary.samples as usize);
    let mut scores: HashMap<String, Vec<f32>> = groups
        .iter()
        .map(|g| (g.layer.clone(), vec![0f32; g.channels]))
        .collect();
    let mut batches = 0usize;
    let all: Vec<usize> = (0..rows).collect();
    for chunk in all.chunks(BATCH) {
        let feeds = train::feeds(data, &binding.inputs, chunk, graph.device())?;
        let out = graph.forward(&feeds, Mode::Eval)?.remove(0);
        let task = units::task_of(out.dims());
        let student = units::unit_logits(&out).map_err(ce)?;
        let own = student
            .detach()
            .argmax(1)
            .and_then(|t| t.to_dtype(DType::I64))
            .and_then(|t| t.to_vec1::<i64>())
            .map_err(ce)?;
        // The label where there is one, else the model's own class.
        let target: Vec<i64> = match &labels {
            Some(l) => {
                let idx = Tensor::from_vec(
                    chunk.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                    chunk.len(),
                    l.device(),
                )
                .map_err(ce)?;
                let (l, mask) =
                    units::unit_labels(&l.index_select(&idx, 0).map_err(ce)?, task).map_err(ce)?;
                let (l, mask) = (
                    l.to_vec1::<i64>().map_err(ce)?,
                    mask.to_vec1::<f32>().map_err(ce)?,
                );
                l.iter()
                    .zip(&mask)
                    .zip(&own)
                    .map(|((&l, &m), &o)| if m > 0.0 { l } else { o })
                    .collect()
            }
            None => own,
        };
        let n = target.len();
        let target = Tensor::from_vec(target, n, student.device()).map_err(ce)?;
        let loss = loss::cross_entropy(&student, &target).map_err(ce)?;
        let grads = loss.backward().map_err(ce)?;
        for (layer, gate) in &by_gate {
            if let Some(g) = grads.get(gate.as_tensor()) {
                let g = g.to_vec1::<f32>().map_err(ce)?;
                for (s, v) in scores
                    .get_mut(layer)
                    .expect("one per group")
                    .iter_mut()
                    .zip(g)
                {
                    *s += v * v;
                }
            }
        }
        batches += 1;
        progress.update(batches as f64 * BATCH as f64 / rows.max(1) as f64)?;
    }
    for s in scores.values_mut() {
        s.iter_mut().for_each(|v| *v /= batches.max(1) as f32);
    }
    Ok(scores)
}
