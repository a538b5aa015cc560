//! Classification fine-tuning through the C API: a classifier from a pretrained model (or from
//! a config), host-fed classification steps on a `beit_trainer`, dataset-driven fine-tuning
//! (`beit finetune`'s loop, [`crate::train::finetune::run_finetune_until`]) with a progress
//! callback, and the recipe's default options. The trainer itself (creation, checkpoints,
//! saving) is `beit_trainer` ([`super::trainer`]).

use std::ffi::{c_char, c_void};
use std::mem::size_of;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::context::{beit_context, context_ref};
use super::model::{beit_model, check_slice, hand_out as hand_out_model, handle_ref, write_versioned};
use super::status::{beit_status, check_struct_size, guard, non_null, non_null_mut, utf8_arg, FfiError, FfiResult};
use super::trainer::{
    beit_step_stats, beit_trainer, beit_trainer_options, beit_trainer_options_default, check_len, claim,
    step_stats_out, write_step_stats, RawWeightDecayOn,
};
use crate::context::Context;
use crate::data::dataset::Dataset;
use crate::model::{Architecture, BeitConfig, ClassifyBatch};
use crate::tensor::checked_numel;
use crate::train::finetune::{
    classifier_from_pretrained, dataset_labels, label_fraction_subset, run_finetune_until, steps_per_epoch,
    subset_dataset, FinetuneData,
};
use crate::train::recipes::finetune as recipe;
use crate::train::trainer::StepStats;

/// A classification batch for `beit_trainer_step_classify`: caller-owned, read only during the
/// call. Every length must equal what the shape implies.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_classify_batch {
    /// `sizeof(beit_classify_batch)` as the caller compiled it.
    pub struct_size: usize,
    /// Pixel values, `[batch, channels, height, width]` (NCHW), f32, normalised as the model
    /// expects, all finite. Required.
    pub pixels: *const f32,
    /// Floats at `pixels`; must equal `batch * channels * height * width`.
    pub pixels_len: usize,
    /// Images in the batch (at least 1).
    pub batch: usize,
    /// Channels per image; must equal the model's `num_channels`.
    pub channels: usize,
    /// Image height; training runs at the configured image size only.
    pub height: usize,
    /// Image width; training runs at the configured image size only.
    pub width: usize,
    /// `[batch]` class ids, each in `[0, num_labels)`. Required.
    pub labels: *const i64,
    /// Values at `labels`; must equal `batch`.
    pub labels_len: usize,
}

/// How `beit_trainer_finetune` feeds a classification trainer from a dataset file (the data
/// side of `beit finetune`; the optimizer side is the trainer's `beit_trainer_options`). Start
/// from `beit_finetune_options_default()`. Values are checked when the run starts
/// (`BEIT_ERR_INVALID_ARGUMENT` naming the field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_finetune_options {
    /// `sizeof(beit_finetune_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Where the trainer's step count ends: the run takes steps until it reaches this. 0 (the
    /// default) takes the trainer's `total_steps` (its schedule's length), which must then be
    /// positive.
    pub steps: u64,
    /// Images per step (default 64). Each epoch is the dataset's full batches in a seeded
    /// order (a dataset smaller than one batch gives one short batch).
    pub batch_size: usize,
    /// Label smoothing of the cross-entropy, in [0, 1) (default 0.1).
    pub label_smoothing: f32,
    /// Smallest area fraction of the random resized crop, in (0, 1] (default 0.08; the
    /// largest is 1).
    pub min_crop_scale: f64,
    /// Horizontal flip probability, in [0, 1] (default 0.5; 0 for data where mirroring changes
    /// the class).
    pub flip_prob: f64,
    /// Seeds the labelled subset, the epoch orders and the augmentations (default 0). `beit
    /// finetune --seed S` uses S here and for the trainer's and the head's seeds.
    pub seed: u64,
    /// Loader worker threads, 1 to 256 (default 1); the batches are the same for any count.
    pub workers: usize,
    /// Fraction of the labelled samples to train on, in (0, 1] (default 1): below 1, a
    /// stratified subset (the same fraction of every class, at least one sample each), drawn
    /// by `seed`.
    pub label_fraction: f64,
    /// A directory for the labelled subset's temporary file (written, mapped and removed at
    /// once; only with `label_fraction` below 1). NULL (the default): the system's temporary
    /// directory.
    pub scratch_dir: *const c_char,
}

