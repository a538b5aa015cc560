//! Semantic segmentation through the C API: a `BeitForSemanticSegmentation` from a pretrained
//! backbone or a config, dataset-driven fine-tuning (`beit segment finetune`'s loop,
//! [`crate::train::segmentation::finetune_until`]) with a progress callback, and evaluation
//! (mIoU, pixel accuracy, per-class IoU).

use std::ffi::{c_char, c_void};
use std::mem::size_of;
use std::ops::ControlFlow;
use std::path::Path;

use super::context::{beit_context, context_ref};
use super::finetune::{run_reporting, CCallback, Progress};
use super::model::{beit_model, check_slice, hand_out as hand_out_model, handle_ref, write_versioned};
use super::status::{beit_status, check_struct_size, guard, non_null_mut, utf8_arg, FfiError, FfiResult};
use super::trainer::copy_model;
use crate::data::dataset::Dataset;
use crate::data::subset::split_indices;
use crate::model::segmentation::metrics::IouReport;
use crate::model::BeitConfig;
use crate::train::segmentation::{
    evaluate_on, finetune_until, from_pretrained_backbone, segmenter_from_config, SegFinetuneOptions, SegSplit,
    SegStepLog,
};

/// Which samples of a dataset `beit_model_evaluate_segmentation` scores.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_split {
    /// Every sample.
    BEIT_SPLIT_ALL = 0,
    /// The held-out samples of the train/test split (`test_fraction`, `split_seed`): those
    /// `beit_segmentation_finetune` with the same split did not train on.
    BEIT_SPLIT_TEST = 1,
}

/// A `beit_split` as C passes it in: any 32-bit value, checked before use. The header shows it
/// as `beit_split` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSplit(pub u32);

/// How `beit_segmentation_finetune` trains (the options of `beit segment finetune`). Start from
/// `beit_segmentation_options_default()` (BEiT's segmentation recipe scaled to small runs).
/// Values are checked when the run starts (`BEIT_ERR_INVALID_ARGUMENT` naming the problem).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_segmentation_options {
    /// `sizeof(beit_segmentation_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Epochs over the training samples, at least 1 (default 10). Each epoch is the full
    /// batches of a seeded shuffle.
    pub epochs: u64,
    /// Images per step, at least 2 (training-mode BatchNorm) and at most the training samples
    /// (default 16).
    pub batch_size: usize,
    /// Peak learning rate, after warmup (default 1e-3).
    pub learning_rate: f64,
    /// Final learning rate of the cosine schedule (default 1e-6).
    pub min_learning_rate: f64,
    /// Steps of linear warmup (default 50; at most the run).
    pub warmup_steps: u64,
    /// AdamW's weight decay (default 0.05; BEiT's rule, BatchNorm statistics excluded).
    pub weight_decay: f32,
    /// Layer-wise learning rate decay, 1 = none (default 0.9).
    pub layer_decay: f64,
    /// Stochastic depth rate of the last block, in [0, 1); negative (the default, -1) takes
    /// the config's `drop_path_rate`.
    pub drop_path_rate: f64,
    /// Clip the global gradient norm to this; 0 disables clipping (default 3).
    pub clip_grad_norm: f64,
    /// Seeds the shuffles, flips, drop path and the labelled subset (default 0).
    pub seed: u64,
    /// Per-channel normalisation mean of [0, 1] pixels: `mean_len` values (1 = all channels,
    /// or one per channel). NULL (the default): 0.5.
    pub mean: *const f32,
    /// Values at `mean` (0 when it is NULL).
    pub mean_len: usize,
    /// Per-channel normalisation standard deviation, as `mean`. NULL (the default): 0.5.
    pub std: *const f32,
    /// Values at `std` (0 when it is NULL).
    pub std_len: usize,
    /// Random horizontal flips (default true).
    pub flip: bool,
    /// Share of the samples held out for evaluation, in [0, 1) (default 0.2): the run trains
    /// on the rest only.
    pub test_fraction: f64,
    /// Seed of the train/test shuffle (default 0).
    pub split_seed: u64,
    /// Fraction of the train split whose masks are used, in (0, 1] (default 1): a seeded
    /// subset (by `seed`), stratified by the samples' image labels when the dataset has them.
    pub label_fraction: f64,
}

