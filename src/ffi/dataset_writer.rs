//! Writing `.beitds` dataset files (docs/dataset-format.md) from a host: `beit_dataset_writer`,
//! which takes samples from caller arrays (wrapping [`crate::data::dataset::DatasetWriter`]),
//! and `beit_dataset_import`, which converts IDX, NumPy, image-folder and emoji-package sources
//! as `beit dataset import` does ([`crate::data::import::import`]). Both write atomically: a
//! file appears at its path complete, or not at all.

use std::ffi::c_char;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::claim::{claim_state, HandleKind};
use super::dataset::{beit_dataset_info, dataset_info, DATASET_INFO_V1_SIZE};
use super::model::{check_slice, write_versioned};
use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg};
use super::status::{FfiError, FfiResult};
use crate::data::dataset::{DatasetSpec, DatasetWriter};
use crate::data::import::{import, ImportSource};
use crate::tensor::checked_numel;

/// What a new dataset file holds: the image shape and which optional sections every sample
/// carries. Start from `beit_dataset_spec_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dataset_spec {
    /// `sizeof(beit_dataset_spec)` as the caller compiled it.
    pub struct_size: usize,
    /// Image height H (1 to 65536).
    pub height: u32,
    /// Image width W (1 to 65536).
    pub width: u32,
    /// Channels per pixel C (1 grey, 3 RGB, ...; 1 to 4096).
    pub channels: u32,
    /// Whether every sample carries a class label (u32).
    pub has_labels: bool,
    /// Whether every sample carries a segmentation mask (u8 [H, W]).
    pub has_masks: bool,
    /// Whether every sample carries a visual-token grid (u16 [token_grid_h, token_grid_w]).
    pub has_tokens: bool,
    /// Token grid rows (1 to 65536) with tokens; must be 0 without.
    pub token_grid_h: u32,
    /// Token grid columns (1 to 65536) with tokens; must be 0 without.
    pub token_grid_w: u32,
}

/// Samples for `beit_dataset_writer_append`: `count` samples back to back in caller arrays,
/// read only during the call. Start from `beit_dataset_samples_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dataset_samples {
    /// `sizeof(beit_dataset_samples)` as the caller compiled it.
    pub struct_size: usize,
    /// Samples in the arrays (0 appends nothing).
    pub count: usize,
    /// Pixels u8 `[count, H, W, C]`: each sample's rows top to bottom, each row's pixels left
    /// to right, each pixel's C channel values together (interleaved, "HWC"), exactly the
    /// layout the file stores and `beit_dataset_read_sample` gives back. Required.
    pub pixels: *const u8,
    /// Bytes at `pixels`; must equal `count * H * W * C`.
    pub pixels_len: usize,
    /// Class labels u32 `[count]`: required when the spec has labels, NULL otherwise.
    pub labels: *const u32,
    /// Values at `labels`; must equal `count` when given.
    pub labels_len: usize,
    /// Segmentation masks u8 `[count, H, W]`: required when the spec has masks, NULL
    /// otherwise.
    pub masks: *const u8,
    /// Bytes at `masks`; must equal `count * H * W` when given.
    pub masks_len: usize,
    /// Visual tokens u16 `[count, token_grid_h, token_grid_w]`, row-major: required when the
    /// spec has tokens, NULL otherwise.
    pub tokens: *const u16,
    /// Values at `tokens`; must equal `count * token_grid_h * token_grid_w` when given.
    pub tokens_len: usize,
}

/// A source format of `beit_dataset_import` (`beit_dataset_import_options.format`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_import_format {
    /// MNIST-style IDX files, raw or gzip (as Fashion-MNIST ships them): `images` (u8
    /// [N, H, W]) and optionally `labels` (u8 [N]); 1 channel. `height` x `width`, when not
    /// 0, is a canvas each image is centred on (zero padding, e.g. 28 -> 32).
    BEIT_IMPORT_IDX = 0,
    /// NumPy `.npy` arrays (v1-v3, C order): `images` [N, H, W] or [N, H, W, C] of u1, or of
    /// f4/f8 in [0, 1] (stored as round(x * 255)), and optionally `labels` [N] of any integer
    /// dtype.
    BEIT_IMPORT_NPY = 1,
    /// `dir`/<class>/<image>.png|jpg|jpeg: labels are the sorted class folder names; images
    /// are converted to `channels` (1 grey or 3 RGB; 0 means 3) and resized (bilinear) to
    /// `height` x `width` (both required). The class names go to `<out>.classes.json`.
    BEIT_IMPORT_IMAGE_FOLDER = 2,
    /// An unpacked emoji-datasource-<set> npm package in `dir`, image set `set` (e.g. google,
    /// twitter) at `height` = `width` pixels (0 means 64): RGB over black, label = category,
    /// segmentation mask = category + 1 where opaque. The category names go to
    /// `<out>.classes.json`.
    BEIT_IMPORT_EMOJI = 3,
}

/// A `beit_import_format` as C passes it in: any 32-bit value, checked before use. The header
/// shows it as `beit_import_format` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawImportFormat(pub u32);