/// Called by `beit_trainer_finetune` after every step, on the thread that called it, with what
/// the step did and the `user_data` given to it. Return 0 to go on, anything else to stop:
/// the run then returns `BEIT_OK` with the trainer as that step left it (a later call resumes
/// there). The trainer is claimed for the whole run, so calls on it from the callback return
/// `BEIT_ERR_BUSY`. `stats` is valid only during the call.
#[allow(non_camel_case_types)]
pub type beit_step_callback =
    Option<unsafe extern "C" fn(stats: *const beit_step_stats, user_data: *mut c_void) -> i32>;

/// What `beit_model_evaluate` measured. Set `struct_size` (or start from
/// `beit_evaluation_default()`) and, to receive the confusion matrix, `confusion` and
/// `confusion_len`; the other fields are outputs.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_evaluation {
    /// Set by the caller to `sizeof(beit_evaluation)`; left as it is.
    pub struct_size: usize,
    /// Input: receives the confusion matrix, `[num_labels, num_labels]` row-major
    /// (`confusion[true * num_labels + predicted]` images); NULL to skip it.
    pub confusion: *mut u64,
    /// Input: values at `confusion`; when it is not NULL, must equal `num_labels * num_labels`
    /// (the model's `num_labels`, as `beit_model_get_info` gives it).
    pub confusion_len: usize,
    /// Output: images evaluated (the whole dataset).
    pub images: u64,
    /// Output: images whose top-1 prediction is their label.
    pub correct: u64,
    /// Output: `correct / images` (0 for an empty dataset).
    pub top1: f64,
    /// Output: the model's number of labels.
    pub num_labels: usize,
}

const CLASSIFY_BATCH_V1_SIZE: usize = size_of::<beit_classify_batch>();
const FINETUNE_OPTIONS_V1_SIZE: usize = size_of::<beit_finetune_options>();
const STEP_STATS_V1_SIZE: usize = size_of::<beit_step_stats>();
const EVALUATION_V1_SIZE: usize = size_of::<beit_evaluation>();

/// `beit finetune`'s trainer options for a run of `total_steps` steps: lr 1e-3 after a linear
/// warmup of a tenth of the run, cosine to 1e-6 at `total_steps`, AdamW betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.05 (BEiT's rule), no gradient clipping, drop path 0.1, layer decay
/// 0.65, seed 0, with `struct_size` set. `total_steps` 0 gives a constant rate without warmup.
#[no_mangle]
pub extern "C" fn beit_trainer_options_finetune_default(total_steps: u64) -> beit_trainer_options {
    let o = recipe::trainer_options(total_steps);
    beit_trainer_options {
        learning_rate: o.learning_rate,
        min_learning_rate: o.min_learning_rate,
        warmup_steps: o.warmup_steps,
        total_steps: o.total_steps,
        weight_decay: o.weight_decay,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        clip_grad_norm: o.clip_grad_norm,
        drop_path_rate: o.drop_path_rate.unwrap_or(-1.0),
        layer_decay: o.layer_decay,
        weight_decay_on: RawWeightDecayOn::of(o.weight_decay_on),
        seed: o.seed,
        ..beit_trainer_options_default()
    }
}

/// An empty `beit_classify_batch` (NULL pointers, zero sizes) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_classify_batch_default() -> beit_classify_batch {
    beit_classify_batch {
        struct_size: size_of::<beit_classify_batch>(),
        pixels: std::ptr::null(),
        pixels_len: 0,
        batch: 0,
        channels: 0,
        height: 0,
        width: 0,
        labels: std::ptr::null(),
        labels_len: 0,
    }
}

/// `beit finetune`'s data options (see `beit_finetune_options`), with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_finetune_options_default() -> beit_finetune_options {
    beit_finetune_options {
        struct_size: size_of::<beit_finetune_options>(),
        steps: 0,
        batch_size: recipe::BATCH_SIZE,
        label_smoothing: recipe::LABEL_SMOOTHING,
        min_crop_scale: recipe::MIN_CROP_SCALE,
        flip_prob: recipe::FLIP_PROB,
        seed: 0,
        workers: 1,
        label_fraction: 1.0,
        scratch_dir: std::ptr::null(),
    }
}