/// What one segmentation fine-tuning step did (`beit_segmentation_callback`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_segmentation_step {
    /// `sizeof(beit_segmentation_step)` of this library's version.
    pub struct_size: usize,
    /// Steps completed, this one included.
    pub step: u64,
    /// Steps the whole run takes.
    pub total_steps: u64,
    /// The epoch of this step (from 0).
    pub epoch: u64,
    /// Pixel cross-entropy (plus the auxiliary head's, weighted) before the update.
    pub loss: f64,
    /// The learning rate this step applied (before layer decay).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Called by `beit_segmentation_finetune` after every step, on the thread that called it, with
/// what the step did and the `user_data` given to it. Return 0 to go on, anything else to stop:
/// the run then returns `BEIT_OK` and the model of the steps done. `step` is valid only during
/// the call.
#[allow(non_camel_case_types)]
pub type beit_segmentation_callback =
    Option<unsafe extern "C" fn(step: *const beit_segmentation_step, user_data: *mut c_void) -> i32>;

/// What a `beit_segmentation_finetune` run did. Set `struct_size` (or start from
/// `beit_segmentation_report_default()`); only the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_segmentation_report {
    /// Set by the caller to `sizeof(beit_segmentation_report)`; left as it is.
    pub struct_size: usize,
    /// Steps taken (fewer than planned when the callback stopped the run).
    pub steps: u64,
    /// Samples trained on (the train split, or its labelled fraction).
    pub train_samples: u64,
    /// Samples held out (the test split).
    pub test_samples: u64,
    /// Mean loss of the last epoch (of its steps taken).
    pub final_epoch_loss: f64,
    /// Wall-clock seconds of the training.
    pub seconds: f64,
}

/// How `beit_model_evaluate_segmentation` evaluates. Start from
/// `beit_segmentation_eval_options_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_segmentation_eval_options {
    /// `sizeof(beit_segmentation_eval_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Images per forward pass, at least 1 (default 32).
    pub batch_size: usize,
    /// Per-channel normalisation mean, as in `beit_segmentation_options` (NULL: 0.5).
    pub mean: *const f32,
    /// Values at `mean`.
    pub mean_len: usize,
    /// Per-channel normalisation standard deviation (NULL: 0.5).
    pub std: *const f32,
    /// Values at `std`.
    pub std_len: usize,
    /// Which samples: `BEIT_SPLIT_TEST` (the default) or `BEIT_SPLIT_ALL`.
    pub split: RawSplit,
    /// The split's held-out share, in [0, 1) (default 0.2), for `BEIT_SPLIT_TEST`.
    pub test_fraction: f64,
    /// The split's seed (default 0), for `BEIT_SPLIT_TEST`.
    pub split_seed: u64,
}

/// What `beit_model_evaluate_segmentation` measured. Set `struct_size` (or start from
/// `beit_segmentation_evaluation_default()`) and, for the per-class IoU, `per_class_iou` and
/// `per_class_iou_len`; the other fields are outputs.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_segmentation_evaluation {
    /// Set by the caller to `sizeof(beit_segmentation_evaluation)`; left as it is.
    pub struct_size: usize,
    /// Input: receives each class's IoU (NaN for a class in neither the masks nor the
    /// predictions); NULL to skip it.
    pub per_class_iou: *mut f64,
    /// Input: values at `per_class_iou`; when it is not NULL, must equal the model's
    /// `num_labels`.
    pub per_class_iou_len: usize,
    /// Output: mean IoU over the classes present (in the masks or the predictions).
    pub mean_iou: f64,
    /// Output: correctly labelled pixels / scored pixels (the ignore index is not scored).
    pub pixel_accuracy: f64,
    /// Output: samples evaluated.
    pub samples: u64,
    /// Output: the model's number of labels.
    pub num_labels: usize,
}

