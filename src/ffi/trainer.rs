//! `beit_trainer`: masked-image-modeling pretraining (BEiT's recipe) on host-supplied batches,
//! with checkpoints that resume bit for bit. Wraps [`crate::train::trainer::Trainer`].

use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::claim::{claim_state, HandleKind};
use super::context::{beit_context, context_shared};
use super::model::{beit_model, beit_model_info, check_slice, handle_ref, model_info, write_versioned};
use super::status::read_versioned;
use super::status::{
    beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg, FfiError, FfiResult,
};
use crate::context::{Context, Device};
use crate::model::{Architecture, BeitConfig, MimBatch, MimTarget, Model};
use crate::precision::Precision;
use crate::tensor::checked_numel;
use crate::train::trainer::{Gradients, PassStats, StepStats, Trainer, TrainerOptions, WeightDecayOn};

/// Which parameters weight decay applies to (`beit_trainer_options.weight_decay_on`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_weight_decay_on {
    /// BEiT's rule: no decay for biases, 1-D tensors (norms, layer scales), the CLS token and
    /// absolute position embeddings; everything else decays.
    BEIT_WEIGHT_DECAY_BEIT = 0,
    /// Every parameter decays (one `torch.optim.AdamW` group, as a plain PyTorch script does).
    BEIT_WEIGHT_DECAY_ALL = 1,
}

/// A `beit_weight_decay_on` as C passes it in: any 32-bit value, checked before use. The header
/// shows it as `beit_weight_decay_on` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawWeightDecayOn(pub u32);

impl RawWeightDecayOn {
    fn to_weight_decay_on(self) -> FfiResult<WeightDecayOn> {
        match self.0 {
            0 => Ok(WeightDecayOn::Beit),
            1 => Ok(WeightDecayOn::All),
            other => Err(FfiError::invalid(format!(
                "opts->weight_decay_on {other} is not a beit_weight_decay_on (BEIT_WEIGHT_DECAY_BEIT = 0, \
                 BEIT_WEIGHT_DECAY_ALL = 1)"
            ))),
        }
    }

    pub(super) fn of(on: WeightDecayOn) -> Self {
        RawWeightDecayOn(match on {
            WeightDecayOn::Beit => beit_weight_decay_on::BEIT_WEIGHT_DECAY_BEIT,
            WeightDecayOn::All => beit_weight_decay_on::BEIT_WEIGHT_DECAY_ALL,
        } as u32)
    }
}

/// How a trainer optimises. Start from `beit_trainer_options_default()` (BEiT's pretraining
/// recipe: lr 1.5e-3, cosine to 1e-5, AdamW betas (0.9, 0.98), eps 1e-8, weight decay 0.05,
/// gradient clipping at 3.0, drop path from the config) and change the fields you need. Values
/// are checked when a trainer is created (`BEIT_ERR_INVALID_ARGUMENT` naming the field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_trainer_options {
    /// `sizeof(beit_trainer_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Peak learning rate, reached after warmup (finite, >= 0).
    pub learning_rate: f64,
    /// Final learning rate of the cosine schedule (finite, >= 0).
    pub min_learning_rate: f64,
    /// Steps of linear warmup from 0 to `learning_rate`.
    pub warmup_steps: u64,
    /// Length of the cosine schedule; 0 keeps `learning_rate` constant after warmup. Otherwise
    /// it must exceed `warmup_steps`.
    pub total_steps: u64,
    /// AdamW's decoupled weight decay (finite, >= 0).
    pub weight_decay: f64,
    /// AdamW's beta1, in [0, 1).
    pub beta1: f64,
    /// AdamW's beta2, in [0, 1).
    pub beta2: f64,
    /// AdamW's epsilon (finite, > 0).
    pub eps: f64,
    /// Clip the global gradient norm to this (finite, >= 0); 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Stochastic depth rate of the last block (rising linearly from 0 at the first), in
    /// [0, 1); a negative value (the default, -1) takes the config's `drop_path_rate`.
    pub drop_path_rate: f64,
    /// Layer-wise learning rate decay factor, in (0, 1]; 1 (the default) means none.
    pub layer_decay: f64,
    /// Which parameters weight decay applies to (default `BEIT_WEIGHT_DECAY_BEIT`).
    pub weight_decay_on: RawWeightDecayOn,
    /// Seeds the trainer's random state (stochastic depth). Training is deterministic for a
    /// given model, options, seed and batch sequence, whatever the thread count.
    pub seed: u64,
    /// The precision of the steps (default `BEIT_PRECISION_DEFAULT`: bf16 on a cuda context,
    /// fp32 for segmentation there and on the CPU). Added after the first version: a caller whose `struct_size` ends
    /// before it gets the default.
    pub precision: RawPrecision,
}

/// The precision training computes in (`beit_trainer_options.precision`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_precision {
    /// bf16 on a cuda context (BEiT's mixed precision: bf16 activations and GEMM inputs, fp32
    /// accumulation and master weights), except for segmentation (fp32: its GPU step has no
    /// bf16 pass); fp32 on the CPU.
    BEIT_PRECISION_DEFAULT = 0,
    /// fp32 everywhere: on a cuda context the GPU step matches the CPU's to rounding.
    BEIT_PRECISION_FP32 = 1,
    /// bf16 mixed precision; cuda contexts only (the CPU computes in fp32: refused there).
    BEIT_PRECISION_BF16 = 2,
}

/// A `beit_precision` as C passes it in: any 32-bit value, checked before use. The header shows
/// it as `beit_precision` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawPrecision(pub u32);

impl RawPrecision {
    /// The GPU step's precision this asks for on a context of `device` (`None` on the CPU, and
    /// for the default: the trainer's task picks it, `Trainer::default_cuda_precision`).
    fn for_device(self, device: Device) -> FfiResult<Option<Precision>> {
        let cuda = device == Device::Cuda;
        match self.0 {
            0 => Ok(None),
            1 => Ok(cuda.then_some(Precision::F32)),
            2 if cuda => Ok(Some(Precision::Bf16)),
            2 => Err(FfiError::new(
                beit_status::BEIT_ERR_UNSUPPORTED,
                "opts->precision is BEIT_PRECISION_BF16, but this context runs on the CPU, which trains in fp32 \
                 (use BEIT_PRECISION_DEFAULT or BEIT_PRECISION_FP32, or a cuda context)",
            )),
            other => Err(FfiError::invalid(format!(
                "opts->precision {other} is not a beit_precision (BEIT_PRECISION_DEFAULT = 0, BEIT_PRECISION_FP32 = 1, \
                 BEIT_PRECISION_BF16 = 2)"
            ))),
        }
    }
}

/// A pretraining batch for `beit_trainer_step`: caller-owned, read only during the call.
/// Every length must equal what the shape implies (see each field).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_mim_batch {
    /// `sizeof(beit_mim_batch)` as the caller compiled it.
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
    /// `[batch, num_patches]`, 0 or 1 per patch: 1 marks a masked patch (its embedding is
    /// replaced by the mask token and its label counts in the loss). At least one patch of the
    /// batch must be masked. Required.
    pub bool_masked_pos: *const u8,
    /// Bytes at `bool_masked_pos`; must equal `batch * num_patches`, where `num_patches` is
    /// `(height / patch_size) * (width / patch_size)`.
    pub bool_masked_pos_len: usize,
    /// `[batch, num_patches]` visual token ids: each masked patch's must be in
    /// `[0, vocab_size)`; the values at unmasked patches are ignored. Required.
    pub labels: *const i64,
    /// Values at `labels`; must equal `batch * num_patches`.
    pub labels_len: usize,
}

/// What one `beit_trainer_step` did. Set `struct_size` (or start from
/// `beit_step_stats_default()`); only the fields that fit in it are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_step_stats {
    /// Set by the caller to `sizeof(beit_step_stats)`; left as it is.
    pub struct_size: usize,
    /// Steps completed, this one included.
    pub step: u64,
    /// Mean cross-entropy over the masked patches, before this step's update.
    pub loss: f64,
    /// The learning rate this step applied (before layer decay).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Masked patches the loss averaged over.
    pub masked: usize,
    /// Wall-clock seconds the step took.
    pub seconds: f64,
    /// Images per second of this step.
    pub images_per_s: f64,
}

/// Size of the first version of `beit_trainer_options` (before `precision`).
const TRAINER_OPTIONS_V1_SIZE: usize = offset_of!(beit_trainer_options, precision);
/// The end of the second version (`precision`).
const TRAINER_OPTIONS_V2_SIZE: usize = offset_of!(beit_trainer_options, precision) + size_of::<u32>();
const MIM_BATCH_V1_SIZE: usize = size_of::<beit_mim_batch>();
const STEP_STATS_V1_SIZE: usize = size_of::<beit_step_stats>();
const MODEL_INFO_V1_SIZE: usize = size_of::<beit_model_info>();

/// A pretraining trainer: its own copy of a `BeitForMaskedImageModeling` model, the AdamW
/// state, the learning rate schedule, the random state (stochastic depth) and the data
/// position. Checkpoints hold all of it, so a resumed run continues bit for bit.
///
/// Thread safety: a trainer takes one call at a time. Every `beit_trainer_*` call on it (all
/// but `beit_trainer_free`) claims it for its duration without waiting; a call made while
/// another thread's call holds it does nothing and returns `BEIT_ERR_BUSY` (the message names
/// the refused call), so hosts that share a trainer between threads serialise their calls
/// themselves (a lock) or retry. Calls on different trainers may run at once, also on one
/// context. A trainer runs its work on the thread pool and under the memory budget of the
/// context it was created with; it shares that pool, so the context handle may be freed first.
///
/// After a call that returned `BEIT_ERR_INTERNAL` because libbeit panicked (a bug) while it
/// held the trainer, the trainer's state is unknown: a step may have applied part of its
/// update. Every later call on it then returns `BEIT_ERR_INTERNAL` (saying so) instead of
/// training on, or saving, a possibly inconsistent state; free it and start a new trainer
/// (e.g. from the last checkpoint). Other errors never do this: they leave the trainer as it
/// was before the call.
#[allow(non_camel_case_types)]
pub struct beit_trainer {
    /// Claimed by every call that touches the trainer (see [`claim`]). A call that panics
    /// while holding it poisons it, which refuses every later call.
    inner: Mutex<Trainer>,
    /// The thread pool and memory budget of the context the trainer was created with, shared:
    /// freeing the context handle first is safe.
    ctx: Arc<Context>,
}

