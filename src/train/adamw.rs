//! AdamW over the flat parameter buffer, with PyTorch's update rule (decoupled weight decay
//! applied first, bias-corrected moments) so N steps equal `torch.optim.AdamW`'s.

use rayon::prelude::*;

use crate::error::Result;
use crate::model::params::{ParamSpec, ParamStore};
use crate::resources::try_zeroed;

/// The hyperparameters live with the backends, whose AdamW kernels take them.
pub use crate::backend::optimizer::AdamWConfig;

/// BEiT's weight-decay rule (unilm `get_parameter_groups`): no decay for 1-D tensors, biases,
/// the CLS token and absolute position embeddings. The mask token and the relative position
/// bias tables (2-D) are decayed.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    !(shape.len() == 1
        || name.ends_with(".bias")
        || name.ends_with("cls_token")
        || name.ends_with("position_embeddings"))
}

/// Which entries of a parameter store the optimizer updates, and which of those decay: the one
/// walk over a store's entries that every trainer (MIM, classification, segmentation, the
/// dVAE) and both backends' AdamW build their state from.
#[derive(Debug, Clone)]
pub struct DecayPlan {
    /// 1 where an element decays, 0 where not (and 0 outside the trained entries).
    pub mask: Vec<f32>,
    /// The trained entries, as `(offset, len)` ranges of the store's buffer.
    pub trained: Vec<(usize, usize)>,
}

impl DecayPlan {
    /// `rule(spec)` for each exported entry: `None` leaves it untrained, `Some(decays)` trains
    /// it (with weight decay when `decays`). Unexported entries (the zero key bias) never train.
    pub fn new(store: &ParamStore, rule: impl Fn(&ParamSpec) -> Option<bool>) -> Result<Self> {
        let mut mask = try_zeroed::<f32>(store.data.len(), "the weight-decay mask")?;
        let mut trained = Vec::new();
        for s in store.specs.iter().filter(|s| s.exported) {
            let Some(decays) = rule(s) else { continue };
            if decays {
                mask[s.offset..s.offset + s.len].fill(1.0);
            }
            trained.push((s.offset, s.len));
        }
        Ok(DecayPlan { mask, trained })
    }

    /// BEiT's rule: every exported entry trains, and decays as [`decays`] says.
    pub fn beit(store: &ParamStore) -> Result<Self> {
        Self::new(store, |s| Some(decays(&s.name, &s.shape)))
    }
}

/// Optimizer state for one [`ParamStore`]: first and second moments, the step count, and which
/// entries decay. Entries that are not trained (like the zero key bias) are never touched.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The trained entries as runs that either all decay or all do not, so the update loop has
    /// no per-element mask to read.
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: usize,
    len: usize,
    decays: bool,
}

/// Elements per parallel task of the update (a few tasks per thread for typical tensors).
const CHUNK: usize = 16_384;

impl AdamW {
    /// State for `store` under BEiT's decay rule ([`DecayPlan::beit`]).
    pub fn new(store: &ParamStore, config: AdamWConfig) -> Result<Self> {
        Ok(Self::from_plan(config, DecayPlan::beit(store)?))
    }

    /// State for the entries a [`DecayPlan`] trains.
    pub fn from_plan(config: AdamWConfig, plan: DecayPlan) -> Self {
        Self::with_mask(config, plan.mask, plan.trained)
    }

    /// State for a raw buffer: `decay_mask[i]` is 1 where element i decays, 0 where not; only the
    /// `trained` ranges `(offset, len)` are updated.
    pub fn with_mask(config: AdamWConfig, decay_mask: Vec<f32>, trained: Vec<(usize, usize)>) -> Self {
        let n = decay_mask.len();
        let mut segments = Vec::new();
        for (offset, len) in trained {
            let mask = &decay_mask[offset..offset + len];
            let mut start = 0;
            while start < len {
                let decays = mask[start] != 0.0;
                let run = mask[start..].iter().take_while(|&&d| (d != 0.0) == decays).count();
                segments.push(Segment { offset: offset + start, len: run, decays });
                start += run;
            }
        }
        AdamW { config, step: 0, exp_avg: vec![0.0; n], exp_avg_sq: vec![0.0; n], segments }
    }

    /// One step at learning rate `lr` (the schedule's value for this step; layer-wise decay
    /// scales it per entry through `lr_scale`, 1 everywhere when `None`).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, lr_scale: Option<&[f32]>) {
        assert_eq!(params.len(), self.exp_avg.len());
        assert_eq!(grads.len(), params.len());
        if let Some(s) = lr_scale {
            assert_eq!(s.len(), params.len());
        }
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - (c.beta1 as f64).powi(self.step as i32);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(self.step as i32)).sqrt() as f32;
        let k = UpdateConsts { lr, step_size: (lr as f64 / bias1) as f32, bias2_sqrt, config: c };
        for seg in &self.segments {
            let range = seg.offset..seg.offset + seg.len;
            let weight_decay = if seg.decays { c.weight_decay } else { 0.0 };
            let p = &mut params[range.clone()];
            let m = &mut self.exp_avg[range.clone()];
            let v = &mut self.exp_avg_sq[range.clone()];
            let g = &grads[range.clone()];
            let scale = lr_scale.map(|s| &s[range.clone()]);
            p.par_chunks_mut(CHUNK).enumerate().zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).for_each(
                |(((chunk, p), m), v)| {
                    let at = chunk * CHUNK..chunk * CHUNK + p.len();
                    match scale {
                        None => update(p, m, v, &g[at], &k, weight_decay),
                        Some(s) => update_scaled(p, m, v, &g[at.clone()], &s[at], &k, weight_decay),
                    }
                },
            );
        }
    }
}

/// What one step's update needs besides the tensors.
struct UpdateConsts {
    lr: f32,
    step_size: f32,
    bias2_sqrt: f32,
    config: AdamWConfig,
}

/// PyTorch's AdamW on one element at learning rate scale `s` (decay first, then the moments and
/// the bias-corrected step). Written once so both loops below do exactly the same arithmetic.
#[inline(always)]
fn update_one(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, s: f32, k: &UpdateConsts, weight_decay: f32) {
    let c = k.config;
    let (lr, step) = (k.lr * s, k.step_size * s);
    *p *= 1.0 - lr * weight_decay;
    *m += (g - *m) * (1.0 - c.beta1);
    *v = *v * c.beta2 + (1.0 - c.beta2) * g * g;
    let denom = v.sqrt() / k.bias2_sqrt + c.eps;
    *p -= step * *m / denom;
}

crate::backend::cpu::math::simd_dispatch! {
    fn update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: &UpdateConsts, weight_decay: f32) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            update_one(p, m, v, g, 1.0, k, weight_decay);
        }
    }
}

crate::backend::cpu::math::simd_dispatch! {
    fn update_scaled(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &[f32], k: &UpdateConsts, weight_decay: f32) {
        for ((((p, m), v), &g), &s) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g).zip(s) {
            update_one(p, m, v, g, s, k, weight_decay);
        }
    }
}