const SEG_OPTIONS_V1_SIZE: usize = size_of::<beit_segmentation_options>();
const SEG_REPORT_V1_SIZE: usize = size_of::<beit_segmentation_report>();
const SEG_EVAL_OPTIONS_V1_SIZE: usize = size_of::<beit_segmentation_eval_options>();
const SEG_EVALUATION_V1_SIZE: usize = size_of::<beit_segmentation_evaluation>();
/// The CLI's defaults of the split (`beit segment --test-fraction`) and of evaluation batches.
const DEFAULT_TEST_FRACTION: f64 = 0.2;
const DEFAULT_EVAL_BATCH: usize = 32;

/// The default segmentation options (`SegFinetuneOptions`' defaults and the CLI's split), with
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_segmentation_options_default() -> beit_segmentation_options {
    let d = SegFinetuneOptions::default();
    beit_segmentation_options {
        struct_size: size_of::<beit_segmentation_options>(),
        epochs: d.epochs as u64,
        batch_size: d.batch_size,
        learning_rate: d.lr,
        min_learning_rate: d.min_lr,
        warmup_steps: d.warmup_steps as u64,
        weight_decay: d.weight_decay,
        layer_decay: d.layer_decay,
        drop_path_rate: d.drop_path_rate.unwrap_or(-1.0),
        clip_grad_norm: d.clip_grad.unwrap_or(0.0),
        seed: d.seed,
        mean: std::ptr::null(),
        mean_len: 0,
        std: std::ptr::null(),
        std_len: 0,
        flip: d.flip,
        test_fraction: DEFAULT_TEST_FRACTION,
        split_seed: 0,
        label_fraction: 1.0,
    }
}

/// A zeroed `beit_segmentation_report` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_segmentation_report_default() -> beit_segmentation_report {
    beit_segmentation_report {
        struct_size: size_of::<beit_segmentation_report>(),
        steps: 0,
        train_samples: 0,
        test_samples: 0,
        final_epoch_loss: 0.0,
        seconds: 0.0,
    }
}

/// The default evaluation options (the test split of `beit segment eval`), `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_segmentation_eval_options_default() -> beit_segmentation_eval_options {
    beit_segmentation_eval_options {
        struct_size: size_of::<beit_segmentation_eval_options>(),
        batch_size: DEFAULT_EVAL_BATCH,
        mean: std::ptr::null(),
        mean_len: 0,
        std: std::ptr::null(),
        std_len: 0,
        split: RawSplit(beit_split::BEIT_SPLIT_TEST as u32),
        test_fraction: DEFAULT_TEST_FRACTION,
        split_seed: 0,
    }
}

/// A `beit_segmentation_evaluation` without a per-class buffer and zeroed outputs,
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_segmentation_evaluation_default() -> beit_segmentation_evaluation {
    beit_segmentation_evaluation {
        struct_size: size_of::<beit_segmentation_evaluation>(),
        per_class_iou: std::ptr::null_mut(),
        per_class_iou_len: 0,
        mean_iou: 0.0,
        pixel_accuracy: 0.0,
        samples: 0,
        num_labels: 0,
    }
}

/// A normalisation vector (NULL: `[0.5]`). Its length against the channels is checked by the
/// run.
///
/// # Safety
/// `ptr` must be NULL or readable for `len` floats.
unsafe fn norm_vector(ptr: *const f32, len: usize, name: &str) -> FfiResult<Vec<f32>> {
    if ptr.is_null() {
        if len != 0 {
            return Err(FfiError::invalid(format!("opts->{name} is NULL but opts->{name}_len is {len}")));
        }
        return Ok(vec![0.5]);
    }
    check_slice(ptr, len, &format!("opts->{name}"))?;
    // A normalisation has one value per channel, and channels are few: a huge length is a bug.
    if len == 0 || len > crate::resources::MAX_CHANNELS {
        return Err(FfiError::invalid(format!(
            "opts->{name}_len is {len}: give 1 value (all channels) or one per channel"
        )));
    }
    // SAFETY: non-NULL, aligned and sized (checked); the caller promises `len` readable floats.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec())
}