/// A `beit_evaluation` with no confusion buffer and zeroed outputs, `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_evaluation_default() -> beit_evaluation {
    beit_evaluation {
        struct_size: size_of::<beit_evaluation>(),
        confusion: std::ptr::null_mut(),
        confusion_len: 0,
        images: 0,
        correct: 0,
        top1: 0.0,
        num_labels: 0,
    }
}

/// A progress report's receiver: `Break` stops the run.
pub(super) type Progress<'a, S> = &'a mut dyn FnMut(&S) -> ControlFlow<()>;

/// Runs `work` on `ctx`'s thread pool while the calling thread serves its progress reports:
/// `on_progress` sees each report on the caller's thread (where a host expects its callback:
/// its thread-locals, its interpreter lock), and what it returns is handed back to `work`,
/// which waits for it. Without `on_progress` the reports just continue.
pub(super) fn run_reporting<S: Copy + Send, R: Send>(
    ctx: &Context,
    work: impl FnOnce(Progress<'_, S>) -> R + Send,
    on_progress: Option<Progress<'_, S>>,
) -> R {
    let Some(on_progress) = on_progress else {
        return ctx.run(|| work(&mut |_| ControlFlow::Continue(())));
    };
    let (report_tx, report_rx) = std::sync::mpsc::sync_channel::<S>(0);
    let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel::<ControlFlow<()>>(0);
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            ctx.run(move || {
                work(&mut |s| {
                    // The serving side is gone only if it panicked: stop.
                    if report_tx.send(*s).is_err() {
                        return ControlFlow::Break(());
                    }
                    reply_rx.recv().unwrap_or(ControlFlow::Break(()))
                })
            })
            // `report_tx` drops here, which ends the serving loop below.
        });
        for s in report_rx.iter() {
            if reply_tx.send(on_progress(&s)).is_err() {
                break;
            }
        }
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A C progress callback as the header declares it (NULL is `None`).
type RawCallback<T> = Option<unsafe extern "C" fn(*const T, *mut c_void) -> i32>;

/// A C progress callback as a Rust one (`None` without a callback).
pub(super) struct CCallback<T> {
    f: unsafe extern "C" fn(*const T, *mut c_void) -> i32,
    user_data: *mut c_void,
}

impl<T> CCallback<T> {
    pub(super) fn new(f: RawCallback<T>, user_data: *mut c_void) -> Option<Self> {
        f.map(|f| CCallback { f, user_data })
    }

    /// Calls it with `value`: nonzero stops.
    pub(super) fn call(&self, value: &T) -> ControlFlow<()> {
        // SAFETY: the host's callback, called as its documentation says, on the host's thread.
        match unsafe { (self.f)(value, self.user_data) } {
            0 => ControlFlow::Continue(()),
            _ => ControlFlow::Break(()),
        }
    }
}

/// Turns a pretrained model (`BeitForMaskedImageModeling`, `BeitModel` or
/// `BeitForImageClassification`) into a new `BeitForImageClassification` with `num_labels`
/// labels, as BEiT starts fine-tuning and `beit finetune --model` does: the backbone is copied
/// (a shared relative position bias becomes every block's own table), the mask token and MIM
/// head are dropped, and the head is fresh (`beit.pooler.layernorm` 1/0, `classifier.weight`
/// truncated normal × 0.001, drawn from `seed`; a pretrained classifier of another shape is
/// replaced likewise). The config's `drop_path_rate` becomes `drop_path_rate`. `pretrained` is
/// only read. On success `*out` receives a model to release with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, pretrained, out), `BEIT_ERR_INVALID_ARGUMENT`
/// (`num_labels` not 1 to 2^20; `drop_path_rate` not in [0, 1); the label maps over the
/// context's memory budget), `BEIT_ERR_FORMAT` (a pretrained tensor missing or of another
/// size, e.g. a segmentation model's backbone without its relative position tables).
///
/// # Safety
/// `ctx` and `pretrained` must be NULL or live handles; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_to_classifier(
    ctx: *const beit_context,
    pretrained: *const beit_model,
    num_labels: usize,
    drop_path_rate: f64,
    seed: u64,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let pretrained = unsafe { handle_ref(pretrained) }?.model();
        let out = non_null_mut(out, "out")?;
        check_drop_path(drop_path_rate)?;
        let (model, _fresh) = ctx.run(|| classifier_from_pretrained(&pretrained, num_labels, drop_path_rate, seed))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(model, out) };
        Ok(())
    })
}

