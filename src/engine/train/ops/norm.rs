//! BatchNormalization (running statistics in eval mode, batch statistics in train mode) and
//! LayerNormalization, composed so that gradients flow.
use super::attrs::{attr_f, attr_i, axis, input, optional};
use super::channel::{channel_add, channel_mul, channel_sum};
use super::Ctx;
use super::Mode;
use crate::engine::onnx::proto::NodeProto;
use candle_core::{Result, Tensor};

pub(super) fn batch_norm(n: &NodeProto, inputs: &[Option<Tensor>], ctx: &Ctx) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    let (scale, bias) = (input(inputs, 1)?, input(inputs, 2)?);
    let (mean, var) = (input(inputs, 3)?, input(inputs, 4)?);
    let eps = attr_f(n, "epsilon", 1e-5) as f64;
    let (mean, var) = if ctx.mode == Mode::Train && !ctx.frozen_batch_norm {
        let count = (x.elem_count() / x.dim(1)?.max(1)) as f64;
        let m = (channel_sum(x)? / count)?;
        let centred = channel_add(x, &m.neg()?)?;
        let v = (channel_sum(&centred.sqr()?)? / count)?;
        let momentum = attr_f(n, "momentum", 0.9) as f64;
        let mut running = ctx.running.lock().expect("running statistics lock");
        for (name, batch) in [(&n.input[3], &m), (&n.input[4], &v)] {
            if let Some(r) = running.get_mut(name) {
                let b = batch.detach().flatten_all()?;
                *r = ((&*r * momentum)? + (b * (1.0 - momentum))?)?;
            }
        }
        drop(running);
        let inv = (v + eps)?.sqrt()?.recip()?;
        let scaled = channel_mul(&centred, &(inv * scale.flatten_all()?)?)?;
        return channel_add(&scaled, &bias.flatten_all()?);
    } else {
        (mean.flatten_all()?, var.flatten_all()?)
    };
    // y = x·(γ/σ) + (β − μ·γ/σ)
    let k = ((var + eps)?.sqrt()?.recip()? * scale.flatten_all()?)?;
    let shift = (bias.flatten_all()? - (mean * &k)?)?;
    channel_add(&channel_mul(x, &k)?, &shift)
}

pub(super) fn layer_norm(n: &NodeProto, inputs: &[Option<Tensor>]) -> Result<Tensor> {
    let x = input(inputs, 0)?;
    let from = axis(attr_i(n, "axis", -1), x.rank())?;
    let dims: Vec<usize> = (from..x.rank()).collect();
    let eps = attr_f(n, "epsilon", 1e-5) as f64;
    let centred = x.broadcast_sub(&x.mean_keepdim(dims.clone())?)?;
    let var = centred.sqr()?.mean_keepdim(dims)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    y = y.broadcast_mul(input(inputs, 1)?)?;
    if let Some(b) = optional(inputs, 2) {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}
