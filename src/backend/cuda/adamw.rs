//! AdamW on the GPU (`cuda/adamw.cu`): fp32 master weights and moments, the same rule and the
//! same operation order as the CPU's `train::adamw::AdamW::step`, plus an optional bf16 copy of
//! the parameters refreshed in the same pass (what the bf16 forward reads).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use crate::backend::optimizer::AdamWConfig;
use crate::error::Result;

/// Per-element flags of [`GpuAdamW`]: bit 0 trained, bit 1 decays (see cuda/adamw.cu).
const FLAG_TRAINED: u8 = 1;
const FLAG_DECAYS: u8 = 2;

/// Optimizer state on the device for one flat parameter buffer.
pub struct GpuAdamW {
    pub config: AdamWConfig,
    pub step: u64,
    pub exp_avg: CudaSlice<f32>,
    pub exp_avg_sq: CudaSlice<f32>,
    flags: CudaSlice<u8>,
}

impl GpuAdamW {
    /// State with zero moments. `decay_mask[i]` is 1 where element i decays, 0 where not (as
    /// `AdamW::with_mask`); `trained` lists the (offset, len) ranges that are updated at all.
    pub fn new(dev: &CudaDevice, config: AdamWConfig, decay_mask: &[f32], trained: &[(usize, usize)]) -> Result<Self> {
        let n = decay_mask.len();
        let mut flags = vec![0u8; n];
        for &(offset, len) in trained {
            ensure!(offset + len <= n, InvalidArgument, "adamw: trained range {offset}+{len} past {n} elements");
            for j in offset..offset + len {
                flags[j] = FLAG_TRAINED | if decay_mask[j] != 0.0 { FLAG_DECAYS } else { 0 };
            }
        }
        Ok(GpuAdamW { config, step: 0, exp_avg: dev.zeros(n)?, exp_avg_sq: dev.zeros(n)?, flags: dev.upload(&flags)? })
    }

    /// One step at learning rate `lr`, as `AdamW::step(params, grads, lr, lr_scale)`; when
    /// `params_bf16` is given it receives bf16(params) after the update.
    pub fn step(
        &mut self,
        dev: &CudaDevice,
        params: &mut dyn DevicePtrMut<f32>,
        grads: &dyn DevicePtr<f32>,
        lr: f32,
        lr_scale: Option<&dyn DevicePtr<f32>>,
        params_bf16: Option<&mut dyn DevicePtrMut<half::bf16>>,
    ) -> Result<()> {
        let n = self.exp_avg.len();
        ensure!(
            params.len() == n && grads.len() == n,
            InvalidArgument,
            "adamw: params {} grads {} state {n}",
            params.len(),
            grads.len()
        );
        if let Some(s) = &lr_scale {
            ensure!(s.len() == n, InvalidArgument, "adamw: lr_scale holds {} elements, expected {n}", s.len());
        }
        if let Some(b) = &params_bf16 {
            ensure!(b.len() == n, InvalidArgument, "adamw: bf16 copy holds {} elements, expected {n}", b.len());
        }
        self.step += 1;
        let c = self.config;
        // Host-side scalars exactly as the CPU computes them (f64 bias corrections).
        let bias1 = 1.0 - (c.beta1 as f64).powi(self.step as i32);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(self.step as i32)).sqrt() as f32;
        let step_size = (lr as f64 / bias1) as f32;
        let stream = dev.stream();
        let pp = params.device_ptr_mut(stream).0;
        let mp = self.exp_avg.device_ptr_mut(stream).0;
        let vp = self.exp_avg_sq.device_ptr_mut(stream).0;
        let gp = grads.device_ptr(stream).0;
        let fp = self.flags.device_ptr(stream).0;
        let sp = lr_scale.map_or(0, |s| s.device_ptr(stream).0);
        let bp = params_bf16.map_or(0, |b| b.device_ptr_mut(stream).0);
        dev.launch_pointwise(
            "adamw.cu",
            "beit_adamw_step",
            &[lr, c.beta1, c.beta2, c.eps, c.weight_decay, step_size, bias2_sqrt],
            &[pp, mp, vp, gp, fp, sp, bp],
            n,
        )
    }
}
