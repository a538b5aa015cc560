//! Gradient clipping by global norm, PyTorch's `clip_grad_norm_` rule: the L2 norm over all
//! gradients; if it exceeds `max_norm`, every gradient is scaled by `max_norm / (norm + 1e-6)`.
//! The norm is summed in fixed-size chunks added in order, so it does not depend on threads.

use rayon::prelude::*;

const CHUNK: usize = 16_384;

/// L2 norm of `grads`, deterministic for any thread count.
pub fn global_norm(grads: &[f32]) -> f64 {
    let partial: Vec<f64> = grads.par_chunks(CHUNK).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    partial.iter().sum::<f64>().sqrt()
}

/// Clips `grads` in place to global norm `max_norm` and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if let Some(factor) = clip_factor(norm, max_norm) {
        scale(grads, factor);
    }
    norm
}

/// PyTorch's `clip_grad_norm_` factor for a gradient of norm `norm`: `max_norm / (norm + 1e-6)`
/// when that is below 1, else `None` (the gradient is left as it is).
pub fn clip_factor(norm: f64, max_norm: f64) -> Option<f32> {
    let coef = max_norm / (norm + 1e-6);
    (coef < 1.0).then_some(coef as f32)
}

/// Multiplies every gradient by `factor`.
pub fn scale(grads: &mut [f32], factor: f32) {
    grads.par_chunks_mut(CHUNK).for_each(|chunk| chunk.iter_mut().for_each(|g| *g *= factor));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_derived_norm_and_clip() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(global_norm(&g), 5.0);
        let before = clip_grad_norm(&mut g, 1.0);
        assert_eq!(before, 5.0);
        let c = 1.0 / (5.0 + 1e-6);
        assert!((g[0] as f64 - 3.0 * c).abs() < 1e-7 && (g[1] as f64 - 4.0 * c).abs() < 1e-7);
        // Below the threshold nothing changes.
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }

    #[test]
    fn norm_is_thread_count_independent() {
        let g: Vec<f32> = (0..100_000).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| global_norm(&g));
        let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap().install(|| global_norm(&g));
        assert_eq!(one.to_bits(), four.to_bits());
    }
}
