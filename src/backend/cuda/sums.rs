//! Deterministic sums on the GPU (`cuda/reduce.cu`; the global gradient norm is `reduce.rs`):
//! column sums (a Linear's bias gradient), row sums, and per-channel sums of NCHW tensors (a
//! convolution's bias gradient).
//! Fixed summation orders (chunk partials added in order, block trees), no atomics: the same
//! inputs give the same bits on every run. Results are f32; column and channel sums are
//! accumulated (`+=`) like the CPU's parameter gradients, row sums overwrite.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{config, int, Arg};
use super::matmul::GemmType;
use crate::error::Result;

const FILE: &str = "reduce.cu";

/// Rows per chunk of a column sum: from the row length only (never the GPU), as the CPU's
/// `reduce_chunk_rows`, so the grouping of the sums is fixed.
fn chunk_rows(n: usize) -> usize {
    (16_384 / n.max(1)).clamp(4, 128)
}

/// Scratch (`f32` elements) [`CudaDevice::column_sums`] needs for `rows` rows of `n`.
pub fn column_sums_scratch_len(rows: usize, n: usize) -> usize {
    rows.div_ceil(chunk_rows(n)) * n
}

impl CudaDevice {
    /// `out[j] += Σ_r x[r, j]` over rows of `n = out.len()`.
    pub fn column_sums<T: GemmType>(
        &self,
        out: &mut dyn DevicePtrMut<f32>,
        x: &dyn DevicePtr<T>,
        scratch: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = out.len();
        ensure!(n > 0 && x.len() % n == 0, InvalidArgument, "column_sums: {} elements in rows of {n}", x.len());
        let rows = x.len() / n;
        let need = column_sums_scratch_len(rows, n);
        ensure!(scratch.len() >= need, InvalidArgument, "column_sums: scratch holds {}, needs {need}", scratch.len());
        if rows == 0 {
            return Ok(());
        }
        let (chunk, chunks) = (chunk_rows(n), rows.div_ceil(chunk_rows(n)));
        let partials = self.addr_mut(scratch);
        let args = [
            Arg::Ptr(partials),
            Arg::Ptr(self.addr(x)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("n", n)?),
            Arg::I32(int("chunk rows", chunk)?),
        ];
        let name = by_type::<T>("beit_reduce_column_sums_partial_f32", "beit_reduce_column_sums_partial_bf16");
        // SAFETY: the kernel's signature; block (x, y) writes chunk y's columns.
        unsafe { self.launch_kernel(FILE, name, config((n.div_ceil(128), chunks, 1), 128), &args)? };
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(partials),
            Arg::I32(int("chunks", chunks)?),
            Arg::I32(int("n", n)?),
        ];
        // SAFETY: the kernel's signature; one thread per column.
        unsafe {
            self.launch_kernel(FILE, "beit_reduce_column_sums_finish", config((n.div_ceil(128), 1, 1), 128), &args)
        }
    }

    /// `out[r] = Σ_j x[r, j]` over `out.len()` rows.
    pub fn row_sums<T: GemmType>(&self, out: &mut dyn DevicePtrMut<f32>, x: &dyn DevicePtr<T>) -> Result<()> {
        let rows = out.len();
        ensure!(rows > 0 && x.len() % rows == 0, InvalidArgument, "row_sums: {} elements in {rows} rows", x.len());
        let n = x.len() / rows;
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(self.addr(x)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("n", n)?),
        ];
        let name = by_type::<T>("beit_reduce_row_sums_f32", "beit_reduce_row_sums_bf16");
        // SAFETY: the kernel's signature; one warp per row, 8 per block.
        unsafe { self.launch_kernel(FILE, name, config((rows.div_ceil(8), 1, 1), 256), &args) }
    }

    /// `out[c] += Σ_b Σ_p x[b, c, p]` for NCHW `x` of `batch` images of `out.len()` channels of
    /// `plane` elements: a convolution's bias gradient (the CPU's conv `bias_grad`).
    pub fn channel_sums<T: GemmType>(
        &self,
        out: &mut dyn DevicePtrMut<f32>,
        x: &dyn DevicePtr<T>,
        batch: usize,
        plane: usize,
    ) -> Result<()> {
        let channels = out.len();
        ensure!(x.len() == batch * channels * plane, InvalidArgument, "channel_sums: x holds {}", x.len());
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(self.addr(x)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("channels", channels)?),
            Arg::I32(int("plane", plane)?),
        ];
        let name = by_type::<T>("beit_reduce_channel_sums_f32", "beit_reduce_channel_sums_bf16");
        // SAFETY: the kernel's signature; one block per channel.
        unsafe { self.launch_kernel(FILE, name, config((channels, 1, 1), 256), &args) }
    }
}