/// Creates a fresh `BeitForImageClassification` (the from-scratch baseline, as `beit finetune`
/// without `--model`) from the text of a Hugging Face config.json: labels `0..num_labels`, no
/// mask token, per-layer relative position bias where the config shares one, `drop_path_rate`,
/// BEiT's random initialisation from `seed`. On success `*out` receives a model to release
/// with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (not UTF-8; `num_labels` not 1
/// to 2^20; `drop_path_rate` not in [0, 1)), `BEIT_ERR_FORMAT` (not JSON, wrong field types),
/// `BEIT_ERR_CONFIG`, `BEIT_ERR_UNSUPPORTED`.
///
/// # Safety
/// `ctx` must be NULL or a live context; `config_json` NULL or a NUL-terminated string; `out`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_classifier_create(
    ctx: *const beit_context,
    config_json: *const c_char,
    num_labels: usize,
    drop_path_rate: f64,
    seed: u64,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let json = unsafe { utf8_arg(config_json, "config_json") }?;
        let out = non_null_mut(out, "out")?;
        check_drop_path(drop_path_rate)?;
        let config = BeitConfig::from_json_str(json)?;
        let model = ctx.run(|| recipe::classifier_from_config(&config, num_labels, drop_path_rate, seed))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(model, out) };
        Ok(())
    })
}

fn check_drop_path(rate: f64) -> FfiResult<()> {
    if !(0.0..1.0).contains(&rate) {
        return Err(FfiError::invalid(format!("drop_path_rate must be in [0, 1), got {rate}")));
    }
    Ok(())
}

/// Creates a copy of `model` for `height` x `width` inputs (as `beit finetune --image-size`):
/// same weights, the position tables (absolute embeddings, relative position bias) resized as
/// Hugging Face does, the config's `image_size` changed. `model` is only read. On success
/// `*out` receives a model to release with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (a size that holds no patch;
/// a config the new size makes invalid), `BEIT_ERR_UNSUPPORTED` (absolute position embeddings
/// of a non-square grid, which cannot be resized).
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_with_image_size(
    ctx: *const beit_context,
    model: *const beit_model,
    height: usize,
    width: usize,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let model = unsafe { handle_ref(model) }?.model();
        let out = non_null_mut(out, "out")?;
        let resized = ctx.run(|| model.with_image_size(height, width))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(resized, out) };
        Ok(())
    })
}

