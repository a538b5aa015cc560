//! The optimizer half of every training step, written once for every trainer and every device:
//! the gradient's global norm, a refusal that changes nothing when it is not finite, clipping
//! (PyTorch's `clip_grad_norm_` rule), and one AdamW step. Where the parameters, gradients and
//! moments live is the [`UpdateTarget`]'s business: [`HostUpdate`] for the CPU trainers (MIM,
//! classification, segmentation, the dVAE), the device state for the GPU step.

use super::adamw::AdamW;
use super::clip::{clip_factor, global_norm, scale};
use crate::error::Result;

/// Why [`apply_update`] refused: the gradient's global norm, which is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteGradient(pub f64);

/// The three moves of an optimizer step on the memory that holds the parameters, gradients and
/// optimizer state. Each is deterministic (fixed reduction order, no atomics).
pub trait UpdateTarget {
    /// The gradient's global L2 norm, accumulated in f64.
    fn grad_norm(&mut self) -> Result<f64>;
    /// Multiplies every gradient by `factor`.
    fn scale_grads(&mut self, factor: f32) -> Result<()>;
    /// One AdamW step at learning rate `lr` (times the target's per-element scales, if any).
    fn adamw_step(&mut self, lr: f32) -> Result<()>;
}

/// Clips the target's gradient to global norm `max_norm` (`None` does not clip) and applies one
/// AdamW step at `lr`. Returns the norm before clipping. A non-finite norm is refused (the
/// inner `Err`) before anything changes: neither the gradient nor the parameters nor the
/// optimizer state are touched. The outer `Err` is a failure of the memory itself (a device
/// error).
pub fn apply_update(
    target: &mut impl UpdateTarget,
    lr: f32,
    max_norm: Option<f64>,
) -> Result<std::result::Result<f64, NonFiniteGradient>> {
    let norm = target.grad_norm()?;
    if !norm.is_finite() {
        return Ok(Err(NonFiniteGradient(norm)));
    }
    if let Some(factor) = max_norm.and_then(|max_norm| clip_factor(norm, max_norm)) {
        target.scale_grads(factor)?;
    }
    target.adamw_step(lr)?;
    Ok(Ok(norm))
}

/// Parameters, gradients and AdamW state in host memory: the CPU trainers' [`UpdateTarget`].
pub struct HostUpdate<'a> {
    pub adamw: &'a mut AdamW,
    pub params: &'a mut [f32],
    pub grads: &'a mut [f32],
    /// Per-element learning-rate scales (layer-wise decay), or `None` for 1 everywhere.
    pub lr_scale: Option<&'a [f32]>,
}

impl UpdateTarget for HostUpdate<'_> {
    fn grad_norm(&mut self) -> Result<f64> {
        Ok(global_norm(self.grads))
    }

    fn scale_grads(&mut self, factor: f32) -> Result<()> {
        scale(self.grads, factor);
        Ok(())
    }

    fn adamw_step(&mut self, lr: f32) -> Result<()> {
        self.adamw.step(self.params, self.grads, lr, self.lr_scale);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::optimizer::AdamWConfig;

    #[test]
    fn clips_then_steps_and_refuses_non_finite_without_change() {
        let config = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
        let mut adamw = AdamW::with_mask(config, vec![0.0; 2], vec![(0, 2)]);
        let mut params = vec![1.0f32, 1.0];
        let mut grads = vec![3.0f32, 4.0];
        // Norm 5 clipped to 1: the gradient becomes (0.6, 0.8)/(1 + 2e-7); AdamW's first step
        // moves each parameter by lr·sign(g) (m̂/√v̂ = ±1, up to eps).
        let mut target = HostUpdate { adamw: &mut adamw, params: &mut params, grads: &mut grads, lr_scale: None };
        let norm = apply_update(&mut target, 0.1, Some(1.0)).unwrap().unwrap();
        assert_eq!(norm, 5.0);
        assert!((grads[0] - 0.6).abs() < 1e-6 && (grads[1] - 0.8).abs() < 1e-6, "{grads:?}");
        assert!((params[0] - 0.9).abs() < 1e-6 && (params[1] - 0.9).abs() < 1e-6, "{params:?}");
        assert_eq!(adamw.step, 1);

        let mut bad = vec![f32::INFINITY, 1.0];
        let before = (params.clone(), adamw.exp_avg.clone(), adamw.exp_avg_sq.clone());
        let mut target = HostUpdate { adamw: &mut adamw, params: &mut params, grads: &mut bad, lr_scale: None };
        let err = apply_update(&mut target, 0.1, Some(1.0)).unwrap().unwrap_err();
        assert!(err.0.is_infinite());
        assert_eq!(bad, vec![f32::INFINITY, 1.0]);
        assert_eq!((params, adamw.exp_avg, adamw.exp_avg_sq), before);
        assert_eq!(adamw.step, 1);
    }
}
