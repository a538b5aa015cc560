//! `beit_dvae_trainer`: training a visual tokenizer (a dVAE) through the C API, on host batches
//! or on a dataset file with the loop `beit tokenizer train` runs. Wraps
//! [`crate::train::dvae::DvaeTrainer`] and [`crate::train::dvae_run::train_on_dataset`].

use std::ffi::{c_char, c_void};
use std::mem::size_of;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::claim::{claim_state, HandleKind};
use super::context::{beit_context, context_shared};
use super::model::{check_slice, write_versioned};
use super::status::{
    beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg, FfiError, FfiResult,
};
use super::tokenizer::{beit_tokenizer, beit_tokenizer_info, tokenizer_info, TOKENIZER_INFO_V1_SIZE};
use crate::context::Context;
use crate::data::dataset::Dataset;
use crate::dvae::{Dvae, DvaeConfig};
use crate::files::OutputDir;
use crate::resources::{Bytes, Need};
use crate::train::dvae::{DvaeStepStats, DvaeTrainOptions, DvaeTrainer};
use crate::train::dvae_run::{train_on_dataset, DvaeDataOptions};

/// The architecture of a new tokenizer (the fields of its `config.json`). Start from
/// `beit_dvae_config_default()` (`beit tokenizer train`'s defaults: 1 channel, 32x32 images,
/// 8192 codes, widths 32/64/128 over 3 groups of 1 block, decoder width 64) and change what you
/// need. Checked when a trainer is created (`BEIT_ERR_INVALID_ARGUMENT` naming the field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dvae_config {
    /// `sizeof(beit_dvae_config)` as the caller compiled it.
    pub struct_size: usize,
    /// Image channels C, 1 to 4 (1 grey, 3 RGB).
    pub in_channels: usize,
    /// Side S of the square images the tokenizer takes: a positive multiple of
    /// `2^(group_count - 1)`, at most 4096.
    pub image_size: usize,
    /// Codebook size: tokens are in `[0, vocab_size)`; 2 to 65536.
    pub vocab_size: usize,
    /// Width of the first group of residual blocks (later groups double it): a positive
    /// multiple of 4, at most 4096.
    pub n_hid: usize,
    /// Groups of residual blocks, 1 to 6; the token grid is `image_size / 2^(group_count - 1)`
    /// a side.
    pub group_count: usize,
    /// Residual blocks per group, 1 to 16.
    pub n_blk_per_group: usize,
    /// Width of the decoder's first convolution, 1 to 4096 (a trained tokenizer needs a
    /// decoder).
    pub decoder_n_init: usize,
}

/// How a tokenizer trainer optimises: AdamW with a linear warmup over the first 5% of
/// `total_steps` and a cosine decay to `lr / 100`, weight decay 1e-4; the Gumbel-softmax
/// temperature decays exponentially from `tau_start` to `tau_end` over the first 70% of the
/// steps; the KL weight rises linearly from 0 to `kl_weight` over the first 20%. Start from
/// `beit_dvae_train_options_default()` (`beit tokenizer train`'s defaults). Checked when a
/// trainer is created (`BEIT_ERR_INVALID_ARGUMENT` naming the field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dvae_train_options {
    /// `sizeof(beit_dvae_train_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Peak learning rate (finite, >= 0; default 1e-3).
    pub lr: f32,
    /// Final weight of the KL term to the uniform prior (finite, >= 0; default 5e-3).
    pub kl_weight: f32,
    /// Gumbel-softmax temperature at the start (finite, > 0; default 1).
    pub tau_start: f32,
    /// Gumbel-softmax temperature after 70% of the steps (finite, > 0; default 0.125).
    pub tau_end: f32,
    /// Steps the schedules span (> 0; default 600). Training may go on past them at the final
    /// values.
    pub total_steps: u64,
    /// Seeds the Gumbel noise, and the initial weights of a trainer made by
    /// `beit_dvae_trainer_create` (as `beit tokenizer train --seed` does both).
    pub seed: u64,
}

