//! Compute backends. The CPU backend (`cpu`) is the numerical reference: every other backend is
//! tested against it. The CUDA backend (`cuda`) is compiled into every build but loads CUDA only
//! at run time; the `Backend` trait is drawn out of the two once the model runs on both.

pub mod cpu;
pub mod cuda;
pub mod optimizer;
pub mod shapes;