impl RawImportFormat {
    fn to_format(self) -> FfiResult<beit_import_format> {
        match self.0 {
            0 => Ok(beit_import_format::BEIT_IMPORT_IDX),
            1 => Ok(beit_import_format::BEIT_IMPORT_NPY),
            2 => Ok(beit_import_format::BEIT_IMPORT_IMAGE_FOLDER),
            3 => Ok(beit_import_format::BEIT_IMPORT_EMOJI),
            other => Err(FfiError::invalid(format!(
                "opts->format {other} is not a beit_import_format (BEIT_IMPORT_IDX = 0, BEIT_IMPORT_NPY = 1, \
                 BEIT_IMPORT_IMAGE_FOLDER = 2, BEIT_IMPORT_EMOJI = 3)"
            ))),
        }
    }
}

/// What `beit_dataset_import` converts and where it writes. Start from
/// `beit_dataset_import_options_default()`. A field the format does not use must be left at
/// its default (NULL or 0); a set one is refused, naming it, rather than silently ignored.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dataset_import_options {
    /// `sizeof(beit_dataset_import_options)` as the caller compiled it.
    pub struct_size: usize,
    /// The source format (default `BEIT_IMPORT_IDX`).
    pub format: RawImportFormat,
    /// The dataset file to write (replaced atomically if it exists). Required. It must not be,
    /// or lie inside, one of the inputs.
    pub out: *const c_char,
    /// The image file (IDX, NPY; required there).
    pub images: *const c_char,
    /// The label file (IDX, NPY; optional: NULL imports images only).
    pub labels: *const c_char,
    /// The folder to import (image folder: one sub-folder per class; emoji: the package root).
    pub dir: *const c_char,
    /// Image height: the output size (image folder, required), the padded canvas (IDX, 0 for
    /// none), the emoji size (0 for 64).
    pub height: u32,
    /// Image width, as `height` (emoji images are square: equal to `height`).
    pub width: u32,
    /// Output channels of an image folder: 1 (grey) or 3 (RGB); 0 means 3.
    pub channels: u32,
    /// The emoji image set, e.g. "google" or "twitter" (emoji: required).
    pub set: *const c_char,
}

const SPEC_V1_SIZE: usize = size_of::<beit_dataset_spec>();
const SAMPLES_V1_SIZE: usize = size_of::<beit_dataset_samples>();
const IMPORT_OPTIONS_V1_SIZE: usize = size_of::<beit_dataset_import_options>();

/// A zeroed `beit_dataset_spec` (no optional sections) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dataset_spec_default() -> beit_dataset_spec {
    beit_dataset_spec {
        struct_size: size_of::<beit_dataset_spec>(),
        height: 0,
        width: 0,
        channels: 0,
        has_labels: false,
        has_masks: false,
        has_tokens: false,
        token_grid_h: 0,
        token_grid_w: 0,
    }
}

/// An empty `beit_dataset_samples` (count 0, NULL arrays) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dataset_samples_default() -> beit_dataset_samples {
    beit_dataset_samples {
        struct_size: size_of::<beit_dataset_samples>(),
        count: 0,
        pixels: std::ptr::null(),
        pixels_len: 0,
        labels: std::ptr::null(),
        labels_len: 0,
        masks: std::ptr::null(),
        masks_len: 0,
        tokens: std::ptr::null(),
        tokens_len: 0,
    }
}

/// Import options with every path NULL, every size 0 and `format` `BEIT_IMPORT_IDX`, with
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dataset_import_options_default() -> beit_dataset_import_options {
    beit_dataset_import_options {
        struct_size: size_of::<beit_dataset_import_options>(),
        format: RawImportFormat(beit_import_format::BEIT_IMPORT_IDX as u32),
        out: std::ptr::null(),
        images: std::ptr::null(),
        labels: std::ptr::null(),
        dir: std::ptr::null(),
        height: 0,
        width: 0,
        channels: 0,
        set: std::ptr::null(),
    }
}

/// Where a writer stands.
enum WriterState {
    /// Taking samples.
    Open(DatasetWriter),
    /// `beit_dataset_writer_finish` wrote the file.
    Finished,
    /// A write failed part-way (the message says how); the temporary file is gone.
    Failed(String),
}

/// A dataset file being written: samples go to a temporary file beside the target, which
/// `beit_dataset_writer_finish` completes and renames into place. Until then nothing exists at
/// the target path (a file already there stays as it was); freeing an unfinished writer
/// removes the temporary file, so it leaves nothing behind.
///
/// Thread safety: a writer takes one call at a time; a call made while another thread's call
/// holds it does nothing and returns `BEIT_ERR_BUSY`.
#[allow(non_camel_case_types)]
pub struct beit_dataset_writer {
    inner: Mutex<WriterState>,
}

const _: () = super::status::assert_thread_safe::<beit_dataset_writer>();

