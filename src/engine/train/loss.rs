//! Training losses, composed from candle ops that have backward passes.
use candle_core::{DType, Result, Tensor, D};

fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Mean cross-entropy of `logits` (batch x classes) against integer `labels` (batch).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let picked = log_softmax(logits)?.gather(&labels.to_dtype(DType::I64)?.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}

/// Mean cross-entropy of `logits` (units x classes) against `labels` (units) over the units
/// whose `mask` is 1 (ignored pixels and padding are 0); 0 when no unit counts.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let picked = log_softmax(logits)?
        .gather(&labels.to_dtype(DType::I64)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let counted = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    (picked * mask)?.sum_all()?.neg()? / counted
}

/// Hinton's distillation term: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over
/// the batch (the T² keeps its gradients on the scale of the hard-label term).
pub fn distillation_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = temperature;
    let log_s = log_softmax(&(student / t)?)?;
    let log_t = log_softmax(&(teacher.detach() / t)?)?;
    let kl = (log_t.exp()? * (log_t - log_s)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (t * t)
}

/// Mean squared error between two feature tensors of the same shape (intermediate-feature
/// distillation); the target carries no gradient.
pub fn feature_mse(student: &Tensor, target: &Tensor) -> Result<Tensor> {
    (student - target.detach())?.sqr()?.mean_all()
}
