//! Fuzzes model configs: arbitrary bytes to `BeitConfig::from_json_str`, then a model of every
//! architecture by `Model::new_random` and by the C API's `beit_model_create`, under a 4 MiB
//! memory budget. Nothing may panic, abort, hang or report `BEIT_ERR_INTERNAL`. The checks live
//! in ../src/config_json.rs, shared with tests/config_json_fuzz.rs, which runs them over
//! deterministic inputs in `cargo test`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../src/config_json.rs"]
mod config_json;

fuzz_target!(|data: &[u8]| {
    static CTX: OnceLock<config_json::Context> = OnceLock::new();
    config_json::check(data, CTX.get_or_init(config_json::Context::new));
});