// Many threads may call into one trainer at once (each call claims it first); the compiler
// checks that the claim is all the sharing needs.
const _: () = super::status::assert_thread_safe::<beit_trainer>();

/// One call's exclusive use of a trainer: the trainer and the context it runs on.
pub(super) struct Claimed<'a> {
    pub(super) trainer: MutexGuard<'a, Trainer>,
    pub(super) ctx: &'a Context,
}

/// Claims the trainer behind a handle for the call `call` (named in the messages), without
/// waiting: `BEIT_ERR_NULL_POINTER` for NULL, `BEIT_ERR_BUSY` when another call holds it,
/// `BEIT_ERR_INTERNAL` when an earlier call panicked while holding it. The claim ends when the
/// returned value is dropped, also when the call fails or panics.
///
/// # Safety
/// `trainer` must be NULL or a live trainer (one not freed, and not being freed).
pub(super) unsafe fn claim<'a>(trainer: *const beit_trainer, call: &str) -> FfiResult<Claimed<'a>> {
    let handle = non_null(trainer, "trainer")?;
    // SAFETY: non-NULL; the caller promises a live trainer. Only a shared reference is made:
    // other threads may hold one too, and the mutex decides who may change the trainer.
    let handle = unsafe { &*handle };
    const KIND: HandleKind =
        HandleKind { name: "trainer", recovery: "create a new trainer (e.g. from your last checkpoint)" };
    Ok(Claimed { trainer: claim_state(&handle.inner, call, &KIND)?, ctx: &handle.ctx })
}

/// BEiT's pretraining defaults (the values of the Rust `TrainerOptions::default()`), with
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_trainer_options_default() -> beit_trainer_options {
    let d = TrainerOptions::default();
    beit_trainer_options {
        struct_size: size_of::<beit_trainer_options>(),
        learning_rate: d.learning_rate,
        min_learning_rate: d.min_learning_rate,
        warmup_steps: d.warmup_steps,
        total_steps: d.total_steps,
        weight_decay: d.weight_decay,
        beta1: d.beta1,
        beta2: d.beta2,
        eps: d.eps,
        clip_grad_norm: d.clip_grad_norm,
        drop_path_rate: d.drop_path_rate.unwrap_or(-1.0),
        layer_decay: d.layer_decay,
        weight_decay_on: RawWeightDecayOn::of(d.weight_decay_on),
        seed: d.seed,
        precision: RawPrecision(beit_precision::BEIT_PRECISION_DEFAULT as u32),
    }
}

/// An empty `beit_mim_batch` (NULL pointers, zero sizes) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_mim_batch_default() -> beit_mim_batch {
    beit_mim_batch {
        struct_size: size_of::<beit_mim_batch>(),
        pixels: std::ptr::null(),
        pixels_len: 0,
        batch: 0,
        channels: 0,
        height: 0,
        width: 0,
        bool_masked_pos: std::ptr::null(),
        bool_masked_pos_len: 0,
        labels: std::ptr::null(),
        labels_len: 0,
    }
}

/// A zeroed `beit_step_stats` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_step_stats_default() -> beit_step_stats {
    beit_step_stats {
        struct_size: size_of::<beit_step_stats>(),
        step: 0,
        loss: 0.0,
        lr: 0.0,
        grad_norm: 0.0,
        masked: 0,
        seconds: 0.0,
        images_per_s: 0.0,
    }
}

impl beit_trainer_options {
    /// The Rust options these describe (not yet validated: `Trainer::new` does that).
    fn to_options(self) -> FfiResult<TrainerOptions> {
        Ok(TrainerOptions {
            learning_rate: self.learning_rate,
            min_learning_rate: self.min_learning_rate,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            clip_grad_norm: self.clip_grad_norm,
            // NaN is not negative: it stays Some and validation rejects it.
            drop_path_rate: if self.drop_path_rate < 0.0 { None } else { Some(self.drop_path_rate) },
            layer_decay: self.layer_decay,
            weight_decay_on: self.weight_decay_on.to_weight_decay_on()?,
            seed: self.seed,
            // The C options have no target field: BEiT's visual tokens (a checkpoint loaded
            // with `beit_trainer_load_checkpoint` brings its own).
            mim_target: MimTarget::VisualTokens,
        })
    }
}

/// Reads the caller's options (NULL: the defaults): the trainer's options, and the GPU step's
/// precision on `ctx` (`None` on the CPU).
///
/// # Safety
/// `opts` must be NULL or readable for its `struct_size` bytes.
pub(super) unsafe fn read_options(
    opts: *const beit_trainer_options,
    ctx: &Context,
) -> FfiResult<(TrainerOptions, Option<Precision>)> {
    let opts = if opts.is_null() {
        beit_trainer_options_default()
    } else {
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure they cover the first version; fields past them keep
        // their defaults.
        unsafe {
            let size = check_struct_size(opts, "opts", TRAINER_OPTIONS_V1_SIZE)?;
            let versions = [TRAINER_OPTIONS_V1_SIZE, TRAINER_OPTIONS_V2_SIZE];
            read_versioned(opts, size, beit_trainer_options_default(), &versions)
        }
    };
    Ok((opts.to_options()?, opts.precision.for_device(ctx.device())?))
}

/// A new trainer with the precision the caller's options chose for its context.
pub(super) fn configured(mut trainer: Trainer, precision: Option<Precision>) -> Trainer {
    if let Some(p) = precision {
        trainer.set_context_precision(p);
    }
    trainer
}

/// Hands a new trainer to the caller through `out`.
///
/// # Safety
/// `out` must be non-NULL and writable.
pub(super) unsafe fn hand_out(trainer: Trainer, ctx: Arc<Context>, out: *mut *mut beit_trainer) {
    let handle = Box::into_raw(Box::new(beit_trainer { inner: Mutex::new(trainer), ctx }));
    // SAFETY: the caller checked `out`.
    unsafe { out.write(handle) };
}

/// A copy of `model`: same config, architecture and parameters.
pub(super) fn copy_model(model: &Model) -> FfiResult<Model> {
    let mut copy = Model::zeroed(model.config().clone(), model.architecture())?;
    let (src, dst) = (&model.params().data, &mut copy.params_mut().data);
    if src.len() != dst.len() {
        return Err(FfiError::new(
            beit_status::BEIT_ERR_INTERNAL,
            format!("copying the model: {} parameters became {}", src.len(), dst.len()),
        ));
    }
    dst.copy_from_slice(src);
    Ok(copy)
}

/// Creates a trainer for a copy of `model`: a `BeitForMaskedImageModeling` (pretraining,
/// `beit_trainer_step`) or a `BeitForImageClassification` (fine-tuning,
/// `beit_trainer_step_classify` and `beit_trainer_finetune`; see `beit_model_to_classifier`
/// and `beit_trainer_options_finetune_default`) or a `BeitForSemanticSegmentation`
/// (fine-tuning, `beit_trainer_step_segment`). The trainer owns its own parameters, so `model` is only read during the call and stays as
/// it is (free it whenever you like). `opts` may be NULL for the defaults. The trainer runs
/// its steps on `ctx`'s thread pool (shared: `ctx` may be freed first). On success `*out` receives a
/// trainer to release with `beit_trainer_free`; on failure `*out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, model, out), `BEIT_ERR_INVALID_ARGUMENT` (not a
/// masked image modeling, classification or segmentation model; struct_size, an option value or
/// `weight_decay_on`, named).
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `opts` NULL or readable for its
/// `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_create(
    ctx: *const beit_context,
    model: *const beit_model,
    opts: *const beit_trainer_options,
    out: *mut *mut beit_trainer,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let model = unsafe { handle_ref(model) }?.model();
        let out = non_null_mut(out, "out")?;
        let (options, precision) = unsafe { read_options(opts, &context) }?;
        // Under the context: the copy and the optimizer state are planned against its budget.
        let trainer = context.run(|| Trainer::for_task(copy_model(&model)?, options).map_err(FfiError::from))?;
        let trainer = configured(trainer, precision);
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { hand_out(trainer, context, out) };
        Ok(())
    })
}

/// Creates a trainer for a fresh `BeitForMaskedImageModeling` with BEiT's random
/// initialisation, reproducible from `init_seed`, from the text of a Hugging Face config.json
/// (its `architectures` entry is ignored). `opts` may be NULL for the defaults; `opts->seed`
/// seeds the training randomness, `init_seed` the weights. The trainer shares `ctx`'s thread pool. On
/// success `*out` receives a trainer to release with `beit_trainer_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (not UTF-8, options),
/// `BEIT_ERR_FORMAT` (not JSON, wrong field types), `BEIT_ERR_CONFIG`, `BEIT_ERR_UNSUPPORTED`.
///
/// # Safety
/// `ctx` must be NULL or a live context; `config_json` NULL or a NUL-terminated string; `opts`
/// NULL or readable for its `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_create_from_config(
    ctx: *const beit_context,
    config_json: *const c_char,
    init_seed: u64,
    opts: *const beit_trainer_options,
    out: *mut *mut beit_trainer,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let json = unsafe { utf8_arg(config_json, "config_json") }?;
        let out = non_null_mut(out, "out")?;
        let (options, precision) = unsafe { read_options(opts, &context) }?;
        let config = BeitConfig::from_json_str(json)?;
        let trainer = context
            .run(|| Trainer::new(Model::new_random(config, Architecture::MaskedImageModeling, init_seed)?, options))?;
        let trainer = configured(trainer, precision);
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { hand_out(trainer, context, out) };
        Ok(())
    })
}

/// Creates a trainer for the model in a Hugging Face directory (`config.json` +
/// `model.safetensors`, as `beit_model_load` reads it), which must be a
/// `BeitForMaskedImageModeling` or a `BeitForImageClassification` (as `beit_trainer_create`). Training starts at step 0 with fresh optimizer state (to
/// resume a run, load a checkpoint instead). `opts` may be NULL for the defaults. The trainer
/// shares `ctx`'s thread pool. On success `*out` receives a trainer to release with
/// `beit_trainer_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (not UTF-8, options, neither a
/// masked image modeling nor a classification model), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT`, `BEIT_ERR_CONFIG`,
/// `BEIT_ERR_UNSUPPORTED` (as `beit_model_load`).
///
/// # Safety
/// `ctx` must be NULL or a live context; `model_dir` NULL or a NUL-terminated string; `opts`
/// NULL or readable for its `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_load_model_dir(
    ctx: *const beit_context,
    model_dir: *const c_char,
    opts: *const beit_trainer_options,
    out: *mut *mut beit_trainer,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let dir = unsafe { utf8_arg(model_dir, "model_dir") }?;
        let out = non_null_mut(out, "out")?;
        let (options, precision) = unsafe { read_options(opts, &context) }?;
        let trainer = context.run(|| Trainer::for_task(Model::load(Path::new(dir))?, options))?;
        let trainer = configured(trainer, precision);
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { hand_out(trainer, context, out) };
        Ok(())
    })
}

