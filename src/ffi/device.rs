//! `beit_get_device_info`: what device `BEIT_DEVICE_AUTO` would use here, and why.
//!
//! The function is named `beit_get_device_info` rather than `beit_device_info` because C puts
//! typedef names and function names in one namespace, and the struct is `beit_device_info`.

use std::ffi::c_char;
use std::mem::size_of;

use super::context::{beit_device, RawDevice};
use super::model::write_versioned;
use super::status::{beit_status, check_struct_size, guard, non_null_mut};

/// Bytes of `beit_device_info::name`, including the terminating NUL.
pub const BEIT_DEVICE_NAME_BYTES: usize = 256;
/// Bytes of `beit_device_info::reason`, including the terminating NUL.
pub const BEIT_DEVICE_REASON_BYTES: usize = 512;

/// The device `BEIT_DEVICE_AUTO` picks on this machine, and the CUDA probe's findings.
/// Start from `beit_device_info_default()`; `struct_size` lets later versions add fields.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_device_info {
    /// Set by the caller to `sizeof(beit_device_info)`; left as it is.
    pub struct_size: usize,
    /// The device `BEIT_DEVICE_AUTO` picks: `BEIT_DEVICE_CPU` in this version whatever
    /// `cuda_usable` says (only pretraining runs on the CUDA backend so far: a trainer made on a
    /// `BEIT_DEVICE_CUDA` context steps on the GPU; inference and the tokenizer refuse such a
    /// context with `BEIT_ERR_UNSUPPORTED`).
    pub kind: RawDevice,
    /// 1 when the CUDA probe found a usable GPU, 0 when not (see `reason`).
    pub cuda_usable: u32,
    /// The GPU's name (device 0), or "cpu"; NUL-terminated UTF-8.
    pub name: [c_char; BEIT_DEVICE_NAME_BYTES],
    /// Compute capability of the GPU (e.g. 9 and 0 for an H100/H200); 0 without a GPU.
    pub compute_capability_major: i32,
    pub compute_capability_minor: i32,
    /// Total memory of the GPU in bytes; 0 without a GPU.
    pub total_memory: u64,
    /// The NVIDIA driver's CUDA version as 1000*major + 10*minor (13000 for 13.0); 0 without one.
    pub driver_version: i32,
    /// CUDA devices the driver sees; 0 without a driver.
    pub device_count: i32,
    /// The probe's sentence: the GPU found, or exactly what is missing; NUL-terminated UTF-8,
    /// truncated to fit.
    pub reason: [c_char; BEIT_DEVICE_REASON_BYTES],
}

const DEVICE_INFO_V1_SIZE: usize = size_of::<beit_device_info>();

/// A zeroed `beit_device_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_device_info_default() -> beit_device_info {
    beit_device_info {
        struct_size: size_of::<beit_device_info>(),
        kind: RawDevice(beit_device::BEIT_DEVICE_CPU as u32),
        cuda_usable: 0,
        name: [0; BEIT_DEVICE_NAME_BYTES],
        compute_capability_major: 0,
        compute_capability_minor: 0,
        total_memory: 0,
        driver_version: 0,
        device_count: 0,
        reason: [0; BEIT_DEVICE_REASON_BYTES],
    }
}

/// Copies `text` into a fixed C buffer, truncated at a UTF-8 character boundary, NUL-terminated.
fn fill<const N: usize>(dst: &mut [c_char; N], text: &str) {
    let mut end = text.len().min(N - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (d, &b) in dst.iter_mut().zip(&text.as_bytes()[..end]) {
        *d = b as c_char;
    }
    dst[end] = 0;
}

/// The probe's findings as `beit_device_info` (with `struct_size` set to `struct_size`).
pub(crate) fn device_info(struct_size: usize) -> beit_device_info {
    let report = crate::context::probe_cuda();
    let mut info = beit_device_info_default();
    info.struct_size = struct_size;
    info.cuda_usable = u32::from(report.usable);
    // What `auto` picks (see `Context::new`): CUDA when the probe says it is usable.
    let kind = if report.usable { beit_device::BEIT_DEVICE_CUDA } else { beit_device::BEIT_DEVICE_CPU };
    info.kind = RawDevice(kind as u32);
    info.driver_version = report.driver_version;
    info.device_count = report.device_count;
    match &report.gpu {
        Some(gpu) => {
            fill(&mut info.name, &gpu.name);
            info.compute_capability_major = gpu.compute_capability.0;
            info.compute_capability_minor = gpu.compute_capability.1;
            info.total_memory = gpu.total_memory;
        }
        None => fill(&mut info.name, "cpu"),
    }
    fill(&mut info.reason, &report.reason);
    info
}

/// Describes the device `BEIT_DEVICE_AUTO` would use: probes CUDA on the first call (never
/// crashes on a machine without CUDA) and writes what it found to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size too small).
///
/// # Safety
/// `out` must be NULL or point to a writable `beit_device_info` of at least its `struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_get_device_info(out: *mut beit_device_info) -> beit_status {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", DEVICE_INFO_V1_SIZE) }?;
        let info = device_info(size);
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_truncates_at_char_boundary() {
        let mut buf = [1 as c_char; 4];
        fill(&mut buf, "aé"); // 3 bytes + NUL fits exactly
        assert_eq!(buf.map(|c| c as u8), [b'a', 0xc3, 0xa9, 0]);
        fill(&mut buf, "abé"); // é would need bytes 2..4: cut before it
        assert_eq!(&buf.map(|c| c as u8)[..3], &[b'a', b'b', 0]);
    }
}
