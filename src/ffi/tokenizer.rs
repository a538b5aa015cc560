//! `beit_tokenizer`: the visual tokenizer (a dVAE, [`crate::dvae::Dvae`]) behind the C API:
//! images to visual tokens, and, for tokenizers with a decoder, tokens back to images.

use std::ffi::c_char;
use std::mem::size_of;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::context::{beit_context, context_shared};
use super::model::{check_slice, write_versioned};
use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg};
use super::status::{FfiError, FfiResult};
use crate::context::{Context, Device};
use crate::dvae::{map_pixels, unmap_pixels, Dvae, DvaeConfig};
use crate::train::gpu_dvae::GpuTokenizer;

/// A loaded visual tokenizer, never modified after loading.
///
/// Thread safety: a tokenizer is immutable; any number of threads may call
/// `beit_tokenizer_get_info`, `beit_tokenizer_tokenize` and `beit_tokenizer_decode` on one
/// tokenizer at once. It runs on the thread pool of the context it was loaded with, which it
/// shares, so the context handle may be freed first. Free it only when no call is using it.
/// On a cuda context it tokenizes and decodes on the GPU (one call at a time; others wait).
#[allow(non_camel_case_types)]
pub struct beit_tokenizer {
    /// Shared with the loaders that tokenize with it (`beit_loader`), which may outlive it.
    inner: Arc<Dvae>,
    /// The thread pool of the context the tokenizer was loaded with, shared.
    ctx: Arc<Context>,
    /// The parameters on the GPU, for a cuda context: its tokenizing and decoding passes.
    gpu: Option<Mutex<GpuTokenizer>>,
}

// The thread-safety promise above, checked by the compiler: nothing in a tokenizer changes
// after loading (the GPU's pass memory is behind a lock).
const _: () = super::status::assert_thread_safe::<beit_tokenizer>();

/// What a tokenizer takes and gives. Set `struct_size` (or start from
/// `beit_tokenizer_info_default()`); only the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_tokenizer_info {
    /// Set by the caller to `sizeof(beit_tokenizer_info)`; left as it is.
    pub struct_size: usize,
    /// Channels C of an input image (`in_channels`).
    pub in_channels: usize,
    /// Height and width S of an input image (`image_size`); images are S x S.
    pub image_size: usize,
    /// Number of distinct tokens (`vocab_size`): every token is in `[0, vocab_size)`.
    pub vocab_size: usize,
    /// Rows of an image's token grid.
    pub grid_h: usize,
    /// Columns of an image's token grid.
    pub grid_w: usize,
    /// Tokens per image, `grid_h * grid_w`.
    pub tokens_per_image: usize,
    /// Whether the tokenizer has a decoder (`beit_tokenizer_decode` works).
    pub has_decoder: bool,
}

pub(crate) const TOKENIZER_INFO_V1_SIZE: usize = size_of::<beit_tokenizer_info>();

/// A zeroed `beit_tokenizer_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_tokenizer_info_default() -> beit_tokenizer_info {
    beit_tokenizer_info {
        struct_size: size_of::<beit_tokenizer_info>(),
        in_channels: 0,
        image_size: 0,
        vocab_size: 0,
        grid_h: 0,
        grid_w: 0,
        tokens_per_image: 0,
        has_decoder: false,
    }
}

impl beit_tokenizer {
    /// A tokenizer handle for `dvae` on `ctx`: on a cuda context its parameters are uploaded
    /// to the GPU for the tokenizing and decoding passes.
    pub(crate) fn new(dvae: Dvae, ctx: Arc<Context>) -> FfiResult<Self> {
        let gpu = match ctx.device() {
            Device::Cuda => Some(Mutex::new(GpuTokenizer::new(&dvae)?)),
            _ => None,
        };
        Ok(beit_tokenizer { inner: Arc::new(dvae), ctx, gpu })
    }

    /// Hands the tokenizer to the caller through `out`.
    ///
    /// # Safety
    /// `out` must be non-NULL and writable.
    pub(crate) unsafe fn hand_out(self, out: *mut *mut beit_tokenizer) {
        let handle = Box::into_raw(Box::new(self));
        // SAFETY: the caller's promise.
        unsafe { out.write(handle) };
    }
}

