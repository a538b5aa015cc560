//! Training pieces: the optimizer and learning-rate schedules. The pretraining and fine-tuning
//! loops, checkpoints and metrics arrive with their issues.

pub mod adamw;
pub mod checkpoint;
pub mod clip;
pub mod dvae;
pub mod evaluate;
pub mod finetune;
pub mod layer_decay;
pub mod run_record;
pub mod schedule;
pub mod segmentation;
pub mod trainer;
