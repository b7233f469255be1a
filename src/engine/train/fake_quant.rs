//! Fake quantization for quantization-aware training: the forward pass sees every quantized
//! tensor exactly as the exported QDQ model will hold it (values computed by the same code that
//! writes the int8 model, rounding half to even as ONNX Runtime does), while gradients pass
//! straight through the rounding (the straight-through estimator). Activations are clipped to
//! their quantized range, and no gradient flows from beyond it.
use super::candle_error;
use super::graph::{Mode, ValueHook};
use super::ops::contiguous_f32;
use crate::engine::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// Maps a tensor's float values to the float values its quantize -> dequantize round trip gives.
pub type RoundTrip = Arc<dyn Fn(&[f32]) -> Vec<f32> + Send + Sync>;

/// How one named tensor is fake-quantized.
#[derive(Clone)]
pub enum FakeQuantSpec {
    /// An activation with a fixed scale and zero point, saturating at `qmin..=qmax`.
    Activation {
        scale: f32,
        zero_point: i32,
        qmin: i32,
        qmax: i32,
    },
    /// A weight or constant whose quantization parameters follow its current values (weight
    /// scales are recomputed from the weights at every step, as the export will).
    Values(RoundTrip),
}

impl FakeQuantSpec {
    /// The float range an activation keeps; gradients outside it are zero.
    fn clip_range(&self) -> Option<(f32, f32)> {
        match self {
            FakeQuantSpec::Activation {
                scale,
                zero_point,
                qmin,
                qmax,
            } => Some((
                (qmin - zero_point) as f32 * scale,
                (qmax - zero_point) as f32 * scale,
            )),
            FakeQuantSpec::Values(_) => None,
        }
    }

    fn round_trip(&self, values: &[f32]) -> Vec<f32> {
        match self {
            FakeQuantSpec::Activation {
                scale,
                zero_point,
                qmin,
                qmax,
            } => values
                .iter()
                .map(|&x| {
                    // Half to even, as ONNX Runtime's QuantizeLinear rounds.
                    let q = ((x / scale).round_ties_even() as i32 + zero_point).clamp(*qmin, *qmax);
                    (q - zero_point) as f32 * scale
                })
                .collect(),
            FakeQuantSpec::Values(f) => f(values),
        }
    }
}

/// The fake quantization of a whole model: tensor name -> how it is quantized.
#[derive(Clone, Default)]
pub struct FakeQuant {
    specs: HashMap<String, FakeQuantSpec>,
}

impl FakeQuant {
    pub fn new(specs: HashMap<String, FakeQuantSpec>) -> Self {
        Self { specs }
    }

    /// How many tensors are fake-quantized.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// `value` as the quantized model computes it, with a straight-through gradient: one custom
    /// op whose forward pass writes the round trip in one pass over the values and whose
    /// backward pass lets the gradient through inside the clip range (the training graph keeps
    /// one tensor per fake-quantized value, not the five a composition of tensor ops keeps).
    fn fake_quantize(&self, spec: &FakeQuantSpec, value: Tensor) -> candle_core::Result<Tensor> {
        value.contiguous()?.apply_op1(RoundTripOp(spec.clone()))
    }
}

/// The forward pass of [`FakeQuant`]: the exact quantize -> dequantize values.
struct RoundTripOp(FakeQuantSpec);

impl candle_core::CustomOp1 for RoundTripOp {
    fn name(&self) -> &'static str {
        "fake-quantize"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let values = contiguous_f32(storage, layout, self.name())?;
        let out = self.0.round_trip(values);
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match self.0.clip_range() {
            Some(range) => grad
                .contiguous()?
                .apply_op2_no_bwd(&arg.contiguous()?, &PassInside(range))
                .map(Some),
            None => Ok(Some(grad.clone())),
        }
    }
}

/// The straight-through gradient of an activation: `grad` where the input lay inside the clip
/// range (bounds included), zero beyond it.
struct PassInside((f32, f32));