/// How `beit_dvae_trainer_train` draws batches from a dataset: `beit tokenizer train`'s
/// augmentation (a random resized crop with a random horizontal flip, resampled to the
/// tokenizer's image size and mapped as `beit_dvae_trainer_step` describes). Start from
/// `beit_dvae_data_options_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dvae_data_options {
    /// `sizeof(beit_dvae_data_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Steps to run; 0 (the default) runs the steps left until the trainer's `total_steps`
    /// (none when it is there already).
    pub steps: u64,
    /// Images per step (>= 1; default 64); each epoch drops its last incomplete batch, so the
    /// dataset needs at least this many images.
    pub batch: usize,
    /// Smallest crop area fraction of the random resized crop, in (0, 1] (default 0.5).
    pub crop_scale_min: f64,
    /// Loader threads building batches ahead of the steps, 1 to 256 (default 1). The batches
    /// are the same for any number.
    pub workers: usize,
    /// Seeds the epochs' image orders and the augmentations (default 0).
    pub seed: u64,
}

/// What one tokenizer training step did. Set `struct_size` (or start from
/// `beit_dvae_step_stats_default()`); only the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dvae_step_stats {
    /// Set by the caller to `sizeof(beit_dvae_step_stats)`; left as it is.
    pub struct_size: usize,
    /// Steps completed, this one included.
    pub step: u64,
    /// The loss the step minimised: `recon_mse + kl_weight_now * kl`, before its update
    /// (`kl_weight_now` is the KL weight's warmup value at this step).
    pub loss: f64,
    /// Mean squared error of the reconstruction from the relaxed codes, in mapped-pixel units.
    pub recon_mse: f64,
    /// Mean KL divergence of the code distribution to the uniform prior, per token (nats).
    pub kl: f64,
    /// Perplexity of the hard codes (the encoder's argmax) over the batch: how many codes the
    /// batch used, in effect.
    pub perplexity: f64,
    /// The Gumbel-softmax temperature of this step.
    pub tau: f64,
    /// The learning rate this step applied.
    pub lr: f64,
}

/// What a `beit_dvae_trainer_train` run did. Set `struct_size` (or start from
/// `beit_dvae_train_summary_default()`); only the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_dvae_train_summary {
    /// Set by the caller to `sizeof(beit_dvae_train_summary)`; left as it is.
    pub struct_size: usize,
    /// Steps the run applied.
    pub steps: u64,
    /// Whether the progress callback stopped the run before all its steps.
    pub stopped: bool,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
}

/// The progress callback of `beit_dvae_trainer_train`: called on the calling thread after each
/// applied step with that step's stats (valid during the call only) and the caller's
/// `user_data`. Return 0 to go on, anything else to stop the run there (the step is kept and
/// the run returns `BEIT_OK`). It must return normally (no `longjmp`, no C++ exception through
/// it), and must not call `beit_dvae_trainer_*` functions on the trainer being trained (they
/// return `BEIT_ERR_BUSY`).
#[allow(non_camel_case_types)]
pub type beit_dvae_progress_fn =
    Option<unsafe extern "C" fn(stats: *const beit_dvae_step_stats, user_data: *mut c_void) -> i32>;

const DVAE_CONFIG_V1_SIZE: usize = size_of::<beit_dvae_config>();
const DVAE_TRAIN_OPTIONS_V1_SIZE: usize = size_of::<beit_dvae_train_options>();
const DVAE_DATA_OPTIONS_V1_SIZE: usize = size_of::<beit_dvae_data_options>();
const DVAE_STEP_STATS_V1_SIZE: usize = size_of::<beit_dvae_step_stats>();
const DVAE_TRAIN_SUMMARY_V1_SIZE: usize = size_of::<beit_dvae_train_summary>();

/// A tokenizer trainer: a dVAE (encoder and decoder), its AdamW state and its schedules.
///
/// Devices: the trainer runs on the thread pool and under the memory budget of the context it
/// was created with (shared: the context handle may be freed first). On a cuda context the
/// steps run on the GPU in fp32, as `beit tokenizer train --device cuda` does (the parameters
/// and the optimizer state live there, and every step copies the parameters back to the host
/// for saving and `beit_dvae_trainer_get_tokenizer`).
///
/// Thread safety: a trainer takes one call at a time. Every `beit_dvae_trainer_*` call on it
/// (all but `beit_dvae_trainer_free`) claims it for its duration without waiting; a call made
/// while another thread's call holds it does nothing and returns `BEIT_ERR_BUSY`. Calls on
/// different trainers may run at once. After a call that returned `BEIT_ERR_INTERNAL` because
/// libbeit panicked while it held the trainer, every later call on it returns
/// `BEIT_ERR_INTERNAL`: free it.
#[allow(non_camel_case_types)]
pub struct beit_dvae_trainer {
    /// Claimed by every call that touches the trainer ([`claim`]).
    inner: Mutex<DvaeTrainer>,
    /// The thread pool, memory budget and device of the context the trainer was created with.
    ctx: Arc<Context>,
}

