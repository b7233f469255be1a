//! Zero masks, and holding them through training: the forward pass reads every masked weight
//! multiplied by its mask, so pruned weights contribute nothing and receive no gradient (AdamW
//! then leaves a zero weight at zero), and the export is masked once more to be exact.
use crate::engine::onnx::proto::ModelProto;
use crate::engine::train::{candle_error, Mode, ValueHook};
use crate::engine::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// Weight name -> which elements stay (row-major, the initializer's layout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Masks(pub BTreeMap<String, Vec<bool>>);

impl Masks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Zeroes every masked-out weight of `model`.
    pub fn apply(&self, model: &mut ModelProto) {
        for (name, keep) in &self.0 {
            let mut values = super::values_of(model, name);
            if values.len() != keep.len() {
                continue;
            }
            for (v, k) in values.iter_mut().zip(keep) {
                if !k {
                    *v = 0.0;
                }
            }
            super::set_values(model, name, &values);
        }
    }

    /// The zero patterns already in `model`'s prunable weights, for those at least `min_share`
    /// zero (a dense trained weight has almost no exact zeros; a pruned one has many).
    pub fn of_zeros(model: &ModelProto, min_share: f64) -> Masks {
        let mut out = BTreeMap::new();
        for w in super::prunable_weights(model) {
            let values = super::values_of(model, &w.weight);
            let zeros = values.iter().filter(|v| **v == 0.0).count();
            if !values.is_empty() && zeros as f64 >= min_share * values.len() as f64 {
                out.insert(w.weight, values.iter().map(|v| *v != 0.0).collect());
            }
        }
        Masks(out)
    }

    /// The hook training needs to hold these masks (none when there are none).
    pub fn training_hook(&self) -> Result<Option<std::sync::Arc<dyn ValueHook>>> {
        if self.is_empty() {
            return Ok(None);
        }
        Ok(Some(std::sync::Arc::new(self.hook()?)))
    }

    /// A training hook that holds these masks.
    pub fn hook(&self) -> Result<MaskHook> {
        let mut masks = BTreeMap::new();
        for (name, keep) in &self.0 {
            let values: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let t = Tensor::from_vec(values, keep.len(), &candle_core::Device::Cpu)
                .map_err(|e| candle_error("mask", e))?;
            masks.insert(name.clone(), t);
        }
        Ok(MaskHook { masks })
    }
}

/// Multiplies masked weights by their masks as the forward pass reads them.
pub struct MaskHook {
    masks: BTreeMap<String, Tensor>,
}

impl ValueHook for MaskHook {
    fn apply(&self, name: &str, value: Tensor, _mode: Mode) -> Result<Tensor> {
        let Some(mask) = self.masks.get(name) else {
            return Ok(value);
        };
        if mask.elem_count() != value.elem_count() {
            return Ok(value);
        }
        mask.reshape(value.shape())
            .and_then(|m| m.to_dtype(value.dtype()))
            .and_then(|m| value.mul(&m))
            .map_err(|e| candle_error("mask", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_zeroes_masked_weights_and_their_gradients() {
        let masks = Masks(BTreeMap::from([(
            "w".to_string(),
            vec![true, false, true, false],
        )]));
        let hook = masks.hook().unwrap();
        let var =
            candle_core::Var::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &candle_core::Device::Cpu)
                .unwrap();
        let out = hook
            .apply("w", var.as_tensor().clone(), Mode::Train)
            .unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 0., 3., 0.]
        );
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 0., 1., 0.]
        );
        // Other names pass through.
        let other = hook
            .apply("b", var.as_tensor().clone(), Mode::Eval)
            .unwrap();
        assert_eq!(
            other.flatten_all().unwrap().to_vec1::<f32>().unwrap()[1],
            2.
        );
    }
}
