//! The checks of the `safetensors_header` fuzz target, shared with
//! tests/safetensors_header_fuzz.rs (included there with `#[path]`, so that `cargo test` runs
//! them without nightly or libFuzzer).
//!
//! Arbitrary bytes as each safetensors file libbeit reads: a model's `model.safetensors` beside a
//! valid small config.json (`Model::load`, `beit_model_load`), a trainer checkpoint (whose
//! metadata carries its own config: `Trainer::from_checkpoint`, `Trainer::load_checkpoint`,
//! `beit_trainer_load_checkpoint`) and a tokenizer's weights beside a valid tokenizer config
//! (`Dvae::load`, `beit_tokenizer_load`), all under a small memory budget. Nothing may panic,
//! abort, hang or report an internal error; what loads must be finite, and a trainer that
//! refuses a checkpoint must be unchanged.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use beit::dvae::{Dvae, DvaeConfig};
use beit::ffi::context::{
    beit_context, beit_context_create, beit_context_free, beit_context_options, beit_context_options_default,
};
use beit::ffi::model::{beit_model_free, beit_model_load};
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::ffi::tokenizer::{beit_tokenizer_free, beit_tokenizer_load};
use beit::ffi::trainer::{beit_trainer, beit_trainer_free, beit_trainer_load_checkpoint, beit_trainer_step_count};
use beit::resources::{with_budget, MemoryBudget};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Error, Model};

/// What one model, trainer or tokenizer may need here; more must be refused before allocating.
pub const BUDGET: u64 = 4 << 20;

/// The model every file is read against: 8x8 grey images, 4x4 patches, one layer of width 8.
pub const MODEL_CONFIG: &str = r#"{"image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 8,
    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 8,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "architectures": ["BeitForMaskedImageModeling"]}"#;

/// The tokenizer every file is read against: 8x8 grey images, 8 codes, 2 groups.
pub fn tokenizer_config() -> DvaeConfig {
    DvaeConfig {
        in_channels: 1,
        image_size: 8,
        vocab_size: 8,
        n_hid: 4,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(4),
        ..DvaeConfig::small_grey(8)
    }
}

/// The files and handles the checks reuse (one per process).
pub struct Scratch {
    model_dir: PathBuf,
    tokenizer_dir: PathBuf,
    checkpoint: PathBuf,
    /// A valid trainer that each input is loaded into (it must be unchanged by a refusal).
    trainer: Trainer,
    /// The same through the C API, and its context.
    c_trainer: *mut beit_trainer,
    ctx: *mut beit_context,
}

impl Scratch {
    /// Makes `dir/model/config.json`, `dir/tokenizer/config.json` and the trainers.
    pub fn new(dir: &Path) -> Scratch {
        let model_dir = dir.join("model");
        let tokenizer_dir = dir.join("tokenizer");
        std::fs::create_dir_all(&model_dir).unwrap();
        std::fs::create_dir_all(&tokenizer_dir).unwrap();
        std::fs::write(model_dir.join("config.json"), MODEL_CONFIG).unwrap();
        std::fs::write(tokenizer_dir.join("config.json"), tokenizer_config().to_json()).unwrap();
        let trainer = Trainer::new(valid_model(), TrainerOptions::default()).unwrap();
        let mut ctx = std::ptr::null_mut();
        // A C host's context with the same budget as the Rust checks run under.
        let opts = beit_context_options { memory_budget: BUDGET, ..beit_context_options_default() };
        // SAFETY: valid options and a writable out-pointer.
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        let c_trainer = c_trainer(ctx, dir);
        Scratch { model_dir, tokenizer_dir, checkpoint: dir.join("checkpoint.safetensors"), trainer, c_trainer, ctx }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: live handles, freed once.
        unsafe {
            beit_trainer_free(self.c_trainer);
            beit_context_free(self.ctx);
        }
    }
}

/// The model of [`MODEL_CONFIG`], seeded.
pub fn valid_model() -> Model {
    let cfg = BeitConfig::from_json_str(MODEL_CONFIG).unwrap();
    Model::new_random(cfg, Architecture::MaskedImageModeling, 0).unwrap()
}

/// Valid inputs, the seeds: the model's weights, a checkpoint of a trainer of it, and the
/// tokenizer's weights (written into `dir` under those names).
#[allow(dead_code)] // tests/safetensors_header_fuzz.rs uses it; the fuzz target starts from fuzz/seeds/
pub fn write_seeds(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let model = valid_model();
    let tmp = dir.join(".seed-model");
    model.save(&tmp).unwrap();
    let weights = dir.join("model.safetensors");
    std::fs::rename(tmp.join("model.safetensors"), &weights).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    let checkpoint = dir.join("checkpoint.safetensors");
    Trainer::new(model, TrainerOptions::default()).unwrap().save_checkpoint(&checkpoint).unwrap();
    let tmp = dir.join(".seed-tokenizer");
    Dvae::new(tokenizer_config(), 0).unwrap().save(&tmp).unwrap();
    let tokenizer = dir.join("tokenizer.safetensors");
    std::fs::rename(tmp.join("model.safetensors"), &tokenizer).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    vec![weights, checkpoint, tokenizer]
}