const _: () = super::status::assert_thread_safe::<beit_dvae_trainer>();

const DVAE_TRAINER: HandleKind = HandleKind {
    name: "dVAE trainer",
    recovery: "create a new one (e.g. from a tokenizer directory it saved, with beit_dvae_trainer_load)",
};

/// One call's exclusive use of a trainer, and the context it runs on.
///
/// # Safety
/// `trainer` must be NULL or a live trainer.
unsafe fn claim<'a>(
    trainer: *const beit_dvae_trainer,
    call: &str,
) -> FfiResult<(MutexGuard<'a, DvaeTrainer>, &'a Arc<Context>)> {
    let handle = non_null(trainer, "trainer")?;
    // SAFETY: non-NULL; the caller promises a live trainer. Only a shared reference is made;
    // the mutex decides who may change the trainer.
    let handle = unsafe { &*handle };
    Ok((claim_state(&handle.inner, call, &DVAE_TRAINER)?, &handle.ctx))
}

/// `beit tokenizer train`'s architecture for grey images, with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dvae_config_default() -> beit_dvae_config {
    let d = DvaeConfig::small_grey(32);
    beit_dvae_config {
        struct_size: size_of::<beit_dvae_config>(),
        in_channels: d.in_channels,
        image_size: d.image_size,
        vocab_size: d.vocab_size,
        n_hid: d.n_hid,
        group_count: d.group_count,
        n_blk_per_group: d.n_blk_per_group,
        decoder_n_init: d.decoder_n_init.unwrap_or(0),
    }
}

/// The steps `beit tokenizer train` runs by default.
const DEFAULT_STEPS: usize = 600;

/// `beit tokenizer train`'s training defaults, with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dvae_train_options_default() -> beit_dvae_train_options {
    let d = DvaeTrainOptions::for_steps(DEFAULT_STEPS);
    beit_dvae_train_options {
        struct_size: size_of::<beit_dvae_train_options>(),
        lr: d.lr,
        kl_weight: d.kl_weight,
        tau_start: d.tau_start,
        tau_end: d.tau_end,
        total_steps: d.total_steps as u64,
        seed: d.seed,
    }
}

/// The images per step `beit tokenizer train` takes by default.
const DEFAULT_BATCH: usize = 64;

/// `beit tokenizer train`'s data defaults (steps 0: up to the trainer's `total_steps`), with
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dvae_data_options_default() -> beit_dvae_data_options {
    let d = DvaeDataOptions::new(0, DEFAULT_BATCH);
    beit_dvae_data_options {
        struct_size: size_of::<beit_dvae_data_options>(),
        steps: 0,
        batch: d.batch,
        crop_scale_min: d.crop_scale_min,
        workers: d.workers,
        seed: d.seed,
    }
}

/// A zeroed `beit_dvae_step_stats` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dvae_step_stats_default() -> beit_dvae_step_stats {
    beit_dvae_step_stats {
        struct_size: size_of::<beit_dvae_step_stats>(),
        step: 0,
        loss: 0.0,
        recon_mse: 0.0,
        kl: 0.0,
        perplexity: 0.0,
        tau: 0.0,
        lr: 0.0,
    }
}

/// A zeroed `beit_dvae_train_summary` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_dvae_train_summary_default() -> beit_dvae_train_summary {
    beit_dvae_train_summary {
        struct_size: size_of::<beit_dvae_train_summary>(),
        steps: 0,
        stopped: false,
        seconds: 0.0,
    }
}

/// A caller's `u64` count as a `usize`, or an error naming it.
fn count(value: u64, name: &str) -> FfiResult<usize> {
    usize::try_from(value).map_err(|_| FfiError::invalid(format!("{name} is {value}, more than this platform counts")))
}

/// Reads a versioned input struct: NULL gives `default`.
///
/// # Safety
/// `ptr` must be NULL or readable for its `struct_size` bytes.
unsafe fn read_versioned<T: Copy>(ptr: *const T, name: &str, v1_size: usize, default: T) -> FfiResult<T> {
    if ptr.is_null() {
        return Ok(default);
    }
    // SAFETY: non-NULL; the caller promises struct_size readable bytes, and check_struct_size
    // makes sure they cover every field of the first version, all that is read here.
    unsafe {
        check_struct_size(ptr, name, v1_size)?;
        Ok(ptr.read_unaligned())
    }
}

