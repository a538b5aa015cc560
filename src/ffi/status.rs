//! Status codes, the thread-local last error message, and the panic boundary that every export
//! goes through.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

/// The result of every fallible libbeit call. `BEIT_OK` (0) means success; for any other value
/// `beit_last_error_message()` tells, in words, what went wrong.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_status {
    /// Success.
    BEIT_OK = 0,
    /// An argument is unusable: a wrong shape or length, a bad option value, a too small
    /// `struct_size`, an output the model does not have.
    BEIT_ERR_INVALID_ARGUMENT = 1,
    /// A required pointer argument is NULL (the message names it).
    BEIT_ERR_NULL_POINTER = 2,
    /// A file or directory could not be read or written.
    BEIT_ERR_IO = 3,
    /// A file was read but its content is wrong: bad JSON, corrupt or truncated safetensors,
    /// a missing tensor or a tensor of the wrong shape.
    BEIT_ERR_FORMAT = 4,
    /// A config that cannot describe a working model (e.g. hidden_size not divisible by
    /// num_attention_heads).
    BEIT_ERR_CONFIG = 5,
    /// A requested device or feature is not available in this build.
    BEIT_ERR_UNSUPPORTED = 6,
    /// A caller-owned output buffer has the wrong length (the message gives both lengths).
    BEIT_ERR_BUFFER_SIZE = 7,
    /// A bug in libbeit (for instance a caught panic). Please report it with the message.
    BEIT_ERR_INTERNAL = 8,
    /// Training produced a non-finite loss or gradient (it diverged, e.g. a learning rate too
    /// high); the step was not applied and the trainer is unchanged.
    BEIT_ERR_NUMERICAL = 9,
    /// The handle is in use by a call on another thread (e.g. two `beit_trainer_step` calls on
    /// one trainer at once); nothing was done. Handles documented as "one thread at a time"
    /// refuse concurrent use with this status instead of corrupting themselves.
    BEIT_ERR_BUSY = 10,
}

/// A `beit_status` as C passes it in: any 32-bit value, checked before use. The header shows it
/// as `beit_status` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStatus(pub u32);

/// What an export failed with: a status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub status: beit_status,
    pub message: String,
}

impl FfiError {
    pub fn new(status: beit_status, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(beit_status::BEIT_ERR_INVALID_ARGUMENT, message)
    }

    pub fn buffer_size(message: impl Into<String>) -> Self {
        Self::new(beit_status::BEIT_ERR_BUFFER_SIZE, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_) => beit_status::BEIT_ERR_INVALID_ARGUMENT,
            Error::Io(_) => beit_status::BEIT_ERR_IO,
            Error::Format(_) => beit_status::BEIT_ERR_FORMAT,
            Error::Config(_) => beit_status::BEIT_ERR_CONFIG,
            Error::Unsupported(_) => beit_status::BEIT_ERR_UNSUPPORTED,
            Error::Internal(_) => beit_status::BEIT_ERR_INTERNAL,
            Error::Numerical(_) => beit_status::BEIT_ERR_NUMERICAL,
            Error::Busy(_) => beit_status::BEIT_ERR_BUSY,
        };
        FfiError { status, message: e.message().to_string() }
    }
}

pub(crate) type FfiResult<T> = std::result::Result<T, FfiError>;

thread_local! {
    /// The message of the last failed call on this thread ("" after a call that succeeded).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // An interior NUL would cut the message short; C hosts cannot see past it anyway.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with` fails only while the thread is being torn down; nothing to report to then.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = text);
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|slot| {
        let mut slot = slot.borrow_mut();
        if !slot.as_bytes().is_empty() {
            *slot = CString::default();
        }
    });
}

/// The text of a caught panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// The panic boundary of every fallible export: clears the thread's last error, runs `f`,
/// catches any panic (reported as `BEIT_ERR_INTERNAL` with the panic message), records the
/// error message, and returns the status. Nothing ever unwinds into C.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult<()>) -> beit_status {
    clear_last_error();
    let outcome = catch_unwind(AssertUnwindSafe(f));
    let error = match outcome {
        Ok(Ok(())) => {
            // Cleared again: a host callback run during the call (a training run's progress)
            // may have made calls of its own that failed on this thread.
            clear_last_error();
            return beit_status::BEIT_OK;
        }
        Ok(Err(e)) => e,
        Err(payload) => {
            let message = format!("libbeit panicked (this is a bug, please report it): {}", panic_message(&*payload));
            // Dropping a payload can itself panic (a payload whose Drop panics); never let
            // that unwind into C.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            FfiError::new(beit_status::BEIT_ERR_INTERNAL, message)
        }
    };
    set_last_error(&error.message);
    error.status
}