/// Claims a writer for the call `call`, without waiting (see `beit_trainer`'s claim).
///
/// # Safety
/// `writer` must be NULL or a live writer.
unsafe fn claim<'a>(writer: *const beit_dataset_writer, call: &str) -> FfiResult<MutexGuard<'a, WriterState>> {
    let handle = non_null(writer, "writer")?;
    // SAFETY: non-NULL; the caller promises a live writer; the mutex decides who changes it.
    let handle = unsafe { &*handle };
    const KIND: HandleKind = HandleKind { name: "dataset writer", recovery: "write the file again" };
    claim_state(&handle.inner, call, &KIND)
}

/// The open writer of a state, or the error that says why there is none.
fn open_writer<'a>(state: &'a mut WriterState, call: &str) -> FfiResult<&'a mut DatasetWriter> {
    match state {
        WriterState::Open(w) => Ok(w),
        WriterState::Finished => Err(FfiError::invalid(format!("{call}: the writer is already finished"))),
        WriterState::Failed(why) => Err(FfiError::invalid(format!(
            "{call}: the writer failed earlier ({why}) and wrote nothing; free it and start again"
        ))),
    }
}

/// Starts a dataset file at `path` with the shape and sections of `spec`: creates its
/// temporary file beside `path` (nothing appears at `path` before
/// `beit_dataset_writer_finish`). On success `*out` receives a writer to release with
/// `beit_dataset_writer_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (path, spec, out), `BEIT_ERR_INVALID_ARGUMENT` (path not
/// UTF-8 or without a file name; struct_size; a zero or too large dimension; a token grid
/// without `has_tokens`, or `has_tokens` without a grid), `BEIT_ERR_IO` (the directory does not
/// exist or is not writable).
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `spec` NULL or readable for its
/// `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_writer_create(
    path: *const c_char,
    spec: *const beit_dataset_spec,
    out: *mut *mut beit_dataset_writer,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; utf8_arg checks for NULL.
        let path = unsafe { utf8_arg(path, "path") }?;
        let spec = non_null(spec, "spec")?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure they cover the first version read here.
        let s = unsafe {
            check_struct_size(spec, "spec", SPEC_V1_SIZE)?;
            spec.read_unaligned()
        };
        let token_grid = match (s.has_tokens, s.token_grid_h, s.token_grid_w) {
            (true, gh, gw) => Some((gh, gw)),
            (false, 0, 0) => None,
            (false, gh, gw) => {
                return Err(FfiError::invalid(format!(
                    "spec->token_grid is {gh}x{gw} but spec->has_tokens is false (set both, or neither)"
                )))
            }
        };
        let spec = DatasetSpec {
            height: s.height,
            width: s.width,
            channels: s.channels,
            labels: s.has_labels,
            masks: s.has_masks,
            token_grid,
        };
        let writer = DatasetWriter::create(Path::new(path), spec)?;
        let handle = Box::into_raw(Box::new(beit_dataset_writer { inner: Mutex::new(WriterState::Open(writer)) }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Checks one optional array of `samples`: given exactly when the spec has its section, and
/// then of the length `per_sample * count` implies. Returns whether it is given.
fn check_part<T>(ptr: *const T, len: usize, on: bool, name: &str, per_sample: &[usize], count: usize) -> FfiResult<()> {
    if !on {
        if !ptr.is_null() || len != 0 {
            return Err(FfiError::invalid(format!(
                "samples->{name} is given but the dataset has no {name} (leave it NULL with length 0)"
            )));
        }
        return Ok(());
    }
    non_null(ptr, &format!("samples->{name}"))?;
    let mut shape = vec![count];
    shape.extend_from_slice(per_sample);
    let shape_text = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
    match checked_numel(&shape) {
        Some(want) if want == len => {}
        Some(want) => {
            return Err(FfiError::invalid(format!("samples->{name}_len is {len}, but [{shape_text}] needs {want}")))
        }
        None => {
            return Err(FfiError::invalid(format!(
                "samples->{name}_len is {len}, but [{shape_text}] needs more values than fit in memory"
            )))
        }
    }
    check_slice(ptr, len, &format!("samples->{name}"))
}

/// Appends `samples->count` samples from the caller's arrays (see `beit_dataset_samples` for
/// the layouts). Everything is checked before anything is written: on a refused call the
/// writer is as before. An I/O error part-way (a full disk) ends the writer: its temporary file
/// is removed, and every later call but `beit_dataset_writer_free` is refused.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (writer, samples, samples->pixels, an array the spec
/// requires), `BEIT_ERR_INVALID_ARGUMENT` (struct_size; a length other than the shape's, with
/// both numbers; an array the spec does not have; the labels, masks and tokens held in memory
/// until the file is finished would exceed the memory budget; a finished or failed writer),
/// `BEIT_ERR_IO` (writing failed), `BEIT_ERR_BUSY` (another thread's call holds the writer).
///
/// # Safety
/// `writer` must be NULL or a live writer; `samples` NULL or readable for its `struct_size`,
/// each of its non-NULL arrays holding its stated length for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_writer_append(
    writer: *mut beit_dataset_writer,
    samples: *const beit_dataset_samples,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut state = unsafe { claim(writer, "beit_dataset_writer_append") }?;
        let samples = non_null(samples, "samples")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
        // check_struct_size makes sure cover the first version read here.
        let s = unsafe {
            check_struct_size(samples, "samples", SAMPLES_V1_SIZE)?;
            samples.read_unaligned()
        };
        let w = open_writer(&mut state, "beit_dataset_writer_append")?;
        let spec = *w.spec();
        let (h, wd, c) = (spec.height as usize, spec.width as usize, spec.channels as usize);
        let (gh, gw) = spec.token_grid.map_or((0, 0), |(gh, gw)| (gh as usize, gw as usize));
        let n = s.count;
        check_part(s.pixels, s.pixels_len, true, "pixels", &[h, wd, c], n)?;
        check_part(s.labels, s.labels_len, spec.labels, "labels", &[], n)?;
        check_part(s.masks, s.masks_len, spec.masks, "masks", &[h, wd], n)?;
        check_part(s.tokens, s.tokens_len, spec.token_grid.is_some(), "tokens", &[gh, gw], n)?;
        w.reserve(n)?;
        // SAFETY (all four): non-NULL when their section is on, aligned, lengths checked
        // against the shapes; the caller promises they hold those lengths during the call.
        let (pixels, labels, masks, tokens) = unsafe {
            (
                std::slice::from_raw_parts(s.pixels, s.pixels_len),
                spec.labels.then(|| std::slice::from_raw_parts(s.labels, s.labels_len)),
                spec.masks.then(|| std::slice::from_raw_parts(s.masks, s.masks_len)),
                spec.token_grid.map(|_| std::slice::from_raw_parts(s.tokens, s.tokens_len)),
            )
        };
        let (per_pixels, per_mask, per_tokens) = (h * wd * c, h * wd, gh * gw);
        for i in 0..n {
            let pushed = w.push(
                &pixels[i * per_pixels..(i + 1) * per_pixels],
                labels.map(|l| l[i]),
                masks.map(|m| &m[i * per_mask..(i + 1) * per_mask]),
                tokens.map(|t| &t[i * per_tokens..(i + 1) * per_tokens]),
            );
            if let Err(e) = pushed {
                // Part of the chunk is in the file: end the writer (dropping it removes the
                // temporary file) rather than leave a file with half a chunk.
                let why = format!("writing sample {} of this chunk failed: {}", i, e.message());
                *state = WriterState::Failed(why.clone());
                return Err(FfiError::new(FfiError::from(e).status, why + "; the temporary file was removed"));
            }
        }
        Ok(())
    })
}

