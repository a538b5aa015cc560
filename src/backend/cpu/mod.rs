//! The CPU backend: rayon for threads, the `gemm` crate for matrix products, and one readable
//! function per op. Every op here works on caller-provided slices (carved from an arena), so the
//! forward pass allocates nothing per op.

pub mod attention;
pub mod attention_backward;
pub mod attention_kernel;
pub mod backward;
pub mod batchnorm;
pub mod code_ops;
pub mod conv;
pub mod cross_entropy;
pub mod cross_entropy_smoothed;
pub mod elementwise;
pub mod gemm;
pub mod image_ops;
pub mod interp;
pub mod layernorm;
pub mod math;
pub mod mean_squared_error;
pub mod ops;
pub mod pixel_cross_entropy;
pub mod pool;
pub mod relaxation;

/// A raw pointer that may cross into rayon tasks. Used only where tasks write provably disjoint
/// parts of one buffer (e.g. one attention head's columns each).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rows per rayon task for row-wise ops: large enough to amortise scheduling, small enough to
/// balance `rows` over the pool.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (16_384 / row_len.max(1)).max(1);
    rows.div_ceil(threads * 4).max(min_rows)
}