/// The panic boundary of the infallible exports (free functions, defaults): runs `f`, and on a
/// panic returns `fallback` instead of unwinding. The last error message is not touched.
pub(crate) fn guard_infallible<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            fallback
        }
    }
}

/// Compiles only for a `T` that many threads may use at once through shared references: the
/// handles documented as safe to share state that promise with this (a `RefCell` or `Cell`
/// inside one, or a non-thread-safe reference count, would fail the build).
pub(crate) const fn assert_thread_safe<T: Send + Sync>() {}

/// Rejects a NULL pointer with a message naming the argument.
pub(crate) fn non_null<T>(ptr: *const T, name: &str) -> FfiResult<*const T> {
    if ptr.is_null() {
        Err(FfiError::new(beit_status::BEIT_ERR_NULL_POINTER, format!("{name} is NULL")))
    } else {
        Ok(ptr)
    }
}

/// Rejects a NULL out-pointer with a message naming the argument.
pub(crate) fn non_null_mut<T>(ptr: *mut T, name: &str) -> FfiResult<*mut T> {
    non_null(ptr as *const T, name).map(|p| p as *mut T)
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string valid for the call.
pub(crate) unsafe fn utf8_arg<'a>(ptr: *const c_char, name: &str) -> FfiResult<&'a str> {
    let ptr = non_null(ptr, name)?;
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes.to_str().map_err(|e| FfiError::invalid(format!("{name} is not valid UTF-8: {e}")))
}

/// Reads the leading `size_t struct_size` of a versioned struct and checks it against the size
/// of the struct's first version. Larger values (structs from a newer header) are accepted.
///
/// # Safety
/// `ptr` must be non-NULL and point to at least a readable `size_t`.
pub(crate) unsafe fn check_struct_size<T>(ptr: *const T, name: &str, first_version_size: usize) -> FfiResult<usize> {
    // SAFETY: every versioned struct starts with a size_t; the caller checked `ptr`.
    let size = unsafe { (ptr as *const usize).read_unaligned() };
    if size < first_version_size {
        return Err(FfiError::invalid(format!(
            "{name}->struct_size is {size}, smaller than the {first_version_size} bytes of the first version of \
             this struct (set it to sizeof the struct, or start from the *_default() function)"
        )));
    }
    Ok(size)
}

/// Reads a caller's versioned input struct of `caller_size` bytes: the versions' ends
/// (`version_ends`: the size of each version, the offset where the next one's fields start)
/// that `caller_size` covers come from the caller, the rest (fields added after the caller's
/// header, or covered only in part by an odd `struct_size`) from `defaults`.
///
/// # Safety
/// `src` must be readable for `caller_size` bytes.
pub(crate) unsafe fn read_versioned<T: Copy>(
    src: *const T,
    caller_size: usize,
    defaults: T,
    version_ends: &[usize],
) -> T {
    let mut value = defaults;
    let n = version_ends.iter().copied().filter(|&end| end <= caller_size.min(size_of::<T>())).max().unwrap_or(0);
    // SAFETY: `src` is readable for `n <= caller_size` bytes (the caller's promise) and `value`
    // is a `T` of at least `n` bytes; the fields are plain numbers and pointers, valid for any
    // bytes the caller wrote into them.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, &mut value as *mut T as *mut u8, n) };
    value
}

/// The message of the last failed libbeit call on the calling thread.
///
/// Every fallible function (one returning `beit_status`) clears the message when it starts, so
/// after a successful call this is the empty string. Never NULL. The pointer stays valid until
/// the next libbeit call on the same thread; copy the text to keep it. Each thread has its own
/// message, so this is safe to call from any thread.
#[no_mangle]
pub extern "C" fn beit_last_error_message() -> *const c_char {
    static EMPTY: &CStr = c"";
    guard_infallible(EMPTY.as_ptr(), || LAST_ERROR.try_with(|slot| slot.borrow().as_ptr()).unwrap_or(EMPTY.as_ptr()))
}

/// The name of a status code as a static string (e.g. "BEIT_ERR_IO"); "BEIT_UNKNOWN_STATUS" for
/// a value this version does not know. Never NULL; the string must not be freed.
#[no_mangle]
pub extern "C" fn beit_status_name(status: RawStatus) -> *const c_char {
    let name: &'static CStr = match status.0 {
        0 => c"BEIT_OK",
        1 => c"BEIT_ERR_INVALID_ARGUMENT",
        2 => c"BEIT_ERR_NULL_POINTER",
        3 => c"BEIT_ERR_IO",
        4 => c"BEIT_ERR_FORMAT",
        5 => c"BEIT_ERR_CONFIG",
        6 => c"BEIT_ERR_UNSUPPORTED",
        7 => c"BEIT_ERR_BUFFER_SIZE",
        8 => c"BEIT_ERR_INTERNAL",
        9 => c"BEIT_ERR_NUMERICAL",
        10 => c"BEIT_ERR_BUSY",
        _ => c"BEIT_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: beit_last_error_message never returns NULL and the string is NUL-terminated.
        unsafe { CStr::from_ptr(beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    #[test]
    fn a_panic_inside_the_guard_is_internal_with_its_message() {
        let status = guard(|| panic!("boom at the boundary"));
        assert_eq!(status, beit_status::BEIT_ERR_INTERNAL);
        let msg = last_error();
        assert!(msg.contains("boom at the boundary"), "{msg}");
        assert!(msg.contains("panicked"), "{msg}");
    }

    #[test]
    fn a_formatted_panic_message_is_kept() {
        let n = 42;
        let status = guard(|| panic!("value {n} out of range"));
        assert_eq!(status, beit_status::BEIT_ERR_INTERNAL);
        assert!(last_error().contains("value 42 out of range"));
    }

    #[test]
    fn a_panic_with_an_odd_payload_is_still_caught() {
        let status = guard(|| std::panic::panic_any(17u32));
        assert_eq!(status, beit_status::BEIT_ERR_INTERNAL);
        assert!(last_error().contains("unknown panic payload"));
    }

    #[test]
    fn a_panic_in_the_thread_pool_is_caught() {
        let ctx = crate::Context::new(&crate::ContextOptions {
            device: crate::Device::Cpu,
            threads: 2,
            ..Default::default()
        })
        .unwrap();
        let status = guard(|| ctx.run(|| panic!("worker panic")));
        assert_eq!(status, beit_status::BEIT_ERR_INTERNAL);
        assert!(last_error().contains("worker panic"));
        // The pool survives and still works.
        assert_eq!(ctx.run(|| 1 + 1), 2);
    }

    #[test]
    fn success_clears_the_message_and_errors_map_to_statuses() {
        assert_eq!(guard(|| Err(Error::Config("bad heads".into()).into())), beit_status::BEIT_ERR_CONFIG);
        assert_eq!(last_error(), "bad heads");
        assert_eq!(guard(|| Ok(())), beit_status::BEIT_OK);
        assert_eq!(last_error(), "");
        assert_eq!(guard(|| Err(Error::Io("x".into()).into())), beit_status::BEIT_ERR_IO);
        assert_eq!(guard(|| Err(Error::Format("x".into()).into())), beit_status::BEIT_ERR_FORMAT);
        assert_eq!(guard(|| Err(Error::Unsupported("x".into()).into())), beit_status::BEIT_ERR_UNSUPPORTED);
        assert_eq!(guard(|| Err(Error::InvalidArgument("x".into()).into())), beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert_eq!(guard(|| Err(Error::Internal("x".into()).into())), beit_status::BEIT_ERR_INTERNAL);
        assert_eq!(guard(|| Err(Error::Busy("x".into()).into())), beit_status::BEIT_ERR_BUSY);
    }

    #[test]
    fn messages_are_per_thread() {
        assert_eq!(guard(|| Err(FfiError::invalid("main thread"))), beit_status::BEIT_ERR_INVALID_ARGUMENT);
        std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            guard(|| Err(FfiError::invalid("other thread")));
            assert_eq!(last_error(), "other thread");
        })
        .join()
        .unwrap();
        assert_eq!(last_error(), "main thread");
    }

    #[test]
    fn interior_nul_does_not_lose_the_message() {
        guard(|| Err(FfiError::invalid("before\0after")));
        assert_eq!(last_error(), "before\\0after");
    }

    #[test]
    fn infallible_guard_returns_the_fallback_on_panic() {
        assert_eq!(guard_infallible(7, || panic!("nope")), 7);
        assert_eq!(guard_infallible(7, || 3), 3);
    }

    #[test]
    fn status_names() {
        let name = |s: u32| unsafe { CStr::from_ptr(beit_status_name(RawStatus(s))) }.to_str().unwrap();
        assert_eq!(name(beit_status::BEIT_OK as u32), "BEIT_OK");
        assert_eq!(name(beit_status::BEIT_ERR_BUFFER_SIZE as u32), "BEIT_ERR_BUFFER_SIZE");
        assert_eq!(name(beit_status::BEIT_ERR_INTERNAL as u32), "BEIT_ERR_INTERNAL");
        assert_eq!(name(beit_status::BEIT_ERR_BUSY as u32), "BEIT_ERR_BUSY");
        assert_eq!(name(999), "BEIT_UNKNOWN_STATUS");
    }
}
