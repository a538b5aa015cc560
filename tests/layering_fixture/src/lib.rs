// A tiny crate tree with one fault of each kind scripts/check-layers must find (never compiled).
pub mod backend;
pub mod data;
pub mod ffi;
pub mod model;
pub mod train;