/// What `beit_tokenizer_get_info` reports of a tokenizer of `config`, for a caller's struct of
/// `struct_size` bytes.
pub(crate) fn tokenizer_info(config: &DvaeConfig, struct_size: usize) -> beit_tokenizer_info {
    beit_tokenizer_info {
        struct_size,
        in_channels: config.in_channels,
        image_size: config.image_size,
        vocab_size: config.vocab_size,
        grid_h: config.grid(),
        grid_w: config.grid(),
        tokens_per_image: config.tokens_per_image(),
        has_decoder: config.has_decoder(),
    }
}

/// The tokenizer behind a handle, or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `tokenizer` must be NULL or a live tokenizer.
pub(crate) unsafe fn tokenizer_ref<'a>(tokenizer: *const beit_tokenizer) -> FfiResult<&'a beit_tokenizer> {
    let tokenizer = non_null(tokenizer, "tokenizer")?;
    // SAFETY: non-NULL; the caller promises a live tokenizer (immutable, so shared use is fine).
    Ok(unsafe { &*tokenizer })
}

impl beit_tokenizer {
    /// The tokenizer, shared.
    pub(crate) fn dvae(&self) -> &Arc<Dvae> {
        &self.inner
    }
}

/// `a * b * ...`, or None on overflow.
fn checked_product(factors: &[usize]) -> Option<usize> {
    factors.iter().try_fold(1usize, |acc, &f| acc.checked_mul(f))
}

/// Checks a caller's length against what `batch` images need; a wrong length is `status`.
fn check_len(name: &str, len: usize, want: Option<usize>, what: &str, status: beit_status) -> FfiResult<()> {
    match want {
        Some(want) if want == len => Ok(()),
        Some(want) => Err(FfiError::new(status, format!("{name} is {len}, but {what} needs {want}"))),
        None => Err(FfiError::invalid(format!("{name} is {len}, but {what} needs more values than fit in memory"))),
    }
}

/// Loads a tokenizer directory (`config.json` + `model.safetensors`, as written by
/// `beit tokenizer train` or scripts/convert_dalle_encoder.py). Files are fully validated: a
/// missing tensor, a wrong shape or a non-finite weight is an error. On success `*out` receives
/// a tokenizer to release with `beit_tokenizer_free`; on failure `*out` is not written. The
/// tokenizer runs on `ctx`'s thread pool, which it shares (`ctx` may be freed first).
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, dir, out), `BEIT_ERR_INVALID_ARGUMENT` (dir not
/// UTF-8), `BEIT_ERR_IO` (missing or unreadable files), `BEIT_ERR_FORMAT` (bad safetensors, a
/// missing or misshapen tensor, a non-finite weight), `BEIT_ERR_CONFIG` (a config.json that is
/// not valid JSON, lacks a field, or describes no working tokenizer).
///
/// # Safety
/// `ctx` must be NULL or a live context; `dir` NULL or a NUL-terminated string; `out` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn beit_tokenizer_load(
    ctx: *const beit_context,
    dir: *const c_char,
    out: *mut *mut beit_tokenizer,
) -> beit_status {
    guard(|| {
        // SAFETY (all three): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_shared(ctx, "ctx") }?;
        let dir = unsafe { utf8_arg(dir, "dir") }?;
        let out = non_null_mut(out, "out")?;
        let dvae = ctx.run(|| Dvae::load(Path::new(dir)))?;
        let tokenizer = beit_tokenizer::new(dvae, ctx)?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { tokenizer.hand_out(out) };
        Ok(())
    })
}

/// Frees a tokenizer. NULL is a no-op. Its context is not touched.
///
/// # Safety
/// `tokenizer` must be NULL or a tokenizer not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_tokenizer_free(tokenizer: *mut beit_tokenizer) {
    guard_infallible((), || {
        if !tokenizer.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(tokenizer) });
        }
    })
}

/// Describes a tokenizer. Set `out->struct_size` first (or start from
/// `beit_tokenizer_info_default()`); fields this version does not know are left untouched.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (tokenizer, out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size).
///
/// # Safety
/// `tokenizer` must be NULL or a live tokenizer; `out` NULL or writable for `out->struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_tokenizer_get_info(
    tokenizer: *const beit_tokenizer,
    out: *mut beit_tokenizer_info,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; tokenizer_ref checks for NULL.
        let t = unsafe { tokenizer_ref(tokenizer) }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", TOKENIZER_INFO_V1_SIZE) }?;
        let info = tokenizer_info(&t.inner.config, size);
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

