//! What the optimizer ops of every backend take: AdamW's hyperparameters. The optimizer loop
//! (schedule, clipping, which entries decay) belongs to `train`; the update kernels to the
//! backends (`train::adamw` on the CPU, `backend::cuda::adamw` on the GPU).

/// AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`): moment decay rates, the
/// denominator's epsilon, and the decoupled weight decay applied to the entries that decay.
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
