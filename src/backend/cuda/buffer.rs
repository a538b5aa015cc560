//! Device buffers: cudarc's `CudaSlice<T>` (freed on drop, on the device's stream), with
//! upload/download helpers that return libbeit errors. `T` is `f32`, `half::bf16`, `u8`, `i32`...
//! (any cudarc `DeviceRepr`).

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use super::device::{driver_error, CudaDevice};
use crate::error::Result;

/// A buffer on the GPU.
pub type DeviceBuffer<T> = CudaSlice<T>;

impl CudaDevice {
    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        self.stream().clone_htod(host).map_err(|e| driver_error("host-to-device copy", e))
    }

    /// Copies `host` into an existing buffer of the same length.
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        Self::check_len("upload_into", dst, host.len())?;
        self.stream().memcpy_htod(host, dst).map_err(|e| driver_error("host-to-device copy", e))
    }

    /// Copies a device buffer to a new host vector (waits for the queued work that writes it).
    pub fn download<T: DeviceRepr>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        self.stream().clone_dtoh(buf).map_err(|e| driver_error("device-to-host copy", e))
    }

    /// A zero-filled buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        self.stream().alloc_zeros(n).map_err(|e| driver_error(&format!("allocating {n} elements"), e))
    }

    /// A buffer of `n` elements with undefined contents, for outputs a kernel overwrites fully.
    ///
    /// # Safety
    /// Reading an element before writing it reads garbage (not UB for plain numbers, but wrong).
    pub unsafe fn alloc_uninit<T: DeviceRepr>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        // SAFETY: forwarded to the caller.
        unsafe { self.stream().alloc(n) }.map_err(|e| driver_error(&format!("allocating {n} elements"), e))
    }
}
