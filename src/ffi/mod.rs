//! The C API (`include/beit.h`, generated from these files by cbindgen).
//!
//! Conventions: every fallible function returns a `beit_status` and leaves its message for
//! `beit_last_error_message()`; every export runs behind a panic boundary; handles are opaque
//! boxes with a NULL-tolerant `*_free`; structs crossing the boundary start with `struct_size`.

mod claim;
pub mod context;
pub mod dataset;
pub mod dataset_writer;
pub mod device;
pub mod dvae;
pub mod finetune;
pub mod loader;
pub mod masking;
pub mod model;
pub mod parameters;
pub mod seg_trainer;
pub mod segmentation;
pub mod status;
pub mod tokenizer;
pub mod trainer;
pub mod version;