/// Creates a `BeitForSemanticSegmentation` with `num_labels` classes whose backbone is
/// `pretrained`'s (any architecture; every backbone tensor of the same name and shape is
/// copied) under a fresh UperNet head drawn from `seed`, as `beit segment finetune --model` does
/// with a model that is not yet a segmentation model. The config gains `out_indices` (HF's
/// [3, 5, 7, 11] scaled to the depth) and `auxiliary_channels` (the hidden size) when it has
/// none. `pretrained` is only read. On success `*out` receives a model to release with
/// `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (`num_labels` not 1 to 2^20),
/// `BEIT_ERR_CONFIG` (a config the segmentation head cannot use).
///
/// # Safety
/// `ctx` and `pretrained` must be NULL or live handles; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_to_segmenter(
    ctx: *const beit_context,
    pretrained: *const beit_model,
    num_labels: usize,
    seed: u64,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let pretrained = unsafe { handle_ref(pretrained) }?.model();
        let out = non_null_mut(out, "out")?;
        let (model, _copied) = ctx.run(|| from_pretrained_backbone(&pretrained, num_labels, seed))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(model, out) };
        Ok(())
    })
}

/// Creates a fresh `BeitForSemanticSegmentation` with `num_labels` classes from the text of a
/// Hugging Face config.json (as `beit segment finetune --config`): the config completed as in
/// `beit_model_to_segmenter`, BEiT's random initialisation from `seed`. On success `*out`
/// receives a model to release with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (not UTF-8, `num_labels` not 1
/// to 2^20), `BEIT_ERR_FORMAT` (not JSON, wrong field types), `BEIT_ERR_CONFIG`,
/// `BEIT_ERR_UNSUPPORTED`.
///
/// # Safety
/// `ctx` must be NULL or a live context; `config_json` NULL or a NUL-terminated string; `out`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_segmenter_create(
    ctx: *const beit_context,
    config_json: *const c_char,
    num_labels: usize,
    seed: u64,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let json = unsafe { utf8_arg(config_json, "config_json") }?;
        let out = non_null_mut(out, "out")?;
        let config = BeitConfig::from_json_str(json)?;
        let model = ctx.run(|| segmenter_from_config(config, num_labels, seed))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(model, out) };
        Ok(())
    })
}

