//! Recipes: the rules that turn a caller's few choices into a whole training setup, shared by
//! the CLI and (later) the C API so that both train the same way:
//! - [`presets`]: the built-in model configs (`base`, `large`, `tiny32`, ...);
//! - [`masking`]: how many patches pretraining masks by default (BEiT's 75 of 196);
//! - [`schedule`]: the default warmup;
//! - [`tokens`]: where pretraining's targets come from (token cache, tokenizer or pixels);
//! - [`pretrain`]: a pretraining run's data and a fresh model's config;
//! - [`resume`]: what a resumed run must keep, and the record its checkpoint holds of it;
//! - [`finetune`]: classification fine-tuning's defaults and a from-scratch classifier.

pub mod finetune;
pub mod masking;
pub mod presets;
pub mod pretrain;
pub mod resume;
pub mod schedule;
pub mod tokens;
