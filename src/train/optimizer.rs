//! The optimizer half of every CPU training step, written once for the MIM and classification
//! [`super::trainer::Trainer`], the segmentation fine-tune and the dVAE trainer: the gradient's
//! global norm, a refusal that changes nothing when it is not finite, clipping, and one AdamW
//! step. (The GPU pretraining step does the same on the device, `backend::cuda::pretrain`, until
//! the one-pass redesign gives it this function too.)

use super::adamw::AdamW;
use super::clip::{global_norm, scale_to_norm};

/// Why [`apply_update`] refused: the gradient's global norm, which is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteGradient(pub f64);

/// Clips `grads` to global norm `max_norm` (PyTorch's `clip_grad_norm_`; `None` does not clip)
/// and applies one AdamW step at learning rate `lr` (scaled per element by `lr_scale`, layer-wise
/// decay). Returns the norm before clipping. A non-finite norm is refused before anything
/// changes: neither `grads` nor `params` nor the optimizer state are touched.
pub fn apply_update(
    adamw: &mut AdamW,
    params: &mut [f32],
    grads: &mut [f32],
    lr: f32,
    lr_scale: Option<&[f32]>,
    max_norm: Option<f64>,
) -> Result<f64, NonFiniteGradient> {
    let norm = global_norm(grads);
    if !norm.is_finite() {
        return Err(NonFiniteGradient(norm));
    }
    if let Some(max_norm) = max_norm {
        scale_to_norm(grads, norm, max_norm);
    }
    adamw.step(params, grads, lr, lr_scale);
    Ok(norm)
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
        let norm = apply_update(&mut adamw, &mut params, &mut grads, 0.1, None, Some(1.0)).unwrap();
        assert_eq!(norm, 5.0);
        assert!((grads[0] - 0.6).abs() < 1e-6 && (grads[1] - 0.8).abs() < 1e-6, "{grads:?}");
        assert!((params[0] - 0.9).abs() < 1e-6 && (params[1] - 0.9).abs() < 1e-6, "{params:?}");
        assert_eq!(adamw.step, 1);

        let mut bad = vec![f32::INFINITY, 1.0];
        let before = (params.clone(), adamw.exp_avg.clone(), adamw.exp_avg_sq.clone());
        let err = apply_update(&mut adamw, &mut params, &mut bad, 0.1, None, Some(1.0)).unwrap_err();
        assert!(err.0.is_infinite());
        assert_eq!(bad, vec![f32::INFINITY, 1.0]);
        assert_eq!((params, adamw.exp_avg, adamw.exp_avg_sq), before);
        assert_eq!(adamw.step, 1);
    }
}
