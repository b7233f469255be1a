//! Applying a channel group: which channels to keep, and slicing every tensor of the group to them.
use super::{channel_groups, ChannelGroup};
use crate::engine::onnx::proto::ModelProto;
use crate::engine::onnx::tensor::{dims, f32_tensor, f32_values};

pub use crate::domain::prune::PruneImportance as Importance;

/// How many of `total` to keep when removing `sparsity` of them, rounded up to `multiple_of`.
pub fn kept_count(total: usize, sparsity: f64, multiple_of: usize) -> usize {
    let keep = ((total as f64) * (1.0 - sparsity)).round().max(1.0) as usize;
    let m = multiple_of.max(1);
    keep.div_ceil(m).saturating_mul(m).clamp(1, total)
}

/// The `keep` highest-scoring indices, ascending.
pub fn top(scores: &[f32], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = order[..keep.min(scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// The norm of each slice along `axis` of a row-major tensor.
pub fn norms_along(values: &[f32], d: &[usize], axis: usize, importance: Importance) -> Vec<f32> {
    let inner: usize = d[axis + 1..].iter().product();
    let mut out = vec![0f32; d[axis]];
    for (i, v) in values.iter().enumerate() {
        let c = (i / inner) % d[axis];
        out[c] += match importance {
            Importance::L1 | Importance::Taylor => v.abs(),
            Importance::L2 => v * v,
        };
    }
    if importance == Importance::L2 {
        out.iter_mut().for_each(|x| *x = x.sqrt());
    }
    out
}

pub(crate) fn select_along(values: &[f32], d: &[usize], axis: usize, keep: &[usize]) -> Vec<f32> {
    let inner: usize = d[axis + 1..].iter().product();
    let outer: usize = d[..axis].iter().product();
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &c in keep {
            let start = (o * d[axis] + c) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    out
}

/// Keeps only the channels `keep` (ascending indices) of `group`.
pub fn keep_channels(model: &mut ModelProto, group: &ChannelGroup, keep: &[usize]) {
    let graph = model.graph.as_mut().expect("groups come from a graph");
    let initializers = &mut graph.initializer;
    // Keeps the indices `kept` along `axis` of initializer `name`, when that axis is `len` long.
    let mut slice = |name: &str, axis: usize, len: usize, kept: &[usize]| {
        let Some(t) = initializers
            .iter_mut()
            .find(|t| t.name.as_deref() == Some(name))
        else {
            return;
        };
        let mut d = dims(t);
        if d[axis] != len {
            return;
        }
        let values = select_along(&f32_values(t).unwrap_or_default(), &d, axis, kept);
        d[axis] = kept.len();
        *t = f32_tensor(name, &d, &values);
    };
    for (name, axis) in &group.slices {
        slice(name, *axis, group.channels, keep);
    }
    for (name, axis, offset, total) in &group.windows {
        // The group's window moves to its kept channels; the channels around it stay.
        let kept: Vec<usize> = (0..*offset)
            .chain(keep.iter().map(|&k| offset + k))
            .chain(offset + group.channels..*total)
            .collect();
        slice(name, *axis, *total, &kept);
    }
    for &i in &group.depthwise {
        for a in graph.node[i].attribute.iter_mut() {
            if a.name.as_deref() == Some("group") {
                a.i = Some(keep.len() as i64);
            }
        }
    }
    // Declared intermediate shapes no longer hold; they are optional.
    graph.value_info.clear();
}

/// Keeps `keep` of the channels of `layer`'s group in `model` as it is now: earlier changes to
/// other groups may have moved where its channels sit in a Concat, so the group is found again.
/// None when the layer forms no group (any more).
pub fn keep_layer_channels(
    model: &mut ModelProto,
    layer: &str,
    keep: &[usize],
) -> Option<ChannelGroup> {
    let group = channel_groups(model)
        .into_iter()
        .find(|g| g.layer == layer)?;
    keep_channels(model, &group, keep);
    Some(group)
}

/// The `share` most important channels (by L1 norm) of a group, ascending.
pub fn most_important(group: &ChannelGroup, share: f64, multiple_of: usize) -> Vec<usize> {
    let count = kept_count(group.channels, 1.0 - share, multiple_of);
    let mut order: Vec<usize> = (0..group.channels).collect();
    order.sort_by(|&a, &b| group.importance[b].total_cmp(&group.importance[a]));
    let mut keep = order[..count].to_vec();
    keep.sort_unstable();
    keep
}
