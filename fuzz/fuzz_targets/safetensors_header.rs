//! Fuzzes the safetensors readers: arbitrary bytes as a model's weights (`Model::load`,
//! `beit_model_load`), as a trainer checkpoint (`Trainer::from_checkpoint`,
//! `Trainer::load_checkpoint`, `beit_trainer_load_checkpoint`) and as a tokenizer's weights
//! (`Dvae::load`, `beit_tokenizer_load`), under a 4 MiB memory budget. Nothing may panic, abort,
//! hang or report `BEIT_ERR_INTERNAL`. The checks live in ../src/safetensors_bytes.rs, shared
//! with tests/safetensors_header_fuzz.rs, which runs them over deterministic inputs in
//! `cargo test`. Scratch files go to `$TMPDIR/beit-fuzz-safetensors-PID/` (one set per process,
//! overwritten by each input).
#![no_main]

use std::sync::Mutex;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../src/safetensors_bytes.rs"]
mod safetensors_bytes;

struct Shared(Mutex<safetensors_bytes::Scratch>);
// SAFETY: the scratch's C handles are only used under the mutex, one thread at a time, which
// the C API allows for a trainer and requires nothing more of for a context.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fuzz_target!(|data: &[u8]| {
    static SCRATCH: OnceLock<Shared> = OnceLock::new();
    let shared = SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("beit-fuzz-safetensors-{}", std::process::id()));
        Shared(Mutex::new(safetensors_bytes::Scratch::new(&dir)))
    });
    let mut scratch = shared.0.lock().unwrap_or_else(|e| e.into_inner());
    safetensors_bytes::check(data, &mut scratch);
});
