//! `beit_context`: the device and the thread pool every pass runs on.

use std::mem::size_of;

use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null_mut, FfiError, FfiResult};
use crate::context::{Context, ContextOptions, Device};

/// Where a context runs work.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_device {
    /// CUDA when this build has it and a GPU is usable, else the CPU.
    BEIT_DEVICE_AUTO = 0,
    /// The CPU.
    BEIT_DEVICE_CPU = 1,
    /// CUDA; an error (`BEIT_ERR_UNSUPPORTED`) when unavailable, never a silent fallback.
    BEIT_DEVICE_CUDA = 2,
}

/// A `beit_device` as C passes it in: any 32-bit value, checked before use. The header shows it
/// as `beit_device` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDevice(pub u32);

impl RawDevice {
    fn to_device(self) -> FfiResult<Device> {
        match self.0 {
            0 => Ok(Device::Auto),
            1 => Ok(Device::Cpu),
            2 => Ok(Device::Cuda),
            other => Err(FfiError::invalid(format!(
                "device {other} is not a beit_device (BEIT_DEVICE_AUTO = 0, BEIT_DEVICE_CPU = 1, BEIT_DEVICE_CUDA = 2)"
            ))),
        }
    }
}

/// Options of `beit_context_create`. Start from `beit_context_options_default()` and change
/// the fields you need; `struct_size` lets later versions add fields at the end.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_context_options {
    /// `sizeof(beit_context_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Where work runs (default `BEIT_DEVICE_AUTO`).
    pub device: RawDevice,
    /// Worker threads of the context's pool; 0 (the default) means one per available core.
    pub num_threads: u32,
}

/// Size of the first version of `beit_context_options`.
const CONTEXT_OPTIONS_V1_SIZE: usize = size_of::<beit_context_options>();

/// An execution context: a device and a thread pool of its own, so that a host's thread setting
/// is exact and independent of other libraries.
///
/// Thread safety: a context may be shared by many threads; concurrent `beit_model_infer` calls
/// on one context are safe (its pool is thread-safe; the passes share its workers). Free it
/// only after every call using it has returned and after the models created with it are freed.
#[allow(non_camel_case_types)]
pub struct beit_context {
    /// Shared so that trainers can keep the thread pool alive past `beit_context_free`.
    pub(crate) inner: std::sync::Arc<Context>,
}

/// The default context options: `BEIT_DEVICE_AUTO`, one thread per core.
#[no_mangle]
pub extern "C" fn beit_context_options_default() -> beit_context_options {
    beit_context_options {
        struct_size: size_of::<beit_context_options>(),
        device: RawDevice(beit_device::BEIT_DEVICE_AUTO as u32),
        num_threads: 0,
    }
}

/// Creates a context. `opts` may be NULL for the defaults. On success `*out` receives a new
/// context, to be released with `beit_context_free`; on failure `*out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size, device or
/// thread count), `BEIT_ERR_UNSUPPORTED` (a device this build or machine lacks).
///
/// # Safety
/// `opts` must be NULL or point to a readable `beit_context_options` of at least its
/// `struct_size` bytes; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_context_create(
    opts: *const beit_context_options,
    out: *mut *mut beit_context,
) -> beit_status {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let options = if opts.is_null() {
            beit_context_options_default()
        } else {
            // SAFETY: non-NULL; the caller promises a readable struct of struct_size bytes, and
            // check_struct_size makes sure that covers every field read here.
            unsafe {
                check_struct_size(opts, "opts", CONTEXT_OPTIONS_V1_SIZE)?;
                opts.read_unaligned()
            }
        };
        let device = options.device.to_device()?;
        let threads = usize::try_from(options.num_threads).unwrap_or(usize::MAX);
        let inner = Context::new(&ContextOptions { device, threads, ..Default::default() })?;
        let handle = Box::into_raw(Box::new(beit_context { inner: std::sync::Arc::new(inner) }));
        // SAFETY: non-NULL, and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a context made by `beit_context_create`. NULL is a no-op.
///
/// # Safety
/// `ctx` must be NULL or a context from `beit_context_create` not freed before, that no other
/// thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_context_free(ctx: *mut beit_context) {
    guard_infallible((), || {
        if !ctx.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(ctx) });
        }
    })
}

/// The context behind a handle, or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `ctx` must be NULL or a live context.
pub(crate) unsafe fn context_ref<'a>(ctx: *const beit_context, name: &str) -> FfiResult<&'a Context> {
    let ctx = super::status::non_null(ctx, name)?;
    // SAFETY: non-NULL; the caller promises a live context.
    Ok(unsafe { &(*ctx).inner })
}

/// A shared reference to the context behind a handle (for handles that keep using its thread
/// pool, like trainers), or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `ctx` must be NULL or a live context.
pub(crate) unsafe fn context_shared(ctx: *const beit_context, name: &str) -> FfiResult<std::sync::Arc<Context>> {
    let ctx = super::status::non_null(ctx, name)?;
    // SAFETY: non-NULL; the caller promises a live context.
    Ok(std::sync::Arc::clone(unsafe { &(*ctx).inner }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr;

    #[test]
    fn create_and_free() {
        let mut opts = beit_context_options_default();
        opts.device = RawDevice(beit_device::BEIT_DEVICE_CPU as u32);
        opts.num_threads = 2;
        let mut ctx: *mut beit_context = ptr::null_mut();
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        assert!(!ctx.is_null());
        assert_eq!(unsafe { &(*ctx).inner }.threads(), 2);
        unsafe { beit_context_free(ctx) };
        unsafe { beit_context_free(ptr::null_mut()) };
    }

    #[test]
    fn bad_options() {
        let mut ctx: *mut beit_context = ptr::null_mut();
        let mut opts = beit_context_options_default();
        opts.device = RawDevice(7);
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        opts = beit_context_options_default();
        opts.struct_size = 4;
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        opts = beit_context_options_default();
        opts.num_threads = 100_000;
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(ctx.is_null(), "out is written only on success");
        assert_eq!(unsafe { beit_context_create(ptr::null(), ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);
    }
}