/// Writes the number of samples appended so far to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (a finished or failed writer),
/// `BEIT_ERR_BUSY` (another thread's call holds the writer).
///
/// # Safety
/// `writer` must be NULL or a live writer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_writer_count(writer: *const beit_dataset_writer, out: *mut u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut state = unsafe { claim(writer, "beit_dataset_writer_count") }?;
        let out = non_null_mut(out, "out")?;
        let count = open_writer(&mut state, "beit_dataset_writer_count")?.len();
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(count) };
        Ok(())
    })
}

/// Completes the file: writes the labels, masks and tokens sections and the header, syncs it
/// to disk and renames it to the writer's path (replacing any file there). When `out` is not
/// NULL it receives the new file's description (only the fields that fit in its
/// `struct_size`). After this call, successful or not, the writer takes no more samples; free
/// it with `beit_dataset_writer_free`. On failure the temporary file is removed and a file
/// that was at the path before stays as it was.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (writer), `BEIT_ERR_INVALID_ARGUMENT` (out's struct_size;
/// a finished or failed writer), `BEIT_ERR_IO`, `BEIT_ERR_BUSY` (another thread's call holds
/// the writer).
///
/// # Safety
/// `writer` must be NULL or a live writer; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_writer_finish(
    writer: *mut beit_dataset_writer,
    out: *mut beit_dataset_info,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut state = unsafe { claim(writer, "beit_dataset_writer_finish") }?;
        let out_size = if out.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes.
            Some(unsafe { check_struct_size(out, "out", DATASET_INFO_V1_SIZE) }?)
        };
        open_writer(&mut state, "beit_dataset_writer_finish")?;
        let WriterState::Open(w) = std::mem::replace(&mut *state, WriterState::Finished) else {
            unreachable!("checked open above");
        };
        let header = w.finish().inspect_err(|e| *state = WriterState::Failed(e.message().to_string()))?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_versioned(out, &dataset_info(&header, size), size) };
        }
        Ok(())
    })
}

/// Frees a writer. An unfinished one is abandoned: its temporary file is removed, and nothing
/// is left at its path (a file that was there before stays as it was). NULL is a no-op.
///
/// # Safety
/// `writer` must be NULL or a writer not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_writer_free(writer: *mut beit_dataset_writer) {
    guard_infallible((), || {
        if !writer.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(writer) });
        }
    })
}

