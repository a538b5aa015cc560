//! `beit_dataset`: read access to `.beitds` dataset files (docs/dataset-format.md). Wraps
//! [`crate::data::dataset::Dataset`]: the file is memory-mapped and fully validated when it is
//! opened, and samples are copied into caller-owned buffers.

use std::ffi::c_char;
use std::mem::size_of;
use std::path::Path;
use std::ptr::{addr_of, addr_of_mut};

use super::model::{check_slice, write_versioned};
use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg};
use super::status::{FfiError, FfiResult};
use crate::data::dataset::{Dataset, DatasetHeader};

/// An open dataset file: memory-mapped and validated, never modified.
///
/// Thread safety: a dataset is immutable; any number of threads may call
/// `beit_dataset_get_info` and `beit_dataset_read_sample` on one dataset at once. Free it only
/// when no call is using it.
#[allow(non_camel_case_types)]
pub struct beit_dataset {
    inner: Dataset,
}

// The thread-safety promise above, checked by the compiler: a dataset is a read-only mapping.
const _: () = super::status::assert_thread_safe::<beit_dataset>();

/// What a dataset holds. Set `struct_size` (or start from `beit_dataset_info_default()`); only
/// the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dataset_info {
    /// Set by the caller to `sizeof(beit_dataset_info)`; left as it is.
    pub struct_size: usize,
    /// Number of samples (may be 0).
    pub count: u64,
    /// Image height H.
    pub height: u32,
    /// Image width W.
    pub width: u32,
    /// Channels per pixel C (1 grey, 3 RGB, ...).
    pub channels: u32,
    /// Whether every sample has a class label.
    pub has_labels: bool,
    /// Whether every sample has a segmentation mask ([H, W] u8).
    pub has_masks: bool,
    /// Whether every sample has a visual-token grid ([token_grid_h, token_grid_w] u16).
    pub has_tokens: bool,
    /// Token grid rows; 0 without tokens.
    pub token_grid_h: u32,
    /// Token grid columns; 0 without tokens.
    pub token_grid_w: u32,
    /// Bytes of one sample's pixels, H * W * C (`beit_dataset_sample.pixels_len`).
    pub pixels_len: usize,
    /// Bytes of one sample's mask, H * W, or 0 without masks (`beit_dataset_sample.mask_len`).
    pub mask_len: usize,
    /// Tokens of one sample, token_grid_h * token_grid_w, or 0 without tokens
    /// (`beit_dataset_sample.tokens_len`).
    pub tokens_len: usize,
}

/// One sample for `beit_dataset_read_sample`: caller-owned buffers to copy it into (inputs),
/// and the label and what was written (outputs). Start from `beit_dataset_sample_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dataset_sample {
    /// `sizeof(beit_dataset_sample)` as the caller compiled it.
    pub struct_size: usize,
    /// Receives the pixels, u8 [H, W, C] interleaved, row-major. Required.
    pub pixels: *mut u8,
    /// Bytes at `pixels`; must equal H * W * C (`beit_dataset_info.pixels_len`).
    pub pixels_len: usize,
    /// Receives the segmentation mask, u8 [H, W], when the dataset has masks; NULL to skip it.
    pub mask: *mut u8,
    /// Bytes at `mask`; when `mask` is not NULL and the dataset has masks, must equal H * W.
    pub mask_len: usize,
    /// Receives the visual tokens, u16 [token_grid_h, token_grid_w] row-major (host byte
    /// order), when the dataset has tokens; NULL to skip them.
    pub tokens: *mut u16,
    /// Values at `tokens`; when `tokens` is not NULL and the dataset has tokens, must equal
    /// token_grid_h * token_grid_w.
    pub tokens_len: usize,
    /// Output: the class label when `label_written`, else 0.
    pub label: u32,
    /// Output: whether the dataset has labels and `label` holds this sample's.
    pub label_written: bool,
    /// Output: whether `mask` was filled (the dataset has masks and `mask` is not NULL).
    pub mask_written: bool,
    /// Output: whether `tokens` was filled (the dataset has tokens and `tokens` is not NULL).
    pub tokens_written: bool,
}