/// Fine-tunes a copy of the segmentation model `model` on a dataset file with masks, as
/// `beit segment finetune` does, and hands the trained copy out through `*out` (`model` is only
/// read: models are immutable). The samples are split into train and test
/// (`opts->test_fraction`, `opts->split_seed`); the run trains on the train split (or its
/// labelled fraction) with AdamW (BEiT's decay rule), linear warmup and cosine schedule,
/// layer-wise lr decay, stochastic depth, clipping, flips, and BatchNorm's running statistics.
/// On a cuda context the steps run on the GPU (fp32). With the same model, data and options
/// the weights on the CPU are bit for bit those of `beit segment finetune` (same thread count).
///
/// `callback` (may be NULL) is called after every step, on the calling thread; a nonzero
/// return stops the run cleanly (see `beit_segmentation_callback`). `report` (may be NULL)
/// receives what the run did. On an error neither `*out` nor `report` is written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, model, dataset_path, out), `BEIT_ERR_INVALID_ARGUMENT`
/// (not a segmentation model; struct_size; an option value; fewer training samples than a
/// batch; a dataset without masks, of another image size or channel count, or with a mask
/// value that is neither a class of the model nor its ignore index), `BEIT_ERR_IO`,
/// `BEIT_ERR_FORMAT`, `BEIT_ERR_NUMERICAL` (training diverged), `BEIT_ERR_UNSUPPORTED` (on a
/// cuda context, what the GPU step does not run).
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `dataset_path` NULL or a NUL-terminated
/// string; `opts` NULL or readable for its `struct_size`, its `mean` and `std` NULL or holding
/// their lengths; `callback`, when not NULL, a function that may be called as described;
/// `report` NULL or writable for its `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_segmentation_finetune(
    ctx: *const beit_context,
    model: *const beit_model,
    dataset_path: *const c_char,
    opts: *const beit_segmentation_options,
    callback: beit_segmentation_callback,
    user_data: *mut c_void,
    report: *mut beit_segmentation_report,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let source = unsafe { handle_ref(model) }?.model();
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let out = non_null_mut(out, "out")?;
        let o = if opts.is_null() {
            beit_segmentation_options_default()
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
            // check_struct_size makes sure cover the first version's fields.
            unsafe {
                check_struct_size(opts, "opts", SEG_OPTIONS_V1_SIZE)?;
                opts.read_unaligned()
            }
        };
        let report_size = if report.is_null() {
            None
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes.
            Some(unsafe { check_struct_size(report, "report", SEG_REPORT_V1_SIZE) }?)
        };
        // SAFETY: the caller promises NULL or `*_len` readable floats.
        let (mean, std) = unsafe { (norm_vector(o.mean, o.mean_len, "mean")?, norm_vector(o.std, o.std_len, "std")?) };
        let epochs = usize::try_from(o.epochs)
            .map_err(|_| FfiError::invalid(format!("opts->epochs {} is too many", o.epochs)))?;
        let warmup_steps = usize::try_from(o.warmup_steps)
            .map_err(|_| FfiError::invalid(format!("opts->warmup_steps {} is too many", o.warmup_steps)))?;
        let check_rate = |v: f64, name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(FfiError::invalid(format!("opts->{name} is {v}, out of range (see beit_segmentation_options)")))
            }
        };
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        check_rate(o.learning_rate, "learning_rate", finite_nonneg(o.learning_rate))?;
        check_rate(o.min_learning_rate, "min_learning_rate", finite_nonneg(o.min_learning_rate))?;
        check_rate(f64::from(o.weight_decay), "weight_decay", finite_nonneg(f64::from(o.weight_decay)))?;
        check_rate(o.layer_decay, "layer_decay", o.layer_decay > 0.0 && o.layer_decay <= 1.0)?;
        check_rate(o.clip_grad_norm, "clip_grad_norm", finite_nonneg(o.clip_grad_norm))?;
        check_rate(o.drop_path_rate, "drop_path_rate", o.drop_path_rate < 1.0)?;
        let options = SegFinetuneOptions {
            epochs,
            batch_size: o.batch_size,
            lr: o.learning_rate,
            min_lr: o.min_learning_rate,
            warmup_steps,
            weight_decay: o.weight_decay,
            layer_decay: o.layer_decay,
            // NaN is not negative: it stays Some and is refused above (NaN < 1 is false).
            drop_path_rate: if o.drop_path_rate < 0.0 { None } else { Some(o.drop_path_rate) },
            clip_grad: (o.clip_grad_norm > 0.0).then_some(o.clip_grad_norm),
            seed: o.seed,
            mean,
            std,
            flip: o.flip,
            device: ctx.device(),
        };
        let data = Dataset::open(Path::new(path))?;
        let split = SegSplit::new(&data, o.test_fraction, o.split_seed, o.label_fraction, o.seed)?;
        let mut trained = ctx.run(|| copy_model(&source))?;
        let callback = CCallback::new(callback, user_data);
        let mut serve = |s: &SegStepLog| match &callback {
            Some(cb) => cb.call(&beit_segmentation_step {
                struct_size: size_of::<beit_segmentation_step>(),
                step: s.step as u64,
                total_steps: s.total_steps as u64,
                epoch: s.epoch as u64,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
            }),
            None => ControlFlow::Continue(()),
        };
        let result = run_reporting(
            ctx,
            |on_step| finetune_until(&mut trained, &data, &split.train, &options, on_step),
            callback.is_some().then_some(&mut serve as Progress<'_, SegStepLog>),
        )?;
        if let Some(size) = report_size {
            let value = beit_segmentation_report {
                struct_size: size,
                steps: result.steps as u64,
                train_samples: split.train.len() as u64,
                test_samples: split.test.len() as u64,
                final_epoch_loss: result.final_epoch_loss,
                seconds: result.seconds,
            };
            // SAFETY: `report` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_versioned(report, &value, size) };
        }
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out_model(trained, out) };
        Ok(())
    })
}