/// Frees a trainer. NULL is a no-op. Its context is not touched. This is the one trainer call
/// that does not claim the trainer: free it only when no call on it is running.
///
/// # Safety
/// `trainer` must be NULL or a trainer not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_free(trainer: *mut beit_trainer) {
    guard_infallible((), || {
        if !trainer.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(trainer) });
        }
    })
}

/// Checks that a caller's `len` equals what the shape implies.
pub(super) fn check_len(name: &str, len: usize, want: Option<usize>, shape: &str) -> FfiResult<()> {
    match want {
        Some(want) if want == len => Ok(()),
        Some(want) => Err(FfiError::invalid(format!("{name} is {len}, but {shape} needs {want}"))),
        None => Err(FfiError::invalid(format!("{name} is {len}, but {shape} needs more values than fit in memory"))),
    }
}

/// One optimizer step on `batch`: forward, backward, gradient clipping, AdamW at the scheduled
/// learning rate, inside the trainer's context's thread pool. On success the step count and
/// the data position go up by one, and, when `out` is not NULL, `out` receives what the step
/// did (only the fields that fit in `out->struct_size`).
///
/// Every argument and the whole batch are checked before anything runs; on any error the
/// trainer is exactly as before the call (parameters, optimizer state, step, random state) and
/// `out` is not written.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (trainer, batch, batch->pixels, batch->bool_masked_pos,
/// batch->labels), `BEIT_ERR_INVALID_ARGUMENT` (struct_size of batch or out; a length that does
/// not match the shape, with both numbers; a shape other than the configured image size or
/// channel count; a mask value other than 0 or 1, or no masked patch; a masked patch's label
/// outside `[0, vocab_size)`; a non-finite pixel), `BEIT_ERR_NUMERICAL` (the loss or gradient
/// is not finite: training diverged; the step was not applied), `BEIT_ERR_BUSY` (another
/// thread's call holds the trainer; nothing was done), `BEIT_ERR_INTERNAL` (see
/// `beit_trainer`: after a panic the trainer refuses further calls).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `batch` NULL or readable for its `struct_size`,
/// each of its non-NULL buffers holding its stated length for the duration of the call; `out`
/// NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_step(
    trainer: *mut beit_trainer,
    batch: *const beit_mim_batch,
    out: *mut beit_step_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_step") }?;
        let out_size = unsafe { optional_out_size(out, "out", STEP_STATS_V1_SIZE) }?;
        let stats = unsafe { with_mim_batch(&mut claimed, batch, |t, mim| t.step(mim)) }?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_step_stats(out, size, &stats) };
        }
        Ok(())
    })
}

/// The caller's `struct_size` of an optional output struct (`None` for NULL), checked against
/// its first version's size.
///
/// # Safety
/// `out` must be NULL or readable for its `struct_size`.
pub(super) unsafe fn optional_out_size<T>(
    out: *const T,
    name: &str,
    first_version_size: usize,
) -> FfiResult<Option<usize>> {
    if out.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL; the caller promises struct_size readable bytes.
    Ok(Some(unsafe { check_struct_size(out, name, first_version_size) }?))
}

/// `stats` as a `beit_step_stats` whose `struct_size` is `struct_size`.
pub(super) fn step_stats_out(stats: &StepStats, struct_size: usize) -> beit_step_stats {
    beit_step_stats {
        struct_size,
        step: stats.step,
        loss: stats.loss,
        lr: stats.lr,
        grad_norm: stats.grad_norm,
        masked: stats.masked,
        seconds: stats.seconds,
        images_per_s: stats.images_per_s,
    }
}

/// Writes `stats` into the caller's `beit_step_stats` of `size` bytes.
///
/// # Safety
/// `out` must be writable for `size` bytes, `size` >= the first version's size.
pub(super) unsafe fn write_step_stats(out: *mut beit_step_stats, size: usize, stats: &StepStats) {
    // SAFETY: the caller's promise.
    unsafe { write_versioned(out, &step_stats_out(stats, size), size) };
}

/// Checks the caller's pretraining batch against the claimed trainer's model (every pointer,
/// every length against the shape, before any slice is made), then runs `run` on the trainer
/// and the batch inside the trainer's context (a cuda context moves the trainer to the GPU
/// first).
///
/// # Safety
/// `batch` must be NULL or readable for its `struct_size`, each of its non-NULL buffers holding
/// its stated length, unwritten, for the duration of the call.
unsafe fn with_mim_batch<R: Send>(
    claimed: &mut Claimed<'_>,
    batch: *const beit_mim_batch,
    run: impl FnOnce(&mut Trainer, &MimBatch<'_>) -> crate::Result<R> + Send,
) -> FfiResult<R> {
    let batch = non_null(batch, "batch")?;
    // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
    // check_struct_size makes sure cover the fields of the first version read here.
    let b = unsafe {
        check_struct_size(batch, "batch", MIM_BATCH_V1_SIZE)?;
        batch.read_unaligned()
    };
    non_null(b.pixels, "batch->pixels")?;
    non_null(b.bool_masked_pos, "batch->bool_masked_pos")?;
    non_null(b.labels, "batch->labels")?;

    // Every length against the shape, before any slice is made.
    let (ph, pw) = claimed.trainer.model().config().patch_size.hw();
    let (gh, gw) = (b.height / ph, b.width / pw);
    check_len(
        "batch->pixels_len",
        b.pixels_len,
        checked_numel(&[b.batch, b.channels, b.height, b.width]),
        &format!("[batch {}, channels {}, height {}, width {}]", b.batch, b.channels, b.height, b.width),
    )?;
    let per_patch = checked_numel(&[b.batch, gh, gw]);
    let patches = gh.checked_mul(gw).map_or_else(|| format!("{gh}x{gw}"), |n| n.to_string());
    let patch_shape =
        format!("[batch {}, patches {patches}] ({}x{} pixels in {ph}x{pw} patches)", b.batch, b.height, b.width);
    check_len("batch->bool_masked_pos_len", b.bool_masked_pos_len, per_patch, &patch_shape)?;
    check_len("batch->labels_len", b.labels_len, per_patch, &patch_shape)?;
    check_slice(b.pixels, b.pixels_len, "batch->pixels")?;
    check_slice(b.bool_masked_pos, b.bool_masked_pos_len, "batch->bool_masked_pos")?;
    check_slice(b.labels, b.labels_len, "batch->labels")?;

    // SAFETY: non-NULL, aligned, sizes checked; the caller promises each buffer holds its
    // stated length and that nobody writes it during the call.
    let mim = unsafe {
        MimBatch {
            pixels: std::slice::from_raw_parts(b.pixels, b.pixels_len),
            batch: b.batch,
            channels: b.channels,
            height: b.height,
            width: b.width,
            bool_masked_pos: std::slice::from_raw_parts(b.bool_masked_pos, b.bool_masked_pos_len),
            labels: std::slice::from_raw_parts(b.labels, b.labels_len),
        }
    };
    let ctx = claimed.ctx;
    let inner: &mut Trainer = &mut claimed.trainer;
    // A cuda context runs the step on the GPU (moved there on the first step).
    inner.use_context(ctx)?;
    Ok(ctx.run(|| run(inner, &mim))?)
}

/// What the first half of a split step computed (`beit_trainer_forward_backward`). Set
/// `struct_size` (or start from `beit_pass_stats_default()`); only the fields that fit in it
/// are written.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_pass_stats {
    /// Set by the caller to `sizeof(beit_pass_stats)`; left as it is.
    pub struct_size: usize,
    /// The batch's loss (as `beit_step_stats.loss`).
    pub loss: f64,
    /// Images in the batch.
    pub images: usize,
    /// Masked patches the loss averaged over: when several trainers' gradients are combined
    /// into the gradient of their joint batch, each share weighs `masked / total masked`.
    pub masked: usize,
}

/// Where a buffer handed to the host lives.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_memory_location {
    /// Host memory: read and write it through `host`.
    BEIT_MEMORY_HOST = 0,
    /// CUDA device memory of the GPU the trainer runs on: `device_pointer` on `stream`.
    BEIT_MEMORY_CUDA_DEVICE = 1,
}

/// The pending step's gradient buffer (`beit_trainer_get_gradients`): `len` f32 values laid out
/// like the parameters (`beit_parameter_info.offset` gives each parameter's place). The host may
/// read and overwrite it in place (an all-reduce, its own clipping) until
/// `beit_trainer_apply_gradients` or `beit_trainer_discard_gradients`; after either, or after
/// `beit_trainer_free`, the pointers are invalid. The buffer is a little longer than the listed
/// parameters: it also holds internal entries no `beit_parameter_info` names (the zero key bias
/// that keeps the fused query/key/value bias contiguous), which are never updated; all-reduce the
/// whole buffer.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_gradients {
    /// Set by the caller to `sizeof(beit_gradients)`; left as it is.
    pub struct_size: usize,
    /// Where the buffer lives: on the host for CPU contexts, on the GPU for cuda contexts.
    pub location: beit_memory_location,
    /// `BEIT_MEMORY_HOST`: the buffer; NULL otherwise.
    pub host: *mut f32,
    /// `BEIT_MEMORY_CUDA_DEVICE`: the buffer's `CUdeviceptr`; 0 otherwise.
    pub device_pointer: u64,
    /// `BEIT_MEMORY_CUDA_DEVICE`: the `CUstream` the backward pass was queued on; NULL is
    /// CUDA's default stream, which libbeit uses today (a valid stream handle: queue on it or
    /// synchronise it like any other). Make your work on the buffer wait for it (e.g.
    /// `ncclAllReduce` on this stream, or `cuStreamSynchronize` first), and have it finished,
    /// or queued on this stream, before `beit_trainer_apply_gradients`. NULL for host memory.
    pub stream: *mut c_void,
    /// Values in the buffer.
    pub len: usize,
}