impl beit_dvae_config {
    /// The tokenizer config these fields describe, validated (`config->FIELD ...` on a bad one).
    fn to_config(self) -> FfiResult<DvaeConfig> {
        let config = DvaeConfig {
            in_channels: self.in_channels,
            image_size: self.image_size,
            vocab_size: self.vocab_size,
            n_hid: self.n_hid,
            group_count: self.group_count,
            n_blk_per_group: self.n_blk_per_group,
            decoder_n_init: Some(self.decoder_n_init),
            ..DvaeConfig::small_grey(self.image_size)
        };
        config.validate().map_err(|e| FfiError::invalid(format!("config->{}", e.message())))?;
        Ok(config)
    }
}

impl beit_dvae_train_options {
    /// The Rust options these describe, validated (`opts->FIELD ...` on a bad one).
    fn to_options(self) -> FfiResult<DvaeTrainOptions> {
        let options = DvaeTrainOptions {
            lr: self.lr,
            kl_weight: self.kl_weight,
            tau_start: self.tau_start,
            tau_end: self.tau_end,
            seed: self.seed,
            ..DvaeTrainOptions::for_steps(count(self.total_steps, "opts->total_steps")?)
        };
        options.validate().map_err(|e| FfiError::invalid(format!("opts->{}", e.message())))?;
        Ok(options)
    }
}

/// Builds a trainer for `dvae` on `ctx` (on its GPU for a cuda context) and hands it out.
///
/// # Safety
/// `out` must be non-NULL and writable.
unsafe fn create(
    ctx: Arc<Context>,
    make_dvae: impl FnOnce() -> crate::error::Result<Dvae> + Send,
    options: DvaeTrainOptions,
    out: *mut *mut beit_dvae_trainer,
) -> FfiResult<()> {
    // Under the context: the parameters, gradients and optimizer state are tested against its
    // budget before they are allocated.
    let trainer = ctx.run(|| {
        let mut trainer = DvaeTrainer::new(make_dvae()?, options)?;
        trainer.use_context(&ctx)?;
        Ok::<_, crate::error::Error>(trainer)
    })?;
    let handle = Box::into_raw(Box::new(beit_dvae_trainer { inner: Mutex::new(trainer), ctx }));
    // SAFETY: the caller checked `out`.
    unsafe { out.write(handle) };
    Ok(())
}

/// Creates a trainer for a new tokenizer of architecture `config` with DALL-E's random
/// initialisation, reproducible from `opts->seed`. `config` and `opts` may be NULL for the
/// defaults. On success `*out` receives a trainer to release with `beit_dvae_trainer_free`; on
/// failure `*out` is not written. On a cuda context the parameters move to the GPU now.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, out), `BEIT_ERR_INVALID_ARGUMENT` (a struct_size; a
/// config field or option value, named; parameters and optimizer state beyond the context's
/// memory budget), `BEIT_ERR_UNSUPPORTED` (a cuda context whose GPU cannot be used).
///
/// # Safety
/// `ctx` must be NULL or a live context; `config` and `opts` NULL or readable for their
/// `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_create(
    ctx: *const beit_context,
    config: *const beit_dvae_config,
    opts: *const beit_dvae_train_options,
    out: *mut *mut beit_dvae_trainer,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let out = non_null_mut(out, "out")?;
        let config = unsafe { read_versioned(config, "config", DVAE_CONFIG_V1_SIZE, beit_dvae_config_default()) }?;
        let opts =
            unsafe { read_versioned(opts, "opts", DVAE_TRAIN_OPTIONS_V1_SIZE, beit_dvae_train_options_default()) }?;
        let (config, options) = (config.to_config()?, opts.to_options()?);
        let seed = options.seed;
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { create(context, move || Dvae::new(config, seed), options, out) }
    })
}