/// An optional path field of the import options: `None` for NULL.
///
/// # Safety
/// `ptr` must be NULL or a NUL-terminated string.
unsafe fn optional_path(ptr: *const c_char, name: &str) -> FfiResult<Option<PathBuf>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's promise.
    Ok(Some(PathBuf::from(unsafe { utf8_arg(ptr, name) }?)))
}

/// The import the options describe: every field the format uses read and checked, every
/// other one required to be at its default.
///
/// # Safety
/// Every string field of `o` must be NULL or a NUL-terminated string.
unsafe fn import_source(o: &beit_dataset_import_options) -> FfiResult<(ImportSource, PathBuf)> {
    let format = o.format.to_format()?;
    // SAFETY (all string fields): the caller's promise.
    let out = PathBuf::from(unsafe { utf8_arg(o.out, "opts->out") }?);
    let images = unsafe { optional_path(o.images, "opts->images") }?;
    let labels = unsafe { optional_path(o.labels, "opts->labels") }?;
    let dir = unsafe { optional_path(o.dir, "opts->dir") }?;
    let set = unsafe { optional_path(o.set, "opts->set") }?;
    use beit_import_format::*;
    let name = match format {
        BEIT_IMPORT_IDX => "BEIT_IMPORT_IDX",
        BEIT_IMPORT_NPY => "BEIT_IMPORT_NPY",
        BEIT_IMPORT_IMAGE_FOLDER => "BEIT_IMPORT_IMAGE_FOLDER",
        BEIT_IMPORT_EMOJI => "BEIT_IMPORT_EMOJI",
    };
    let unused = |field: &str, set: bool| -> FfiResult<()> {
        if set {
            return Err(FfiError::invalid(format!(
                "opts->{field} is set, but {name} does not use it (leave it NULL or 0)"
            )));
        }
        Ok(())
    };
    let required = |field: &str, value: Option<PathBuf>| {
        value.ok_or_else(|| {
            FfiError::new(beit_status::BEIT_ERR_NULL_POINTER, format!("opts->{field} is NULL ({name} needs it)"))
        })
    };
    let source = match format {
        BEIT_IMPORT_IDX | BEIT_IMPORT_NPY => {
            unused("dir", dir.is_some())?;
            unused("set", set.is_some())?;
            unused("channels", o.channels != 0)?;
            let images = required("images", images)?;
            if format == BEIT_IMPORT_NPY {
                unused("height", o.height != 0)?;
                unused("width", o.width != 0)?;
                ImportSource::Npy { images, labels }
            } else {
                let pad = match (o.height, o.width) {
                    (0, 0) => None,
                    (h, w) if h > 0 && w > 0 => Some((h, w)),
                    (h, w) => {
                        return Err(FfiError::invalid(format!(
                            "opts->height x opts->width is {h}x{w}: give both sides of the padded canvas, or neither"
                        )))
                    }
                };
                ImportSource::Idx { images, labels, pad }
            }
        }
        BEIT_IMPORT_IMAGE_FOLDER | BEIT_IMPORT_EMOJI => {
            unused("images", images.is_some())?;
            unused("labels", labels.is_some())?;
            let dir = required("dir", dir)?;
            if format == BEIT_IMPORT_IMAGE_FOLDER {
                unused("set", set.is_some())?;
                let channels = if o.channels == 0 { 3 } else { o.channels };
                ImportSource::ImageFolder { dir, height: o.height, width: o.width, channels }
            } else {
                unused("channels", o.channels != 0)?;
                let set = required("set", set)?.to_string_lossy().into_owned();
                let size = match (o.height, o.width) {
                    (0, 0) => 64,
                    (h, w) if h == w => h,
                    (h, w) => {
                        return Err(FfiError::invalid(format!(
                            "opts->height x opts->width is {h}x{w}, but emoji images are square"
                        )))
                    }
                };
                ImportSource::Emoji { dir, set, size }
            }
        }
    };
    Ok((source, out))
}

