//! Compute backends. The CPU backend (`cpu`) is the numerical reference: every other backend is
//! tested against it. The CUDA backend (`cuda`) is compiled into every build but loads CUDA only
//! at run time. The passes are written once over [`Backend`] (`ops.rs`), on memory planned as
//! views (`memory.rs`).

pub mod cpu;
pub mod cuda;
pub mod image_ops;
pub mod memory;
pub mod ops;
pub mod optimizer;
pub mod shapes;

pub use image_ops::ImageOps;
pub use ops::Backend;