/// Creates a trainer that goes on training the tokenizer in `dir` (`config.json` +
/// `model.safetensors`, as `beit_dvae_trainer_save` or `beit tokenizer train` write them; it
/// must have a decoder). Training starts at step 0 with fresh optimizer state. `opts` may be
/// NULL for the defaults (`opts->seed` seeds the Gumbel noise only). On success `*out` receives
/// a trainer to release with `beit_dvae_trainer_free`; on failure `*out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, dir, out), `BEIT_ERR_INVALID_ARGUMENT` (dir not UTF-8;
/// struct_size or an option value, named; a tokenizer without a decoder; beyond the memory
/// budget), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT`, `BEIT_ERR_CONFIG` (as `beit_tokenizer_load`),
/// `BEIT_ERR_UNSUPPORTED` (a cuda context whose GPU cannot be used).
///
/// # Safety
/// `ctx` must be NULL or a live context; `dir` NULL or a NUL-terminated string; `opts` NULL or
/// readable for its `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_load(
    ctx: *const beit_context,
    dir: *const c_char,
    opts: *const beit_dvae_train_options,
    out: *mut *mut beit_dvae_trainer,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let dir = unsafe { utf8_arg(dir, "dir") }?;
        let out = non_null_mut(out, "out")?;
        let opts =
            unsafe { read_versioned(opts, "opts", DVAE_TRAIN_OPTIONS_V1_SIZE, beit_dvae_train_options_default()) }?;
        let options = opts.to_options()?;
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { create(context, || Dvae::load(Path::new(dir)), options, out) }
    })
}

/// Frees a trainer. NULL is a no-op. Its context is not touched. This is the one call that does
/// not claim the trainer: free it only when no call on it is running.
///
/// # Safety
/// `trainer` must be NULL or a trainer not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_free(trainer: *mut beit_dvae_trainer) {
    guard_infallible((), || {
        if !trainer.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(trainer) });
        }
    })
}

/// The C view of a step's stats, for a caller's struct of `struct_size` bytes.
fn step_stats(s: &DvaeStepStats, struct_size: usize) -> beit_dvae_step_stats {
    beit_dvae_step_stats {
        struct_size,
        step: s.step as u64 + 1,
        loss: s.loss,
        recon_mse: s.recon_mse,
        kl: s.kl,
        perplexity: s.perplexity,
        tau: f64::from(s.tau),
        lr: f64::from(s.lr),
    }
}

/// Reads the `struct_size` of an optional output struct (NULL: no output).
///
/// # Safety
/// `out` must be NULL or readable for a `size_t`.
unsafe fn out_size<T>(out: *mut T, v1_size: usize) -> FfiResult<Option<usize>> {
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller's promise.
    Ok(Some(unsafe { check_struct_size(out, "out", v1_size) }?))
}

/// One optimizer step on a batch of `batch` images: the Gumbel-softmax relaxation at this
/// step's temperature, the reconstruction and KL losses, backward, AdamW at the scheduled
/// learning rate, inside the trainer's context (on its GPU for a cuda context). On success the
/// step count goes up by one and, when `out` is not NULL, `out` receives the step's stats (only
/// the fields that fit in `out->struct_size`).
///
/// `pixels` holds f32 `[batch, C, S, S]` (channel planes, row-major; C = `in_channels`, S =
/// `image_size`, see `beit_dvae_trainer_get_info`) in the tokenizer's pixel mapping, DALL-E's
/// `map_pixels`: an image with values x in [0, 1] enters as `0.8 * x + 0.1` (what
/// `beit_dvae_trainer_train` feeds; note that `beit_tokenizer_tokenize` takes unmapped pixels
/// and maps them itself). `pixels_len` must equal `batch * C * S * S`. Every value must be
/// finite.
///
/// Everything is checked before anything runs; on any error the trainer is as before the call
/// and `out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, pixels), `BEIT_ERR_INVALID_ARGUMENT` (batch 0; a
/// `pixels_len` other than the shape's, with both numbers; a non-finite pixel, with its index;
/// a misaligned buffer; out's struct_size; a step beyond the memory budget),
/// `BEIT_ERR_NUMERICAL` (a non-finite loss or gradient: the step was not applied),
/// `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL` (see `beit_dvae_trainer`).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `pixels` NULL or readable for `pixels_len` floats
/// during the call; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_step(
    trainer: *mut beit_dvae_trainer,
    pixels: *const f32,
    pixels_len: usize,
    batch: usize,
    out: *mut beit_dvae_step_stats,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let (mut trainer, ctx) = unsafe { claim(trainer, "beit_dvae_trainer_step") }?;
        non_null(pixels, "pixels")?;
        let out_size = unsafe { out_size(out, DVAE_STEP_STATS_V1_SIZE) }?;
        if batch == 0 {
            return Err(FfiError::invalid("batch is 0; a step needs at least one image"));
        }
        let c = &trainer.dvae.config;
        let shape = format!("batch {batch} of [{}, {}, {}] images", c.in_channels, c.image_size, c.image_size);
        match batch.checked_mul(trainer.dvae.image_len()) {
            Some(want) if want == pixels_len => {}
            Some(want) => {
                return Err(FfiError::invalid(format!("pixels_len is {pixels_len}, but {shape} needs {want}")))
            }
            None => {
                return Err(FfiError::invalid(format!(
                    "pixels_len is {pixels_len}, but {shape} needs more values than fit in memory"
                )))
            }
        }
        check_slice(pixels, pixels_len, "pixels")?;
        // SAFETY: non-NULL, aligned, length checked; the caller promises it is readable and
        // unchanged during the call.
        let mapped = unsafe { std::slice::from_raw_parts(pixels, pixels_len) };
        if let Some(i) = mapped.iter().position(|v| !v.is_finite()) {
            return Err(FfiError::invalid(format!("pixels[{i}] is {}; pixels must be finite", mapped[i])));
        }
        let inner: &mut DvaeTrainer = &mut trainer;
        let stats = ctx.run(|| inner.step(mapped))?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_versioned(out, &step_stats(&stats, size), size) };
        }
        Ok(())
    })
}

