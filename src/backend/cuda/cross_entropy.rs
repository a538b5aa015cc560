//! Softmax cross-entropy fused with its gradient on the GPU (`cuda/cross_entropy.cu`): the MIM
//! loss over `[rows, vocab]` logits, with masked rows (negative labels, PyTorch's
//! ignore_index) and label smoothing. Equals `backend::cpu::cross_entropy::cross_entropy_fused`
//! on the counted rows (tests/cuda_kernels.rs). Deterministic: block trees, no atomics.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{config, int, Arg};
use super::matmul::GemmType;
use crate::error::Result;

const FILE: &str = "cross_entropy.cu";
const THREADS: u32 = 256;
/// `CE_SUM_THREADS` of the kernel file.
const SUM_THREADS: u32 = 256;

impl CudaDevice {
    /// Overwrites `logits` (`[rows, vocab]`) with the gradient of the mean loss over the
    /// counted rows, `(softmax − target)·inv_rows` (0 on masked rows, label < 0), writes each
    /// row's loss to `losses` (`[rows]`, 0 when masked) and ADDS their sum (f64) to `loss_sum[0]`.
    /// `inv_rows` is 1 / (rows counted in the whole batch); `smoothing` is ε of
    /// `nn.CrossEntropyLoss(label_smoothing = ε)` (0 for MIM). Labels must be `< vocab`
    /// (a larger one gives a NaN loss).
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy_fused<T: GemmType>(
        &self,
        logits: &mut dyn DevicePtrMut<T>,
        labels: &dyn DevicePtr<i32>,
        vocab: usize,
        inv_rows: f32,
        smoothing: f32,
        losses: &mut dyn DevicePtrMut<f32>,
        loss_sum: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        let rows = labels.len();
        ensure!(vocab > 0, InvalidArgument, "cross_entropy: vocab must be positive");
        ensure!(logits.len() == rows * vocab, InvalidArgument, "cross_entropy: logits hold {}", logits.len());
        ensure!(losses.len() == rows, InvalidArgument, "cross_entropy: losses hold {}", losses.len());
        ensure!(loss_sum.len() == 1, InvalidArgument, "cross_entropy: loss_sum must hold one f64");
        ensure!((0.0..1.0).contains(&smoothing), InvalidArgument, "cross_entropy: smoothing {smoothing}");
        let args = [
            Arg::Ptr(self.addr_mut(logits)),
            Arg::Ptr(self.addr_mut(losses)),
            Arg::Ptr(self.addr(labels)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("vocab", vocab)?),
            Arg::F32(inv_rows),
            Arg::F32(smoothing),
        ];
        let name = by_type::<T>("beit_cross_entropy_forward_backward_f32", "beit_cross_entropy_forward_backward_bf16");
        // SAFETY: the kernel's signature; one block per row.
        unsafe { self.launch_kernel(FILE, name, config((rows, 1, 1), THREADS), &args)? };
        self.add_loss_sum(loss_sum, losses)
    }

    /// `loss_sum[0] += Σ losses` in f64, in a fixed order (the per-row losses of a fused loss).
    pub(crate) fn add_loss_sum(
        &self,
        loss_sum: &mut dyn DevicePtrMut<f64>,
        losses: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        ensure!(loss_sum.len() == 1, InvalidArgument, "loss sum: loss_sum must hold one f64");
        let rows = losses.len();
        let args = [Arg::Ptr(self.addr_mut(loss_sum)), Arg::Ptr(self.addr_mut(losses)), Arg::I32(int("rows", rows)?)];
        // SAFETY: the kernel's signature; one block.
        unsafe { self.launch_kernel(FILE, "beit_cross_entropy_loss_sum", config((1, 1, 1), SUM_THREADS), &args) }
    }
}
