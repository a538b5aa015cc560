//! Data for pretraining and fine-tuning: BEiT's block-wise masking, a synthetic MIM task, the
//! on-disk dataset format (docs/dataset-format.md), its importers, and the augmenting two-view
//! loader.

// cbindgen exports every public integer constant it sees; these modules are Rust-only (the C API
// does not expose datasets yet), so keep their format constants out of include/beit.h.
pub mod batch;
/// cbindgen:ignore
pub mod dataset;
/// cbindgen:ignore
pub mod import;
/// cbindgen:ignore
pub mod loader;
pub mod masking;
/// cbindgen:ignore
pub mod mim_source;
/// cbindgen:ignore
pub mod subset;
pub mod synthetic;
/// cbindgen:ignore
pub mod token_cache;