/// The shape text and the value counts of `batch` images and their tokens.
fn batch_lengths(t: &Dvae, batch: usize) -> (String, Option<usize>, Option<usize>) {
    let c = &t.config;
    let shape = format!("batch {batch} of [{}, {}, {}] images", c.in_channels, c.image_size, c.image_size);
    (shape, checked_product(&[batch, t.image_len()]), checked_product(&[batch, c.tokens_per_image()]))
}

/// Tokenizes a batch of images inside the tokenizer's context's thread pool: `tokens[b * P + i]`
/// receives token i (row-major over the `grid_h x grid_w` grid) of image b, P =
/// `tokens_per_image`.
///
/// `pixels` holds `batch` images f32 `[batch, C, S, S]` (channel planes, row-major), with
/// values in `[0, 1]` (plain pixels, NOT mapped): libbeit applies DALL-E's `map_pixels`
/// (`0.8 * x + 0.1`) itself. Values outside `[0, 1]` are mapped the same way, not clamped.
/// `pixels_len` must equal `batch * C * S * S` and `tokens_len` `batch * P`
/// (`beit_tokenizer_info`). Every argument and every pixel are checked before anything runs; on
/// any error nothing is written to `tokens`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (tokenizer, pixels, tokens), `BEIT_ERR_INVALID_ARGUMENT`
/// (batch 0, a `pixels_len` other than the shape's, a NaN or infinite pixel, a misaligned
/// buffer), `BEIT_ERR_BUFFER_SIZE` (a `tokens_len` other than `batch * P`; both numbers are in
/// the message).
///
/// On a cuda context the pass runs on the GPU (fp32; the tokens equal the CPU's up to ties
/// within rounding).
///
/// Thread safety: any number of threads may tokenize with one tokenizer at once (on the GPU
/// they take turns).
///
/// # Safety
/// `tokenizer` must be NULL or a live tokenizer; `pixels` NULL or readable for `pixels_len`
/// floats and `tokens` NULL or writable for `tokens_len` values, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_tokenizer_tokenize(
    tokenizer: *const beit_tokenizer,
    pixels: *const f32,
    pixels_len: usize,
    batch: usize,
    tokens: *mut i64,
    tokens_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; tokenizer_ref checks for NULL.
        let t = unsafe { tokenizer_ref(tokenizer) }?;
        non_null(pixels, "pixels")?;
        non_null_mut(tokens, "tokens")?;
        if batch == 0 {
            return Err(FfiError::invalid("batch is 0; tokenize at least one image"));
        }
        let (shape, want_pixels, want_tokens) = batch_lengths(&t.inner, batch);
        check_len("pixels_len", pixels_len, want_pixels, &shape, beit_status::BEIT_ERR_INVALID_ARGUMENT)?;
        check_len("tokens_len", tokens_len, want_tokens, &shape, beit_status::BEIT_ERR_BUFFER_SIZE)?;
        check_slice(pixels, pixels_len, "pixels")?;
        check_slice(tokens as *const i64, tokens_len, "tokens")?;
        // SAFETY: non-NULL, aligned, length checked; the caller promises it is readable.
        let input = unsafe { std::slice::from_raw_parts(pixels, pixels_len) };
        if let Some(i) = input.iter().position(|v| !v.is_finite()) {
            return Err(FfiError::invalid(format!("pixels[{i}] is {}; pixels must be finite", input[i])));
        }
        let mapped: Vec<f32> = input.iter().map(|&v| map_pixels(v)).collect();
        let dvae = &t.inner;
        let out = match &t.gpu {
            Some(gpu) => {
                let mut gpu = gpu.lock().unwrap_or_else(|e| e.into_inner());
                gpu.tokenize(dvae, &mapped)?
            }
            None => t.ctx.run(|| dvae.tokenize(&mapped))?,
        };
        if out.len() != tokens_len {
            return Err(FfiError::new(
                beit_status::BEIT_ERR_INTERNAL,
                format!("the tokenizer gave {} tokens for {tokens_len}", out.len()),
            ));
        }
        for (k, &tok) in out.iter().enumerate() {
            // SAFETY: k < tokens_len; the buffer is aligned and writable (checked / promised).
            unsafe { tokens.add(k).write(i64::from(tok)) };
        }
        Ok(())
    })
}

