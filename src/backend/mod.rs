//! Compute backends. The CPU backend (`cpu`) is the numerical reference: every other backend is
//! tested against it. The CUDA backend arrives with its own issue; the `Backend` trait is drawn
//! out of the CPU ops once there are two implementations to abstract over.

pub mod cpu;
