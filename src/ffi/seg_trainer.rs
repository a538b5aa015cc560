//! Host-fed segmentation fine-tuning through the C API: steps on a `beit_trainer` made from a
//! `BeitForSemanticSegmentation` (`beit_trainer_create`, `beit_trainer_load_model_dir`), whole
//! (`beit_trainer_step_segment`) or split (`beit_trainer_forward_backward_segment`, then
//! `beit_trainer_apply_gradients` or `beit_trainer_discard_gradients`). The dataset-driven loop
//! (`beit_segmentation_finetune`) takes the same steps ([`crate::train::segmentation`]).

use std::mem::size_of;

use super::model::check_slice;
use super::status::{beit_status, check_struct_size, guard, non_null, FfiResult};
use super::trainer::{
    beit_pass_stats, beit_step_stats, beit_trainer, check_len, claim, optional_out_size, write_pass_stats,
    write_step_stats, Claimed,
};
use crate::model::segmentation::SegBatch;
use crate::tensor::checked_numel;
use crate::train::trainer::Trainer;

/// A segmentation batch for `beit_trainer_step_segment`: caller-owned, read only during the
/// call. Every length must equal what the shape implies. Start from `beit_seg_batch_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_seg_batch {
    /// `sizeof(beit_seg_batch)` as the caller compiled it.
    pub struct_size: usize,
    /// Pixel values, `[batch, channels, height, width]` (NCHW), f32, normalised as the model
    /// expects, all finite. Required.
    pub pixels: *const f32,
    /// Floats at `pixels`; must equal `batch * channels * height * width`.
    pub pixels_len: usize,
    /// Images in the batch: at least 2 (BatchNorm normalises over the batch in training).
    pub batch: usize,
    /// Channels per image; must equal the model's `num_channels`.
    pub channels: usize,
    /// Image height; training runs at the configured image size only.
    pub height: usize,
    /// Image width; training runs at the configured image size only.
    pub width: usize,
    /// `[batch, height, width]` class ids, one per pixel: each in `[0, num_labels)` or equal
    /// to the config's `semantic_loss_ignore_index` (255 by default: that pixel counts
    /// nowhere in the loss). Required.
    pub labels: *const i64,
    /// Values at `labels`; must equal `batch * height * width`.
    pub labels_len: usize,
}

const SEG_BATCH_V1_SIZE: usize = size_of::<beit_seg_batch>();
const STEP_STATS_V1_SIZE: usize = size_of::<beit_step_stats>();
const PASS_STATS_V1_SIZE: usize = size_of::<beit_pass_stats>();

