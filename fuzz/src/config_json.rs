//! The checks of the `config_json` fuzz target, shared with tests/config_json_fuzz.rs (included
//! there with `#[path]`, so that `cargo test` runs them without nightly or libFuzzer).
//!
//! Arbitrary bytes as a Hugging Face config.json: `BeitConfig::from_json_str`, then a model of
//! every architecture (`Model::new_random`, and `beit_model_create` through the C API) under a
//! small memory budget. Whatever the bytes, nothing may panic, abort (an allocation the budget
//! should have refused), hang (libFuzzer's -timeout), or report an internal error; every
//! refusal carries a message.

use std::ffi::CString;

use beit::ffi::context::{
    beit_context, beit_context_create, beit_context_free, beit_context_options, beit_context_options_default,
};
use beit::ffi::model::{beit_model_create, beit_model_free, RawArchitecture};
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::resources::{with_budget, MemoryBudget};
use beit::{Architecture, BeitConfig, Error, Model};

/// What one model may need here: a few MiB keeps every accepted config fast to build, and
/// anything larger must be refused before it is allocated.
pub const BUDGET: u64 = 4 << 20;

pub const ARCHITECTURES: [Architecture; 4] = [
    Architecture::Backbone,
    Architecture::MaskedImageModeling,
    Architecture::ImageClassification,
    Architecture::SemanticSegmentation,
];

/// Runs the config parser and model creation on `data`. Panics only when the library
/// misbehaves: a panic of its own, an internal error, an error without a message, or a model
/// that does not match the config it was made from.
pub fn check(data: &[u8], ctx: &Context) {
    with_budget(MemoryBudget::Bytes(BUDGET), || {
        if let Ok(text) = std::str::from_utf8(data) {
            check_rust(text);
        }
        check_c_api(data, ctx);
    });
}

fn check_rust(text: &str) {
    let cfg = match BeitConfig::from_json_str(text) {
        Ok(cfg) => cfg,
        Err(e) => return refused(&e, "BeitConfig::from_json_str"),
    };
    for arch in ARCHITECTURES {
        match Model::new_random(cfg.clone(), arch, 0) {
            Ok(model) => {
                assert_eq!(model.architecture(), arch);
                assert_eq!(model.config().hidden_size, cfg.hidden_size);
                let n = model.params().data.len() as u64;
                assert!(n * 4 <= BUDGET, "a {n}-parameter model was made under a {BUDGET}-byte budget");
            }
            Err(e) => refused(&e, &format!("Model::new_random({arch:?})")),
        }
    }
}

fn refused(e: &Error, call: &str) {
    assert!(!matches!(e, Error::Internal(_)), "{call}: internal error: {e}");
    assert!(!e.message().is_empty(), "{call}: an error without a message");
}

/// A C API context for the checks (one per process: creating a thread pool per input would
/// dominate the run).
pub struct Context(*mut beit_context);

// SAFETY: the C API documents a context as usable from any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// A context whose memory budget is [`BUDGET`], as a C host sets it.
    pub fn new() -> Context {
        let mut ctx = std::ptr::null_mut();
        let opts = beit_context_options { memory_budget: BUDGET, ..beit_context_options_default() };
        // SAFETY: valid options and a writable out-pointer.
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        Context(ctx)
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: a live context, freed once.
        unsafe { beit_context_free(self.0) };
    }
}

/// `beit_model_create` with the bytes up to the first NUL (what a C caller's string holds),
/// for every architecture and one that does not exist, on a context whose budget is [`BUDGET`].
fn check_c_api(data: &[u8], ctx: &Context) {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = CString::new(&data[..end]).expect("no NUL before `end`");
    for arch in [0u32, 1, 2, 3, 4, u32::MAX] {
        let mut model = std::ptr::null_mut();
        // SAFETY: a live context, a NUL-terminated string, a writable out-pointer.
        let status = unsafe { beit_model_create(ctx.0, text.as_ptr(), RawArchitecture(arch), 0, &mut model) };
        assert_ne!(status, beit_status::BEIT_ERR_INTERNAL, "beit_model_create(arch {arch}): {}", last_message());
        if status == beit_status::BEIT_OK {
            assert!(!model.is_null());
            assert!(arch < 4, "beit_model_create accepted architecture {arch}");
        } else {
            assert!(model.is_null(), "a failed beit_model_create wrote *out");
            assert!(!last_message().is_empty(), "beit_model_create: {status:?} without a message");
        }
        // SAFETY: NULL or a live model, freed once.
        unsafe { beit_model_free(model) };
    }
}

fn last_message() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
    unsafe { std::ffi::CStr::from_ptr(beit_last_error_message()) }.to_string_lossy().into_owned()
}
