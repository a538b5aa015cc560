//! Training: the trainer, the optimizer and learning-rate schedules, checkpoints, metrics, and
//! the recipes (presets, defaults, token-source policy, resume rules) front ends share.

pub mod adamw;
pub mod checkpoint;
pub mod clip;
pub mod dvae;
mod dvae_pass;
pub mod dvae_run;
pub mod evaluate;
pub mod finetune;
pub mod gpu_dvae;
pub mod gpu_inference;
pub mod gpu_pretrain;
pub(crate) mod gpu_update;
pub mod layer_decay;
pub mod optimizer;
/// cbindgen:ignore
pub mod recipes;
pub mod run_record;
pub mod schedule;
pub mod segmentation;
pub mod trainer;
