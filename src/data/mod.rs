//! Data for pretraining and fine-tuning: BEiT's block-wise masking, a synthetic MIM task, the
//! on-disk dataset format (docs/dataset-format.md), its importers, and the augmenting two-view
//! loader.

// cbindgen exports every public integer constant it sees; the C API wraps these modules through
// its own structs (src/ffi/dataset*.rs, loader.rs, masking.rs), so keep their Rust constants out
// of include/beit.h.
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