/// Evaluates a segmentation model on a dataset file with masks, as `beit segment eval` does:
/// each image normalised, the logits upsampled bilinearly to the mask size, the per-pixel
/// argmax scored against the masks over the chosen samples (mIoU, pixel accuracy, per-class
/// IoU), on the context's device (CPU, or the GPU in fp32). `opts` NULL takes the defaults
/// (the test split of the default split). On an error nothing is written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, model, dataset_path, out), `BEIT_ERR_INVALID_ARGUMENT`
/// (not a segmentation model; struct_size; batch_size 0; an unknown split or a test_fraction
/// outside [0, 1); a dataset without masks, of another size, or with a mask value the model
/// does not have), `BEIT_ERR_BUFFER_SIZE` (`per_class_iou_len` is not `num_labels`),
/// `BEIT_ERR_IO`, `BEIT_ERR_FORMAT`, `BEIT_ERR_UNSUPPORTED` (on a cuda context, what the GPU
/// pass does not run).
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `dataset_path` NULL or a NUL-terminated
/// string; `opts` NULL or readable for its `struct_size`, its `mean` and `std` NULL or holding
/// their lengths; `out` NULL or readable and writable for its `struct_size`, its
/// `per_class_iou` NULL or writable for `per_class_iou_len` values.
#[no_mangle]
pub unsafe extern "C" fn beit_model_evaluate_segmentation(
    ctx: *const beit_context,
    model: *const beit_model,
    dataset_path: *const c_char,
    opts: *const beit_segmentation_eval_options,
    out: *mut beit_segmentation_evaluation,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let model = unsafe { handle_ref(model) }?.model();
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let out = non_null_mut(out, "out")?;
        let o = if opts.is_null() {
            beit_segmentation_eval_options_default()
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes.
            unsafe {
                check_struct_size(opts, "opts", SEG_EVAL_OPTIONS_V1_SIZE)?;
                opts.read_unaligned()
            }
        };
        // SAFETY: non-NULL; the caller promises struct_size readable bytes; only the inputs
        // are read.
        let (size, per_class, per_class_len) = unsafe {
            let size = check_struct_size(out, "out", SEG_EVALUATION_V1_SIZE)?;
            (
                size,
                std::ptr::addr_of!((*out).per_class_iou).read_unaligned(),
                std::ptr::addr_of!((*out).per_class_iou_len).read_unaligned(),
            )
        };
        // SAFETY: the caller promises NULL or `*_len` readable floats.
        let (mean, std) = unsafe { (norm_vector(o.mean, o.mean_len, "mean")?, norm_vector(o.std, o.std_len, "std")?) };
        if model.architecture() != crate::model::Architecture::SemanticSegmentation {
            return Err(FfiError::invalid(format!(
                "segmentation evaluation needs a BeitForSemanticSegmentation model; this one is {}",
                model.architecture().hf_name()
            )));
        }
        let k = model.config().num_labels();
        if !per_class.is_null() {
            if per_class_len != k {
                return Err(FfiError::buffer_size(format!(
                    "out->per_class_iou_len is {per_class_len}, but the model has {k} labels"
                )));
            }
            check_slice(per_class, per_class_len, "out->per_class_iou")?;
        }
        let data = Dataset::open(Path::new(path))?;
        let ids = match o.split.0 {
            0 => (0..data.len()).collect(),
            1 => split_indices(data.len(), o.test_fraction, o.split_seed)?.1,
            other => {
                return Err(FfiError::invalid(format!(
                    "opts->split {other} is not a beit_split (BEIT_SPLIT_ALL = 0, BEIT_SPLIT_TEST = 1)"
                )))
            }
        };
        let r: IouReport = ctx.run(|| evaluate_on(&model, &data, &ids, o.batch_size, &mean, &std, ctx.device()))?;
        if !per_class.is_null() {
            // SAFETY: checked above: aligned, writable for k values (the caller's promise).
            let dst = unsafe { std::slice::from_raw_parts_mut(per_class, per_class_len) };
            for (d, v) in dst.iter_mut().zip(&r.per_class) {
                *d = v.unwrap_or(f64::NAN);
            }
        }
        let value = beit_segmentation_evaluation {
            struct_size: size,
            per_class_iou: per_class,
            per_class_iou_len: per_class_len,
            mean_iou: r.mean_iou,
            pixel_accuracy: r.pixel_accuracy,
            samples: ids.len() as u64,
            num_labels: k,
        };
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &value, size) };
        Ok(())
    })
}