/// Converts images (and labels) into a dataset file, as `beit dataset import` does (see
/// `beit_import_format` for each format and docs/dataset-format.md for the details). The file
/// is written atomically; image folders and emoji packages also write their class names, a JSON
/// array of strings in label order, to `<out>.classes.json`. Before anything is written, an
/// `out` that is, or lies inside, one of the inputs is refused; temporary files of `out` that
/// killed imports left are removed. When `info` is not NULL it receives the new file's
/// description (only the fields that fit in its `struct_size`).
///
/// Errors: `BEIT_ERR_NULL_POINTER` (opts, opts->out, an input the format needs),
/// `BEIT_ERR_INVALID_ARGUMENT` (struct_size; an unknown format; a path not UTF-8; a field the
/// format does not use; sizes out of range; `out` overwriting an input), `BEIT_ERR_IO` (a
/// missing or unreadable input, an unwritable output), `BEIT_ERR_FORMAT` (an input that is not
/// what its format says: bad magic, a truncated file, an undecodable image, mismatched counts).
///
/// # Safety
/// `opts` must be NULL or readable for its `struct_size`, each string field NULL or a
/// NUL-terminated string; `info` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_import(
    opts: *const beit_dataset_import_options,
    info: *mut beit_dataset_info,
) -> beit_status {
    guard(|| {
        let opts = non_null(opts, "opts")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure they cover the first version read here.
        let o = unsafe {
            check_struct_size(opts, "opts", IMPORT_OPTIONS_V1_SIZE)?;
            opts.read_unaligned()
        };
        let info_size = if info.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes.
            Some(unsafe { check_struct_size(info, "info", DATASET_INFO_V1_SIZE) }?)
        };
        // SAFETY: the caller promises every string field is NULL or NUL-terminated.
        let (source, out) = unsafe { import_source(&o) }?;
        let imported = import(&source, &out, &|field| format!("opts->{field}"))?;
        if let Some(size) = info_size {
            // SAFETY: `info` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_versioned(info, &dataset_info(&imported.header, size), size) };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::Dataset;
    use std::ffi::{CStr, CString};

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated.
        unsafe { CStr::from_ptr(super::super::status::beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    fn cstr(p: &Path) -> CString {
        CString::new(p.to_str().unwrap()).unwrap()
    }

    const SPEC: DatasetSpec =
        DatasetSpec { height: 2, width: 3, channels: 2, labels: true, masks: true, token_grid: Some((1, 2)) };

    fn c_spec(s: DatasetSpec) -> beit_dataset_spec {
        let (gh, gw) = s.token_grid.unwrap_or((0, 0));
        beit_dataset_spec {
            height: s.height,
            width: s.width,
            channels: s.channels,
            has_labels: s.labels,
            has_masks: s.masks,
            has_tokens: s.token_grid.is_some(),
            token_grid_h: gh,
            token_grid_w: gw,
            ..beit_dataset_spec_default()
        }
    }

    /// Sample i of the test data: 12 pixel bytes, a label, 6 mask bytes, 2 tokens.
    fn sample(i: usize) -> (Vec<u8>, u32, Vec<u8>, Vec<u16>) {
        let px = (0..12).map(|k| (i * 13 + k * 3) as u8).collect();
        let mask = (0..6).map(|k| ((i + k) % 4) as u8).collect();
        (px, 1000 + i as u32, mask, vec![(i * 7) as u16, 60000 + i as u16])
    }

    fn create(path: &Path, spec: &beit_dataset_spec) -> Result<*mut beit_dataset_writer, (beit_status, String)> {
        let mut w = std::ptr::null_mut();
        match unsafe { beit_dataset_writer_create(cstr(path).as_ptr(), spec, &mut w) } {
            beit_status::BEIT_OK => Ok(w),
            status => {
                assert!(w.is_null());
                Err((status, last_error()))
            }
        }
    }

    /// Samples `range` of the test data as caller arrays (kept alive by the returned vectors).
    struct Chunk {
        pixels: Vec<u8>,
        labels: Vec<u32>,
        masks: Vec<u8>,
        tokens: Vec<u16>,
        count: usize,
    }

    impl Chunk {
        fn of(range: std::ops::Range<usize>) -> Self {
            let mut c = Chunk { pixels: vec![], labels: vec![], masks: vec![], tokens: vec![], count: range.len() };
            for i in range {
                let (p, l, m, t) = sample(i);
                c.pixels.extend(p);
                c.labels.push(l);
                c.masks.extend(m);
                c.tokens.extend(t);
            }
            c
        }
        fn samples(&self) -> beit_dataset_samples {
            beit_dataset_samples {
                count: self.count,
                pixels: self.pixels.as_ptr(),
                pixels_len: self.pixels.len(),
                labels: self.labels.as_ptr(),
                labels_len: self.labels.len(),
                masks: self.masks.as_ptr(),
                masks_len: self.masks.len(),
                tokens: self.tokens.as_ptr(),
                tokens_len: self.tokens.len(),
                ..beit_dataset_samples_default()
            }
        }
    }

    /// Chunks appended through the C API make, byte for byte, the file the Rust writer makes
    /// from the same samples one by one; finish reports its description.
    #[test]
    fn appended_chunks_make_the_rust_writers_file() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, reference) = (dir.path().join("c.beitds"), dir.path().join("rust.beitds"));
        let w = create(&ours, &c_spec(SPEC)).unwrap();
        for range in [0..3, 3..3, 3..7] {
            let chunk = Chunk::of(range);
            assert_eq!(
                unsafe { beit_dataset_writer_append(w, &chunk.samples()) },
                beit_status::BEIT_OK,
                "{}",
                last_error()
            );
        }
        let mut count = 0;
        assert_eq!(unsafe { beit_dataset_writer_count(w, &mut count) }, beit_status::BEIT_OK);
        assert_eq!(count, 7);
        assert!(!ours.exists(), "nothing at the path before finish");
        let mut info = crate::ffi::dataset::beit_dataset_info_default();
        assert_eq!(unsafe { beit_dataset_writer_finish(w, &mut info) }, beit_status::BEIT_OK);
        assert_eq!((info.count, info.height, info.width, info.channels, info.tokens_len), (7, 2, 3, 2, 2));
        // A finished writer takes nothing more.
        let chunk = Chunk::of(0..1);
        assert_eq!(unsafe { beit_dataset_writer_append(w, &chunk.samples()) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("already finished"));
        assert_eq!(
            unsafe { beit_dataset_writer_finish(w, std::ptr::null_mut()) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        unsafe { beit_dataset_writer_free(w) };

        let mut rw = DatasetWriter::create(&reference, SPEC).unwrap();
        for i in 0..7 {
            let (p, l, m, t) = sample(i);
            rw.push(&p, Some(l), Some(&m), Some(&t)).unwrap();
        }
        rw.finish().unwrap();
        assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&reference).unwrap());
        let d = Dataset::open(&ours).unwrap();
        assert_eq!(d.tokens(6).unwrap(), &[42, 60006]);
        assert_eq!(d.label(2), Some(1002));
    }

    #[test]
    fn refused_appends_change_nothing_and_an_unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.beitds");
        std::fs::write(&path, b"the old file").unwrap();
        let w = create(&path, &c_spec(SPEC)).unwrap();
        let chunk = Chunk::of(0..2);
        let good = chunk.samples();
        let refused = |s: beit_dataset_samples, status: beit_status, words: &[&str]| {
            assert_eq!(unsafe { beit_dataset_writer_append(w, &s) }, status, "{}", last_error());
            let msg = last_error();
            for word in words {
                assert!(msg.contains(word), "{msg} lacks {word}");
            }
        };
        use beit_status::*;
        refused(
            beit_dataset_samples { pixels_len: 23, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["pixels_len is 23", "[2, 2, 3, 2] needs 24"],
        );
        refused(
            beit_dataset_samples { count: 3, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["pixels_len is 24", "needs 36"],
        );
        refused(beit_dataset_samples { labels: std::ptr::null(), ..good }, BEIT_ERR_NULL_POINTER, &["samples->labels"]);
        refused(
            beit_dataset_samples { masks_len: 11, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["masks_len is 11", "needs 12"],
        );
        refused(
            beit_dataset_samples { tokens_len: 3, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["tokens_len is 3", "needs 4"],
        );
        refused(
            beit_dataset_samples { count: usize::MAX, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["more values than fit"],
        );
        refused(beit_dataset_samples { struct_size: 8, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["struct_size"]);
        refused(beit_dataset_samples { pixels: std::ptr::null(), ..good }, BEIT_ERR_NULL_POINTER, &["samples->pixels"]);
        let misaligned = unsafe { (chunk.tokens.as_ptr() as *const u8).add(1) } as *const u16;
        refused(beit_dataset_samples { tokens: misaligned, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["aligned"]);
        assert_eq!(unsafe { beit_dataset_writer_append(w, std::ptr::null()) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_dataset_writer_append(std::ptr::null_mut(), &good) }, BEIT_ERR_NULL_POINTER);
        let mut count = 9;
        assert_eq!(unsafe { beit_dataset_writer_count(w, &mut count) }, BEIT_OK);
        assert_eq!(count, 0, "no refused call appended anything");
        assert_eq!(unsafe { beit_dataset_writer_append(w, &good) }, BEIT_OK);
        // Arrays for sections the dataset does not have are refused.
        let plain = dir.path().join("plain.beitds");
        let p = create(&plain, &c_spec(DatasetSpec { labels: false, masks: false, token_grid: None, ..SPEC })).unwrap();
        refused_on(p, good, &["samples->labels is given but the dataset has no labels"]);
        unsafe { beit_dataset_writer_free(p) };
        // Freed unfinished: no temporary file, the old file untouched, nothing at plain.beitds.
        unsafe { beit_dataset_writer_free(w) };
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("d.beitds")]);
        assert_eq!(std::fs::read(&path).unwrap(), b"the old file");
        unsafe { beit_dataset_writer_free(std::ptr::null_mut()) };
    }

    fn refused_on(w: *mut beit_dataset_writer, s: beit_dataset_samples, words: &[&str]) {
        assert_eq!(unsafe { beit_dataset_writer_append(w, &s) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        let msg = last_error();
        assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.beitds");
        let spec = c_spec(SPEC);
        let refused = |s: beit_dataset_spec, status: beit_status, word: &str| {
            let (got, msg) = create(&path, &s).unwrap_err();
            assert_eq!(got, status, "{msg}");
            assert!(msg.contains(word), "{msg} lacks {word}");
        };
        use beit_status::*;
        refused(beit_dataset_spec { height: 0, ..spec }, BEIT_ERR_INVALID_ARGUMENT, "zero dimension");
        refused(beit_dataset_spec { channels: 5000, ..spec }, BEIT_ERR_INVALID_ARGUMENT, "beyond the limits");
        refused(beit_dataset_spec { token_grid_h: 0, ..spec }, BEIT_ERR_INVALID_ARGUMENT, "token grid 0x2");
        refused(beit_dataset_spec { has_tokens: false, ..spec }, BEIT_ERR_INVALID_ARGUMENT, "has_tokens is false");
        refused(beit_dataset_spec { struct_size: 4, ..spec }, BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        let (got, msg) = create(&dir.path().join("no/such/dir/d.beitds"), &spec).unwrap_err();
        assert_eq!(got, BEIT_ERR_IO, "{msg}");
        let mut w = std::ptr::null_mut();
        assert_eq!(unsafe { beit_dataset_writer_create(std::ptr::null(), &spec, &mut w) }, BEIT_ERR_NULL_POINTER);
        let c = cstr(&path);
        assert_eq!(unsafe { beit_dataset_writer_create(c.as_ptr(), std::ptr::null(), &mut w) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(
            unsafe { beit_dataset_writer_create(c.as_ptr(), &spec, std::ptr::null_mut()) },
            BEIT_ERR_NULL_POINTER
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// IDX files written by hand (big-endian header, u8 body): the C import gives the pixels
    /// and labels the files hold, padded as asked; overlapping paths and unused or missing
    /// fields are refused before anything is written.
    #[test]
    fn import_idx_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels, out) =
            (dir.path().join("img.idx"), dir.path().join("lbl.idx"), dir.path().join("out.beitds"));
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        img.extend(1..=12u8);
        std::fs::write(&images, &img).unwrap();
        std::fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 2, 7, 9]).unwrap();
        let (ci, cl, co) = (cstr(&images), cstr(&labels), cstr(&out));
        let mut o = beit_dataset_import_options_default();
        (o.images, o.labels, o.out) = (ci.as_ptr(), cl.as_ptr(), co.as_ptr());
        (o.height, o.width) = (4, 5);
        let mut info = crate::ffi::dataset::beit_dataset_info_default();
        assert_eq!(unsafe { beit_dataset_import(&o, &mut info) }, beit_status::BEIT_OK, "{}", last_error());
        assert_eq!((info.count, info.height, info.width, info.channels, info.has_labels), (2, 4, 5, 1, true));
        let d = Dataset::open(&out).unwrap();
        // 2x3 centred on 4x5: rows 1..3, columns 1..4.
        #[rustfmt::skip]
        let want0 = [0, 0, 0, 0, 0,  0, 1, 2, 3, 0,  0, 4, 5, 6, 0,  0, 0, 0, 0, 0];
        assert_eq!(d.pixels(0), want0);
        assert_eq!(d.pixels(1)[6..9], [7, 8, 9]);
        assert_eq!((d.label(0), d.label(1)), (Some(7), Some(9)));

        use beit_status::*;
        let refused = |o: beit_dataset_import_options, status: beit_status, words: &[&str]| {
            let before = std::fs::read(&out).unwrap();
            assert_eq!(unsafe { beit_dataset_import(&o, std::ptr::null_mut()) }, status, "{}", last_error());
            let msg = last_error();
            assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
            assert_eq!(std::fs::read(&out).unwrap(), before, "a refused import left the file alone");
        };
        refused(
            beit_dataset_import_options { out: ci.as_ptr(), ..o },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->out", "opts->images", "refusing to overwrite"],
        );
        refused(beit_dataset_import_options { height: 4, width: 0, ..o }, BEIT_ERR_INVALID_ARGUMENT, &["4x0"]);
        refused(
            beit_dataset_import_options { channels: 3, ..o },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->channels is set", "BEIT_IMPORT_IDX"],
        );
        refused(
            beit_dataset_import_options { dir: ci.as_ptr(), ..o },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->dir is set"],
        );
        refused(
            beit_dataset_import_options { format: RawImportFormat(1), ..o },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->height is set", "BEIT_IMPORT_NPY"],
        );
        refused(
            beit_dataset_import_options { format: RawImportFormat(9), ..o },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->format 9"],
        );
        refused(
            beit_dataset_import_options { images: std::ptr::null(), ..o },
            BEIT_ERR_NULL_POINTER,
            &["opts->images is NULL"],
        );
        refused(beit_dataset_import_options { out: std::ptr::null(), ..o }, BEIT_ERR_NULL_POINTER, &["opts->out"]);
        let folder = beit_dataset_import_options {
            format: RawImportFormat(2),
            images: std::ptr::null(),
            labels: std::ptr::null(),
            ..o
        };
        refused(folder, BEIT_ERR_NULL_POINTER, &["opts->dir is NULL", "BEIT_IMPORT_IMAGE_FOLDER"]);
        refused(beit_dataset_import_options { labels: co.as_ptr(), ..o }, BEIT_ERR_INVALID_ARGUMENT, &["opts->labels"]);
        refused(beit_dataset_import_options { labels: ci.as_ptr(), ..o }, BEIT_ERR_FORMAT, &["bad IDX magic"]);
        refused(beit_dataset_import_options { struct_size: 8, ..o }, BEIT_ERR_INVALID_ARGUMENT, &["struct_size"]);
        assert_eq!(unsafe { beit_dataset_import(std::ptr::null(), std::ptr::null_mut()) }, BEIT_ERR_NULL_POINTER);
    }
}
