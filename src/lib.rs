//! libbeit: BEiT vision transformers (Bao et al. 2021) as an embeddable native runtime.
//!
//! The Rust API: [`Model`] loads and saves Hugging Face BEiT directories and runs inference;
//! [`Context`] holds the thread pool. The C API in [`ffi`] wraps exactly this.

#[macro_use]
pub mod error;
pub mod backend;
pub mod context;
pub mod data;
pub mod dvae;
pub mod ffi;
pub mod files;
pub mod model;
pub mod precision;
/// cbindgen:ignore
pub mod resources;
pub mod tensor;
pub mod train;

pub use context::{Context, ContextOptions, Device};
pub use error::{Error, Result};
pub use model::{Architecture, BeitConfig, ImageBatch, Model, OutputBuffers, OutputShapes, Outputs};
pub use tensor::Tensor;

/// The crate version, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