impl candle_core::CustomOp2 for PassInside {
    fn name(&self) -> &'static str {
        "fake-quantize-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &candle_core::CpuStorage,
        grad_layout: &candle_core::Layout,
        arg: &candle_core::CpuStorage,
        arg_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (lo, hi) = self.0;
        let g = contiguous_f32(grad, grad_layout, self.name())?;
        let x = contiguous_f32(arg, arg_layout, self.name())?;
        if g.len() != x.len() {
            candle_core::bail!("{}: gradient and input differ in size", self.name());
        }
        let out = g
            .iter()
            .zip(x)
            .map(|(&g, &x)| if (lo..=hi).contains(&x) { g } else { 0.0 })
            .collect();
        Ok((
            candle_core::CpuStorage::F32(out),
            grad_layout.shape().clone(),
        ))
    }
}

impl ValueHook for FakeQuant {
    fn apply(&self, name: &str, value: Tensor, _mode: Mode) -> Result<Tensor> {
        match self.specs.get(name) {
            Some(spec) => self
                .fake_quantize(spec, value)
                .map_err(|e| candle_error(&format!("fake quantization of `{name}`"), e)),
            None => Ok(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn activation() -> FakeQuantSpec {
        FakeQuantSpec::Activation {
            scale: 0.5,
            zero_point: 2,
            qmin: 0,
            qmax: 10,
        }
    }

    #[test]
    fn activations_round_half_to_even_and_saturate_like_quantize_linear() {
        let fq = FakeQuant::new(HashMap::from([("x".to_string(), activation())]));
        // Range: (0 - 2) * 0.5 = -1 .. (10 - 2) * 0.5 = 4.
        let x = Tensor::new(&[0.25f32, 0.75, 1.1, -3.0, 9.0], &Device::Cpu).unwrap();
        let y = fq.apply("x", x, Mode::Train).unwrap();
        assert_eq!(
            y.to_vec1::<f32>().unwrap(),
            vec![0.0, 1.0, 1.0, -1.0, 4.0],
            "0.25/0.5 = 0.5 rounds to 0 and 0.75/0.5 = 1.5 to 2 (ties to even)"
        );
    }

    #[test]
    fn gradients_pass_straight_through_inside_the_range_and_stop_outside() {
        let fq = FakeQuant::new(HashMap::from([("x".to_string(), activation())]));
        let x = Var::new(&[0.3f32, 2.2, -3.0, 9.0], &Device::Cpu).unwrap();
        let y = fq.apply("x", x.as_tensor().clone(), Mode::Train).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn strided_inputs_and_range_bounds_follow_the_same_rules() {
        let fq = FakeQuant::new(HashMap::from([("x".to_string(), activation())]));
        // A transposed (non-contiguous) view: [[-1, 4], [5, 0.3]] read column by column.
        let x = Var::new(&[[-1.0f32, 5.0], [4.0, 0.3]], &Device::Cpu).unwrap();
        let y = fq
            .apply("x", x.as_tensor().t().unwrap(), Mode::Train)
            .unwrap();
        assert_eq!(
            y.to_vec2::<f32>().unwrap(),
            vec![vec![-1.0, 4.0], vec![4.0, 0.5]]
        );
        // Weighted so that each input's gradient is told apart; the bounds themselves pass.
        let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![1.0, 0.0], vec![2.0, 4.0]]);
    }

    #[test]
    fn values_use_their_round_trip_and_unknown_names_pass_unchanged() {
        let halve: RoundTrip =
            Arc::new(|v: &[f32]| v.iter().map(|x| (x * 2.0).round() / 2.0).collect());
        let fq = FakeQuant::new(HashMap::from([(
            "w".to_string(),
            FakeQuantSpec::Values(halve),
        )]));
        let w = Var::new(&[0.3f32, 1.2], &Device::Cpu).unwrap();
        let y = fq.apply("w", w.as_tensor().clone(), Mode::Eval).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.5, 1.0]);
        let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 3.0]
        );
        let other = Tensor::new(&[0.3f32], &Device::Cpu).unwrap();
        let same = fq.apply("b", other, Mode::Eval).unwrap();
        assert_eq!(same.to_vec1::<f32>().unwrap(), vec![0.3]);
    }
}