pub(crate) const DATASET_INFO_V1_SIZE: usize = size_of::<beit_dataset_info>();
const DATASET_SAMPLE_V1_SIZE: usize = size_of::<beit_dataset_sample>();

/// A zeroed `beit_dataset_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dataset_info_default() -> beit_dataset_info {
    beit_dataset_info {
        struct_size: size_of::<beit_dataset_info>(),
        count: 0,
        height: 0,
        width: 0,
        channels: 0,
        has_labels: false,
        has_masks: false,
        has_tokens: false,
        token_grid_h: 0,
        token_grid_w: 0,
        pixels_len: 0,
        mask_len: 0,
        tokens_len: 0,
    }
}

/// An empty `beit_dataset_sample` (NULL buffers, zero lengths and outputs) with `struct_size`
/// set.
#[no_mangle]
pub extern "C" fn beit_dataset_sample_default() -> beit_dataset_sample {
    beit_dataset_sample {
        struct_size: size_of::<beit_dataset_sample>(),
        pixels: std::ptr::null_mut(),
        pixels_len: 0,
        mask: std::ptr::null_mut(),
        mask_len: 0,
        tokens: std::ptr::null_mut(),
        tokens_len: 0,
        label: 0,
        label_written: false,
        mask_written: false,
        tokens_written: false,
    }
}

/// The `beit_dataset_info` of a dataset with this header (`struct_size` set to `struct_size`).
pub(crate) fn dataset_info(h: &DatasetHeader, struct_size: usize) -> beit_dataset_info {
    beit_dataset_info {
        struct_size,
        count: h.count,
        height: h.height,
        width: h.width,
        channels: h.channels,
        has_labels: h.has_labels(),
        has_masks: h.has_masks(),
        has_tokens: h.has_tokens(),
        token_grid_h: h.token_grid_h,
        token_grid_w: h.token_grid_w,
        pixels_len: h.pixel_bytes(),
        mask_len: if h.has_masks() { h.mask_bytes() } else { 0 },
        tokens_len: h.tokens_per_sample(),
    }
}

/// The dataset behind a handle, or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `dataset` must be NULL or a live dataset.
unsafe fn dataset_ref<'a>(dataset: *const beit_dataset) -> FfiResult<&'a Dataset> {
    let dataset = non_null(dataset, "dataset")?;
    // SAFETY: non-NULL; the caller promises a live dataset (immutable, so shared use is fine).
    Ok(unsafe { &(*dataset).inner })
}

/// Opens a `.beitds` dataset file (docs/dataset-format.md): maps it and validates the header
/// and every section against the file size, so that no later read can go outside the file. On
/// success `*out` receives a dataset to release with `beit_dataset_free`; on failure `*out` is
/// not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (path, out), `BEIT_ERR_INVALID_ARGUMENT` (path not UTF-8),
/// `BEIT_ERR_IO` (missing or unreadable file), `BEIT_ERR_FORMAT` (not a dataset, an unknown
/// version, a truncated or inconsistent file; the message names the problem).
///
/// The file must not be truncated or rewritten in place while it is open (replace it by
/// rename instead), as with every memory-mapped reader.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_open(path: *const c_char, out: *mut *mut beit_dataset) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; utf8_arg checks for NULL.
        let path = unsafe { utf8_arg(path, "path") }?;
        let out = non_null_mut(out, "out")?;
        let dataset = Dataset::open(Path::new(path))?;
        let handle = Box::into_raw(Box::new(beit_dataset { inner: dataset }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a dataset (and unmaps its file). NULL is a no-op.
///
/// # Safety
/// `dataset` must be NULL or a dataset not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_free(dataset: *mut beit_dataset) {
    guard_infallible((), || {
        if !dataset.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(dataset) });
        }
    })
}

/// Describes a dataset. Set `out->struct_size` first (or start from
/// `beit_dataset_info_default()`); fields this version does not know are left untouched.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (dataset, out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size).
///
/// # Safety
/// `dataset` must be NULL or a live dataset; `out` NULL or writable for `out->struct_size`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_get_info(
    dataset: *const beit_dataset,
    out: *mut beit_dataset_info,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; dataset_ref checks for NULL.
        let d = unsafe { dataset_ref(dataset) }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", DATASET_INFO_V1_SIZE) }?;
        let info = dataset_info(d.header(), size);
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

