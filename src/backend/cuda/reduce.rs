//! Deterministic reductions (`cuda/reduce_norm.cu`): the global gradient norm and clipping by
//! it, as `train::clip` computes them on the CPU. Fixed grid, fixed trees, no atomics.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::device::{driver_error, CudaDevice};
use crate::error::Result;

/// Blocks of the partial-sum pass; must equal BEIT_NORM_BLOCKS in cuda/reduce_norm.cu. Fixed,
/// not derived from the GPU, so the summation order (and the result) is the same everywhere.
const NORM_BLOCKS: u32 = 1024;
const THREADS: u32 = 256;

impl CudaDevice {
    /// Queues the global L2 norm of `x`: `out[0]` = Σx² and `out[1]` = √Σx², in f64 on the
    /// device (no host round trip). `out` holds 2 elements.
    pub fn global_norm_into(&self, x: &dyn DevicePtr<f32>, out: &mut CudaSlice<f64>) -> Result<()> {
        let xp = x.device_ptr(self.stream()).0;
        self.norm_of_raw(xp, x.len(), out)
    }

    /// The norm passes over `n` floats at device address `xp`.
    fn norm_of_raw(&self, xp: u64, n: usize, out: &mut CudaSlice<f64>) -> Result<()> {
        Self::check_len("global_norm out", out, 2)?;
        let n = n as i64;
        let mut partial = self.zeros::<f64>(NORM_BLOCKS as usize)?;
        let f = self.function("reduce_norm.cu", "beit_sumsq_partial")?;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(&xp).arg(&mut partial).arg(&n);
        let cfg = LaunchConfig { grid_dim: (NORM_BLOCKS, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (const float*, double*, long long) as the kernel declares; partial holds
        // NORM_BLOCKS doubles, one per block.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error("launching beit_sumsq_partial", e))?;
        let f = self.function("reduce_norm.cu", "beit_sumsq_finish")?;
        let count = NORM_BLOCKS as i32;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(&partial).arg(&count).arg(out);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (const double*, int, double*) as declared; out holds 2 doubles.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error("launching beit_sumsq_finish", e))?;
        Ok(())
    }

    /// The global L2 norm of `x`, read back to the host (synchronises), as
    /// `train::clip::global_norm`.
    pub fn global_norm(&self, x: &dyn DevicePtr<f32>) -> Result<f64> {
        let mut out = self.zeros::<f64>(2)?;
        self.global_norm_into(x, &mut out)?;
        Ok(self.download(&out)?[1])
    }

    /// Clips `grads` in place to global norm `max_norm`, as `train::clip::clip_grad_norm`,
    /// entirely on the device; `norm_out` (2 elements) receives Σg² and the norm before clipping.
    pub fn clip_grad_norm(
        &self,
        grads: &mut dyn DevicePtrMut<f32>,
        max_norm: f64,
        norm_out: &mut CudaSlice<f64>,
    ) -> Result<()> {
        let n = grads.len();
        let gp = grads.device_ptr_mut(self.stream()).0;
        self.norm_of_raw(gp, n, norm_out)?;
        let f = self.function("reduce_norm.cu", "beit_clip_by_norm")?;
        let n_arg = n as i64;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(&*norm_out).arg(&max_norm).arg(&gp).arg(&n_arg);
        // SAFETY: (const double*, double, float*, long long) as declared; grads holds n floats.
        unsafe { launch.launch(self.launch_1d(n, THREADS)) }
            .map_err(|e| driver_error("launching beit_clip_by_norm", e))?;
        Ok(())
    }
}
