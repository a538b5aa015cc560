//! Classification fine-tuning's recipe: the defaults `beit finetune` uses (its flags' defaults)
//! and that the C API's `beit_trainer_options_finetune_default()` and
//! `beit_finetune_options_default()` give, and a fresh classifier from a config, so that every
//! front end builds the same run from the same few choices.

use crate::error::Result;
use crate::model::{Architecture, BeitConfig, Model};
use crate::train::finetune::classification_config;
use crate::train::trainer::TrainerOptions;

use super::schedule::default_warmup_steps;

/// Peak learning rate (BEiT-B from pt22k uses 4e-3 at batch 1024; small runs take less).
pub const LEARNING_RATE: f64 = 1e-3;
/// Final learning rate of the cosine schedule.
pub const MIN_LEARNING_RATE: f64 = 1e-6;
/// Layer-wise lr decay (BEiT: 0.65 for base from pretraining).
pub const LAYER_DECAY: f64 = 0.65;
/// AdamW's weight decay.
pub const WEIGHT_DECAY: f64 = 0.05;
/// AdamW's betas: fine-tuning uses PyTorch's (0.9, 0.999), pretraining BEiT's (0.9, 0.98).
pub const BETAS: (f64, f64) = (0.9, 0.999);
/// Gradient clipping (0: off; BEiT fine-tuning does not clip).
pub const CLIP_GRAD_NORM: f64 = 0.0;
/// Stochastic depth rate of the last block.
pub const DROP_PATH_RATE: f64 = 0.1;
/// Label smoothing of the cross-entropy.
pub const LABEL_SMOOTHING: f32 = 0.1;
/// Images per step.
pub const BATCH_SIZE: usize = 64;
/// Smallest random-resized-crop area fraction (BEiT / timm: 0.08).
pub const MIN_CROP_SCALE: f64 = 0.08;
/// Horizontal flip probability.
pub const FLIP_PROB: f64 = 0.5;
/// Epochs when no step count is given.
pub const EPOCHS: u64 = 10;

/// The trainer options of a fine-tuning run of `total_steps` steps with the recipe's defaults:
/// a cosine schedule over the run after a tenth of it of warmup ([`default_warmup_steps`]),
/// and the constants above; eps, the decay rule and the seed (0) are [`TrainerOptions`]'
/// defaults.
pub fn trainer_options(total_steps: u64) -> TrainerOptions {
    TrainerOptions {
        learning_rate: LEARNING_RATE,
        min_learning_rate: MIN_LEARNING_RATE,
        warmup_steps: default_warmup_steps(total_steps),
        total_steps,
        weight_decay: WEIGHT_DECAY,
        beta1: BETAS.0,
        beta2: BETAS.1,
        clip_grad_norm: CLIP_GRAD_NORM,
        drop_path_rate: Some(DROP_PATH_RATE),
        layer_decay: LAYER_DECAY,
        ..TrainerOptions::default()
    }
}

/// A from-scratch `BeitForImageClassification` (the baseline a pretrained start is compared
/// with): [`classification_config`] of `source` with `num_labels` labels and drop path
/// `drop_path_rate`, BEiT's random initialisation from `seed`.
pub fn classifier_from_config(source: &BeitConfig, num_labels: usize, drop_path_rate: f64, seed: u64) -> Result<Model> {
    let cfg = classification_config(source, num_labels, drop_path_rate)?;
    Model::new_random(cfg, Architecture::ImageClassification, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_warm_up_a_tenth_and_validate() {
        let o = trainer_options(250);
        assert_eq!((o.warmup_steps, o.total_steps), (25, 250));
        assert_eq!((o.beta1, o.beta2, o.drop_path_rate), (0.9, 0.999, Some(0.1)));
        o.validate().unwrap();
    }
}