/// An empty `beit_seg_batch` (NULL pointers, zero sizes) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_seg_batch_default() -> beit_seg_batch {
    beit_seg_batch {
        struct_size: size_of::<beit_seg_batch>(),
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

/// Checks the caller's segmentation batch (every pointer, every length against the shape
/// before any slice is made, then the values against the claimed trainer's model), then runs
/// `run` on the trainer and the batch inside the trainer's context (a cuda context moves the
/// trainer to the GPU first, in fp32). A wrong trainer or batch is refused before the move.
///
/// # Safety
/// `batch` must be NULL or readable for its `struct_size`, each of its non-NULL buffers holding
/// its stated length, unwritten, for the duration of the call.
unsafe fn with_seg_batch<R: Send>(
    claimed: &mut Claimed<'_>,
    batch: *const beit_seg_batch,
    run: impl FnOnce(&mut Trainer, &SegBatch<'_>) -> crate::Result<R> + Send,
) -> FfiResult<R> {
    let batch = non_null(batch, "batch")?;
    // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
    // check_struct_size makes sure cover the fields of the first version read here.
    let b = unsafe {
        check_struct_size(batch, "batch", SEG_BATCH_V1_SIZE)?;
        batch.read_unaligned()
    };
    non_null(b.pixels, "batch->pixels")?;
    non_null(b.labels, "batch->labels")?;
    check_len(
        "batch->pixels_len",
        b.pixels_len,
        checked_numel(&[b.batch, b.channels, b.height, b.width]),
        &format!("[batch {}, channels {}, height {}, width {}]", b.batch, b.channels, b.height, b.width),
    )?;
    check_len(
        "batch->labels_len",
        b.labels_len,
        checked_numel(&[b.batch, b.height, b.width]),
        &format!("[batch {}, height {}, width {}]", b.batch, b.height, b.width),
    )?;
    check_slice(b.pixels, b.pixels_len, "batch->pixels")?;
    check_slice(b.labels, b.labels_len, "batch->labels")?;
    // SAFETY: non-NULL, aligned, sizes checked; the caller promises each buffer holds its
    // stated length and that nobody writes it during the call.
    let seg = unsafe {
        SegBatch {
            pixels: std::slice::from_raw_parts(b.pixels, b.pixels_len),
            batch: b.batch,
            channels: b.channels,
            height: b.height,
            width: b.width,
            labels: std::slice::from_raw_parts(b.labels, b.labels_len),
        }
    };
    let ctx = claimed.ctx;
    let inner: &mut Trainer = &mut claimed.trainer;
    // Refused before the move to a GPU, so that a wrong trainer or batch changes nothing.
    inner.model().check_seg_batch(&seg)?;
    inner.use_context(ctx)?;
    Ok(ctx.run(|| run(inner, &seg))?)
}

/// One segmentation fine-tuning step on `batch`, for a trainer made from a
/// `BeitForSemanticSegmentation`: forward with BatchNorm on the batch's statistics, HF's loss
/// (per-pixel cross-entropy of the upsampled logits, plus the auxiliary head's weighted loss
/// where the config has one; pixels labelled `semantic_loss_ignore_index` count nowhere),
/// backward, gradient clipping, AdamW at the scheduled learning rate (layer decay, BEiT's
/// weight-decay rule; the BatchNorm running statistics are not optimised), then PyTorch's
/// momentum update of the running statistics — inside the trainer's context's thread pool (on
/// its GPU, in fp32, for a cuda context). This is the step `beit_segmentation_finetune` takes.
/// On success the step count and the data position go up by one and, when `out` is not NULL,
/// `out` receives what the step did (`masked` is 0). Checkpoints
/// (`beit_trainer_save_checkpoint`) hold the running statistics and resume it bit for bit.
///
/// Every argument and the whole batch are checked before anything runs; on any error the
/// trainer is exactly as before the call and `out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, batch, batch->pixels, batch->labels),
/// `BEIT_ERR_INVALID_ARGUMENT` (not a segmentation trainer; struct_size of batch or out; a
/// length that does not match the shape, with both numbers; fewer than 2 images; a shape other
/// than the configured image size or channel count; a label neither in `[0, num_labels)` nor
/// the ignore index; a non-finite pixel; a step pending from
/// `beit_trainer_forward_backward_segment`), `BEIT_ERR_UNSUPPORTED` (a cuda context with
/// `BEIT_PRECISION_BF16`: segmentation trains in fp32 there), `BEIT_ERR_NUMERICAL` (the loss or
/// gradient is not finite; the step was not applied), `BEIT_ERR_BUSY` (another thread's call
/// holds the trainer), `BEIT_ERR_INTERNAL` (see `beit_trainer`).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `batch` NULL or readable for its `struct_size`,
/// each of its non-NULL buffers holding its stated length for the duration of the call; `out`
/// NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_step_segment(
    trainer: *mut beit_trainer,
    batch: *const beit_seg_batch,
    out: *mut beit_step_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_step_segment") }?;
        let out_size = unsafe { optional_out_size(out, "out", STEP_STATS_V1_SIZE) }?;
        let stats = unsafe { with_seg_batch(&mut claimed, batch, |t, seg| t.step_segment(seg)) }?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_step_stats(out, size, &stats) };
        }
        Ok(())
    })
}

/// The first half of a split segmentation step (see `beit_trainer_forward_backward`): checks
/// `batch` exactly as `beit_trainer_step_segment` does, draws the step's stochastic depth, runs
/// the forward and backward into the trainer's gradient buffer (zeroed first) and leaves the
/// step pending. `beit_trainer_get_gradients` shows the buffer; `beit_trainer_apply_gradients`
/// finishes the step (clipping, AdamW, and then the BatchNorm running statistics' update, which
/// happens only for an applied step); `beit_trainer_discard_gradients` drops it and leaves the
/// running statistics as they were. forward_backward_segment + apply_gradients gives, bit for
/// bit, what `beit_trainer_step_segment` gives. `out` (may be NULL) receives the loss.
///
/// Errors: as `beit_trainer_step_segment` (on any error nothing is pending and the trainer is
/// as before), and `BEIT_ERR_INVALID_ARGUMENT` when a step is already pending.
///
/// # Safety
/// As `beit_trainer_step_segment`; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_forward_backward_segment(
    trainer: *mut beit_trainer,
    batch: *const beit_seg_batch,
    out: *mut beit_pass_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_forward_backward_segment") }?;
        let out_size = unsafe { optional_out_size(out, "out", PASS_STATS_V1_SIZE) }?;
        let stats = unsafe { with_seg_batch(&mut claimed, batch, |t, seg| t.forward_backward_segment(seg)) }?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_pass_stats(out, size, &stats) };
        }
        Ok(())
    })
}
