//! Per-channel multiply and add on `[N, C, ...]` tensors (BatchNormalization, convolution biases,
//! depthwise kernels), with backward passes that reduce fast.
//!
//! candle's backward of a broadcast op sums the gradient over the broadcast axes with one
//! `sum_keepdim` over axes 0, 2 and 3 at once, which its CPU backend runs element by element with
//! a divide per axis, on one core: on a MobileNet-class CNN at 224x224 that was most of a
//! training step. Here the per-channel sums reduce the trailing axes first (contiguous, vectorised)
//! and then the batch axis of an `[N, C]` tensor.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Σ over every axis but 1: `[N, C, ...]` -> `[C]`.
pub(crate) fn channel_sum(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims();
    if dims.len() < 2 {
        bail!("a per-channel sum needs [N, C, ...], got {dims:?}")
    }
    let (n, c) = (dims[0], dims[1]);
    let rest: usize = dims[2..].iter().product();
    t.contiguous()?.reshape((n, c, rest))?.sum(2)?.sum(0)
}

#[derive(Clone, Copy)]
enum Kind {
    Mul,
    Add,
}

struct Channel(Kind);

impl CustomOp2 for Channel {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Mul => "channel-mul",
            Kind::Add => "channel-add",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32(s1, l1, self.name())?;
        let a = super::contiguous_f32(s2, l2, self.name())?;
        let dims = l1.shape().dims();
        let c = dims[1];
        if a.len() != c {
            bail!("{}: {} values for {c} channels", self.name(), a.len())
        }
        let inner: usize = dims[2..].iter().product::<usize>().max(1);
        let mut out = Vec::with_capacity(x.len());
        for (i, chunk) in x.chunks(inner).enumerate() {
            let v = a[i % c];
            match self.0 {
                Kind::Mul => out.extend(chunk.iter().map(|&x| x * v)),
                Kind::Add => out.extend(chunk.iter().map(|&x| x + v)),
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self.0 {
            Kind::Mul => (
                Some(channel_mul(grad, a)?),
                Some(channel_sum(&(grad * x)?)?.reshape(a.shape())?),
            ),
            Kind::Add => (
                Some(grad.clone()),
                Some(channel_sum(grad)?.reshape(a.shape())?),
            ),
        })
    }
}

fn apply(x: &Tensor, a: &Tensor, kind: Kind) -> Result<Tensor> {
    let c = a.elem_count();
    if x.rank() < 2 || x.dim(1)? != c || x.dtype() != DType::F32 || a.dtype() != DType::F32 {
        // Not the [N, C, ...] float32 case: plain broadcasting.
        let mut shape = vec![1; x.rank()];
        if x.rank() >= 2 {
            shape[1] = c;
        }
        let a = a.reshape(shape)?;
        return match kind {
            Kind::Mul => x.broadcast_mul(&a),
            Kind::Add => x.broadcast_add(&a),
        };
    }
    x.contiguous()?
        .apply_op2(&a.flatten_all()?.contiguous()?, Channel(kind))
}

/// `x[n, c, ...] · a[c]`.
pub(crate) fn channel_mul(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(x, a, Kind::Mul)
}

/// `x[n, c, ...] + a[c]`.
pub(crate) fn channel_add(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(x, a, Kind::Add)
}