/// Trains on the images of the dataset file `dataset_path` (`.beitds`, as `beit_dataset_open`
/// reads it; its channel count must be the tokenizer's): the loop `beit tokenizer train` runs,
/// so a trainer created with the same config, options and seed and trained with the same data
/// options writes, bit for bit, the tokenizer the command writes. `opts` may be NULL for the
/// defaults.
///
/// Which batches: step n of the trainer (its step count before the step) takes batch
/// `n % B` of epoch `n / B`, B = images / batch (an epoch's order and augmentations come from
/// `opts->seed` and the epoch). So two calls of a and b steps equal one call of a + b, and host
/// steps (`beit_dvae_trainer_step`) in between skip the dataset batches of their step numbers.
///
/// `progress`, when not NULL, is called after each applied step (see `beit_dvae_progress_fn`),
/// with `user_data`; a nonzero return stops the run after that step, which still returns
/// `BEIT_OK` (`out->stopped` says so). When `out` is not NULL it receives what the run did.
///
/// Everything that can be refused is checked before the first step (options, the dataset, the
/// memory of a step and of the loader); such a refusal leaves the trainer as it was. A step
/// whose loss or gradient is not finite ends the run with `BEIT_ERR_NUMERICAL`: that step is not
/// applied, the run's earlier ones are (`beit_dvae_trainer_step_count` tells how many), and
/// `out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, dataset_path), `BEIT_ERR_INVALID_ARGUMENT`
/// (dataset_path not UTF-8; a struct_size; batch 0, workers outside 1 to 256, a crop scale
/// outside (0, 1]; another channel count than the tokenizer's; fewer images than one batch;
/// beyond the memory budget), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT` (as `beit_dataset_open`),
/// `BEIT_ERR_NUMERICAL`, `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL` (see `beit_dvae_trainer`).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `dataset_path` NULL or a NUL-terminated string;
/// `opts` NULL or readable for its `struct_size`; `progress` NULL or a function of the type
/// `beit_dvae_progress_fn` that may be called with `user_data`; `out` NULL or writable for its
/// `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_train(
    trainer: *mut beit_dvae_trainer,
    dataset_path: *const c_char,
    opts: *const beit_dvae_data_options,
    progress: beit_dvae_progress_fn,
    user_data: *mut c_void,
    out: *mut beit_dvae_train_summary,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let (mut trainer, ctx) = unsafe { claim(trainer, "beit_dvae_trainer_train") }?;
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let o = unsafe { read_versioned(opts, "opts", DVAE_DATA_OPTIONS_V1_SIZE, beit_dvae_data_options_default()) }?;
        let out_size = unsafe { out_size(out, DVAE_TRAIN_SUMMARY_V1_SIZE) }?;
        let steps = match count(o.steps, "opts->steps")? {
            0 => trainer.options.total_steps.saturating_sub(trainer.step_count()),
            n => n,
        };
        if !(0.0 < o.crop_scale_min && o.crop_scale_min <= 1.0) {
            return Err(FfiError::invalid(format!("opts->crop_scale_min must be in (0, 1], got {}", o.crop_scale_min)));
        }
        let data = DvaeDataOptions {
            steps,
            batch: o.batch,
            crop_scale_min: o.crop_scale_min,
            workers: o.workers,
            seed: o.seed,
        };
        let dataset = Arc::new(Dataset::open(Path::new(path))?);
        let report = train_on_dataset(&mut trainer, ctx, dataset, &data, |stats| {
            let Some(progress) = progress else { return ControlFlow::Continue(()) };
            let c_stats = step_stats(stats, size_of::<beit_dvae_step_stats>());
            // SAFETY: the caller promises a callable function that takes this user_data; the
            // stats live across the call.
            match unsafe { progress(&c_stats, user_data) } {
                0 => ControlFlow::Continue(()),
                _ => ControlFlow::Break(()),
            }
        })?;
        if let Some(size) = out_size {
            let summary = beit_dvae_train_summary {
                struct_size: size,
                steps: report.steps as u64,
                stopped: report.stopped,
                seconds: report.seconds,
            };
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_versioned(out, &summary, size) };
        }
        Ok(())
    })
}