/// The input fields of a `beit_dataset_sample`.
struct SampleBuffers {
    pixels: *mut u8,
    pixels_len: usize,
    mask: *mut u8,
    mask_len: usize,
    tokens: *mut u16,
    tokens_len: usize,
}

/// Checks one caller buffer against the length the dataset needs.
fn check_buffer<T>(ptr: *const T, len: usize, want: usize, name: &str, what: &str) -> FfiResult<()> {
    if len != want {
        return Err(FfiError::buffer_size(format!("sample->{name}_len is {len}, but {what} needs {want}")));
    }
    check_slice(ptr, len, &format!("sample->{name}"))
}

/// Copies sample `index` into the caller's buffers in `sample`: the pixels always, the mask
/// and tokens when the dataset has them and the buffer is not NULL. On success `sample->label`
/// and the `*_written` flags say what the sample holds; on any error nothing is written (not
/// the buffers, not the struct).
///
/// Errors: `BEIT_ERR_NULL_POINTER` (dataset, sample, sample->pixels),
/// `BEIT_ERR_INVALID_ARGUMENT` (struct_size; `index` not below the sample count; a NULL
/// mask or tokens buffer with a non-zero length; a misaligned tokens buffer),
/// `BEIT_ERR_BUFFER_SIZE` (a buffer length other than the dataset's, with both numbers).
///
/// Thread safety: any number of threads may read from one dataset at once.
///
/// # Safety
/// `dataset` must be NULL or a live dataset; `sample` NULL or readable and writable for its
/// `struct_size`; every non-NULL buffer must hold its stated length, and not overlap another,
/// for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_dataset_read_sample(
    dataset: *const beit_dataset,
    index: u64,
    sample: *mut beit_dataset_sample,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; dataset_ref checks for NULL.
        let d = unsafe { dataset_ref(dataset) }?;
        let sample = non_null_mut(sample, "sample")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure that covers every field of the first version. Only the
        // input fields are read, one by one: the output bools may hold anything before the
        // call (reading them as `bool` would be undefined behaviour).
        let s = unsafe {
            check_struct_size(sample, "sample", DATASET_SAMPLE_V1_SIZE)?;
            SampleBuffers {
                pixels: addr_of!((*sample).pixels).read_unaligned(),
                pixels_len: addr_of!((*sample).pixels_len).read_unaligned(),
                mask: addr_of!((*sample).mask).read_unaligned(),
                mask_len: addr_of!((*sample).mask_len).read_unaligned(),
                tokens: addr_of!((*sample).tokens).read_unaligned(),
                tokens_len: addr_of!((*sample).tokens_len).read_unaligned(),
            }
        };
        let h = d.header();
        if index >= h.count {
            return Err(FfiError::invalid(format!(
                "index {index} is out of range: the dataset has {} samples",
                h.count
            )));
        }
        let i = index as usize; // < count, which validation made sure fits in the file
        non_null(s.pixels, "sample->pixels")?;
        let shape = format!("{}x{}x{} (HxWxC)", h.height, h.width, h.channels);
        check_buffer(s.pixels, s.pixels_len, h.pixel_bytes(), "pixels", &shape)?;
        let want_mask = h.has_masks() && !s.mask.is_null();
        if s.mask.is_null() && s.mask_len != 0 {
            return Err(FfiError::invalid(format!("sample->mask is NULL but sample->mask_len is {}", s.mask_len)));
        }
        if want_mask {
            let shape = format!("a {}x{} mask", h.height, h.width);
            check_buffer(s.mask, s.mask_len, h.mask_bytes(), "mask", &shape)?;
        }
        let want_tokens = h.has_tokens() && !s.tokens.is_null();
        if s.tokens.is_null() && s.tokens_len != 0 {
            return Err(FfiError::invalid(format!(
                "sample->tokens is NULL but sample->tokens_len is {}",
                s.tokens_len
            )));
        }
        if want_tokens {
            let shape = format!("a {}x{} token grid", h.token_grid_h, h.token_grid_w);
            check_buffer(s.tokens, s.tokens_len, h.tokens_per_sample(), "tokens", &shape)?;
        }

        // Everything checked: copy. Raw copies only, so that no `&mut` slice is ever made of a
        // caller buffer (they might alias each other, which the caller promises they do not).
        let pixels = d.pixels(i);
        // SAFETY: `pixels` holds exactly pixels_len bytes (checked above), is writable (the
        // caller's promise) and cannot overlap the read-only map.
        unsafe { std::ptr::copy_nonoverlapping(pixels.as_ptr(), s.pixels, pixels.len()) };
        if want_mask {
            if let Some(mask) = d.mask(i) {
                // SAFETY: as for the pixels; mask_len == mask.len() was checked.
                unsafe { std::ptr::copy_nonoverlapping(mask.as_ptr(), s.mask, mask.len()) };
            }
        }
        if want_tokens {
            if let Some(bytes) = d.tokens_le_bytes(i) {
                for (k, pair) in bytes.chunks_exact(2).enumerate() {
                    // SAFETY: k < tokens_len (bytes holds 2 * tokens_len), the buffer is
                    // aligned (check_slice) and writable (the caller's promise).
                    unsafe { s.tokens.add(k).write(u16::from_le_bytes([pair[0], pair[1]])) };
                }
            }
        }
        let label = d.label(i);
        // SAFETY: `sample` is writable for at least the first version's size (checked), which
        // holds these fields; the inputs are left as they are.
        unsafe {
            addr_of_mut!((*sample).label).write_unaligned(label.unwrap_or(0));
            addr_of_mut!((*sample).label_written).write_unaligned(label.is_some());
            addr_of_mut!((*sample).mask_written).write_unaligned(want_mask);
            addr_of_mut!((*sample).tokens_written).write_unaligned(want_tokens);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{DatasetSpec, DatasetWriter};
    use std::ffi::{CStr, CString};

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated.
        unsafe { CStr::from_ptr(super::super::status::beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    /// A 3-sample 2x3x2 dataset with labels, masks and 2x2 tokens.
    fn write_dataset(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("d.beitds");
        let spec =
            DatasetSpec { height: 2, width: 3, channels: 2, labels: true, masks: true, token_grid: Some((2, 2)) };
        let mut w = DatasetWriter::create(&path, spec).unwrap();
        for i in 0..3u8 {
            let px: Vec<u8> = (0..12).map(|k| i * 20 + k).collect();
            let mask: Vec<u8> = (0..6).map(|k| (i + k) % 3).collect();
            let toks: Vec<u16> = (0..4).map(|k| 1000 * i as u16 + k).collect();
            w.push(&px, Some(7 + i as u32), Some(&mask), Some(&toks)).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn open(path: &Path) -> *mut beit_dataset {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut d = std::ptr::null_mut();
        assert_eq!(unsafe { beit_dataset_open(c.as_ptr(), &mut d) }, beit_status::BEIT_OK);
        assert!(!d.is_null());
        d
    }

    #[test]
    fn open_info_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&write_dataset(dir.path()));
        let mut info = beit_dataset_info_default();
        assert_eq!(unsafe { beit_dataset_get_info(d, &mut info) }, beit_status::BEIT_OK);
        assert_eq!((info.count, info.height, info.width, info.channels), (3, 2, 3, 2));
        assert!(info.has_labels && info.has_masks && info.has_tokens);
        assert_eq!((info.token_grid_h, info.token_grid_w), (2, 2));
        assert_eq!((info.pixels_len, info.mask_len, info.tokens_len), (12, 6, 4));

        let (mut px, mut mask, mut toks) = ([0u8; 12], [0u8; 6], [0u16; 4]);
        let mut s = beit_dataset_sample_default();
        s.pixels = px.as_mut_ptr();
        s.pixels_len = 12;
        s.mask = mask.as_mut_ptr();
        s.mask_len = 6;
        s.tokens = toks.as_mut_ptr();
        s.tokens_len = 4;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 2, &mut s) }, beit_status::BEIT_OK);
        assert_eq!(px.to_vec(), (0..12).map(|k| 40 + k).collect::<Vec<u8>>());
        assert_eq!(mask.to_vec(), (0..6).map(|k| (2 + k) % 3).collect::<Vec<u8>>());
        assert_eq!(toks, [2000, 2001, 2002, 2003]);
        assert_eq!(s.label, 9);
        assert!(s.label_written && s.mask_written && s.tokens_written);

        // Optional buffers may be skipped.
        s.mask = std::ptr::null_mut();
        s.mask_len = 0;
        s.tokens = std::ptr::null_mut();
        s.tokens_len = 0;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_OK);
        assert!(s.label_written && !s.mask_written && !s.tokens_written);
        assert_eq!(s.label, 7);
        unsafe { beit_dataset_free(d) };
    }

    #[test]
    fn output_fields_may_hold_anything_before_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&write_dataset(dir.path()));
        let mut px = [0u8; 12];
        let mut raw = std::mem::MaybeUninit::<beit_dataset_sample>::uninit();
        let p = raw.as_mut_ptr();
        // SAFETY: writes into the uninitialised struct through raw pointers only; every field
        // is initialised (bools by the successful call) before assume_init.
        let s = unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xff, size_of::<beit_dataset_sample>());
            addr_of_mut!((*p).struct_size).write(size_of::<beit_dataset_sample>());
            addr_of_mut!((*p).pixels).write(px.as_mut_ptr());
            addr_of_mut!((*p).pixels_len).write(12);
            addr_of_mut!((*p).mask).write(std::ptr::null_mut());
            addr_of_mut!((*p).mask_len).write(0);
            addr_of_mut!((*p).tokens).write(std::ptr::null_mut());
            addr_of_mut!((*p).tokens_len).write(0);
            assert_eq!(beit_dataset_read_sample(d, 1, p), beit_status::BEIT_OK);
            raw.assume_init()
        };
        assert!(s.label_written && !s.mask_written && !s.tokens_written);
        assert_eq!(s.label, 8);
        assert_eq!(px[0], 20);
        unsafe { beit_dataset_free(d) };
    }

    #[test]
    fn nulls_are_refused_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_dataset(dir.path());
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut d = std::ptr::null_mut();
        assert_eq!(unsafe { beit_dataset_open(std::ptr::null(), &mut d) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert!(last_error().contains("path"));
        assert!(d.is_null());
        assert_eq!(unsafe { beit_dataset_open(c.as_ptr(), std::ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert!(last_error().contains("out"));
        let d = open(&path);
        let mut info = beit_dataset_info_default();
        assert_eq!(unsafe { beit_dataset_get_info(std::ptr::null(), &mut info) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert!(last_error().contains("dataset"));
        assert_eq!(unsafe { beit_dataset_get_info(d, std::ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);
        let mut s = beit_dataset_sample_default();
        assert_eq!(
            unsafe { beit_dataset_read_sample(std::ptr::null(), 0, &mut s) },
            beit_status::BEIT_ERR_NULL_POINTER
        );
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, std::ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert!(last_error().contains("sample"));
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert!(last_error().contains("sample->pixels"), "{}", last_error());
        unsafe { beit_dataset_free(d) };
        unsafe { beit_dataset_free(std::ptr::null_mut()) };
    }

    #[test]
    fn bad_sizes_and_indices_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&write_dataset(dir.path()));
        let mut info = beit_dataset_info_default();
        info.struct_size = 4;
        assert_eq!(unsafe { beit_dataset_get_info(d, &mut info) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("struct_size"));
        assert_eq!(info.count, 0);

        let (mut px, mut mask, mut toks) = ([0xaau8; 13], [0xaau8; 6], [0xaaaau16; 4]);
        let mut s = beit_dataset_sample_default();
        s.pixels = px.as_mut_ptr();
        s.pixels_len = 11;
        let status = unsafe { beit_dataset_read_sample(d, 0, &mut s) };
        assert_eq!(status, beit_status::BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("11") && last_error().contains("12"), "{}", last_error());
        s.pixels_len = 13;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_BUFFER_SIZE);
        s.pixels_len = 12;
        s.mask = mask.as_mut_ptr();
        s.mask_len = 5;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("mask_len is 5") && last_error().contains("needs 6"), "{}", last_error());
        s.mask_len = 6;
        s.tokens = toks.as_mut_ptr();
        s.tokens_len = 3;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("tokens_len is 3") && last_error().contains("needs 4"), "{}", last_error());
        s.tokens_len = 4;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 3, &mut s) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("index 3") && last_error().contains("3 samples"), "{}", last_error());
        assert_eq!(unsafe { beit_dataset_read_sample(d, u64::MAX, &mut s) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        s.struct_size = 8;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("struct_size"));
        s.struct_size = size_of::<beit_dataset_sample>();
        let (null_mask, null_len) = (std::ptr::null_mut(), 6);
        s.mask = null_mask;
        s.mask_len = null_len;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("mask is NULL"), "{}", last_error());
        // Nothing was written by any failed call.
        assert!(px.iter().all(|&b| b == 0xaa) && mask.iter().all(|&b| b == 0xaa));
        assert!(toks.iter().all(|&t| t == 0xaaaa));
        assert!(!s.label_written && s.label == 0);
        unsafe { beit_dataset_free(d) };
    }

    #[test]
    fn corrupt_files_fail_with_the_readers_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_dataset(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let try_open = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            let c = CString::new(p.to_str().unwrap()).unwrap();
            let mut d = std::ptr::null_mut();
            let status = unsafe { beit_dataset_open(c.as_ptr(), &mut d) };
            assert!(d.is_null());
            (status, last_error())
        };
        let (st, msg) = try_open("trunc.beitds", &bytes[..bytes.len() - 1]);
        assert_eq!(st, beit_status::BEIT_ERR_FORMAT);
        assert!(msg.contains("truncated"), "{msg}");
        let mut bad = bytes.clone();
        bad[0] = b'X';
        let (st, msg) = try_open("magic.beitds", &bad);
        assert_eq!(st, beit_status::BEIT_ERR_FORMAT);
        assert!(msg.contains("not a beit dataset"), "{msg}");
        let (st, msg) = try_open("empty.beitds", &[]);
        assert_eq!(st, beit_status::BEIT_ERR_FORMAT, "{msg}");
        let missing = CString::new(dir.path().join("missing").to_str().unwrap()).unwrap();
        let mut d = std::ptr::null_mut();
        assert_eq!(unsafe { beit_dataset_open(missing.as_ptr(), &mut d) }, beit_status::BEIT_ERR_IO);
        assert!(last_error().contains("cannot open"));
    }

    #[test]
    fn a_dataset_without_optional_sections_reports_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.beitds");
        let spec = DatasetSpec { height: 1, width: 2, channels: 1, labels: false, masks: false, token_grid: None };
        let mut w = DatasetWriter::create(&path, spec).unwrap();
        w.push(&[5, 6], None, None, None).unwrap();
        w.finish().unwrap();
        let d = open(&path);
        let (mut px, mut mask) = ([0u8; 2], [0u8; 2]);
        let mut s = beit_dataset_sample_default();
        s.pixels = px.as_mut_ptr();
        s.pixels_len = 2;
        // A mask buffer for a dataset without masks is left alone, whatever its length.
        s.mask = mask.as_mut_ptr();
        s.mask_len = 1;
        assert_eq!(unsafe { beit_dataset_read_sample(d, 0, &mut s) }, beit_status::BEIT_OK);
        assert_eq!(px, [5, 6]);
        assert!(!s.label_written && !s.mask_written && !s.tokens_written);
        let mut info = beit_dataset_info_default();
        assert_eq!(unsafe { beit_dataset_get_info(d, &mut info) }, beit_status::BEIT_OK);
        assert_eq!((info.mask_len, info.tokens_len, info.token_grid_h), (0, 0, 0));
        unsafe { beit_dataset_free(d) };
    }
}