/// A C API trainer of [`valid_model`] (made through a saved directory, as a host would).
fn c_trainer(ctx: *mut beit_context, dir: &Path) -> *mut beit_trainer {
    use beit::ffi::trainer::beit_trainer_load_model_dir;
    let model_dir = dir.join("c-trainer-model");
    valid_model().save(&model_dir).unwrap();
    let path = CString::new(model_dir.to_str().unwrap()).unwrap();
    let mut t = std::ptr::null_mut();
    // SAFETY: a live context, a NUL-terminated path, NULL options, a writable out-pointer.
    let status = unsafe { beit_trainer_load_model_dir(ctx, path.as_ptr(), std::ptr::null(), &mut t) };
    assert_eq!(status, beit_status::BEIT_OK, "{}", last_message());
    t
}

/// Runs every reader on `data`. Panics only when a reader misbehaves.
pub fn check(data: &[u8], s: &mut Scratch) {
    with_budget(MemoryBudget::Bytes(BUDGET), || {
        check_model(data, s);
        check_checkpoint(data, s);
        check_tokenizer(data, s);
    });
}

fn refused(e: &Error, call: &str) {
    assert!(!matches!(e, Error::Internal(_)), "{call}: internal error: {e}");
    assert!(!e.message().is_empty(), "{call}: an error without a message");
}

fn finite(values: &[f32], what: &str) {
    assert!(values.iter().all(|v| v.is_finite()), "{what} loaded non-finite weights");
}

fn check_model(data: &[u8], s: &mut Scratch) {
    std::fs::write(s.model_dir.join("model.safetensors"), data).unwrap();
    match Model::load(&s.model_dir) {
        Ok(m) => finite(&m.params().data, "Model::load"),
        Err(e) => refused(&e, "Model::load"),
    }
    let dir = CString::new(s.model_dir.to_str().unwrap()).unwrap();
    let mut model = std::ptr::null_mut();
    // SAFETY: a live context, a NUL-terminated path, a writable out-pointer.
    let status = unsafe { beit_model_load(s.ctx, dir.as_ptr(), &mut model) };
    c_status(status, model.is_null(), "beit_model_load");
    // SAFETY: NULL or a live model, freed once.
    unsafe { beit_model_free(model) };
}

fn check_checkpoint(data: &[u8], s: &mut Scratch) {
    std::fs::write(&s.checkpoint, data).unwrap();
    match Trainer::from_checkpoint(&s.checkpoint) {
        Ok(t) => finite(&t.model().params().data, "Trainer::from_checkpoint"),
        Err(e) => refused(&e, "Trainer::from_checkpoint"),
    }
    // Into a live trainer: all or nothing.
    let (params, step) = (s.trainer.model().params().data.clone(), s.trainer.step_count());
    match s.trainer.load_checkpoint(&s.checkpoint) {
        Ok(()) => {
            finite(&s.trainer.model().params().data, "Trainer::load_checkpoint");
            // Back to the reference state for the next input.
            s.trainer = Trainer::new(valid_model(), TrainerOptions::default()).unwrap();
        }
        Err(e) => {
            refused(&e, "Trainer::load_checkpoint");
            assert!(
                s.trainer.model().params().data == params && s.trainer.step_count() == step,
                "a refused checkpoint changed the trainer"
            );
        }
    }
    let path = CString::new(s.checkpoint.to_str().unwrap()).unwrap();
    let mut before = 0;
    // SAFETY: a live trainer and a writable out-pointer.
    assert_eq!(unsafe { beit_trainer_step_count(s.c_trainer, &mut before) }, beit_status::BEIT_OK);
    // SAFETY: a live trainer and a NUL-terminated path.
    let status = unsafe { beit_trainer_load_checkpoint(s.c_trainer, path.as_ptr()) };
    c_status(status, true, "beit_trainer_load_checkpoint");
    if status != beit_status::BEIT_OK {
        let mut after = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { beit_trainer_step_count(s.c_trainer, &mut after) }, beit_status::BEIT_OK);
        assert_eq!(before, after, "a refused checkpoint changed the C trainer's step");
    }
}

fn check_tokenizer(data: &[u8], s: &mut Scratch) {
    std::fs::write(s.tokenizer_dir.join("model.safetensors"), data).unwrap();
    match Dvae::load(&s.tokenizer_dir) {
        Ok(t) => finite(&t.params.data, "Dvae::load"),
        Err(e) => refused(&e, "Dvae::load"),
    }
    let dir = CString::new(s.tokenizer_dir.to_str().unwrap()).unwrap();
    let mut tok = std::ptr::null_mut();
    // SAFETY: a live context, a NUL-terminated path, a writable out-pointer.
    let status = unsafe { beit_tokenizer_load(s.ctx, dir.as_ptr(), &mut tok) };
    c_status(status, tok.is_null(), "beit_tokenizer_load");
    // SAFETY: NULL or a live tokenizer, freed once.
    unsafe { beit_tokenizer_free(tok) };
}

/// A C call's status: never internal; a refusal has a message and leaves `*out` NULL.
fn c_status(status: beit_status, out_is_null: bool, call: &str) {
    assert_ne!(status, beit_status::BEIT_ERR_INTERNAL, "{call}: internal error: {}", last_message());
    if status != beit_status::BEIT_OK {
        assert!(out_is_null, "a failed {call} wrote *out");
        assert!(!last_message().is_empty(), "{call}: {status:?} without a message");
    }
}

fn last_message() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
    unsafe { std::ffi::CStr::from_ptr(beit_last_error_message()) }.to_string_lossy().into_owned()
}