/// Saves the tokenizer as a directory (`config.json` + `model.safetensors`) that
/// `beit_tokenizer_load`, `beit_dvae_trainer_load` and `beit tokenize` read. The directory is
/// created if needed (and removed again if the save fails and it is still empty). Both files
/// are written in full before either replaces its old version, so a failed save leaves the
/// files that were there.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (dir not UTF-8), `BEIT_ERR_IO`
/// (e.g. a directory that cannot be created or written), `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `dir` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_save(trainer: *const beit_dvae_trainer, dir: *const c_char) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises above; each helper checks for NULL.
        let (trainer, ctx) = unsafe { claim(trainer, "beit_dvae_trainer_save") }?;
        let dir = Path::new(unsafe { utf8_arg(dir, "dir") }?);
        let dvae = &trainer.dvae;
        ctx.run(|| {
            let out_dir = OutputDir::create(dir)?;
            dvae.save(dir)?;
            out_dir.keep();
            Ok::<_, crate::error::Error>(())
        })?;
        Ok(())
    })
}

/// Hands out the tokenizer as it stands now: a copy, independent of the trainer (later steps
/// do not change it), usable at once with `beit_tokenizer_tokenize` and `beit_tokenizer_decode`
/// on the trainer's context (on its GPU for a cuda context). On success `*out` receives a
/// tokenizer to release with `beit_tokenizer_free`; on failure it is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, out), `BEIT_ERR_INVALID_ARGUMENT` (the copy beyond
/// the memory budget), `BEIT_ERR_UNSUPPORTED` (a GPU that cannot take the copy),
/// `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_get_tokenizer(
    trainer: *const beit_dvae_trainer,
    out: *mut *mut beit_tokenizer,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (trainer, ctx) = unsafe { claim(trainer, "beit_dvae_trainer_get_tokenizer") }?;
        let out = non_null_mut(out, "out")?;
        let dvae = &trainer.dvae;
        let copy = ctx.run(|| {
            let n = dvae.params.data.len();
            Need::new(format!("a copy of the tokenizer ({n} parameters)"), Bytes::floats(&[n])).check()?;
            Ok::<_, crate::error::Error>(dvae.clone())
        })?;
        let tokenizer = beit_tokenizer::new(copy, Arc::clone(ctx))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { tokenizer.hand_out(out) };
        Ok(())
    })
}

/// Writes the number of steps completed to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_step_count(trainer: *const beit_dvae_trainer, out: *mut u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (trainer, _) = unsafe { claim(trainer, "beit_dvae_trainer_step_count") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(trainer.step_count() as u64) };
        Ok(())
    })
}

/// Describes the tokenizer being trained (as `beit_tokenizer_get_info` does a tokenizer), e.g.
/// to size the batches of `beit_dvae_trainer_step`. Set `out->struct_size` first (or start from
/// `beit_tokenizer_info_default()`).
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (struct_size), `BEIT_ERR_BUSY`,
/// `BEIT_ERR_INTERNAL`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable for `out->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_dvae_trainer_get_info(
    trainer: *const beit_dvae_trainer,
    out: *mut beit_tokenizer_info,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (trainer, _) = unsafe { claim(trainer, "beit_dvae_trainer_get_info") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", TOKENIZER_INFO_V1_SIZE) }?;
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &tokenizer_info(&trainer.dvae.config, size), size) };
        Ok(())
    })
}