/// One fine-tuning step on a labelled `batch` of a trainer made from a
/// `BeitForImageClassification` (`beit_trainer_create` or `beit_trainer_load_model_dir`):
/// forward, mean cross-entropy with label smoothing `label_smoothing` (in [0, 1)), backward,
/// gradient clipping, AdamW at the scheduled learning rate, inside the trainer's context's
/// thread pool (on its GPU for a cuda context). On success the step count and the data
/// position go up by one and, when `out` is not NULL, `out` receives what the step did
/// (`masked` is 0). Checkpoints (`beit_trainer_save_checkpoint`) resume it bit for bit.
///
/// Every argument and the whole batch are checked before anything runs; on any error the
/// trainer is exactly as before the call and `out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, batch, batch->pixels, batch->labels),
/// `BEIT_ERR_INVALID_ARGUMENT` (a pretraining trainer; struct_size of batch or out; a length
/// that does not match the shape, with both numbers; a shape other than the configured image
/// size or channel count; a label outside `[0, num_labels)`; a non-finite pixel;
/// `label_smoothing` outside [0, 1)), `BEIT_ERR_NUMERICAL` (the loss or gradient is not
/// finite; the step was not applied), `BEIT_ERR_BUSY` (another thread's call holds the
/// trainer), `BEIT_ERR_INTERNAL` (see `beit_trainer`).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `batch` NULL or readable for its `struct_size`,
/// each of its non-NULL buffers holding its stated length for the duration of the call; `out`
/// NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_step_classify(
    trainer: *mut beit_trainer,
    batch: *const beit_classify_batch,
    label_smoothing: f32,
    out: *mut beit_step_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_step_classify") }?;
        let batch = non_null(batch, "batch")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
        // check_struct_size makes sure cover the fields of the first version read here.
        let b = unsafe {
            check_struct_size(batch, "batch", CLASSIFY_BATCH_V1_SIZE)?;
            batch.read_unaligned()
        };
        let out_size = if out.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes.
            Some(unsafe { check_struct_size(out, "out", STEP_STATS_V1_SIZE) }?)
        };
        non_null(b.pixels, "batch->pixels")?;
        non_null(b.labels, "batch->labels")?;
        check_len(
            "batch->pixels_len",
            b.pixels_len,
            checked_numel(&[b.batch, b.channels, b.height, b.width]),
            &format!("[batch {}, channels {}, height {}, width {}]", b.batch, b.channels, b.height, b.width),
        )?;
        check_len("batch->labels_len", b.labels_len, Some(b.batch), &format!("a batch of {} images", b.batch))?;
        check_slice(b.pixels, b.pixels_len, "batch->pixels")?;
        check_slice(b.labels, b.labels_len, "batch->labels")?;
        // SAFETY: non-NULL, aligned, sizes checked; the caller promises each buffer holds its
        // stated length and that nobody writes it during the call.
        let cb = unsafe {
            ClassifyBatch {
                pixels: std::slice::from_raw_parts(b.pixels, b.pixels_len),
                batch: b.batch,
                channels: b.channels,
                height: b.height,
                width: b.width,
                labels: std::slice::from_raw_parts(b.labels, b.labels_len),
            }
        };
        let ctx = claimed.ctx;
        let inner = &mut *claimed.trainer;
        // Refused before the move to a GPU, so that a wrong trainer changes nothing.
        inner.model().check_classify_batch(&cb)?;
        inner.use_context(ctx)?;
        let stats = ctx.run(|| inner.step_classify(&cb, label_smoothing))?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_step_stats(out, size, &stats) };
        }
        Ok(())
    })
}

/// Reads the caller's fine-tuning options (NULL: the defaults).
///
/// # Safety
/// `opts` must be NULL or readable for its `struct_size` bytes.
unsafe fn read_finetune_options(opts: *const beit_finetune_options) -> FfiResult<beit_finetune_options> {
    if opts.is_null() {
        return Ok(beit_finetune_options_default());
    }
    // SAFETY: non-NULL; the caller promises struct_size readable bytes, and check_struct_size
    // makes sure that covers every field read here.
    unsafe {
        check_struct_size(opts, "opts", FINETUNE_OPTIONS_V1_SIZE)?;
        Ok(opts.read_unaligned())
    }
}