const PASS_STATS_V1_SIZE: usize = size_of::<beit_pass_stats>();
const GRADIENTS_V1_SIZE: usize = size_of::<beit_gradients>();

/// A zeroed `beit_pass_stats` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_pass_stats_default() -> beit_pass_stats {
    beit_pass_stats { struct_size: size_of::<beit_pass_stats>(), loss: 0.0, images: 0, masked: 0 }
}

/// An empty `beit_gradients` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_gradients_default() -> beit_gradients {
    beit_gradients {
        struct_size: size_of::<beit_gradients>(),
        location: beit_memory_location::BEIT_MEMORY_HOST,
        host: std::ptr::null_mut(),
        device_pointer: 0,
        stream: std::ptr::null_mut(),
        len: 0,
    }
}

/// The first half of a split step, for hosts that work on the gradients before the optimizer
/// (data-parallel training's all-reduce, their own clipping): checks `batch` exactly as
/// `beit_trainer_step` does, draws the step's stochastic depth, runs the forward and backward
/// into the trainer's gradient buffer (zeroed first), and leaves the step pending. Then
/// `beit_trainer_get_gradients` shows the buffer and `beit_trainer_apply_gradients` finishes
/// the step (clipping + AdamW, as `beit_trainer_step` does); `beit_trainer_discard_gradients`
/// drops it instead. `beit_trainer_forward_backward` + `beit_trainer_apply_gradients` gives,
/// bit for bit, what `beit_trainer_step` gives. `out` (may be NULL) receives the loss.
///
/// While a step is pending, the calls that would lose it or change what it applies to are
/// refused with `BEIT_ERR_INVALID_ARGUMENT`: another forward_backward or step, loading or saving
/// a checkpoint, setting parameters.
///
/// Errors: as `beit_trainer_step` (on any error nothing is pending and the trainer is as
/// before), and `BEIT_ERR_INVALID_ARGUMENT` when a step is already pending.
///
/// # Safety
/// As `beit_trainer_step`; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_forward_backward(
    trainer: *mut beit_trainer,
    batch: *const beit_mim_batch,
    out: *mut beit_pass_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_forward_backward") }?;
        let out_size = unsafe { optional_out_size(out, "out", PASS_STATS_V1_SIZE) }?;
        let stats = unsafe { with_mim_batch(&mut claimed, batch, |t, mim| t.forward_backward(mim)) }?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_pass_stats(out, size, &stats) };
        }
        Ok(())
    })
}

/// Writes `stats` into the caller's `beit_pass_stats` of `size` bytes.
///
/// # Safety
/// `out` must be writable for `size` bytes, `size` >= the first version's size.
pub(super) unsafe fn write_pass_stats(out: *mut beit_pass_stats, size: usize, stats: &PassStats) {
    let value = beit_pass_stats { struct_size: size, loss: stats.loss, images: stats.images, masked: stats.masked };
    // SAFETY: the caller's promise.
    unsafe { write_versioned(out, &value, size) };
}

/// Describes the pending step's gradient buffer (see `beit_gradients`): where it lives, its
/// pointer and length. Set `out->struct_size` first (or start from
/// `beit_gradients_default()`).
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (struct_size; no step pending),
/// `BEIT_ERR_BUSY` (another thread's call holds the trainer).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_get_gradients(
    trainer: *mut beit_trainer,
    out: *mut beit_gradients,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_get_gradients") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", GRADIENTS_V1_SIZE) }?;
        let mut value = beit_gradients { struct_size: size, ..beit_gradients_default() };
        match claimed.trainer.gradients()? {
            Gradients::Host(grads) => {
                value.host = grads.as_mut_ptr();
                value.len = grads.len();
            }
            Gradients::Device(d) => {
                value.location = beit_memory_location::BEIT_MEMORY_CUDA_DEVICE;
                value.device_pointer = d.pointer;
                value.stream = d.stream as *mut c_void;
                value.len = d.len;
            }
        }
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &value, size) };
        Ok(())
    })
}

/// The second half of a split step: the global gradient norm, clipping and AdamW at the
/// scheduled learning rate, on the gradient buffer as the host left it. On success the step
/// count and data position go up by one and `out` (may be NULL) receives what the step did.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (no step pending;
/// out->struct_size), `BEIT_ERR_NUMERICAL` (the gradient norm is not finite: the step is
/// dropped and the trainer is as before its forward_backward), `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable for its `struct_size`. On a
/// cuda context, the host's work on the gradient buffer must be finished or queued on the
/// trainer's stream (see `beit_gradients.stream`).
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_apply_gradients(
    trainer: *mut beit_trainer,
    out: *mut beit_step_stats,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promises, passed on.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_apply_gradients") }?;
        let out_size = unsafe { optional_out_size(out, "out", STEP_STATS_V1_SIZE) }?;
        let ctx = claimed.ctx;
        let inner: &mut Trainer = &mut claimed.trainer;
        let stats = ctx.run(|| inner.apply_gradients())?;
        if let Some(size) = out_size {
            // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
            unsafe { write_step_stats(out, size, &stats) };
        }
        Ok(())
    })
}

/// Drops the pending step: the trainer is as before its `beit_trainer_forward_backward`
/// (random state included). Nothing to do when no step is pending.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_discard_gradients(trainer: *mut beit_trainer) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_discard_gradients") }?;
        claimed.trainer.discard_gradients();
        Ok(())
    })
}

/// Writes a checkpoint of everything the trainer holds (parameters, AdamW moments, step,
/// options, random state, data position, config) to the file `path`, atomically: a failed
/// save leaves any previous file at `path` intact. `beit_trainer_load_checkpoint` resumes from
/// it bit for bit.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (path not UTF-8), `BEIT_ERR_IO`
/// (e.g. its directory does not exist), `BEIT_ERR_BUSY` (another thread's call holds the
/// trainer; nothing was written).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_save_checkpoint(
    trainer: *const beit_trainer,
    path: *const c_char,
) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises above; each helper checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_save_checkpoint") }?;
        let path = unsafe { utf8_arg(path, "path") }?;
        let trainer: &Trainer = &claimed.trainer;
        claimed.ctx.run(|| trainer.save_checkpoint(Path::new(path)))?;
        Ok(())
    })
}

/// Restores the trainer from a checkpoint written by `beit_trainer_save_checkpoint` for the
/// same model config: parameters, optimizer state, step, data position, random state and the
/// options (the checkpoint's replace the trainer's). Stepping on afterwards gives, bit for bit,
/// what the saved trainer would have. The whole file is checked first: on any error the
/// trainer is unchanged.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (path not UTF-8; a checkpoint of
/// another model config, naming the differences), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT` (not a
/// trainer checkpoint, truncated or corrupt), `BEIT_ERR_BUSY` (another thread's call holds the
/// trainer; nothing was done).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `path` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_load_checkpoint(trainer: *mut beit_trainer, path: *const c_char) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises above; each helper checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_load_checkpoint") }?;
        let path = unsafe { utf8_arg(path, "path") }?;
        let trainer: &mut Trainer = &mut claimed.trainer;
        claimed.ctx.run(|| trainer.load_checkpoint(Path::new(path)))?;
        Ok(())
    })
}

/// Saves the trainer's current weights as a Hugging Face directory (`config.json` +
/// `model.safetensors`, of the trainer's class) that `beit_model_load`,
/// `beit_trainer_load_model_dir` and `transformers` read. The directory is created if needed;
/// each file is replaced atomically.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (dir not UTF-8), `BEIT_ERR_IO`,
/// `BEIT_ERR_BUSY` (another thread's call holds the trainer; nothing was written).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `dir` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_save_model(trainer: *const beit_trainer, dir: *const c_char) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises above; each helper checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_save_model") }?;
        let dir = unsafe { utf8_arg(dir, "dir") }?;
        let trainer: &Trainer = &claimed.trainer;
        claimed.ctx.run(|| trainer.model().save(Path::new(dir)))?;
        Ok(())
    })
}

/// Writes the number of steps completed to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY` (another thread's call holds the trainer).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_step_count(trainer: *const beit_trainer, out: *mut u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_step_count") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(claimed.trainer.step_count()) };
        Ok(())
    })
}

/// Writes the data position to `*out`: where the host's data stream stands. Each successful
/// step adds one; `beit_trainer_set_data_position` sets it; checkpoints store it, so a resumed
/// run can pick the same next batch.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY` (another thread's call holds the trainer).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_get_data_position(trainer: *const beit_trainer, out: *mut u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_get_data_position") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(claimed.trainer.data_position()) };
        Ok(())
    })
}

/// Sets the data position (see `beit_trainer_get_data_position`), e.g. after the host skipped
/// batches.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY` (another thread's call holds the trainer;
/// the position is unchanged).
///
/// # Safety
/// `trainer` must be NULL or a live trainer.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_set_data_position(trainer: *mut beit_trainer, position: u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_set_data_position") }?;
        claimed.trainer.set_data_position(position);
        Ok(())
    })
}

