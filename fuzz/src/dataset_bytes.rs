//! The checks of the `dataset_header` fuzz target, shared with tests/dataset_header_fuzz.rs
//! (included there with `#[path]`, so that `cargo test` type-checks and runs them without
//! nightly or libFuzzer).

use std::ffi::CString;
use std::path::Path;

use beit::data::dataset::{Dataset, DatasetHeader};
use beit::ffi::dataset::{
    beit_dataset_free, beit_dataset_get_info, beit_dataset_info_default, beit_dataset_open, beit_dataset_read_sample,
    beit_dataset_sample_default,
};
use beit::ffi::status::beit_status;

/// Runs every dataset reader on `data` (as a header, and as a whole file written to `scratch`).
/// Panics only when a reader misbehaves: a panic of its own, an internal error, an accessor
/// out of bounds, or a header that validates but does not round-trip.
pub fn check(data: &[u8], scratch: &Path) {
    // The header parser, against the true length and against lengths it was not given.
    let parsed = DatasetHeader::parse(data, data.len() as u64, "fuzz");
    for file_len in [0, 8, 127, 128, u64::MAX, (data.len() as u64).wrapping_mul(3)] {
        let _ = DatasetHeader::parse(data, file_len, "fuzz");
    }
    if let Ok(h) = &parsed {
        h.validate(data.len() as u64, "fuzz").expect("a parsed header validates again");
        let mut again = data.to_vec();
        again[..DatasetHeader::SIZE as usize].copy_from_slice(&h.to_bytes());
        assert_eq!(DatasetHeader::parse(&again, again.len() as u64, "fuzz").as_ref(), Ok(h), "header round trip");
    }

    // The whole reader, on a file.
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    match Dataset::open(scratch) {
        Ok(d) => {
            assert!(parsed.is_ok(), "Dataset::open accepted what DatasetHeader::parse refused");
            let h = d.header().clone();
            for i in 0..d.len() {
                assert_eq!(d.pixels(i).len(), h.pixel_bytes());
                assert_eq!(d.label(i).is_some(), h.has_labels());
                assert_eq!(d.mask(i).map(<[u8]>::len), h.has_masks().then(|| h.mask_bytes()));
                assert_eq!(d.tokens_le_bytes(i).map(<[u8]>::len), h.has_tokens().then(|| 2 * h.tokens_per_sample()));
                #[cfg(target_endian = "little")]
                assert_eq!(d.tokens(i).map(<[u16]>::len), h.has_tokens().then(|| h.tokens_per_sample()));
            }
            assert_eq!(d.all_pixels().len() as u64, h.pixels.length);
        }
        Err(e) => assert!(!e.message().is_empty(), "an error without a message"),
    }
    check_c_api(scratch);
}

/// The same file through the C API: open, info, the first and last sample, one past the end.
fn check_c_api(path: &Path) {
    let Some(c_path) = path.to_str().and_then(|p| CString::new(p).ok()) else { return };
    let mut d = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path and a writable out-pointer.
    let status = unsafe { beit_dataset_open(c_path.as_ptr(), &mut d) };
    assert_ne!(status, beit_status::BEIT_ERR_INTERNAL, "beit_dataset_open: internal error");
    if status != beit_status::BEIT_OK {
        assert!(d.is_null(), "a failed open wrote *out");
        return;
    }
    let mut info = beit_dataset_info_default();
    // SAFETY: a live dataset and a writable info struct.
    assert_eq!(unsafe { beit_dataset_get_info(d, &mut info) }, beit_status::BEIT_OK);
    // With no samples the per-sample sizes are not bounded by the file (0 x anything fits), so
    // allocate them only when there are samples; then they are, and the buffers stay small.
    let alloc = |n: usize| if info.count > 0 { n } else { 1 };
    let mut pixels = vec![0u8; alloc(info.pixels_len)];
    let mut mask = vec![0u8; alloc(info.mask_len)];
    let mut tokens = vec![0u16; alloc(info.tokens_len)];
    let mut indices = vec![info.count, info.count.wrapping_add(1)];
    if info.count > 0 {
        indices.extend([0, info.count - 1]);
    }
    for index in indices {
        let mut s = beit_dataset_sample_default();
        s.pixels = pixels.as_mut_ptr();
        s.pixels_len = pixels.len();
        if info.mask_len > 0 {
            s.mask = mask.as_mut_ptr();
            s.mask_len = mask.len();
        }
        if info.tokens_len > 0 {
            s.tokens = tokens.as_mut_ptr();
            s.tokens_len = tokens.len();
        }
        // SAFETY: a live dataset; every buffer holds its stated length.
        let status = unsafe { beit_dataset_read_sample(d, index, &mut s) };
        let want = if index < info.count { beit_status::BEIT_OK } else { beit_status::BEIT_ERR_INVALID_ARGUMENT };
        assert_eq!(status, want, "beit_dataset_read_sample({index}) of {}", info.count);
    }
    // SAFETY: a live dataset, freed once.
    unsafe { beit_dataset_free(d) };
}
