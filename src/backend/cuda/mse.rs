//! The mean squared error fused with its gradient on the GPU (`cuda/mse.cu`): the pixel-target
//! MIM loss, `backend::cpu::mean_squared_error::mse_fused_part` on the device (tests/cuda_ops.rs).

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{config, int, Arg};
use super::matmul::GemmType;
use crate::error::Result;

/// `MSE_THREADS` of the kernel file.
const THREADS: u32 = 256;

impl CudaDevice {
    /// For `[rows, cols]` predictions `pred` of a batch of `total_rows` rows: overwrites `pred`
    /// with the gradient of the batch loss `(1/total_rows)·Σ_rows (1/cols)·Σ_cols (pred −
    /// target)²`, writes each row's loss to `losses` (`[rows]`) and ADDS their sum (f64) to
    /// `loss_sum[0]`.
    pub fn mse_fused<T: GemmType>(
        &self,
        pred: &mut dyn DevicePtrMut<T>,
        target: &dyn DevicePtr<T>,
        cols: usize,
        total_rows: usize,
        losses: &mut dyn DevicePtrMut<f32>,
        loss_sum: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        let rows = losses.len();
        ensure!(cols > 0, InvalidArgument, "mse: cols must be positive");
        ensure!(
            pred.len() == rows * cols && target.len() == rows * cols,
            InvalidArgument,
            "mse: pred holds {}, target {}, for {rows} rows of {cols}",
            pred.len(),
            target.len()
        );
        ensure!(total_rows >= rows, InvalidArgument, "mse: total_rows {total_rows} below the block's {rows}");
        if rows == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(self.addr_mut(pred)),
            Arg::Ptr(self.addr_mut(losses)),
            Arg::Ptr(self.addr(target)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("cols", cols)?),
            Arg::I32(int("total rows", total_rows)?),
        ];
        let name = by_type::<T>("beit_mse_forward_backward_f32", "beit_mse_forward_backward_bf16");
        // SAFETY: the kernel's signature; one block per row.
        unsafe { self.launch_kernel("mse.cu", name, config((rows, 1, 1), THREADS), &args)? };
        self.add_loss_sum(loss_sum, losses)
    }
}