/// Fine-tunes a classification trainer on a labelled dataset file (`.beitds`), as
/// `beit finetune` does: the augmenting loader (random resized crop, flips, normalisation to
/// mean = std = 0.5) over the (stratified subset of the) data, epoch after epoch in seeded
/// orders, one `beit_trainer_step_classify` per batch, until the trainer's step count reaches
/// `opts->steps` (or its `total_steps`). The run starts at the trainer's data position, so a
/// trainer restored from a checkpoint continues with the batch the saved run would have
/// taken next. With `beit_trainer_options_finetune_default(steps)` as the trainer's options,
/// a model from `beit_model_to_classifier` (or `beit_classifier_create`) and the same seeds, the
/// weights are bit for bit those of `beit finetune` (CPU, same thread count).
///
/// `callback` (may be NULL) is called after every step with its stats and `user_data`, on the
/// calling thread; a nonzero return stops the run cleanly (see `beit_step_callback`). Every
/// label is checked before the first step; `opts` NULL takes the defaults.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, dataset_path), `BEIT_ERR_INVALID_ARGUMENT` (a
/// pretraining trainer; struct_size; an option value, named; no steps to take; a dataset
/// without labels, with a label the model does not have, or whose images' channels differ
/// from the model's), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT` (the dataset file or the subset's
/// scratch file), `BEIT_ERR_NUMERICAL` (training diverged: the steps before it are kept, the
/// failed one is not applied), `BEIT_ERR_BUSY`, `BEIT_ERR_INTERNAL`. After an error the
/// trainer holds the steps completed before it (none when the run was refused up front).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `dataset_path` NULL or a NUL-terminated string;
/// `opts` NULL or readable for its `struct_size`, its `scratch_dir` NULL or a NUL-terminated
/// string; `callback`, when not NULL, a function that may be called as described.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_finetune(
    trainer: *mut beit_trainer,
    dataset_path: *const c_char,
    opts: *const beit_finetune_options,
    callback: beit_step_callback,
    user_data: *mut c_void,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_finetune") }?;
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let o = unsafe { read_finetune_options(opts) }?;
        // SAFETY: the caller promises a NULL or NUL-terminated scratch_dir.
        let scratch = unsafe { scratch_dir(o.scratch_dir) }?;
        let ctx = claimed.ctx;
        let inner = &mut *claimed.trainer;
        if inner.model().architecture() != Architecture::ImageClassification {
            return Err(FfiError::invalid(format!(
                "beit_trainer_finetune: fine-tuning needs a trainer of a BeitForImageClassification model; this \
                 one trains a {} (make one with beit_model_to_classifier and beit_trainer_create)",
                inner.model().architecture().hf_name()
            )));
        }
        let steps = match o.steps {
            0 => inner.options().total_steps,
            s => s,
        };
        if steps == 0 {
            return Err(FfiError::invalid(
                "opts->steps is 0 and so is the trainer's total_steps: say how many steps to train",
            ));
        }
        if !(o.min_crop_scale > 0.0 && o.min_crop_scale <= 1.0) {
            return Err(FfiError::invalid(format!("opts->min_crop_scale must be in (0, 1], got {}", o.min_crop_scale)));
        }
        if !(0.0..=1.0).contains(&o.flip_prob) {
            return Err(FfiError::invalid(format!("opts->flip_prob must be in [0, 1], got {}", o.flip_prob)));
        }
        let feed = FinetuneData {
            batch_size: o.batch_size,
            steps,
            label_smoothing: o.label_smoothing,
            crop_scale: (o.min_crop_scale, 1.0),
            flip_prob: o.flip_prob,
            seed: o.seed,
            workers: o.workers,
        };
        let data = ctx.run(|| -> FfiResult<Arc<Dataset>> {
            let full = Arc::new(Dataset::open(Path::new(path))?);
            let subset = label_fraction_subset(&dataset_labels(&full)?, o.label_fraction, o.seed)?;
            Ok(subset_dataset(&full, subset.as_deref(), &scratch)?)
        })?;
        inner.use_context(ctx)?;
        let callback = CCallback::new(callback, user_data);
        let mut report = |s: &StepStats| match &callback {
            Some(cb) => cb.call(&step_stats_out(s, size_of::<beit_step_stats>())),
            None => ControlFlow::Continue(()),
        };
        run_reporting(
            ctx,
            |on_step| run_finetune_until(inner, data, &feed, on_step),
            callback.is_some().then_some(&mut report as Progress<'_, StepStats>),
        )?;
        Ok(())
    })
}

/// The scratch directory of an options struct (NULL: the system's temporary directory).
///
/// # Safety
/// `dir` must be NULL or a NUL-terminated string.
pub(super) unsafe fn scratch_dir(dir: *const c_char) -> FfiResult<PathBuf> {
    if dir.is_null() {
        return Ok(std::env::temp_dir());
    }
    // SAFETY: non-NULL; the caller promises a NUL-terminated string.
    Ok(PathBuf::from(unsafe { utf8_arg(dir, "opts->scratch_dir") }?))
}

