//! The optimizer's [`UpdateTarget`] on the GPU: parameters (fp32 master copies, and in bf16 runs
//! the working copy AdamW refreshes), gradients and AdamW state in device buffers. Every GPU
//! trainer (the MIM and classification step, the dVAE) runs the one optimizer step,
//! `train::optimizer::apply_update`, over it: the global norm read back (8 bytes) to refuse a
//! non-finite step before anything changes, the clip factor computed as on the CPU and applied
//! by a scale kernel, then AdamW.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::optimizer::UpdateTarget;
use crate::backend::cuda::adamw::GpuAdamW;
use crate::backend::cuda::{Act, CudaDevice, DeviceParams};
use crate::error::Result;

/// The device's side of an optimizer step (borrowed for the step).
pub(crate) struct DeviceUpdate<'a, T: Act> {
    pub dev: &'a CudaDevice,
    pub params: &'a mut DeviceParams<T>,
    pub grads: &'a mut CudaSlice<f32>,
    pub adamw: &'a mut GpuAdamW,
    /// Per-element learning-rate scales (layer-wise decay), or none.
    pub lr_scale: Option<&'a CudaSlice<f32>>,
    /// [Σg², ‖g‖] on the device.
    pub norm: &'a mut CudaSlice<f64>,
}

impl<T: Act> UpdateTarget for DeviceUpdate<'_, T> {
    fn grad_norm(&mut self) -> Result<f64> {
        self.dev.global_norm_into(&*self.grads, self.norm)?;
        Ok(self.dev.download(self.norm)?[1])
    }

    fn scale_grads(&mut self, factor: f32) -> Result<()> {
        self.dev.scale(self.grads, factor)
    }

    fn adamw_step(&mut self, lr: f32) -> Result<()> {
        let (master, work) = self.params.master_and_work();
        self.adamw.step(
            self.dev,
            master,
            &*self.grads,
            lr,
            self.lr_scale.map(|s| s as &dyn DevicePtr<f32>),
            work.map(|w| w as &mut dyn DevicePtrMut<bf16>),
        )
    }
}
