//! Prediction units: training reads every output as rows of class scores, one row per sample
//! (classification `[B, C]`), per pixel (segmentation `[B, C, H, W]`) or per position (sequence
//! `[B, T, C]`), so that one cross-entropy, one KL term and one validation metric serve them all.
//! A single-channel map `[B, 1, H, W]` is a binary segmentation: its logit `z` becomes the two
//! class scores `[0, z]`, whose softmax is `[1 − σ(z), σ(z)]` (cross-entropy on it is the BCE).
use crate::domain::task::TaskKind;
use crate::engine::task::IGNORE_LABEL;
use candle_core::{DType, Result, Tensor};

/// The task an output of these dimensions serves in training.
pub fn task_of(dims: &[usize]) -> TaskKind {
    match dims {
        [_, _, h, w] if h * w > 1 => TaskKind::Segmentation,
        [_, t, _] if *t > 1 => TaskKind::Sequence,
        _ => TaskKind::Classification,
    }
}

/// Class scores `[units, C]` (class axis last) of an output.
pub fn unit_logits(t: &Tensor) -> Result<Tensor> {
    match (task_of(t.dims()), t.dims()) {
        (TaskKind::Segmentation, &[_, c, _, _]) => {
            let rows = t.permute((0, 2, 3, 1))?.contiguous()?.reshape(((), c))?;
            if c == 1 {
                Tensor::cat(&[rows.zeros_like()?, rows], 1)
            } else {
                Ok(rows)
            }
        }
        (TaskKind::Sequence, &[_, _, c]) => t.contiguous()?.reshape(((), c)),
        (_, dims) if dims.len() > 2 => t.flatten_from(1),
        _ => Ok(t.clone()),
    }
}

/// Labels one per unit (`[B]`, `[B, H, W]` or `[B, T]` flattened) and a mask of the units that
/// count: negative labels never do, 255 does not for segmentation. Ignored units get class 0.
pub fn unit_labels(labels: &Tensor, task: TaskKind) -> Result<(Tensor, Tensor)> {
    let flat = labels.flatten_all()?.to_dtype(DType::I64)?;
    let values = flat.to_vec1::<i64>()?;
    let keep: Vec<f32> = values
        .iter()
        .map(|&l| (l >= 0 && !(task == TaskKind::Segmentation && l == IGNORE_LABEL)) as u8 as f32)
        .collect();
    let cleaned: Vec<i64> = values
        .iter()
        .zip(&keep)
        .map(|(&l, &k)| if k > 0.0 { l } else { 0 })
        .collect();
    let n = cleaned.len();
    Ok((
        Tensor::from_vec(cleaned, n, labels.device())?,
        Tensor::from_vec(keep, n, labels.device())?,
    ))
}

/// How predictions score against targets while training picks its epoch: mean IoU for
/// segmentation, else the share of counted units predicted right.
pub fn score(predicted: &[i64], target: &[i64], task: TaskKind) -> f64 {
    let counted = |t: i64| t >= 0 && !(task == TaskKind::Segmentation && t == IGNORE_LABEL);
    if task != TaskKind::Segmentation {
        let (mut right, mut total) = (0usize, 0usize);
        for (&p, &t) in predicted.iter().zip(target) {
            if counted(t) {
                total += 1;
                right += (p == t) as usize;
            }
        }
        return right as f64 / total.max(1) as f64;
    }
    let k = predicted
        .iter()
        .chain(target.iter().filter(|&&t| counted(t)))
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as usize
        + 1;
    let (mut tp, mut fp, mut fn_) = (vec![0u64; k], vec![0u64; k], vec![0u64; k]);
    for (&p, &t) in predicted.iter().zip(target) {
        if !counted(t) {
            continue;
        }
        let (p, t) = (p as usize, t as usize);
        if p == t {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let ious: Vec<f64> = (0..k)
        .filter(|&c| tp[c] + fp[c] + fn_[c] > 0)
        .map(|c| tp[c] as f64 / (tp[c] + fp[c] + fn_[c]) as f64)
        .collect();
    ious.iter().sum::<f64>() / ious.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_segmentation_map_becomes_one_row_per_pixel_and_a_probability_map_two_classes() {
        // [1, 2, 1, 2]: channel 0 = [1, 2], channel 1 = [3, 4] -> rows [1, 3], [2, 4].
        let t = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 2, 1, 2), &Device::Cpu).unwrap();
        let rows = unit_logits(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, vec![vec![1., 3.], vec![2., 4.]]);
        let single = Tensor::from_vec(vec![0.5f32, -1.0], (1, 1, 1, 2), &Device::Cpu).unwrap();
        let rows = unit_logits(&single).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, vec![vec![0., 0.5], vec![0., -1.0]]);
    }

    #[test]
    fn ignored_pixels_leave_the_mask_and_mean_iou_skips_them() {
        let l = Tensor::from_vec(vec![1i64, 255, -1, 0], (1, 2, 2), &Device::Cpu).unwrap();
        let (labels, mask) = unit_labels(&l, TaskKind::Segmentation).unwrap();
        assert_eq!(labels.to_vec1::<i64>().unwrap(), vec![1, 0, 0, 0]);
        assert_eq!(mask.to_vec1::<f32>().unwrap(), vec![1., 0., 0., 1.]);
        // Pixels 0 and 3 count: both right -> mean IoU 1.
        assert_eq!(
            score(&[1, 0, 1, 0], &[1, 255, -1, 0], TaskKind::Segmentation),
            1.0
        );
        assert_eq!(score(&[1, 1], &[1, 0], TaskKind::Segmentation), 0.25);
    }
}
