//! Fuzzes the `.beitds` reader: `DatasetHeader::parse` on the raw bytes, then `Dataset::open`
//! and the C API (`beit_dataset_open`, `_get_info`, `_read_sample`) on the bytes written to a
//! scratch file. Whatever the input, nothing may panic, read out of bounds or report
//! `BEIT_ERR_INTERNAL`. The checks live in ../src/dataset_bytes.rs, shared with
//! tests/dataset_header_fuzz.rs, which runs them over deterministic inputs in `cargo test`.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../src/dataset_bytes.rs"]
mod dataset_bytes;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("beit-fuzz-dataset-{}.beitds", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    dataset_bytes::check(data, scratch());
});
