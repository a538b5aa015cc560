//! `beit_context`: the device and the thread pool every pass runs on.

use super::status::read_versioned;
use std::mem::{offset_of, size_of};

use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null_mut, FfiError, FfiResult};
use crate::context::{Context, ContextOptions, Device};
use crate::resources::MemoryBudget;

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
    /// How many bytes one object planned on this context may need: a model, a trainer, the
    /// buffers of one pass over a batch, a tokenizer. Every such object is sized before it is
    /// allocated, and one that would need more is refused (`BEIT_ERR_CONFIG` when the size
    /// comes from a model config, `BEIT_ERR_INVALID_ARGUMENT` when it comes from an argument or
    /// an input) with a message naming the object, its size and "the memory budget set for this
    /// context". It bounds each object, not the sum of all of them. 0 (the default) means the
    /// memory available to the process when each object is planned (the smallest of the
    /// kernel's MemAvailable, the address-space limit and the cgroup limit). Added after the
    /// first version: a caller whose `struct_size` does not cover it gets the default.
    pub memory_budget: u64,
    /// Which GPU a `BEIT_DEVICE_CUDA` or `BEIT_DEVICE_AUTO` context uses, as the driver numbers
    /// them (after `CUDA_VISIBLE_DEVICES`); default 0. A process drives one GPU: once a context
    /// opened one, a context naming another is `BEIT_ERR_UNSUPPORTED` (run one process per GPU).
    /// A GPU the driver does not have is `BEIT_ERR_UNSUPPORTED` for cuda (auto takes the CPU
    /// and says why); a `BEIT_DEVICE_CPU` context needs 0. Added in the third version: a caller
    /// whose `struct_size` does not cover it gets the default.
    pub device_index: u32,
}

/// Size of the first version of `beit_context_options` (before `memory_budget`).
const CONTEXT_OPTIONS_V1_SIZE: usize = offset_of!(beit_context_options, memory_budget);
/// The end of the second version (`memory_budget`).
const CONTEXT_OPTIONS_V2_SIZE: usize = offset_of!(beit_context_options, memory_budget) + size_of::<u64>();
/// The end of the third version (`device_index`).
const CONTEXT_OPTIONS_V3_SIZE: usize = offset_of!(beit_context_options, device_index) + size_of::<u32>();

/// An execution context: a device and a thread pool of its own, so that a host's thread setting
/// is exact and independent of other libraries.
///
/// Its memory budget (`beit_context_options.memory_budget`) applies to everything planned on
/// it: models created or loaded with it, inference passes run on it, and the trainers and
/// tokenizers made with it (they keep using its budget and pool).
///
/// Thread safety: a context is never changed after creation; any number of threads may pass
/// one context to any calls at once (its pool is thread-safe; concurrent passes share its
/// workers). Free it only after every call using it has returned and after the models created
/// with it are freed.
#[allow(non_camel_case_types)]
pub struct beit_context {
    /// Shared so that trainers can keep the thread pool alive past `beit_context_free`.
    pub(crate) inner: std::sync::Arc<Context>,
}

// The thread-safety promise above, checked by the compiler: a context holds no state that
// shared use could race on.
const _: () = super::status::assert_thread_safe::<beit_context>();

/// The default context options: `BEIT_DEVICE_AUTO`, one thread per core, a memory budget of
/// what the process has available.
#[no_mangle]
pub extern "C" fn beit_context_options_default() -> beit_context_options {
    beit_context_options {
        struct_size: size_of::<beit_context_options>(),
        device: RawDevice(beit_device::BEIT_DEVICE_AUTO as u32),
        num_threads: 0,
        memory_budget: 0,
        device_index: 0,
    }
}

/// Reads the caller's options: a struct from an older header is shorter than this version's,
/// so only the fields its `struct_size` covers are read; the others keep their defaults.
///
/// # Safety
/// `opts` must be non-NULL and readable for its `struct_size` bytes.
unsafe fn read_options(opts: *const beit_context_options) -> FfiResult<beit_context_options> {
    // SAFETY: the caller's promise; check_struct_size makes sure the first version's fields
    // are covered, and read_versioned reads no further than struct_size.
    unsafe {
        let size = check_struct_size(opts, "opts", CONTEXT_OPTIONS_V1_SIZE)?;
        let versions = [CONTEXT_OPTIONS_V1_SIZE, CONTEXT_OPTIONS_V2_SIZE, CONTEXT_OPTIONS_V3_SIZE];
        Ok(read_versioned(opts, size, beit_context_options_default(), &versions))
    }
}

/// The budget `memory_budget` (bytes; 0 for what is available) asks for.
fn memory_budget(bytes: u64) -> MemoryBudget {
    match bytes {
        0 => MemoryBudget::Available,
        n => MemoryBudget::Bytes(n),
    }
}

