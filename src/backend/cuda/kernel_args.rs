//! Launching the hand-written kernels of `cuda/{layernorm,attention,cross_entropy,conv,reduce}.cu`,
//! whose signatures mix device pointers, `int`s and `float`s: the wrappers list the arguments as
//! [`Arg`] values in the kernel's parameter order and pick the grid themselves (each kernel file
//! documents the launch shape it expects).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::device::{driver_error, CudaDevice};
use crate::error::Result;

/// One kernel argument. Pointers go as raw device addresses (`0` is a null pointer), so a
/// wrapper can pass an offset into a buffer or an optional buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    /// A `long long` (element counts, which may pass 2^31).
    I64(i64),
    F32(f32),
}

/// `v` as a kernel `int`, or an error naming `what` (tensors whose dimensions pass 2^31 - 1).
pub(crate) fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| crate::error::Error::InvalidArgument(format!("{what} = {v} does not fit a kernel int")))
}

/// A launch of `grid` blocks of `block` threads, no dynamic shared memory.
pub(crate) fn config(grid: (usize, usize, usize), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaDevice {
    /// The device address of a buffer (or view) the kernel reads.
    pub(crate) fn addr<T>(&self, x: &dyn DevicePtr<T>) -> u64 {
        x.device_ptr(self.stream()).0
    }

    /// The device address of a buffer (or view) the kernel writes.
    pub(crate) fn addr_mut<T>(&self, x: &mut dyn DevicePtrMut<T>) -> u64 {
        x.device_ptr_mut(self.stream()).0
    }

    /// Queues `file::name(args...)` with launch shape `cfg` on the device's stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and type, and every pointer
    /// must address a live device buffer as large as the kernel reads or writes for `cfg`.
    pub(crate) unsafe fn launch_kernel(
        &self,
        file: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.grid_dim.1 == 0 || cfg.grid_dim.2 == 0 {
            return Ok(());
        }
        let f = self.function(file, name)?;
        let mut launch = self.stream().launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => launch.arg(p),
                Arg::I32(v) => launch.arg(v),
                Arg::I64(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
            };
        }
        // SAFETY: forwarded to the caller.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error(&format!("launching {name}"), e))?;
        Ok(())
    }
}
