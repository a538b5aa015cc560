//! The C API (in progress).