/// Decodes visual tokens back into images inside the tokenizer's context's thread pool (only a
/// tokenizer with a decoder, `has_decoder`). `tokens` holds `batch` token grids `[batch, P]` as
/// `beit_tokenizer_tokenize` writes them; `pixels` receives f32 `[batch, C, S, S]` images in
/// `[0, 1]` (DALL-E's `unmap_pixels` of the decoder's output, clamped). `tokens_len` must equal
/// `batch * P` and `pixels_len` `batch * C * S * S`. On any error nothing is written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (tokenizer, tokens, pixels), `BEIT_ERR_INVALID_ARGUMENT`
/// (no decoder; batch 0; a `tokens_len` other than `batch * P`; a token outside
/// `[0, vocab_size)`, with its index; a misaligned buffer), `BEIT_ERR_BUFFER_SIZE` (a
/// `pixels_len` other than the shape's; both numbers are in the message).
///
/// On a cuda context the pass runs on the GPU (fp32; the pixels equal the CPU's to rounding).
///
/// Thread safety: any number of threads may decode with one tokenizer at once (on the GPU
/// they take turns).
///
/// # Safety
/// `tokenizer` must be NULL or a live tokenizer; `tokens` NULL or readable for `tokens_len`
/// values and `pixels` NULL or writable for `pixels_len` floats, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_tokenizer_decode(
    tokenizer: *const beit_tokenizer,
    tokens: *const i64,
    tokens_len: usize,
    batch: usize,
    pixels: *mut f32,
    pixels_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; tokenizer_ref checks for NULL.
        let t = unsafe { tokenizer_ref(tokenizer) }?;
        non_null(tokens, "tokens")?;
        non_null_mut(pixels, "pixels")?;
        let dvae = &t.inner;
        if !dvae.config.has_decoder() {
            return Err(FfiError::invalid(
                "this tokenizer has no decoder (an encoder only, e.g. imported from DALL-E)",
            ));
        }
        if batch == 0 {
            return Err(FfiError::invalid("batch is 0; decode at least one token grid"));
        }
        let (shape, want_pixels, want_tokens) = batch_lengths(dvae, batch);
        check_len("tokens_len", tokens_len, want_tokens, &shape, beit_status::BEIT_ERR_INVALID_ARGUMENT)?;
        check_len("pixels_len", pixels_len, want_pixels, &shape, beit_status::BEIT_ERR_BUFFER_SIZE)?;
        check_slice(tokens, tokens_len, "tokens")?;
        check_slice(pixels as *const f32, pixels_len, "pixels")?;
        // SAFETY: non-NULL, aligned, length checked; the caller promises it is readable.
        let input = unsafe { std::slice::from_raw_parts(tokens, tokens_len) };
        let vocab = dvae.config.vocab_size;
        let mut ids = Vec::with_capacity(tokens_len);
        for (i, &tok) in input.iter().enumerate() {
            match u32::try_from(tok) {
                Ok(id) if (id as usize) < vocab => ids.push(id),
                _ => {
                    return Err(FfiError::invalid(format!("tokens[{i}] is {tok}, outside the vocabulary [0, {vocab})")))
                }
            }
        }
        // Both devices run on the context's pool: under its memory budget, which the decode
        // checks before it allocates (on the GPU too: the one-hot codes and the pixels are
        // host memory).
        let mapped = match &t.gpu {
            Some(gpu) => t.ctx.run(|| gpu.lock().unwrap_or_else(|e| e.into_inner()).decode(dvae, &ids))?,
            None => t.ctx.run(|| dvae.decode(&ids))?,
        };
        if mapped.len() != pixels_len {
            return Err(FfiError::new(
                beit_status::BEIT_ERR_INTERNAL,
                format!("the decoder gave {} values for {pixels_len}", mapped.len()),
            ));
        }
        for (k, &v) in mapped.iter().enumerate() {
            // SAFETY: k < pixels_len; the buffer is aligned and writable (checked / promised).
            unsafe { pixels.add(k).write(unmap_pixels(v)) };
        }
        Ok(())
    })
}
