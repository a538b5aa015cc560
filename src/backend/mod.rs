//! Compute backends. The CPU backend (`cpu`) is the numerical reference: every other backend is
//! tested against it. The CUDA backend (`cuda`) is compiled into every build but loads CUDA only
//! at run time. The passes are written once over [`Backend`] (`ops.rs`), with the convolutional
//! ops of the segmentation head and the tokenizer ([`ImageOps`], `image_ops.rs`) and the
//! tokenizer's code ops ([`CodeOps`], `code_ops.rs`) beside it, on memory planned as views
//! (`memory.rs`).

pub mod code_ops;
pub mod cpu;
pub mod cuda;
pub mod image_ops;
pub mod memory;
pub mod ops;
pub mod optimizer;
pub mod shapes;

pub use code_ops::CodeOps;
pub use image_ops::ImageOps;
pub use ops::Backend;