/// Describes the trainer's model (as `beit_model_get_info` does a model's), e.g. to size
/// batches: `num_patches`, `vocab_size`, `num_channels`, the image size. Set `out->struct_size`
/// first (or start from `beit_model_info_default()`).
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (struct_size), `BEIT_ERR_BUSY`
/// (another thread's call holds the trainer).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable for `out->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_get_model_info(
    trainer: *const beit_trainer,
    out: *mut beit_model_info,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_get_model_info") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", MODEL_INFO_V1_SIZE) }?;
        let info = model_info(claimed.trainer.model(), size);
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::context::{beit_context_create, beit_context_free, beit_context_options_default};
    use crate::ffi::model::{
        beit_architecture, beit_model_create, beit_model_free, beit_model_info_default, RawArchitecture,
    };
    use crate::ffi::status::beit_last_error_message;
    use std::ffi::{CStr, CString};
    use std::ptr;

    const TINY: &str = r#"{"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 8, "patch_size": 4, "num_channels": 1, "vocab_size": 5,
        "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1}"#;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    fn context() -> *mut beit_context {
        let mut opts = beit_context_options_default();
        opts.num_threads = 2;
        let mut ctx = ptr::null_mut();
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        ctx
    }

    fn options() -> beit_trainer_options {
        beit_trainer_options { learning_rate: 1e-3, seed: 3, ..beit_trainer_options_default() }
    }

    fn from_config(ctx: *const beit_context, json: &str, opts: *const beit_trainer_options) -> *mut beit_trainer {
        let json = CString::new(json).unwrap();
        let mut t = ptr::null_mut();
        let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, opts, &mut t) };
        assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
        t
    }

    /// A fixed batch of 2 images of 8x8 pixels (4 patches each), and a view of it.
    struct Batch {
        pixels: Vec<f32>,
        mask: Vec<u8>,
        labels: Vec<i64>,
    }

    impl Batch {
        fn new() -> Self {
            Batch {
                pixels: (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect(),
                mask: vec![1, 0, 1, 0, 0, 1, 1, 0],
                labels: (0..8).map(|i| i % 5).collect(),
            }
        }

        fn view(&self) -> beit_mim_batch {
            beit_mim_batch {
                pixels: self.pixels.as_ptr(),
                pixels_len: self.pixels.len(),
                batch: 2,
                channels: 1,
                height: 8,
                width: 8,
                bool_masked_pos: self.mask.as_ptr(),
                bool_masked_pos_len: self.mask.len(),
                labels: self.labels.as_ptr(),
                labels_len: self.labels.len(),
                ..beit_mim_batch_default()
            }
        }
    }

    fn step(t: *mut beit_trainer, b: &beit_mim_batch) -> (beit_status, beit_step_stats) {
        let mut stats = beit_step_stats_default();
        (unsafe { beit_trainer_step(t, b, &mut stats) }, stats)
    }

    fn step_count(t: *const beit_trainer) -> u64 {
        let mut n = u64::MAX;
        assert_eq!(unsafe { beit_trainer_step_count(t, &mut n) }, beit_status::BEIT_OK);
        n
    }

    fn param_bits(t: *const beit_trainer) -> Vec<u32> {
        let trainer = unsafe { &(*t).inner }.lock().unwrap();
        trainer.model().params().data.iter().map(|v| v.to_bits()).collect()
    }

    /// Everything a trainer holds (weights, AdamW moments, step, data position, random state,
    /// options), as the bytes of a checkpoint: two trainers in the same state give the same.
    fn state_bytes(t: *const beit_trainer) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        let c_path = CString::new(path.to_str().unwrap()).unwrap();
        let st = unsafe { beit_trainer_save_checkpoint(t, c_path.as_ptr()) };
        assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
        std::fs::read(&path).unwrap()
    }

    /// A raw trainer pointer that test threads may share (the API's promise under test).
    #[derive(Clone, Copy)]
    struct Shared(*mut beit_trainer);
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}

    #[test]
    fn defaults_are_the_rust_defaults() {
        let o = beit_trainer_options_default();
        assert_eq!(o.struct_size, size_of::<beit_trainer_options>());
        assert_eq!(o.drop_path_rate, -1.0);
        assert_eq!(o.weight_decay_on, RawWeightDecayOn(beit_weight_decay_on::BEIT_WEIGHT_DECAY_BEIT as u32));
        assert_eq!(o.to_options().unwrap(), TrainerOptions::default());
        let b = beit_mim_batch_default();
        assert_eq!(b.struct_size, size_of::<beit_mim_batch>());
        assert!(b.pixels.is_null() && b.labels.is_null() && b.bool_masked_pos.is_null());
        assert_eq!(beit_step_stats_default().struct_size, size_of::<beit_step_stats>());
        let all = beit_trainer_options {
            drop_path_rate: 0.25,
            weight_decay_on: RawWeightDecayOn(1),
            ..beit_trainer_options_default()
        };
        let r = all.to_options().unwrap();
        assert_eq!((r.drop_path_rate, r.weight_decay_on), (Some(0.25), WeightDecayOn::All));
    }

    #[test]
    fn trains_and_copies_the_model() {
        let ctx = context();
        let json = CString::new(TINY).unwrap();
        let mut model = ptr::null_mut();
        let st = unsafe {
            beit_model_create(
                ctx,
                json.as_ptr(),
                RawArchitecture(beit_architecture::BEIT_ARCH_MASKED_IMAGE_MODELING as u32),
                1,
                &mut model,
            )
        };
        assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
        let before: Vec<u32> = unsafe { &*model }.model().params().data.iter().map(|v| v.to_bits()).collect();

        let opts = options();
        let mut copied = ptr::null_mut();
        assert_eq!(
            unsafe { beit_trainer_create(ctx, model, &opts, &mut copied) },
            beit_status::BEIT_OK,
            "{}",
            last_error()
        );
        assert_eq!(param_bits(copied), before, "the trainer starts from the model's parameters");
        let fresh = from_config(ctx, TINY, &opts);
        let batch = Batch::new();
        let mut losses = Vec::new();
        for i in 0..5 {
            let (st, a) = step(copied, &batch.view());
            assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
            let (st, b) = step(fresh, &batch.view());
            assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "same model, options and batch");
            assert_eq!((a.step, a.masked, a.lr), (i + 1, 4, 1e-3));
            assert!(a.loss.is_finite() && a.grad_norm.is_finite() && a.seconds >= 0.0);
            losses.push(a.loss);
        }
        assert!(losses[4] < losses[0], "{losses:?}");
        let now: Vec<u32> = unsafe { &*model }.model().params().data.iter().map(|v| v.to_bits()).collect();
        assert_eq!(now, before, "training the trainer's copy changed the caller's model");
        assert_ne!(param_bits(copied), before);

        // Data position and step count; stats NULL is allowed.
        let mut pos = 0;
        assert_eq!(unsafe { beit_trainer_get_data_position(copied, &mut pos) }, beit_status::BEIT_OK);
        assert_eq!((pos, step_count(copied)), (5, 5));
        assert_eq!(unsafe { beit_trainer_set_data_position(copied, 42) }, beit_status::BEIT_OK);
        assert_eq!(unsafe { beit_trainer_step(copied, &batch.view(), ptr::null_mut()) }, beit_status::BEIT_OK);
        assert_eq!(unsafe { beit_trainer_get_data_position(copied, &mut pos) }, beit_status::BEIT_OK);
        assert_eq!((pos, step_count(copied)), (43, 6));

        let mut info = beit_model_info_default();
        assert_eq!(unsafe { beit_trainer_get_model_info(copied, &mut info) }, beit_status::BEIT_OK);
        assert_eq!((info.num_patches, info.vocab_size, info.num_channels), (4, 5, 1));

        // A backbone cannot be pretrained.
        let mut backbone = ptr::null_mut();
        let st = unsafe { beit_model_create(ctx, json.as_ptr(), RawArchitecture(0), 1, &mut backbone) };
        assert_eq!(st, beit_status::BEIT_OK);
        let mut t = ptr::null_mut();
        let st = unsafe { beit_trainer_create(ctx, backbone, &opts, &mut t) };
        assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("BeitForMaskedImageModeling"), "{}", last_error());
        assert!(t.is_null());

        unsafe {
            beit_trainer_free(copied);
            beit_trainer_free(fresh);
            beit_trainer_free(ptr::null_mut());
            beit_model_free(backbone);
            beit_model_free(model);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn null_pointers_are_named() {
        let ctx = context();
        let t = from_config(ctx, TINY, ptr::null());
        let json = CString::new(TINY).unwrap();
        let path = CString::new("/tmp/x").unwrap();
        let batch = Batch::new();
        let mut out = ptr::null_mut();
        let mut n = 0u64;
        let null = beit_status::BEIT_ERR_NULL_POINTER;
        // Each call must fail with BEIT_ERR_NULL_POINTER and a message naming the argument.
        macro_rules! null_case {
            ($call:expr, $msg:expr) => {{
                assert_eq!(unsafe { $call }, null, "{}", stringify!($call));
                assert_eq!(last_error(), $msg, "{}", stringify!($call));
            }};
        }
        let info = &mut beit_model_info_default() as *mut beit_model_info;
        null_case!(beit_trainer_create(ptr::null(), ptr::null(), ptr::null(), &mut out), "ctx is NULL");
        null_case!(beit_trainer_create(ctx, ptr::null(), ptr::null(), &mut out), "model is NULL");
        null_case!(
            beit_trainer_create_from_config(ptr::null(), json.as_ptr(), 1, ptr::null(), &mut out),
            "ctx is NULL"
        );
        null_case!(beit_trainer_create_from_config(ctx, ptr::null(), 1, ptr::null(), &mut out), "config_json is NULL");
        null_case!(beit_trainer_create_from_config(ctx, json.as_ptr(), 1, ptr::null(), ptr::null_mut()), "out is NULL");
        null_case!(beit_trainer_load_model_dir(ptr::null(), path.as_ptr(), ptr::null(), &mut out), "ctx is NULL");
        null_case!(beit_trainer_load_model_dir(ctx, ptr::null(), ptr::null(), &mut out), "model_dir is NULL");
        null_case!(beit_trainer_load_model_dir(ctx, path.as_ptr(), ptr::null(), ptr::null_mut()), "out is NULL");
        null_case!(beit_trainer_step(ptr::null_mut(), &batch.view(), ptr::null_mut()), "trainer is NULL");
        null_case!(beit_trainer_step(t, ptr::null(), ptr::null_mut()), "batch is NULL");
        let no_pixels = beit_mim_batch { pixels: ptr::null(), ..batch.view() };
        null_case!(beit_trainer_step(t, &no_pixels, ptr::null_mut()), "batch->pixels is NULL");
        let no_mask = beit_mim_batch { bool_masked_pos: ptr::null(), ..batch.view() };
        null_case!(beit_trainer_step(t, &no_mask, ptr::null_mut()), "batch->bool_masked_pos is NULL");
        let no_labels = beit_mim_batch { labels: ptr::null(), ..batch.view() };
        null_case!(beit_trainer_step(t, &no_labels, ptr::null_mut()), "batch->labels is NULL");
        null_case!(beit_trainer_save_checkpoint(ptr::null(), path.as_ptr()), "trainer is NULL");
        null_case!(beit_trainer_save_checkpoint(t, ptr::null()), "path is NULL");
        null_case!(beit_trainer_load_checkpoint(ptr::null_mut(), path.as_ptr()), "trainer is NULL");
        null_case!(beit_trainer_load_checkpoint(t, ptr::null()), "path is NULL");
        null_case!(beit_trainer_save_model(ptr::null(), path.as_ptr()), "trainer is NULL");
        null_case!(beit_trainer_save_model(t, ptr::null()), "dir is NULL");
        null_case!(beit_trainer_step_count(ptr::null(), &mut n), "trainer is NULL");
        null_case!(beit_trainer_step_count(t, ptr::null_mut()), "out is NULL");
        null_case!(beit_trainer_get_data_position(ptr::null(), &mut n), "trainer is NULL");
        null_case!(beit_trainer_get_data_position(t, ptr::null_mut()), "out is NULL");
        null_case!(beit_trainer_set_data_position(ptr::null_mut(), 1), "trainer is NULL");
        null_case!(beit_trainer_get_model_info(ptr::null(), info), "trainer is NULL");
        null_case!(beit_trainer_get_model_info(t, ptr::null_mut()), "out is NULL");
        assert!(out.is_null(), "out written by a failed call");
        assert_eq!(step_count(t), 0, "a failed call stepped");
        unsafe {
            beit_trainer_free(t);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn bad_struct_sizes_and_enum_values() {
        let ctx = context();
        let json = CString::new(TINY).unwrap();
        let mut out = ptr::null_mut();
        for size in [0, 8, TRAINER_OPTIONS_V1_SIZE - 1] {
            let opts = beit_trainer_options { struct_size: size, ..options() };
            let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, &opts, &mut out) };
            assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
            assert!(last_error().contains("opts->struct_size"), "{}", last_error());
        }
        let opts = beit_trainer_options { weight_decay_on: RawWeightDecayOn(2), ..options() };
        let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, &opts, &mut out) };
        assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("weight_decay_on 2"), "{}", last_error());
        for (opts, needle) in [
            (beit_trainer_options { beta2: 1.0, ..options() }, "beta2"),
            (beit_trainer_options { drop_path_rate: f64::NAN, ..options() }, "drop_path_rate"),
            (beit_trainer_options { learning_rate: -1.0, ..options() }, "learning_rate"),
            (beit_trainer_options { warmup_steps: 5, total_steps: 5, ..options() }, "total_steps"),
        ] {
            let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, &opts, &mut out) };
            assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
            assert!(last_error().contains(needle), "{}", last_error());
        }
        assert!(out.is_null());

        // A larger struct from a newer header is accepted.
        #[repr(C)]
        struct Newer {
            opts: beit_trainer_options,
            future: u64,
        }
        let newer = Newer { opts: beit_trainer_options { struct_size: size_of::<Newer>(), ..options() }, future: 9 };
        let t = from_config(ctx, TINY, &newer.opts);

        let batch = Batch::new();
        let bad = beit_mim_batch { struct_size: 16, ..batch.view() };
        assert_eq!(unsafe { beit_trainer_step(t, &bad, ptr::null_mut()) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("batch->struct_size is 16"), "{}", last_error());
        let mut stats = beit_step_stats { struct_size: STEP_STATS_V1_SIZE - 8, ..beit_step_stats_default() };
        assert_eq!(unsafe { beit_trainer_step(t, &batch.view(), &mut stats) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("out->struct_size"), "{}", last_error());
        assert_eq!((stats.step, step_count(t)), (0, 0), "nothing stepped or written");
        let mut info = beit_model_info { struct_size: 4, ..beit_model_info_default() };
        assert_eq!(unsafe { beit_trainer_get_model_info(t, &mut info) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);

        // A newer, larger stats struct keeps what lies beyond this version's fields.
        #[repr(C)]
        struct NewerStats {
            stats: beit_step_stats,
            future: u64,
        }
        let mut newer_stats = NewerStats {
            stats: beit_step_stats { struct_size: size_of::<NewerStats>(), ..beit_step_stats_default() },
            future: 77,
        };
        assert_eq!(unsafe { beit_trainer_step(t, &batch.view(), &mut newer_stats.stats) }, beit_status::BEIT_OK);
        assert_eq!(
            (newer_stats.stats.struct_size, newer_stats.stats.step, newer_stats.future),
            (size_of::<NewerStats>(), 1, 77)
        );
        unsafe {
            beit_trainer_free(t);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn bad_batches_name_the_problem_and_change_nothing() {
        let ctx = context();
        let (t, twin) = (from_config(ctx, TINY, &options()), from_config(ctx, TINY, &options()));
        let good = Batch::new();
        let expect = |b: &beit_mim_batch, status: beit_status, needles: &[&str]| {
            let before = param_bits(t);
            let mut stats = beit_step_stats_default();
            assert_eq!(unsafe { beit_trainer_step(t, b, &mut stats) }, status, "{}", last_error());
            let msg = last_error();
            for needle in needles {
                assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
            }
            assert_eq!(stats.step, 0, "stats written by a failed call");
            assert_eq!(param_bits(t), before);
        };
        let invalid = beit_status::BEIT_ERR_INVALID_ARGUMENT;
        expect(&beit_mim_batch { pixels_len: 127, ..good.view() }, invalid, &["batch->pixels_len is 127", "128"]);
        expect(
            &beit_mim_batch { bool_masked_pos_len: 7, ..good.view() },
            invalid,
            &["batch->bool_masked_pos_len is 7", "needs 8"],
        );
        expect(&beit_mim_batch { labels_len: 9, ..good.view() }, invalid, &["batch->labels_len is 9", "needs 8"]);
        expect(&beit_mim_batch { batch: usize::MAX, ..good.view() }, invalid, &["more values than fit in memory"]);
        let huge = beit_mim_batch { channels: 0, pixels_len: 0, height: usize::MAX, width: usize::MAX, ..good.view() };
        expect(&huge, invalid, &["bool_masked_pos_len is 8", "more values than fit in memory"]);
        let misaligned = unsafe { (good.labels.as_ptr() as *const u8).add(1) } as *const i64;
        expect(&beit_mim_batch { labels: misaligned, labels_len: 7, ..good.view() }, invalid, &["labels_len is 7"]);
        let misaligned_full = Batch { labels: vec![0; 9], ..Batch::new() };
        let p = unsafe { (misaligned_full.labels.as_ptr() as *const u8).add(1) } as *const i64;
        expect(&beit_mim_batch { labels: p, ..good.view() }, invalid, &["aligned"]);

        let mut b = Batch::new();
        b.labels[0] = 5;
        expect(&b.view(), invalid, &["label 5", "outside the vocabulary"]);
        b.labels[0] = -1;
        expect(&b.view(), invalid, &["label -1", "outside the vocabulary"]);
        b.labels[1] = 1000; // unmasked: ignored, but the masked -1 still is not
        b.labels[0] = 0;
        assert_eq!(step(twin, &b.view()).0, beit_status::BEIT_OK, "a label at an unmasked patch is ignored");
        // Bring `t` level with `twin`.
        assert_eq!(step(t, &b.view()).0, beit_status::BEIT_OK);
        let mut b = Batch::new();
        b.pixels[17] = f32::NAN;
        expect(&b.view(), invalid, &["pixels must be finite"]);
        let mut b = Batch::new();
        b.mask[0] = 2;
        expect(&b.view(), invalid, &["0 or 1"]);
        b.mask.fill(0);
        expect(&b.view(), invalid, &["masks no patch"]);
        let two_channels =
            beit_mim_batch { batch: 1, channels: 2, bool_masked_pos_len: 4, labels_len: 4, ..good.view() };
        expect(&two_channels, invalid, &["2 channels"]);

        let (st, a) = step(t, &good.view());
        assert_eq!(st, beit_status::BEIT_OK);
        let (st, b) = step(twin, &good.view());
        assert_eq!(st, beit_status::BEIT_OK);
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "the trainer diverged from its untouched twin");
        assert_eq!(param_bits(t), param_bits(twin));
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(twin);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn divergence_is_numerical() {
        let ctx = context();
        let opts = beit_trainer_options { learning_rate: 1e36, clip_grad_norm: 0.0, ..options() };
        let t = from_config(ctx, TINY, &opts);
        let batch = Batch::new();
        let mut diverged = false;
        for _ in 0..4 {
            let (before, steps) = (param_bits(t), step_count(t));
            match step(t, &batch.view()).0 {
                beit_status::BEIT_OK => continue,
                st => {
                    assert_eq!(st, beit_status::BEIT_ERR_NUMERICAL, "{}", last_error());
                    assert!(last_error().contains("not applied"), "{}", last_error());
                    assert_eq!((param_bits(t), step_count(t)), (before, steps));
                    diverged = true;
                    break;
                }
            }
        }
        assert!(diverged, "lr 1e36 never gave a non-finite loss");
        unsafe {
            beit_trainer_free(t);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn checkpoints_round_trip_and_refuse_other_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = CString::new(dir.path().join("a.safetensors").to_str().unwrap()).unwrap();
        let ctx = context();
        let t = from_config(ctx, TINY, &options());
        let batch = Batch::new();
        assert_eq!(step(t, &batch.view()).0, beit_status::BEIT_OK);
        assert_eq!(unsafe { beit_trainer_save_checkpoint(t, ckpt.as_ptr()) }, beit_status::BEIT_OK, "{}", last_error());
        let after: Vec<u64> = (0..2).map(|_| step(t, &batch.view()).1.loss.to_bits()).collect();
        assert_eq!(unsafe { beit_trainer_load_checkpoint(t, ckpt.as_ptr()) }, beit_status::BEIT_OK, "{}", last_error());
        assert_eq!(step_count(t), 1);
        let again: Vec<u64> = (0..2).map(|_| step(t, &batch.view()).1.loss.to_bits()).collect();
        assert_eq!(after, again);

        let other =
            from_config(ctx, &TINY.replace("\"intermediate_size\": 16", "\"intermediate_size\": 24"), &options());
        let before = param_bits(other);
        let st = unsafe { beit_trainer_load_checkpoint(other, ckpt.as_ptr()) };
        assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("another model config") && last_error().contains("intermediate_size"));
        assert_eq!((param_bits(other), step_count(other)), (before, 0));

        let missing = CString::new(dir.path().join("no/such/dir/c.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { beit_trainer_save_checkpoint(t, missing.as_ptr()) }, beit_status::BEIT_ERR_IO);
        assert_eq!(unsafe { beit_trainer_load_checkpoint(t, missing.as_ptr()) }, beit_status::BEIT_ERR_IO);
        let non_utf8 = [0xffu8, 0xfe, 0];
        let st = unsafe { beit_trainer_save_checkpoint(t, non_utf8.as_ptr().cast()) };
        assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("UTF-8"));

        // The saved model directory loads back as a trainer with the same weights.
        let model_dir = CString::new(dir.path().join("hf").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { beit_trainer_save_model(t, model_dir.as_ptr()) }, beit_status::BEIT_OK, "{}", last_error());
        let mut loaded = ptr::null_mut();
        let st = unsafe { beit_trainer_load_model_dir(ctx, model_dir.as_ptr(), &options(), &mut loaded) };
        assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
        assert_eq!(param_bits(loaded), param_bits(t));
        assert_eq!(step_count(loaded), 0);
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(other);
            beit_trainer_free(loaded);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn a_panic_inside_a_step_does_not_escape() {
        let ctx = context();
        let t = from_config(ctx, TINY, &options());
        // Break an invariant the optimizer asserts, so that the step panics on a pool thread.
        unsafe { &(*t).inner }.lock().unwrap().optimizer.exp_avg.clear();
        let batch = Batch::new();
        let (st, stats) = step(t, &batch.view());
        assert_eq!(st, beit_status::BEIT_ERR_INTERNAL);
        assert!(last_error().contains("panicked"), "{}", last_error());
        assert_eq!(stats.step, 0);
        // The panic is over, and the trainer is not left claimed (that would be BEIT_ERR_BUSY
        // for ever); but its state is unknown, so every call refuses it, saving included.
        let dir = tempfile::tempdir().unwrap();
        let ckpt = CString::new(dir.path().join("after-panic.safetensors").to_str().unwrap()).unwrap();
        let mut n = 7u64;
        let unusable = |st: beit_status, call: &str| {
            assert_eq!(st, beit_status::BEIT_ERR_INTERNAL, "{call}: {}", last_error());
            let msg = last_error();
            assert!(msg.starts_with(call) && msg.contains("unusable") && msg.contains("free it"), "{msg}");
        };
        unusable(step(t, &batch.view()).0, "beit_trainer_step");
        unusable(unsafe { beit_trainer_step_count(t, &mut n) }, "beit_trainer_step_count");
        unusable(unsafe { beit_trainer_save_checkpoint(t, ckpt.as_ptr()) }, "beit_trainer_save_checkpoint");
        unusable(unsafe { beit_trainer_load_checkpoint(t, ckpt.as_ptr()) }, "beit_trainer_load_checkpoint");
        assert_eq!(n, 7, "out written by a refused call");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a refused save wrote a file");
        // The context's pool survives the panic and still runs other trainers.
        let other = from_config(ctx, TINY, &options());
        assert_eq!(step(other, &batch.view()).0, beit_status::BEIT_OK, "{}", last_error());
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(other);
            beit_context_free(ctx);
        }
    }

    /// Holds `t`'s claim on another thread (as a long call would) while `f` runs.
    fn while_claimed_elsewhere(t: *mut beit_trainer, f: impl FnOnce()) {
        let shared = Shared(t);
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let shared = shared;
                let _claim = unsafe { claim(shared.0, "the test's long call") }.unwrap();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv();
            });
            held_rx.recv().unwrap();
            f();
            release_tx.send(()).unwrap();
        });
    }

    #[test]
    fn every_call_on_a_claimed_trainer_is_busy_and_changes_nothing() {
        let ctx = context();
        let t = from_config(ctx, TINY, &options());
        let batch = Batch::new();
        assert_eq!(step(t, &batch.view()).0, beit_status::BEIT_OK);
        let dir = tempfile::tempdir().unwrap();
        let other_state = CString::new(dir.path().join("other.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { beit_trainer_save_checkpoint(t, other_state.as_ptr()) }, beit_status::BEIT_OK);
        assert_eq!(step(t, &batch.view()).0, beit_status::BEIT_OK);
        let before = state_bytes(t);

        let new_ckpt = CString::new(dir.path().join("new.safetensors").to_str().unwrap()).unwrap();
        let new_dir = CString::new(dir.path().join("model").to_str().unwrap()).unwrap();
        while_claimed_elsewhere(t, || {
            let busy = |st: beit_status, call: &str| {
                assert_eq!(st, beit_status::BEIT_ERR_BUSY, "{call}: {}", last_error());
                let msg = last_error();
                assert!(msg.starts_with(call) && msg.contains("busy") && msg.contains("nothing was done"), "{msg}");
            };
            let mut stats = beit_step_stats { step: 99, ..beit_step_stats_default() };
            busy(unsafe { beit_trainer_step(t, &batch.view(), &mut stats) }, "beit_trainer_step");
            assert_eq!(stats.step, 99, "stats written by a refused step");
            busy(unsafe { beit_trainer_save_checkpoint(t, new_ckpt.as_ptr()) }, "beit_trainer_save_checkpoint");
            busy(unsafe { beit_trainer_save_model(t, new_dir.as_ptr()) }, "beit_trainer_save_model");
            busy(unsafe { beit_trainer_load_checkpoint(t, other_state.as_ptr()) }, "beit_trainer_load_checkpoint");
            busy(unsafe { beit_trainer_set_data_position(t, 1234) }, "beit_trainer_set_data_position");
            let mut n = 77u64;
            busy(unsafe { beit_trainer_step_count(t, &mut n) }, "beit_trainer_step_count");
            busy(unsafe { beit_trainer_get_data_position(t, &mut n) }, "beit_trainer_get_data_position");
            assert_eq!(n, 77, "out written by a refused call");
            let mut info = beit_model_info_default();
            busy(unsafe { beit_trainer_get_model_info(t, &mut info) }, "beit_trainer_get_model_info");
            assert_eq!(info.vocab_size, 0, "info written by a refused call");
            // A NULL trainer is still NULL_POINTER, not BUSY.
            assert_eq!(unsafe { beit_trainer_step_count(ptr::null(), &mut n) }, beit_status::BEIT_ERR_NULL_POINTER);
        });
        assert!(!dir.path().join("new.safetensors").exists() && !dir.path().join("model").exists());
        assert_eq!(state_bytes(t), before, "a refused call changed the trainer");
        // Released: the trainer works again, and from where it was.
        assert_eq!(step(t, &batch.view()).1.step, 3);
        unsafe {
            beit_trainer_free(t);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn concurrent_steps_are_ok_or_busy_and_equal_as_many_sequential_steps() {
        const THREADS: usize = 4;
        const CALLS_PER_THREAD: usize = 3;
        let ctx = context();
        let t = from_config(ctx, TINY, &options());
        let batch = Batch::new();
        let (mut oks, mut busies, mut rounds) = (0u64, 0u64, 0);
        let mut steps_reported = Vec::new();
        // Rounds of THREADS threads released at once, each stepping the shared trainer, until
        // some call was refused (so the test cannot pass without concurrent calls).
        while busies == 0 {
            rounds += 1;
            assert!(rounds <= 200, "200 rounds of {THREADS} concurrent threads never met a busy trainer");
            let start = std::sync::Barrier::new(THREADS);
            let shared = Shared(t);
            let results: Vec<(beit_status, u64, String)> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let (start, batch) = (&start, &batch);
                        scope.spawn(move || {
                            let shared = shared;
                            start.wait();
                            (0..CALLS_PER_THREAD)
                                .map(|_| {
                                    let (st, stats) = step(shared.0, &batch.view());
                                    (st, stats.step, last_error())
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
            });
            for (st, reported, msg) in results {
                match st {
                    beit_status::BEIT_OK => {
                        oks += 1;
                        steps_reported.push(reported);
                    }
                    beit_status::BEIT_ERR_BUSY => {
                        assert_eq!(reported, 0, "stats written by a refused step");
                        assert!(msg.starts_with("beit_trainer_step:") && msg.contains("busy"), "{msg}");
                        busies += 1;
                    }
                    other => panic!("a concurrent step returned {other:?}: {msg}"),
                }
            }
        }
        // Each successful step saw its own step number: no two ran on the same state.
        steps_reported.sort_unstable();
        assert_eq!(steps_reported, (1..=oks).collect::<Vec<_>>());
        assert_eq!(step_count(t), oks);

        let twin = from_config(ctx, TINY, &options());
        for _ in 0..oks {
            assert_eq!(step(twin, &batch.view()).0, beit_status::BEIT_OK);
        }
        assert_eq!(
            state_bytes(t),
            state_bytes(twin),
            "{oks} concurrent successful steps differ from {oks} sequential ones"
        );
        eprintln!("{rounds} round(s): {oks} steps ran, {busies} refused as busy");
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(twin);
            beit_context_free(ctx);
        }
    }

    fn split_step(t: *mut beit_trainer, b: &beit_mim_batch) -> (beit_pass_stats, beit_step_stats) {
        let mut pass = beit_pass_stats_default();
        assert_eq!(unsafe { beit_trainer_forward_backward(t, b, &mut pass) }, beit_status::BEIT_OK, "{}", last_error());
        let mut stats = beit_step_stats_default();
        assert_eq!(unsafe { beit_trainer_apply_gradients(t, &mut stats) }, beit_status::BEIT_OK, "{}", last_error());
        (pass, stats)
    }

    fn host_gradients(t: *mut beit_trainer) -> &'static mut [f32] {
        let mut g = beit_gradients_default();
        assert_eq!(unsafe { beit_trainer_get_gradients(t, &mut g) }, beit_status::BEIT_OK, "{}", last_error());
        assert_eq!(g.location, beit_memory_location::BEIT_MEMORY_HOST);
        assert!(g.device_pointer == 0 && g.stream.is_null());
        unsafe { std::slice::from_raw_parts_mut(g.host, g.len) }
    }

    #[test]
    fn split_step_is_the_step_bit_for_bit() {
        let ctx = context();
        // Drop path on: the split step must draw the same factors as the step.
        let opts = beit_trainer_options { drop_path_rate: 0.3, ..options() };
        let (whole, split) = (from_config(ctx, TINY, &opts), from_config(ctx, TINY, &opts));
        let batch = Batch::new();
        for _ in 0..3 {
            let (st, a) = step(whole, &batch.view());
            assert_eq!(st, beit_status::BEIT_OK, "{}", last_error());
            let (pass, b) = split_step(split, &batch.view());
            assert_eq!((pass.loss, pass.images, pass.masked), (a.loss, 2, 4));
            assert_eq!((b.step, b.loss, b.lr, b.grad_norm, b.masked), (a.step, a.loss, a.lr, a.grad_norm, a.masked));
        }
        assert_eq!(state_bytes(whole), state_bytes(split));
        unsafe {
            beit_trainer_free(whole);
            beit_trainer_free(split);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn gradients_are_the_host_buffer_the_update_reads() {
        let ctx = context();
        let opts = beit_trainer_options { clip_grad_norm: 0.0, weight_decay: 0.0, ..options() };
        let (t, reference) = (from_config(ctx, TINY, &opts), from_config(ctx, TINY, &opts));
        let batch = Batch::new();
        // No step pending: no gradients, nothing to apply.
        let mut g = beit_gradients_default();
        assert_eq!(unsafe { beit_trainer_get_gradients(t, &mut g) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("no step is pending"), "{}", last_error());
        assert_eq!(unsafe { beit_trainer_apply_gradients(t, ptr::null_mut()) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);

        assert_eq!(unsafe { beit_trainer_forward_backward(t, &batch.view(), ptr::null_mut()) }, beit_status::BEIT_OK);
        let grads = host_gradients(t);
        let mut n = 0;
        assert_eq!(unsafe { crate::ffi::parameters::beit_trainer_parameter_count(t, &mut n) }, beit_status::BEIT_OK);
        assert!(n > 10 && grads.len() >= n);
        // The host doubles the gradients: with AdamW (scale-invariant but for eps) the update
        // equals the one of the original gradients within float rounding, and the reported
        // norm is twice the reference's.
        let norm: f64 = grads.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        grads.iter_mut().for_each(|v| *v *= 2.0);
        let mut stats = beit_step_stats_default();
        assert_eq!(unsafe { beit_trainer_apply_gradients(t, &mut stats) }, beit_status::BEIT_OK, "{}", last_error());
        let (_, r) = step(reference, &batch.view());
        assert!(
            (stats.grad_norm - 2.0 * r.grad_norm).abs() <= 1e-6 * r.grad_norm,
            "{} vs {}",
            stats.grad_norm,
            r.grad_norm
        );
        assert!((r.grad_norm - norm).abs() <= 1e-6 * norm);
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(reference);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn a_pending_step_refuses_what_would_lose_it_and_discard_restores() {
        let ctx = context();
        let opts = beit_trainer_options { drop_path_rate: 0.3, ..options() };
        let (t, reference) = (from_config(ctx, TINY, &opts), from_config(ctx, TINY, &opts));
        let batch = Batch::new();
        let before = state_bytes(t);
        assert_eq!(unsafe { beit_trainer_forward_backward(t, &batch.view(), ptr::null_mut()) }, beit_status::BEIT_OK);
        assert_eq!(step(t, &batch.view()).0, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("a step is pending"), "{}", last_error());
        assert_eq!(
            unsafe { beit_trainer_forward_backward(t, &batch.view(), ptr::null_mut()) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        let dir = tempfile::tempdir().unwrap();
        let path = CString::new(dir.path().join("c.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { beit_trainer_save_checkpoint(t, path.as_ptr()) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(!dir.path().join("c.safetensors").exists());
        let name = CString::new("beit.embeddings.cls_token").unwrap();
        let values = [0.5f32; 8];
        let st = unsafe { crate::ffi::parameters::beit_trainer_set_parameter(t, name.as_ptr(), values.as_ptr(), 8) };
        assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        // Discarding puts everything back, the random state included: the next steps are the
        // reference's.
        assert_eq!(unsafe { beit_trainer_discard_gradients(t) }, beit_status::BEIT_OK);
        assert_eq!(state_bytes(t), before);
        for _ in 0..2 {
            assert_eq!(step(t, &batch.view()).1.loss, step(reference, &batch.view()).1.loss);
        }
        assert_eq!(state_bytes(t), state_bytes(reference));
        unsafe {
            beit_trainer_free(t);
            beit_trainer_free(reference);
            beit_context_free(ctx);
        }
    }

    #[test]
    fn precision_is_checked_against_the_context() {
        let ctx = context();
        let json = CString::new(TINY).unwrap();
        let mut t = ptr::null_mut();
        for (value, want) in [
            (0, beit_status::BEIT_OK),
            (1, beit_status::BEIT_OK),
            (2, beit_status::BEIT_ERR_UNSUPPORTED),
            (3, beit_status::BEIT_ERR_INVALID_ARGUMENT),
        ] {
            let opts = beit_trainer_options { precision: RawPrecision(value), ..options() };
            let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, &opts, &mut t) };
            assert_eq!(st, want, "precision {value}: {}", last_error());
            if st == beit_status::BEIT_OK {
                unsafe { beit_trainer_free(t) };
            } else {
                assert!(last_error().contains("precision"), "{}", last_error());
            }
        }
        // A struct from the header before `precision` is read up to its size: the default.
        // So is one whose odd struct_size covers part of it.
        for size in [TRAINER_OPTIONS_V1_SIZE, TRAINER_OPTIONS_V1_SIZE + 2] {
            let old = beit_trainer_options { struct_size: size, precision: RawPrecision(77), ..options() };
            let st = unsafe { beit_trainer_create_from_config(ctx, json.as_ptr(), 1, &old, &mut t) };
            assert_eq!(st, beit_status::BEIT_OK, "struct_size {size}: {}", last_error());
            unsafe { beit_trainer_free(t) };
        }
        unsafe { beit_context_free(ctx) };
    }

    #[test]
    fn parameters_by_name_round_trip_between_models_and_trainers() {
        use crate::ffi::parameters::*;
        let ctx = context();
        let t = from_config(ctx, TINY, &options());
        let batch = Batch::new();
        assert_eq!(step(t, &batch.view()).0, beit_status::BEIT_OK);
        // The model handle is the trainer's model as of its last step.
        let mut m = ptr::null_mut();
        assert_eq!(unsafe { beit_trainer_get_model(t, &mut m) }, beit_status::BEIT_OK, "{}", last_error());
        let trained: Vec<u32> = unsafe { &*m }.model().params().data.iter().map(|v| v.to_bits()).collect();
        assert_eq!(trained, param_bits(t));
        // Listing: every exported tensor, HF names, shapes and offsets as the store lays them out.
        let mut n = 0;
        assert_eq!(unsafe { beit_model_parameter_count(m, &mut n) }, beit_status::BEIT_OK);
        let store = unsafe { &*m }.model().params().clone();
        assert_eq!(n, store.exported().count());
        for (i, spec) in store.exported().enumerate() {
            let mut info = beit_parameter_info_default();
            assert_eq!(unsafe { beit_model_parameter_info(m, i, &mut info) }, beit_status::BEIT_OK);
            let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_str().unwrap();
            assert_eq!(name, spec.name);
            assert_eq!(&info.shape[..info.ndim], &spec.shape[..]);
            assert!(info.shape[info.ndim..].iter().all(|&d| d == 0));
            assert_eq!((info.numel, info.offset), (spec.len, spec.offset));
            let mut tinfo = beit_parameter_info_default();
            assert_eq!(unsafe { beit_trainer_parameter_info(t, i, &mut tinfo) }, beit_status::BEIT_OK);
            assert_eq!(tinfo.name, info.name);
        }
        let mut info = beit_parameter_info_default();
        assert_eq!(unsafe { beit_model_parameter_info(m, n, &mut info) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);

        // Get, set, and the refusals of each.
        let name = CString::new("beit.encoder.layer.1.attention.attention.query.weight").unwrap();
        let mut q = vec![0f32; 64];
        assert_eq!(unsafe { beit_model_get_parameter(m, name.as_ptr(), q.as_mut_ptr(), 64) }, beit_status::BEIT_OK);
        let id = store.find_exported("beit.encoder.layer.1.attention.attention.query.weight").unwrap();
        assert_eq!(q, store.get(id));
        assert_eq!(
            unsafe { beit_model_get_parameter(m, name.as_ptr(), q.as_mut_ptr(), 63) },
            beit_status::BEIT_ERR_BUFFER_SIZE
        );
        assert!(last_error().contains("[8, 8]"), "{}", last_error());
        let nope = CString::new("beit.no.such.weight").unwrap();
        assert_eq!(
            unsafe { beit_model_get_parameter(m, nope.as_ptr(), q.as_mut_ptr(), 64) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        let new: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
        let mut bad = new.clone();
        bad[5] = f32::NAN;
        assert_eq!(
            unsafe { beit_model_set_parameter(m, name.as_ptr(), bad.as_ptr(), 64) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        assert_eq!(unsafe { &*m }.model().params().get(id), store.get(id), "a refused set changes nothing");
        assert_eq!(unsafe { beit_model_set_parameter(m, name.as_ptr(), new.as_ptr(), 64) }, beit_status::BEIT_OK);
        assert_eq!(unsafe { &*m }.model().params().get(id), &new[..]);

        // Trainer set/get, then copying a whole model into a trainer and back.
        assert_eq!(unsafe { beit_trainer_set_parameter(t, name.as_ptr(), new.as_ptr(), 64) }, beit_status::BEIT_OK);
        let mut back = vec![0f32; 64];
        assert_eq!(
            unsafe { beit_trainer_get_parameter(t, name.as_ptr(), back.as_mut_ptr(), 64) },
            beit_status::BEIT_OK
        );
        assert_eq!(back, new);
        let other = from_config(ctx, TINY, &options());
        assert_eq!(unsafe { beit_trainer_copy_parameters_from(other, m) }, beit_status::BEIT_OK, "{}", last_error());
        assert_eq!(param_bits(other), param_bits(t));
        // Another layout is refused, naming the first difference.
        let wider = TINY.replace(r#""vocab_size": 5"#, r#""vocab_size": 6"#);
        let w = from_config(ctx, &wider, &options());
        assert_eq!(unsafe { beit_trainer_copy_parameters_from(w, m) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("lm_head.weight"), "{}", last_error());
        let mut m2 = ptr::null_mut();
        assert_eq!(unsafe { beit_trainer_get_model(other, &mut m2) }, beit_status::BEIT_OK);
        assert_eq!(unsafe { beit_model_copy_parameters(m2, m) }, beit_status::BEIT_OK);
        assert_eq!(unsafe { beit_model_copy_parameters(m2, m2) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        unsafe {
            beit_model_free(m);
            beit_model_free(m2);
            beit_trainer_free(t);
            beit_trainer_free(other);
            beit_trainer_free(w);
            beit_context_free(ctx);
        }
    }
}
