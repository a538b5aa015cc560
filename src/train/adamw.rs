//! AdamW over the flat parameter buffer, with PyTorch's update rule (decoupled weight decay
//! applied first, bias-corrected moments) so N steps equal `torch.optim.AdamW`'s.

use rayon::prelude::*;

use crate::model::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// BEiT's fine-tuning settings: betas (0.9, 0.999), eps 1e-8, weight decay 0.05.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }
    }
}

/// BEiT's weight-decay rule (unilm `get_parameter_groups`): no decay for 1-D tensors, biases,
/// the CLS token and absolute position embeddings. The mask token and the relative position
/// bias tables (2-D) are decayed.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    !(shape.len() == 1
        || name.ends_with(".bias")
        || name.ends_with("cls_token")
        || name.ends_with("position_embeddings"))
}

/// Optimizer state for one [`ParamStore`]: first and second moments, the step count, and a
/// per-element weight-decay factor (1 where the entry decays, 0 elsewhere; entries that are not
/// trained, like the zero key bias, are never touched).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    decay_mask: Vec<f32>,
    trained: Vec<(usize, usize)>,
}

impl AdamW {
    pub fn new(store: &ParamStore, config: AdamWConfig) -> Self {
        let mut decay_mask = vec![0.0; store.data.len()];
        let mut trained = Vec::new();
        for s in store.specs.iter().filter(|s| s.exported) {
            if decays(&s.name, &s.shape) {
                decay_mask[s.offset..s.offset + s.len].fill(1.0);
            }
            trained.push((s.offset, s.len));
        }
        Self::with_mask(config, decay_mask, trained)
    }

    /// State for a raw buffer: `decay_mask[i]` is 1 where element i decays, 0 where not.
    pub fn with_mask(config: AdamWConfig, decay_mask: Vec<f32>, trained: Vec<(usize, usize)>) -> Self {
        let n = decay_mask.len();
        AdamW { config, step: 0, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n], decay_mask, trained }
    }

    /// One step at learning rate `lr` (the schedule's value for this step; layer-wise decay
    /// scales it per entry through `lr_scale`, 1 everywhere when `None`).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, lr_scale: Option<&[f32]>) {
        assert_eq!(params.len(), self.exp_avg.len());
        assert_eq!(grads.len(), params.len());
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - (c.beta1 as f64).powi(self.step as i32);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(self.step as i32)).sqrt() as f32;
        let step_size = (lr as f64 / bias1) as f32;
        for &(offset, len) in &self.trained {
            let range = offset..offset + len;
            let p = &mut params[range.clone()];
            let m = &mut self.exp_avg[range.clone()];
            let v = &mut self.exp_avg_sq[range.clone()];
            let g = &grads[range.clone()];
            let d = &self.decay_mask[range.clone()];
            let scale = lr_scale.map(|s| &s[range.clone()]);
            p.par_chunks_mut(4096).enumerate().zip(m.par_chunks_mut(4096)).zip(v.par_chunks_mut(4096)).for_each(
                |(((chunk, p), m), v)| {
                    let base = chunk * 4096;
                    for i in 0..p.len() {
                        let j = base + i;
                        let s = scale.map_or(1.0, |s| s[j]);
                        let (lr_j, step_j) = (lr * s, step_size * s);
                        p[i] *= 1.0 - lr_j * c.weight_decay * d[j];
                        m[i] += (g[j] - m[i]) * (1.0 - c.beta1);
                        v[i] = v[i] * c.beta2 + (1.0 - c.beta2) * g[j] * g[j];
                        let denom = v[i].sqrt() / bias2_sqrt + c.eps;
                        p[i] -= step_j * m[i] / denom;
                    }
                },
            );
        }
    }
}