/// Creates a context. `opts` may be NULL for the defaults. On success `*out` receives a new
/// context, to be released with `beit_context_free`; on failure `*out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size, device or
/// thread count), `BEIT_ERR_UNSUPPORTED` (a device this build or machine lacks).
///
/// A struct from an older header (a `struct_size` that ends before `memory_budget`) is
/// accepted: the fields it lacks take their defaults.
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
            // SAFETY: non-NULL; the caller promises a readable struct of struct_size bytes.
            unsafe { read_options(opts) }?
        };
        let device = options.device.to_device()?;
        let threads = usize::try_from(options.num_threads).unwrap_or(usize::MAX);
        let memory_budget = Some(memory_budget(options.memory_budget));
        let device_index = usize::try_from(options.device_index).unwrap_or(usize::MAX);
        let inner = Context::new(&ContextOptions { device, threads, memory_budget, device_index })?;
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

    #[test]
    fn the_memory_budget_reaches_the_context() {
        let create = |opts: *const beit_context_options| {
            let mut ctx: *mut beit_context = ptr::null_mut();
            assert_eq!(unsafe { beit_context_create(opts, &mut ctx) }, beit_status::BEIT_OK);
            let budget = unsafe { &(*ctx).inner }.memory_budget();
            unsafe { beit_context_free(ctx) };
            budget
        };
        assert_eq!(beit_context_options_default().memory_budget, 0);
        assert_eq!(create(&beit_context_options_default()), MemoryBudget::Available);
        assert_eq!(create(ptr::null()), MemoryBudget::Available);
        let opts = beit_context_options { memory_budget: 1 << 20, ..beit_context_options_default() };
        assert_eq!(create(&opts), MemoryBudget::Bytes(1 << 20));
        // struct_size, device, num_threads: the first version's size must not change.
        assert_eq!(CONTEXT_OPTIONS_V1_SIZE, size_of::<usize>() + 8);
    }

    #[test]
    fn device_index_is_read_and_checked() {
        let mut ctx: *mut beit_context = ptr::null_mut();
        // A cpu context has no GPU to pick.
        let opts = beit_context_options {
            device: RawDevice(beit_device::BEIT_DEVICE_CPU as u32),
            device_index: 1,
            ..beit_context_options_default()
        };
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        let msg = unsafe { std::ffi::CStr::from_ptr(super::super::status::beit_last_error_message()) };
        assert!(msg.to_str().unwrap().contains("device_index 1"), "{msg:?}");
        // A struct of the second version (up to memory_budget) never reads device_index.
        let older = beit_context_options { struct_size: offset_of!(beit_context_options, device_index), ..opts };
        assert_eq!(unsafe { beit_context_create(&older, &mut ctx) }, beit_status::BEIT_OK);
        unsafe { beit_context_free(ctx) };
    }

    #[test]
    fn an_older_struct_without_the_budget_gets_the_default() {
        // The first version of the struct, followed by a word that is not part of it: a library
        // that read past struct_size would take it for the budget.
        #[repr(C)]
        struct V1 {
            struct_size: usize,
            device: RawDevice,
            num_threads: u32,
        }
        #[repr(C)]
        struct V1AndBeyond {
            v1: V1,
            beyond: u64,
        }
        for struct_size in [size_of::<V1>(), CONTEXT_OPTIONS_V2_SIZE - 1] {
            let old = V1AndBeyond {
                v1: V1 { struct_size, device: RawDevice(beit_device::BEIT_DEVICE_CPU as u32), num_threads: 1 },
                beyond: 1,
            };
            let mut ctx: *mut beit_context = ptr::null_mut();
            let st =
                unsafe { beit_context_create(&old as *const V1AndBeyond as *const beit_context_options, &mut ctx) };
            assert_eq!(st, beit_status::BEIT_OK);
            let inner = unsafe { &(*ctx).inner };
            assert_eq!(
                (inner.memory_budget(), inner.threads()),
                (MemoryBudget::Available, 1),
                "struct_size {struct_size}"
            );
            unsafe { beit_context_free(ctx) };
        }
    }

    #[test]
    fn a_model_over_the_budget_is_a_config_error() {
        use crate::ffi::model::{beit_architecture, beit_model, beit_model_create, beit_model_free, RawArchitecture};
        let opts = beit_context_options { memory_budget: 1 << 20, num_threads: 1, ..beit_context_options_default() };
        let mut ctx: *mut beit_context = ptr::null_mut();
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        let base = c"{}";
        let arch = RawArchitecture(beit_architecture::BEIT_ARCH_BACKBONE as u32);
        let mut model: *mut beit_model = ptr::null_mut();
        let st = unsafe { beit_model_create(ctx, base.as_ptr(), arch, 1, &mut model) };
        let msg = unsafe { std::ffi::CStr::from_ptr(crate::ffi::status::beit_last_error_message()) };
        let msg = msg.to_str().unwrap();
        assert_eq!(st, beit_status::BEIT_ERR_CONFIG, "{msg}");
        assert!(msg.contains("memory budget set for this context") && msg.contains("1.0 MiB"), "{msg}");
        assert!(model.is_null());
        // A tiny model fits the same budget.
        let tiny = c"{\"hidden_size\": 8, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"intermediate_size\": 16, \"image_size\": 8, \"patch_size\": 4}";
        let st = unsafe { beit_model_create(ctx, tiny.as_ptr(), arch, 1, &mut model) };
        assert_eq!(st, beit_status::BEIT_OK);
        unsafe {
            beit_model_free(model);
            beit_context_free(ctx);
        }
    }
}