/// Writes to `*out` the optimizer steps of one epoch of `beit_trainer_finetune` over the
/// dataset file at `dataset_path` with `batch_size` images per step and label fraction
/// `label_fraction` (the subset drawn by `seed`, as the run draws it): the full batches, or 1
/// when the data holds less than one batch. `epochs` times this is `beit finetune --epochs`'
/// step count, to pass to `beit_trainer_options_finetune_default`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (path not UTF-8, batch_size 0,
/// label_fraction not in (0, 1], a dataset without labels or samples), `BEIT_ERR_IO`,
/// `BEIT_ERR_FORMAT`.
///
/// # Safety
/// `dataset_path` must be NULL or a NUL-terminated string; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_finetune_epoch_steps(
    dataset_path: *const c_char,
    batch_size: usize,
    label_fraction: f64,
    seed: u64,
    out: *mut u64,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; utf8_arg checks for NULL.
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let out = non_null_mut(out, "out")?;
        let ds = Dataset::open(Path::new(path))?;
        let labels = dataset_labels(&ds)?;
        let images = label_fraction_subset(&labels, label_fraction, seed)?.map_or(labels.len(), |s| s.len());
        let steps = steps_per_epoch(images, batch_size)?;
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(steps) };
        Ok(())
    })
}

/// Evaluates a `BeitForImageClassification` on every sample of a labelled dataset file, as
/// `beit eval` does: each whole image resized (antialiased bicubic) to the model's image size,
/// normalised to mean = std = 0.5, in batches of `batch_size`, on the context's CPU threads.
/// Writes the image count, the correct ones, top-1 accuracy and `num_labels` into `out`, and
/// the confusion matrix into `out->confusion` when it is not NULL. Every argument is checked
/// before anything runs; on an error nothing is written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, model, dataset_path, out), `BEIT_ERR_INVALID_ARGUMENT`
/// (struct_size; batch_size 0; not a classification model; a dataset without labels, with a
/// label the model does not have, or with another channel count; the confusion matrix or a
/// batch over the memory budget), `BEIT_ERR_BUFFER_SIZE` (`confusion_len` is not
/// `num_labels * num_labels`, with both numbers), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT`.
///
/// Thread safety: a model may be evaluated by many threads at once.
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `dataset_path` NULL or a NUL-terminated
/// string; `out` NULL or readable and writable for its `struct_size`, its `confusion` NULL or
/// writable for `confusion_len` values for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_model_evaluate(
    ctx: *const beit_context,
    model: *const beit_model,
    dataset_path: *const c_char,
    batch_size: usize,
    out: *mut beit_evaluation,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let model = unsafe { handle_ref(model) }?.model();
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, which cover the
        // first version's fields; only the inputs are read.
        let (size, confusion, confusion_len) = unsafe {
            let size = check_struct_size(out, "out", EVALUATION_V1_SIZE)?;
            (
                size,
                std::ptr::addr_of!((*out).confusion).read_unaligned(),
                std::ptr::addr_of!((*out).confusion_len).read_unaligned(),
            )
        };
        if model.architecture() != Architecture::ImageClassification {
            return Err(FfiError::invalid(format!(
                "evaluation needs a BeitForImageClassification model; this one is {}",
                model.architecture().hf_name()
            )));
        }
        let k = model.config().num_labels();
        if !confusion.is_null() {
            let want = k.checked_mul(k).ok_or_else(|| FfiError::invalid(format!("{k}x{k} is too large")))?;
            if confusion_len != want {
                return Err(FfiError::buffer_size(format!(
                    "out->confusion_len is {confusion_len}, but the {k}x{k} confusion matrix of a model with \
                     {k} labels needs {want}"
                )));
            }
            check_slice(confusion, confusion_len, "out->confusion")?;
        }
        let ds = Dataset::open(Path::new(path))?;
        let result = ctx.run(|| crate::train::evaluate::evaluate(&model, &ds, batch_size, |_, _| {}))?;
        if !confusion.is_null() {
            // SAFETY: checked above: aligned, writable for k*k values (the caller's promise).
            let dst = unsafe { std::slice::from_raw_parts_mut(confusion, confusion_len) };
            for (row, chunk) in result.confusion.iter().zip(dst.chunks_exact_mut(k.max(1))) {
                chunk.copy_from_slice(row);
            }
        }
        let value = beit_evaluation {
            struct_size: size,
            confusion,
            confusion_len,
            images: result.images as u64,
            correct: result.correct as u64,
            top1: result.top1,
            num_labels: result.num_labels,
        };
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &value, size) };
        Ok(())
    })
}
