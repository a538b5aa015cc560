//! `beit_loader`: BEiT's augmenting two-view pretraining loader over a dataset file, filling
//! caller buffers batch by batch. Wraps [`crate::data::mim_source::DatasetMim`] with the
//! loader config of `beit pretrain` ([`crate::train::recipes::pretrain::PretrainLoader`]), so
//! that the batches a host hands to `beit_trainer_step` are the ones the CLI trains on.

use std::ffi::c_char;
use std::mem::size_of;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::claim::{claim_state, HandleKind};
use super::context::{beit_context, context_shared};
use super::masking::RawMaskingStrategy;
use super::model::{beit_model, check_slice, handle_ref, write_versioned};
use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg};
use super::status::{FfiError, FfiResult};
use super::tokenizer::{beit_tokenizer, tokenizer_ref};
use crate::context::Context;
use crate::data::dataset::Dataset;
use crate::data::loader::LoaderConfig;
use crate::data::masking::MaskingStrategy;
use crate::data::mim_source::{DatasetMim, TokenSource};
use crate::tensor::checked_numel;
use crate::train::recipes::masking::default_masked_patches;
use crate::train::recipes::pretrain::PretrainLoader;

/// Where a loader's visual tokens (the MIM targets) come from
/// (`beit_loader_options.token_source`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_token_source {
    /// No tokens (e.g. for the pixel target, or a host with its own tokenizer on view 2).
    BEIT_TOKENS_NONE = 0,
    /// The dataset's token section (a token cache, made by `beit tokenize`): tokens of the
    /// whole, unaltered image, so view 1 is the whole image too (no crop, flip or jitter).
    BEIT_TOKENS_CACHED = 1,
    /// `beit_loader_options.tokenizer` run on every batch's view 2 (BEiT's faithful targets).
    BEIT_TOKENS_TOKENIZER = 2,
}

/// A `beit_token_source` as C passes it in: any 32-bit value, checked before use. The header
/// shows it as `beit_token_source` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTokenSource(pub u32);

impl RawTokenSource {
    fn to_source(self) -> FfiResult<beit_token_source> {
        match self.0 {
            0 => Ok(beit_token_source::BEIT_TOKENS_NONE),
            1 => Ok(beit_token_source::BEIT_TOKENS_CACHED),
            2 => Ok(beit_token_source::BEIT_TOKENS_TOKENIZER),
            other => Err(FfiError::invalid(format!(
                "opts->token_source {other} is not a beit_token_source (BEIT_TOKENS_NONE = 0, BEIT_TOKENS_CACHED = 1, \
                 BEIT_TOKENS_TOKENIZER = 2)"
            ))),
        }
    }
}

/// How a loader makes batches. Start from `beit_loader_options_default()`: BEiT's pretraining
/// pipeline as `beit pretrain` runs it. A 0 in a size or count field, and a negative value in
/// a crop or flip field, means "the recipe's value" (each field says which). Values are
/// checked by `beit_loader_create` (`BEIT_ERR_INVALID_ARGUMENT` naming the problem).
///
/// To get exactly the batches `beit pretrain --data D --batch B --seed S [--masked M]
/// [--masking random] [--loader-workers K]` trains on: the same dataset, `batch_size` B,
/// `seed` S, the model, and the token source it uses (cached tokens, or its `--tokenizer`),
/// everything else left at the defaults.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_loader_options {
    /// `sizeof(beit_loader_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Images per batch (at least 1; default 64, `beit pretrain`'s).
    pub batch_size: usize,
    /// The model the batches are for: view 1's size, the patch size and the channel count come
    /// from its config. NULL: give `image_height`, `image_width`, `patch_height` and
    /// `patch_width`. Only read during `beit_loader_create`.
    pub model: *const beit_model,
    /// View 1 (the model's input) height; 0: the model's. With a model, non-zero values must
    /// equal its.
    pub image_height: usize,
    /// View 1 width; 0: the model's.
    pub image_width: usize,
    /// Patch height; view 1's height must be a multiple. 0: the model's.
    pub patch_height: usize,
    /// Patch width; 0: the model's.
    pub patch_width: usize,
    /// View 2 (the tokenizer's input) height; 0: the tokenizer's input size with
    /// `BEIT_TOKENS_TOKENIZER`, else half of view 1's, rounded up.
    pub view2_height: usize,
    /// View 2 width; 0 as for the height.
    pub view2_width: usize,
    /// Patches masked per image, below the grid's patch count; 0: BEiT's ratio (75 of 196
    /// patches, rounded).
    pub masked_patches: usize,
    /// Block-wise (the default) or random masking.
    pub masking: RawMaskingStrategy,
    /// Smallest mask block tried, in 1..=masked_patches; 0: 16, or the masked count if smaller.
    pub min_mask_block: usize,
    /// Random resized crop: smallest fraction of the image area, in (0, crop_scale_max];
    /// negative: the recipe's (BEiT 0.08; 1 with cached tokens).
    pub crop_scale_min: f64,
    /// Largest fraction of the area, at most 1; negative: the recipe's (1).
    pub crop_scale_max: f64,
    /// Smallest crop aspect ratio (width / height), > 0; negative: the recipe's (BEiT 3/4; 1
    /// with cached tokens).
    pub crop_ratio_min: f64,
    /// Largest crop aspect ratio, >= crop_ratio_min; negative: the recipe's (BEiT 4/3; 1 with
    /// cached tokens).
    pub crop_ratio_max: f64,
    /// Horizontal flip probability in [0, 1]; negative: the recipe's (BEiT 0.5; 0 with cached
    /// tokens).
    pub flip_prob: f64,
    /// Colour jitter strength (brightness, contrast, saturation) in [0, 1], for 3-channel data
    /// only; 0 (the default) disables it.
    pub color_jitter: f64,
    /// View 1 normalisation `(x - mean) / std` on [0, 1] pixels: one value for every channel or
    /// one per channel. NULL: 0.5 (BEiT's). Copied by `beit_loader_create`.
    pub mean: *const f32,
    /// Values at `mean` (1 or the channel count; 0 with NULL).
    pub mean_len: usize,
    /// The standard deviations, as `mean` (nonzero); NULL: 0.5.
    pub std: *const f32,
    /// Values at `std`.
    pub std_len: usize,
    /// Seeds the epoch orders, the augmentations and the masks (`beit pretrain --seed`).
    pub seed: u64,
    /// The epoch the loader starts at: its first batch is global position
    /// `epoch_start * batches_per_epoch`.
    pub epoch_start: u64,
    /// Worker threads making batches ahead (0 means 1; at most 256). Batches do not depend on
    /// it.
    pub workers: usize,
    /// Batches made ahead, over all workers; 0: 2 per worker.
    pub prefetch: usize,
    /// Drop the last incomplete batch of each epoch (default true, as pretraining does: every
    /// step sees a full batch). Otherwise the last batch may hold fewer images
    /// (`beit_loader_batch.images`).
    pub drop_last: bool,
    /// Where the visual tokens come from (default `BEIT_TOKENS_NONE`).
    pub token_source: RawTokenSource,
    /// The tokenizer for `BEIT_TOKENS_TOKENIZER` (NULL otherwise). The loader keeps what it
    /// needs: the tokenizer handle may be freed first. It tokenizes on the loader's context,
    /// on the CPU, as `beit pretrain` does.
    pub tokenizer: *const beit_tokenizer,
}

/// What a loader's batches hold. Set `struct_size` (or start from
/// `beit_loader_info_default()`); only the fields that fit in it are written. The `*_len`
/// fields are the lengths `beit_loader_next` expects of each buffer (a full batch).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_loader_info {
    /// Set by the caller to `sizeof(beit_loader_info)`; left as it is.
    pub struct_size: usize,
    /// Images B of a full batch.
    pub batch_size: usize,
    /// Channels C of both views (the dataset's).
    pub channels: usize,
    /// View 1 height H (the model's input).
    pub height: usize,
    /// View 1 width W.
    pub width: usize,
    /// View 2 height H2 (the tokenizer's input).
    pub view2_height: usize,
    /// View 2 width W2.
    pub view2_width: usize,
    /// Patch height.
    pub patch_height: usize,
    /// Patch width.
    pub patch_width: usize,
    /// Mask grid rows, H / patch_height.
    pub grid_h: usize,
    /// Mask grid columns, W / patch_width.
    pub grid_w: usize,
    /// Patches N per image, grid_h * grid_w.
    pub num_patches: usize,
    /// Patches masked per image (block-wise masking may mask slightly fewer; never none).
    pub masked_patches: usize,
    /// Smallest mask block tried.
    pub min_mask_block: usize,
    /// Batches in one epoch.
    pub batches_per_epoch: u64,
    /// Samples in the dataset.
    pub dataset_count: u64,
    /// Whether batches carry class labels (the dataset has them).
    pub has_labels: bool,
    /// Whether batches carry visual tokens (a token source is set).
    pub has_tokens: bool,
    /// The token source.
    pub token_source: RawTokenSource,
    /// Floats of view 1 of a batch, B * C * H * W ([B, C, H, W]).
    pub view1_len: usize,
    /// Floats of view 2, B * C * H2 * W2 ([B, C, H2, W2]).
    pub view2_len: usize,
    /// Bytes of the masks, B * N ([B, N]).
    pub bool_masked_pos_len: usize,
    /// Values of the class labels, B ([B]); 0 without labels.
    pub labels_len: usize,
    /// Values of the visual tokens, B * N ([B, N]); 0 without tokens.
    pub tokens_len: usize,
}

/// Caller buffers for one batch (inputs), and what the batch was (outputs). Every buffer is
/// optional (NULL skips it); a given one must have exactly the length `beit_loader_info` gives.
/// Start from `beit_loader_batch_default()`.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_loader_batch {
    /// `sizeof(beit_loader_batch)` as the caller compiled it.
    pub struct_size: usize,
    /// Receives view 1, f32 [B, C, H, W] (NCHW), normalised with the mean and std: what
    /// `beit_mim_batch.pixels` takes.
    pub view1: *mut f32,
    /// Floats at `view1` (`beit_loader_info.view1_len`).
    pub view1_len: usize,
    /// Receives view 2, f32 [B, C, H2, W2], with the tokenizer's pixel mapping
    /// (x * 0.8 + 0.1 on [0, 1] pixels): what `beit_tokenizer_tokenize` takes.
    pub view2: *mut f32,
    /// Floats at `view2` (`beit_loader_info.view2_len`).
    pub view2_len: usize,
    /// Receives the masks, u8 [B, N], 1 = masked: `beit_mim_batch.bool_masked_pos`.
    pub bool_masked_pos: *mut u8,
    /// Bytes at `bool_masked_pos` (`beit_loader_info.bool_masked_pos_len`).
    pub bool_masked_pos_len: usize,
    /// Receives the class labels, i64 [B], when the dataset has labels (left untouched
    /// otherwise).
    pub labels: *mut i64,
    /// Values at `labels` (`beit_loader_info.labels_len`) when the dataset has labels.
    pub labels_len: usize,
    /// Receives the visual tokens, i64 [B, N], when a token source is set (left untouched
    /// otherwise): `beit_mim_batch.labels`.
    pub tokens: *mut i64,
    /// Values at `tokens` (`beit_loader_info.tokens_len`) when a token source is set.
    pub tokens_len: usize,
    /// Output: images in this batch: B, or fewer for the last batch of an epoch without
    /// `drop_last`. Buffer entries past them are set to 0.
    pub images: usize,
    /// Output: the global position of this batch (`beit_loader_get_position` before the call).
    pub position: u64,
    /// Output: its epoch, position / batches_per_epoch.
    pub epoch: u64,
    /// Output: whether `labels` was filled.
    pub labels_written: bool,
    /// Output: whether `tokens` was filled.
    pub tokens_written: bool,
}

const LOADER_OPTIONS_V1_SIZE: usize = size_of::<beit_loader_options>();
const LOADER_INFO_V1_SIZE: usize = size_of::<beit_loader_info>();
const LOADER_BATCH_V1_SIZE: usize = size_of::<beit_loader_batch>();

/// `beit pretrain`'s default batch size.
const DEFAULT_BATCH_SIZE: usize = 64;

/// BEiT's pretraining loader as `beit pretrain` runs it (see `beit_loader_options`), with
/// `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_loader_options_default() -> beit_loader_options {
    beit_loader_options {
        struct_size: size_of::<beit_loader_options>(),
        batch_size: DEFAULT_BATCH_SIZE,
        model: std::ptr::null(),
        image_height: 0,
        image_width: 0,
        patch_height: 0,
        patch_width: 0,
        view2_height: 0,
        view2_width: 0,
        masked_patches: 0,
        masking: RawMaskingStrategy::of(MaskingStrategy::default()),
        min_mask_block: 0,
        crop_scale_min: -1.0,
        crop_scale_max: -1.0,
        crop_ratio_min: -1.0,
        crop_ratio_max: -1.0,
        flip_prob: -1.0,
        color_jitter: 0.0,
        mean: std::ptr::null(),
        mean_len: 0,
        std: std::ptr::null(),
        std_len: 0,
        seed: 0,
        epoch_start: 0,
        workers: 0,
        prefetch: 0,
        drop_last: true,
        token_source: RawTokenSource(beit_token_source::BEIT_TOKENS_NONE as u32),
        tokenizer: std::ptr::null(),
    }
}

/// A zeroed `beit_loader_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_loader_info_default() -> beit_loader_info {
    beit_loader_info {
        struct_size: size_of::<beit_loader_info>(),
        batch_size: 0,
        channels: 0,
        height: 0,
        width: 0,
        view2_height: 0,
        view2_width: 0,
        patch_height: 0,
        patch_width: 0,
        grid_h: 0,
        grid_w: 0,
        num_patches: 0,
        masked_patches: 0,
        min_mask_block: 0,
        batches_per_epoch: 0,
        dataset_count: 0,
        has_labels: false,
        has_tokens: false,
        token_source: RawTokenSource(0),
        view1_len: 0,
        view2_len: 0,
        bool_masked_pos_len: 0,
        labels_len: 0,
        tokens_len: 0,
    }
}

/// An empty `beit_loader_batch` (NULL buffers, zero lengths and outputs) with `struct_size`
/// set.
#[no_mangle]
pub extern "C" fn beit_loader_batch_default() -> beit_loader_batch {
    beit_loader_batch {
        struct_size: size_of::<beit_loader_batch>(),
        view1: std::ptr::null_mut(),
        view1_len: 0,
        view2: std::ptr::null_mut(),
        view2_len: 0,
        bool_masked_pos: std::ptr::null_mut(),
        bool_masked_pos_len: 0,
        labels: std::ptr::null_mut(),
        labels_len: 0,
        tokens: std::ptr::null_mut(),
        tokens_len: 0,
        images: 0,
        position: 0,
        epoch: 0,
        labels_written: false,
        tokens_written: false,
    }
}

/// The batches a loader makes and where it stands.
struct LoaderState {
    mim: DatasetMim,
    /// The global position of the next batch.
    position: u64,
}

/// An augmenting loader over a dataset file: an endless stream of batches addressed by a
/// global position (epoch = position / batches_per_epoch; each epoch has its own order and
/// augmentations). Every batch is a pure function of the dataset, the options and its
/// position: the batch at position p is the same whatever was read before, whatever the
/// worker count, so `beit_loader_get_position` / `beit_loader_seek` make runs resumable.
///
/// Thread safety: `beit_loader_get_info` may be called from any thread at any time; the other
/// calls take one at a time: one made while another thread's call holds the loader does
/// nothing and returns `BEIT_ERR_BUSY`. The loader keeps its context's thread pool (shared:
/// the context handle may be freed first) and its dataset file mapped until it is freed.
#[allow(non_camel_case_types)]
pub struct beit_loader {
    state: Mutex<LoaderState>,
    info: beit_loader_info,
    ctx: Arc<Context>,
}

const _: () = super::status::assert_thread_safe::<beit_loader>();

/// Claims a loader for the call `call`, without waiting.
///
/// # Safety
/// `loader` must be NULL or a live loader.
unsafe fn claim<'a>(
    loader: *const beit_loader,
    call: &str,
) -> FfiResult<(MutexGuard<'a, LoaderState>, &'a beit_loader)> {
    let handle = non_null(loader, "loader")?;
    // SAFETY: non-NULL; the caller promises a live loader; the mutex decides who changes it.
    let handle = unsafe { &*handle };
    const KIND: HandleKind = HandleKind { name: "loader", recovery: "create a new loader (seek it to your position)" };
    Ok((claim_state(&handle.state, call, &KIND)?, handle))
}

/// A size field: the caller's when non-zero, else `default` (or, without one, an error saying
/// what to give).
fn size_or(value: usize, default: Option<usize>, field: &str, model: Option<usize>) -> FfiResult<usize> {
    match (value, default, model) {
        (v, _, Some(m)) if v != 0 && v != m => {
            Err(FfiError::invalid(format!("opts->{field} is {v}, but the model's is {m} (give 0 to take the model's)")))
        }
        (0, Some(d), _) => Ok(d),
        (0, None, _) => {
            Err(FfiError::invalid(format!("opts->{field} is 0 and no model is given: set it, or opts->model")))
        }
        (v, _, _) => Ok(v),
    }
}

/// One normalisation array: NULL for BEiT's 0.5, else 1 or `channels` finite values (checked
/// by the loader).
///
/// # Safety
/// `ptr` must be NULL or readable for `len` floats.
unsafe fn normalisation(ptr: *const f32, len: usize, channels: usize, field: &str) -> FfiResult<Option<Vec<f32>>> {
    if ptr.is_null() {
        if len != 0 {
            return Err(FfiError::invalid(format!("opts->{field} is NULL but opts->{field}_len is {len}")));
        }
        return Ok(None);
    }
    if len != 1 && len != channels {
        return Err(FfiError::invalid(format!(
            "opts->{field}_len is {len}, but {channels}-channel images take 1 value or {channels}"
        )));
    }
    check_slice(ptr, len, &format!("opts->{field}"))?;
    // SAFETY: non-NULL, aligned, len (1 or the dataset's channel count) values the caller
    // promises are readable.
    Ok(Some(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()))
}

/// The loader config and token source the options describe for `dataset`, checked as far as
/// the options go (the loader checks the rest).
///
/// # Safety
/// The pointers in `o` must be NULL or valid as `beit_loader_options` documents.
unsafe fn loader_setup(o: &beit_loader_options, dataset: &Dataset) -> FfiResult<(LoaderConfig, TokenSource)> {
    let channels = dataset.header().channels as usize;
    let model = if o.model.is_null() {
        None
    } else {
        // SAFETY: the caller promises a live model.
        Some(unsafe { handle_ref(o.model) }?.model().config().clone())
    };
    let model = model.as_ref();
    if let Some(cfg) = model {
        if cfg.num_channels != channels {
            return Err(FfiError::invalid(format!(
                "the model takes {}-channel images but the dataset has {channels} channels",
                cfg.num_channels
            )));
        }
    }
    let model_image = model.map(|c| c.image_size.hw());
    let model_patch = model.map(|c| c.patch_size.hw());
    let image_size = (
        size_or(o.image_height, model_image.map(|s| s.0), "image_height", model_image.map(|s| s.0))?,
        size_or(o.image_width, model_image.map(|s| s.1), "image_width", model_image.map(|s| s.1))?,
    );
    let patch_size = (
        size_or(o.patch_height, model_patch.map(|s| s.0), "patch_height", model_patch.map(|s| s.0))?,
        size_or(o.patch_width, model_patch.map(|s| s.1), "patch_width", model_patch.map(|s| s.1))?,
    );
    if image_size.0 % patch_size.0 != 0 || image_size.1 % patch_size.1 != 0 {
        return Err(FfiError::invalid(format!(
            "view 1 {}x{} is not a whole number of {}x{} patches",
            image_size.0, image_size.1, patch_size.0, patch_size.1
        )));
    }
    let grid = (image_size.0 / patch_size.0, image_size.1 / patch_size.1);
    let masked = if o.masked_patches == 0 { default_masked_patches(grid) } else { o.masked_patches };
    let source = match o.token_source.to_source()? {
        beit_token_source::BEIT_TOKENS_TOKENIZER => {
            // SAFETY: the caller promises a live tokenizer or NULL.
            let t = unsafe { tokenizer_ref(o.tokenizer) }.map_err(|_| {
                FfiError::new(
                    beit_status::BEIT_ERR_NULL_POINTER,
                    "opts->tokenizer is NULL, but opts->token_source is BEIT_TOKENS_TOKENIZER",
                )
            })?;
            TokenSource::Augmented(Arc::clone(t.dvae()))
        }
        other => {
            if !o.tokenizer.is_null() {
                return Err(FfiError::invalid(format!(
                    "opts->tokenizer is set, but opts->token_source is {other:?} (use BEIT_TOKENS_TOKENIZER, or leave it NULL)"
                )));
            }
            if other == beit_token_source::BEIT_TOKENS_CACHED {
                TokenSource::Cached
            } else {
                TokenSource::Pixels
            }
        }
    };
    if o.batch_size == 0 {
        return Err(FfiError::invalid("opts->batch_size is 0: a batch holds at least one image"));
    }
    let recipe = PretrainLoader {
        batch: o.batch_size,
        image_size,
        patch_size,
        masked,
        masking: o.masking.to_strategy("opts->masking")?,
        seed: o.seed,
        workers: o.workers,
    };
    let mut config = recipe.config(&source);
    if (o.view2_height, o.view2_width) != (0, 0) {
        if o.view2_height == 0 || o.view2_width == 0 {
            return Err(FfiError::invalid(format!(
                "opts->view2_height x opts->view2_width is {}x{}: give both, or neither",
                o.view2_height, o.view2_width
            )));
        }
        config.tokenizer_size = (o.view2_height, o.view2_width);
    }
    if o.min_mask_block != 0 {
        config.min_mask_block = o.min_mask_block;
    }
    let pick = |value: f64, recipe: f64| if value < 0.0 { recipe } else { value };
    config.scale = (pick(o.crop_scale_min, config.scale.0), pick(o.crop_scale_max, config.scale.1));
    config.ratio = (pick(o.crop_ratio_min, config.ratio.0), pick(o.crop_ratio_max, config.ratio.1));
    config.flip_prob = pick(o.flip_prob, config.flip_prob);
    if !(0.0..=1.0).contains(&o.color_jitter) {
        return Err(FfiError::invalid(format!("opts->color_jitter is {}, but it must be in [0, 1]", o.color_jitter)));
    }
    config.color_jitter = o.color_jitter as f32;
    // SAFETY (both): the caller promises each array holds its length.
    if let Some(mean) = unsafe { normalisation(o.mean, o.mean_len, channels, "mean") }? {
        config.mean = mean;
    }
    if let Some(std) = unsafe { normalisation(o.std, o.std_len, channels, "std") }? {
        config.std = std;
    }
    if o.prefetch != 0 {
        config.prefetch = o.prefetch;
    }
    config.drop_last = o.drop_last;
    Ok((config, source))
}

/// The shapes of a loader's batches.
fn loader_info(mim: &DatasetMim, source: RawTokenSource, struct_size: usize) -> FfiResult<beit_loader_info> {
    let loader = mim.loader();
    let c = loader.config();
    let h = loader.dataset().header();
    let channels = h.channels as usize;
    let (gh, gw) = c.grid();
    let b = c.batch_size;
    let len = |dims: &[usize], what: &str| {
        checked_numel(dims)
            .ok_or_else(|| FfiError::invalid(format!("a batch's {what} has more values than fit in memory")))
    };
    let has_tokens = !matches!(mim.token_source(), TokenSource::Pixels);
    Ok(beit_loader_info {
        struct_size,
        batch_size: b,
        channels,
        height: c.image_size.0,
        width: c.image_size.1,
        view2_height: c.tokenizer_size.0,
        view2_width: c.tokenizer_size.1,
        patch_height: c.patch_size.0,
        patch_width: c.patch_size.1,
        grid_h: gh,
        grid_w: gw,
        num_patches: gh * gw,
        masked_patches: c.masked_patches,
        min_mask_block: c.min_mask_block,
        batches_per_epoch: mim.batches_per_epoch(),
        dataset_count: h.count,
        has_labels: h.has_labels(),
        has_tokens,
        token_source: source,
        view1_len: len(&[b, channels, c.image_size.0, c.image_size.1], "view 1")?,
        view2_len: len(&[b, channels, c.tokenizer_size.0, c.tokenizer_size.1], "view 2")?,
        bool_masked_pos_len: len(&[b, gh, gw], "masks")?,
        labels_len: if h.has_labels() { b } else { 0 },
        tokens_len: if has_tokens { len(&[b, gh, gw], "tokens")? } else { 0 },
    })
}

/// Creates a loader over the dataset file `dataset_path` (opened, mapped and validated as by
/// `beit_dataset_open`). `opts` may be NULL for the defaults, which need a model or sizes, so
/// in practice it is not. Nothing is read ahead yet: the first `beit_loader_next` starts the
/// workers. On success `*out` receives a loader to release with `beit_loader_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, dataset_path, out; tokenizer with
/// `BEIT_TOKENS_TOKENIZER`), `BEIT_ERR_INVALID_ARGUMENT` (struct_size; a path not UTF-8; an
/// option out of range, naming it; sizes that disagree with the model, the tokenizer or the
/// dataset (channels, token grid); cached tokens from a dataset without a token section, or
/// with crops or flips; fewer images than one batch with `drop_last`; batches in flight that
/// would exceed the context's memory budget), `BEIT_ERR_IO`, `BEIT_ERR_FORMAT` (as
/// `beit_dataset_open`).
///
/// # Safety
/// `ctx` must be NULL or a live context; `dataset_path` NULL or a NUL-terminated string;
/// `opts` NULL or readable for its `struct_size`, its pointers valid as documented there;
/// `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_create(
    ctx: *const beit_context,
    dataset_path: *const c_char,
    opts: *const beit_loader_options,
    out: *mut *mut beit_loader,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises above; each helper checks for NULL.
        let context = unsafe { context_shared(ctx, "ctx") }?;
        let path = unsafe { utf8_arg(dataset_path, "dataset_path") }?;
        let out = non_null_mut(out, "out")?;
        let o = if opts.is_null() {
            beit_loader_options_default()
        } else {
            // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
            // check_struct_size makes sure they cover the first version read here.
            unsafe {
                check_struct_size(opts, "opts", LOADER_OPTIONS_V1_SIZE)?;
                opts.read_unaligned()
            }
        };
        let dataset = Arc::new(Dataset::open(Path::new(path))?);
        // SAFETY: the caller promises the option pointers are valid.
        let (config, source) = unsafe { loader_setup(&o, &dataset) }?;
        let mim = context.run(|| DatasetMim::new(dataset, config, source))?;
        let per_epoch = mim.batches_per_epoch();
        let position = o.epoch_start.checked_mul(per_epoch).ok_or_else(|| {
            FfiError::invalid(format!(
                "opts->epoch_start {} x {per_epoch} batches per epoch overflows a 64-bit position",
                o.epoch_start
            ))
        })?;
        let info = loader_info(&mim, o.token_source, size_of::<beit_loader_info>())?;
        let handle = Box::into_raw(Box::new(beit_loader {
            state: Mutex::new(LoaderState { mim, position }),
            info,
            ctx: context,
        }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Frees a loader: stops its workers and unmaps its dataset. NULL is a no-op.
///
/// # Safety
/// `loader` must be NULL or a loader not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_free(loader: *mut beit_loader) {
    guard_infallible((), || {
        if !loader.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(loader) });
        }
    })
}

/// Describes a loader's batches. Set `out->struct_size` first (or start from
/// `beit_loader_info_default()`); fields this version does not know are left untouched.
/// Never busy: it may run while another thread's `beit_loader_next` does.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (loader, out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size).
///
/// # Safety
/// `loader` must be NULL or a live loader; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_get_info(loader: *const beit_loader, out: *mut beit_loader_info) -> beit_status {
    guard(|| {
        let loader = non_null(loader, "loader")?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", LOADER_INFO_V1_SIZE) }?;
        // SAFETY: non-NULL, live (the caller's promise); `info` never changes.
        let info = beit_loader_info { struct_size: size, ..unsafe { (*loader).info } };
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

/// The input fields of a `beit_loader_batch`.
struct BatchBuffers {
    view1: *mut f32,
    view1_len: usize,
    view2: *mut f32,
    view2_len: usize,
    masks: *mut u8,
    masks_len: usize,
    labels: *mut i64,
    labels_len: usize,
    tokens: *mut i64,
    tokens_len: usize,
}

/// Checks one optional caller buffer: NULL with length 0, or exactly `want` values when
/// `wanted` (the batch has this part). Returns whether it is to be filled.
fn check_buffer<T>(ptr: *const T, len: usize, want: usize, wanted: bool, name: &str, shape: &str) -> FfiResult<bool> {
    if ptr.is_null() {
        if len != 0 {
            return Err(FfiError::invalid(format!("batch->{name} is NULL but batch->{name}_len is {len}")));
        }
        return Ok(false);
    }
    if !wanted {
        return Ok(false);
    }
    if len != want {
        return Err(FfiError::buffer_size(format!("batch->{name}_len is {len}, but {shape} needs {want}")));
    }
    check_slice(ptr, len, &format!("batch->{name}"))?;
    Ok(true)
}

/// Copies `values` to the start of the caller's `len`-value buffer at `dst` and zeroes the
/// rest.
///
/// # Safety
/// `dst` must be writable and aligned for `len` values, `values.len() <= len`, and must not
/// overlap `values`.
unsafe fn fill<T: Copy>(dst: *mut T, len: usize, values: impl ExactSizeIterator<Item = T>) {
    let n = values.len();
    debug_assert!(n <= len);
    for (k, v) in values.enumerate() {
        // SAFETY: k < n <= len.
        unsafe { dst.add(k).write(v) };
    }
    // SAFETY: [n, len) lies inside the buffer; all-zero bytes are 0 for f32, u8 and i64.
    unsafe { std::ptr::write_bytes(dst.add(n), 0, len - n) };
}

/// Makes the batch at the loader's position, fills the caller's buffers in `batch` (each one
/// given, and the outputs), and moves the position on by one. The loader's workers make the
/// following batches meanwhile; with a tokenizer, view 2 is tokenized on the loader's context.
///
/// Every argument is checked before anything is made: on any error nothing is written and
/// the position stays.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (loader, batch), `BEIT_ERR_INVALID_ARGUMENT` (struct_size;
/// a NULL buffer with a non-zero length; a misaligned buffer), `BEIT_ERR_BUFFER_SIZE` (a buffer
/// length other than `beit_loader_info`'s, with both numbers), `BEIT_ERR_BUSY` (another
/// thread's call holds the loader), `BEIT_ERR_INTERNAL` (a loader worker failed; the loader
/// refuses later calls).
///
/// # Safety
/// `loader` must be NULL or a live loader; `batch` NULL or readable and writable for its
/// `struct_size`; every non-NULL buffer must hold its stated length, and not overlap another,
/// for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_next(loader: *mut beit_loader, batch: *mut beit_loader_batch) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (mut state, handle) = unsafe { claim(loader, "beit_loader_next") }?;
        let batch = non_null_mut(batch, "batch")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure they cover the first version. Only the input fields
        // are read, one by one: the output bools may hold anything before the call.
        let b = unsafe {
            check_struct_size(batch, "batch", LOADER_BATCH_V1_SIZE)?;
            use std::ptr::addr_of;
            BatchBuffers {
                view1: addr_of!((*batch).view1).read_unaligned(),
                view1_len: addr_of!((*batch).view1_len).read_unaligned(),
                view2: addr_of!((*batch).view2).read_unaligned(),
                view2_len: addr_of!((*batch).view2_len).read_unaligned(),
                masks: addr_of!((*batch).bool_masked_pos).read_unaligned(),
                masks_len: addr_of!((*batch).bool_masked_pos_len).read_unaligned(),
                labels: addr_of!((*batch).labels).read_unaligned(),
                labels_len: addr_of!((*batch).labels_len).read_unaligned(),
                tokens: addr_of!((*batch).tokens).read_unaligned(),
                tokens_len: addr_of!((*batch).tokens_len).read_unaligned(),
            }
        };
        let i = &handle.info;
        let (bs, c, n) = (i.batch_size, i.channels, i.num_patches);
        let view1_shape = format!("[{bs}, {c}, {}, {}] (B, C, H, W)", i.height, i.width);
        let view2_shape = format!("[{bs}, {c}, {}, {}] (B, C, H2, W2)", i.view2_height, i.view2_width);
        let patch_shape = format!("[{bs}, {n}] (B, patches)");
        let want_view1 = check_buffer(b.view1, b.view1_len, i.view1_len, true, "view1", &view1_shape)?;
        let want_view2 = check_buffer(b.view2, b.view2_len, i.view2_len, true, "view2", &view2_shape)?;
        let want_masks =
            check_buffer(b.masks, b.masks_len, i.bool_masked_pos_len, true, "bool_masked_pos", &patch_shape)?;
        let want_labels =
            check_buffer(b.labels, b.labels_len, i.labels_len, i.has_labels, "labels", &format!("[{bs}]"))?;
        let want_tokens = check_buffer(b.tokens, b.tokens_len, i.tokens_len, i.has_tokens, "tokens", &patch_shape)?;

        let position = state.position;
        let mim = &mut state.mim;
        let data = handle.ctx.run(|| mim.batch_data_at(position))?;
        // Everything made: write. Raw writes only, so that no `&mut` slice is ever made of a
        // caller buffer.
        // SAFETY (all fills): each buffer was checked above to be aligned and of its full-batch
        // length, which the batch's values never exceed; the caller promises it is writable and
        // overlaps nothing.
        unsafe {
            if want_view1 {
                fill(b.view1, b.view1_len, data.view1.iter().copied());
            }
            if want_view2 {
                fill(b.view2, b.view2_len, data.view2.iter().copied());
            }
            if want_masks {
                fill(b.masks, b.masks_len, data.bool_masked_pos.iter().copied());
            }
            if want_labels {
                let labels = data.labels.as_deref().unwrap_or_default();
                fill(b.labels, b.labels_len, labels.iter().map(|&l| i64::from(l)));
            }
            if want_tokens {
                fill(b.tokens, b.tokens_len, data.tokens.as_deref().unwrap_or_default().iter().copied());
            }
            use std::ptr::addr_of_mut;
            addr_of_mut!((*batch).images).write_unaligned(data.indices.len());
            addr_of_mut!((*batch).position).write_unaligned(position);
            addr_of_mut!((*batch).epoch).write_unaligned(position / i.batches_per_epoch);
            addr_of_mut!((*batch).labels_written).write_unaligned(want_labels);
            addr_of_mut!((*batch).tokens_written).write_unaligned(want_tokens);
        }
        state.position = position.wrapping_add(1);
        Ok(())
    })
}

/// Writes the global position of the next batch to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY` (another thread's call holds the loader).
///
/// # Safety
/// `loader` must be NULL or a live loader; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_get_position(loader: *const beit_loader, out: *mut u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (state, _) = unsafe { claim(loader, "beit_loader_get_position") }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises it is writable.
        unsafe { out.write_unaligned(state.position) };
        Ok(())
    })
}

/// Moves the loader to global position `position` (any value): the next `beit_loader_next`
/// gives the batch at that position, exactly as a loader that read its way there would (e.g.
/// the trainer's data position, `beit_trainer_get_data_position`, to resume a run).
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY` (another thread's call holds the loader).
///
/// # Safety
/// `loader` must be NULL or a live loader.
#[no_mangle]
pub unsafe extern "C" fn beit_loader_seek(loader: *mut beit_loader, position: u64) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let (mut state, _) = unsafe { claim(loader, "beit_loader_seek") }?;
        state.position = position;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{DatasetSpec, DatasetWriter};
    use crate::data::loader::Loader;
    use crate::ffi::context::{beit_context_create, beit_context_free, beit_context_options_default};
    use crate::ffi::model::{beit_model_create, beit_model_free};
    use crate::ffi::tokenizer::{beit_tokenizer_free, beit_tokenizer_load};
    use crate::model::{BeitConfig, MimTarget};
    use crate::train::recipes::pretrain::{PretrainData, PretrainDataOptions};
    use std::ffi::{CStr, CString};
    use std::path::PathBuf;

    /// A model for view 1 64x64 in 16x16 patches: a 4x4 grid, the grid of the test tokenizer
    /// (tests/reference_dvae/dalle_small: 32x32 RGB input, 96 tokens).
    const CONFIG: &str = r#"{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": 64, "patch_size": 16, "num_channels": 3, "vocab_size": 96,
        "use_mask_token": true}"#;
    const COUNT: usize = 11;

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated.
        unsafe { CStr::from_ptr(super::super::status::beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    fn tokenizer_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_dvae/dalle_small")
    }

    /// 11 RGB images of 24x20 with labels and a 4x4 token cache.
    fn write_dataset(dir: &Path) -> PathBuf {
        let path = dir.join("d.beitds");
        let spec =
            DatasetSpec { height: 24, width: 20, channels: 3, labels: true, masks: false, token_grid: Some((4, 4)) };
        let mut w = DatasetWriter::create(&path, spec).unwrap();
        for i in 0..COUNT {
            let px: Vec<u8> = (0..24 * 20 * 3).map(|k| ((k * 7 + i * 31) % 251) as u8).collect();
            let toks: Vec<u16> = (0..16).map(|k| ((i * 16 + k) % 96) as u16).collect();
            w.push(&px, Some(100 + i as u32), None, Some(&toks)).unwrap();
        }
        w.finish().unwrap();
        path
    }

    struct Handles {
        ctx: *mut beit_context,
        model: *mut beit_model,
        tokenizer: *mut beit_tokenizer,
    }

    impl Handles {
        fn new() -> Self {
            let mut ctx = std::ptr::null_mut();
            let mut o = beit_context_options_default();
            o.device = crate::ffi::context::RawDevice(crate::ffi::context::beit_device::BEIT_DEVICE_CPU as u32);
            o.num_threads = 2;
            assert_eq!(unsafe { beit_context_create(&o, &mut ctx) }, beit_status::BEIT_OK);
            let json = CString::new(CONFIG).unwrap();
            let mut model = std::ptr::null_mut();
            let arch = crate::ffi::model::RawArchitecture(
                crate::ffi::model::beit_architecture::BEIT_ARCH_MASKED_IMAGE_MODELING as u32,
            );
            assert_eq!(unsafe { beit_model_create(ctx, json.as_ptr(), arch, 1, &mut model) }, beit_status::BEIT_OK);
            let dir = CString::new(tokenizer_dir().to_str().unwrap()).unwrap();
            let mut tokenizer = std::ptr::null_mut();
            assert_eq!(unsafe { beit_tokenizer_load(ctx, dir.as_ptr(), &mut tokenizer) }, beit_status::BEIT_OK);
            Handles { ctx, model, tokenizer }
        }
    }

    impl Drop for Handles {
        fn drop(&mut self) {
            unsafe {
                beit_tokenizer_free(self.tokenizer);
                beit_model_free(self.model);
                beit_context_free(self.ctx);
            }
        }
    }

    fn create(h: &Handles, path: &Path, o: &beit_loader_options) -> Result<*mut beit_loader, (beit_status, String)> {
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut loader = std::ptr::null_mut();
        match unsafe { beit_loader_create(h.ctx, c.as_ptr(), o, &mut loader) } {
            beit_status::BEIT_OK => Ok(loader),
            status => {
                assert!(loader.is_null());
                Err((status, last_error()))
            }
        }
    }

    fn info(loader: *const beit_loader) -> beit_loader_info {
        let mut i = beit_loader_info_default();
        assert_eq!(unsafe { beit_loader_get_info(loader, &mut i) }, beit_status::BEIT_OK);
        i
    }

    /// One batch with every buffer given.
    #[derive(Debug, PartialEq)]
    struct Got {
        view1: Vec<f32>,
        view2: Vec<f32>,
        masks: Vec<u8>,
        labels: Vec<i64>,
        tokens: Vec<i64>,
        images: usize,
        position: u64,
        epoch: u64,
        labels_written: bool,
        tokens_written: bool,
    }

    fn next(loader: *mut beit_loader) -> Got {
        let i = info(loader);
        let mut g = Got {
            view1: vec![f32::NAN; i.view1_len],
            view2: vec![f32::NAN; i.view2_len],
            masks: vec![9; i.bool_masked_pos_len],
            labels: vec![-7; i.labels_len],
            tokens: vec![-7; i.tokens_len],
            images: 0,
            position: 0,
            epoch: 0,
            labels_written: false,
            tokens_written: false,
        };
        let mut b = beit_loader_batch_default();
        (b.view1, b.view1_len) = (g.view1.as_mut_ptr(), g.view1.len());
        (b.view2, b.view2_len) = (g.view2.as_mut_ptr(), g.view2.len());
        (b.bool_masked_pos, b.bool_masked_pos_len) = (g.masks.as_mut_ptr(), g.masks.len());
        if i.has_labels {
            (b.labels, b.labels_len) = (g.labels.as_mut_ptr(), g.labels.len());
        }
        if i.has_tokens {
            (b.tokens, b.tokens_len) = (g.tokens.as_mut_ptr(), g.tokens.len());
        }
        assert_eq!(unsafe { beit_loader_next(loader, &mut b) }, beit_status::BEIT_OK, "{}", last_error());
        (g.images, g.position, g.epoch, g.labels_written, g.tokens_written) =
            (b.images, b.position, b.epoch, b.labels_written, b.tokens_written);
        g
    }

    /// The batches the C loader gives the trainer (view 1, masks, tokens) are exactly those of
    /// `beit pretrain`'s data (`PretrainData`, the CLI's own code) for the same dataset, batch
    /// size, seed, masking and token source, across epochs, with another worker count, and
    /// after a seek back and forth; view 2 and the class labels are the library loader's for the
    /// same config and position.
    #[test]
    fn batches_equal_the_cli_pretraining_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_dataset(dir.path());
        let h = Handles::new();
        let cfg = BeitConfig::from_json_str(CONFIG).unwrap();
        let masked = default_masked_patches(cfg.native_grid());
        let cases = [
            ("cached", beit_token_source::BEIT_TOKENS_CACHED, MimTarget::VisualTokens, MaskingStrategy::Blockwise),
            ("augmented", beit_token_source::BEIT_TOKENS_TOKENIZER, MimTarget::VisualTokens, MaskingStrategy::Random),
            ("auto", beit_token_source::BEIT_TOKENS_NONE, MimTarget::Pixels, MaskingStrategy::Blockwise),
        ];
        for (tokens, source, target, masking) in cases {
            let seed = 5;
            let options = PretrainDataOptions {
                data: path.to_str().unwrap().into(),
                tokens: tokens.into(),
                tokenizer: (source == beit_token_source::BEIT_TOKENS_TOKENIZER).then(tokenizer_dir),
                masking,
                batch: 3,
                loader_workers: 1,
                seed,
            };
            let (mut cli, _) = PretrainData::open(&options, &cfg, masked, seed, target).unwrap();
            let PretrainData::Dataset(mim) = &cli else { panic!("a dataset run") };
            let reference_config = mim.loader().config().clone();

            let mut o = beit_loader_options_default();
            o.model = h.model;
            o.batch_size = 3;
            o.seed = seed;
            o.workers = 3;
            o.masking = RawMaskingStrategy::of(masking);
            o.token_source = RawTokenSource(source as u32);
            if source == beit_token_source::BEIT_TOKENS_TOKENIZER {
                o.tokenizer = h.tokenizer;
            }
            let loader = create(&h, &path, &o).unwrap();
            let i = info(loader);
            // 11 images in batches of 3, the last incomplete one dropped.
            assert_eq!((i.batches_per_epoch, i.batch_size, i.channels, i.height, i.width), (3, 3, 3, 64, 64));
            assert_eq!((i.grid_h, i.grid_w, i.num_patches, i.masked_patches), (4, 4, 16, masked));
            // View 2: the tokenizer's 32x32, which is also half of view 1.
            assert_eq!((i.view2_height, i.view2_width), (32, 32));
            assert_eq!((i.has_labels, i.has_tokens), (true, source != beit_token_source::BEIT_TOKENS_NONE));
            assert_eq!((i.view1_len, i.view2_len, i.bool_masked_pos_len), (3 * 3 * 64 * 64, 3 * 3 * 32 * 32, 48));
            let lib_loader = Loader::new(Arc::new(Dataset::open(&path).unwrap()), reference_config).unwrap();
            for p in 0..7u64 {
                let got = next(loader);
                let want = cli.batch_at(p, 3).unwrap();
                assert_eq!(want.shape, [3, 3, 64, 64]);
                assert_eq!((got.position, got.epoch, got.images), (p, p / 3, 3));
                assert!(got.view1 == want.pixels, "{tokens}: view 1 of batch {p}");
                assert_eq!(got.masks, want.bool_masked_pos, "{tokens}: masks of batch {p}");
                assert!(got.masks.chunks(16).all(|m| m.contains(&1)));
                if target == MimTarget::Pixels {
                    assert!(!got.tokens_written && got.tokens.is_empty() && want.labels.is_empty());
                } else {
                    assert!(got.tokens_written);
                    assert_eq!(got.tokens, want.labels, "{tokens}: tokens of batch {p}");
                }
                let reference = lib_loader.with_epoch(p / 3).unwrap().batch((p % 3) as usize);
                assert!(got.view2 == reference.view2, "{tokens}: view 2 of batch {p}");
                let labels: Vec<i64> = reference.labels.unwrap().into_iter().map(i64::from).collect();
                assert!(got.labels_written);
                assert_eq!(got.labels, labels);
                assert!(reference.indices.iter().zip(&labels).all(|(&k, &l)| l == 100 + k as i64));
            }
            // Seek back and forth: the batch at a position is the same whatever came before.
            for p in [4u64, 1, 6, 6, 0] {
                assert_eq!(unsafe { beit_loader_seek(loader, p) }, beit_status::BEIT_OK);
                let got = next(loader);
                let want = cli.batch_at(p, 3).unwrap();
                assert!(got.view1 == want.pixels && got.masks == want.bool_masked_pos, "{tokens}: seek to {p}");
                let mut pos = 0;
                assert_eq!(unsafe { beit_loader_get_position(loader, &mut pos) }, beit_status::BEIT_OK);
                assert_eq!(pos, p + 1);
            }
            unsafe { beit_loader_free(loader) };
        }
    }

    /// Without drop_last the last batch of an epoch is short: `images` says how many, the rest
    /// of each buffer is zero. epoch_start starts at that epoch's first batch.
    #[test]
    fn short_batches_and_epoch_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_dataset(dir.path());
        let h = Handles::new();
        let mut o = beit_loader_options_default();
        (o.image_height, o.image_width, o.patch_height, o.patch_width) = (32, 32, 8, 8);
        o.batch_size = 4;
        o.drop_last = false;
        o.epoch_start = 2;
        o.seed = 3;
        let loader = create(&h, &path, &o).unwrap();
        let i = info(loader);
        assert_eq!((i.batches_per_epoch, i.masked_patches, i.min_mask_block), (3, 6, 6));
        assert_eq!((i.view2_height, i.view2_width, i.has_tokens, i.tokens_len), (16, 16, false, 0));
        let first = next(loader);
        assert_eq!((first.position, first.epoch, first.images), (6, 2, 4));
        next(loader);
        let last = next(loader);
        assert_eq!((last.position, last.epoch, last.images), (8, 2, 3));
        let per = 3 * 32 * 32;
        assert!(last.view1[3 * per..].iter().all(|&v| v == 0.0) && last.view1[..3 * per].iter().any(|&v| v != 0.0));
        assert!(last.masks[3 * 16..].iter().all(|&v| v == 0) && last.labels[3] == 0);
        assert_eq!(next(loader).epoch, 3);
        unsafe { beit_loader_free(loader) };
    }

    #[test]
    fn bad_options_and_buffers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_dataset(dir.path());
        let h = Handles::new();
        let mut good = beit_loader_options_default();
        good.model = h.model;
        good.batch_size = 2;
        let refused = |o: beit_loader_options, status: beit_status, words: &[&str]| {
            let (got, msg) = create(&h, &path, &o).unwrap_err();
            assert_eq!(got, status, "{msg}");
            for w in words {
                assert!(msg.contains(w), "{msg} lacks {w}");
            }
        };
        use beit_status::*;
        refused(beit_loader_options { batch_size: 0, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["batch_size is 0"]);
        refused(
            beit_loader_options { batch_size: 12, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["fewer images than one batch"],
        );
        refused(
            beit_loader_options { image_height: 32, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["image_height is 32", "64"],
        );
        refused(
            beit_loader_options { model: std::ptr::null(), ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["image_height is 0"],
        );
        refused(beit_loader_options { masked_patches: 16, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["16 masked patches"]);
        refused(
            beit_loader_options { masking: RawMaskingStrategy(5), ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->masking 5"],
        );
        refused(
            beit_loader_options { token_source: RawTokenSource(3), ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["token_source 3"],
        );
        let tokenizer_source = RawTokenSource(beit_token_source::BEIT_TOKENS_TOKENIZER as u32);
        refused(
            beit_loader_options { token_source: tokenizer_source, ..good },
            BEIT_ERR_NULL_POINTER,
            &["opts->tokenizer"],
        );
        refused(
            beit_loader_options { tokenizer: h.tokenizer, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["opts->tokenizer is set"],
        );
        let cached = RawTokenSource(beit_token_source::BEIT_TOKENS_CACHED as u32);
        refused(
            beit_loader_options { token_source: cached, flip_prob: 0.5, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["whole"],
        );
        refused(beit_loader_options { crop_scale_min: 0.0, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["crop scale"]);
        refused(beit_loader_options { flip_prob: 1.5, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["flip"]);
        refused(beit_loader_options { color_jitter: 2.0, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["color_jitter"]);
        let mean = [0.5f32, 0.4];
        refused(
            beit_loader_options { mean: mean.as_ptr(), mean_len: 2, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["mean_len is 2"],
        );
        refused(
            beit_loader_options { mean: std::ptr::null(), mean_len: 3, ..good },
            BEIT_ERR_INVALID_ARGUMENT,
            &["mean is NULL"],
        );
        let zero = [0.0f32];
        refused(beit_loader_options { std: zero.as_ptr(), std_len: 1, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["std"]);
        refused(beit_loader_options { epoch_start: u64::MAX, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["epoch_start"]);
        refused(beit_loader_options { struct_size: 8, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["struct_size"]);
        refused(beit_loader_options { workers: 100_000, ..good }, BEIT_ERR_INVALID_ARGUMENT, &["worker"]);
        let c = CString::new(path.to_str().unwrap()).unwrap();
        let mut l = std::ptr::null_mut();
        assert_eq!(unsafe { beit_loader_create(std::ptr::null(), c.as_ptr(), &good, &mut l) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_loader_create(h.ctx, std::ptr::null(), &good, &mut l) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(
            unsafe { beit_loader_create(h.ctx, c.as_ptr(), &good, std::ptr::null_mut()) },
            BEIT_ERR_NULL_POINTER
        );
        let missing = CString::new(dir.path().join("missing").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { beit_loader_create(h.ctx, missing.as_ptr(), &good, &mut l) }, BEIT_ERR_IO);

        // Custom normalisation reaches view 1: mean 0, std 1 leaves the [0, 1] pixels.
        let (m0, s1) = ([0.0f32], [1.0f32]);
        let plain = beit_loader_options { mean: m0.as_ptr(), mean_len: 1, std: s1.as_ptr(), std_len: 1, ..good };
        let loader = create(&h, &path, &plain).unwrap();
        let got = next(loader);
        assert!(got.view1.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let reference = create(&h, &path, &good).unwrap();
        let want = next(reference);
        assert!(got.view1.iter().zip(&want.view1).all(|(&a, &b)| (b - (a - 0.5) / 0.5).abs() < 1e-6));

        // Wrong buffers: refused, nothing written, the position kept.
        let i = info(loader);
        let mut view1 = vec![1.5f32; i.view1_len + 1];
        let mut b = beit_loader_batch_default();
        (b.view1, b.view1_len) = (view1.as_mut_ptr(), i.view1_len + 1);
        assert_eq!(unsafe { beit_loader_next(loader, &mut b) }, BEIT_ERR_BUFFER_SIZE);
        let msg = last_error();
        assert!(
            msg.contains(&format!("view1_len is {}", i.view1_len + 1)) && msg.contains(&i.view1_len.to_string()),
            "{msg}"
        );
        (b.view1, b.view1_len) = (std::ptr::null_mut(), 5);
        assert_eq!(unsafe { beit_loader_next(loader, &mut b) }, BEIT_ERR_INVALID_ARGUMENT);
        b.view1_len = 0;
        let mut tokens = vec![3i64; 1];
        (b.tokens, b.tokens_len) = (tokens.as_mut_ptr(), 1); // no token source: left alone
        let mut labels = vec![3i64; 1];
        (b.labels, b.labels_len) = (labels.as_mut_ptr(), 1);
        assert_eq!(unsafe { beit_loader_next(loader, &mut b) }, BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("labels_len is 1"), "{}", last_error());
        b.struct_size = 8;
        assert_eq!(unsafe { beit_loader_next(loader, &mut b) }, BEIT_ERR_INVALID_ARGUMENT);
        assert!(view1.iter().all(|&v| v == 1.5) && labels == [3]);
        let mut pos = 9;
        assert_eq!(unsafe { beit_loader_get_position(loader, &mut pos) }, BEIT_OK);
        assert_eq!(pos, 1);
        assert_eq!(unsafe { beit_loader_next(loader, std::ptr::null_mut()) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_loader_next(std::ptr::null_mut(), &mut b) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_loader_seek(std::ptr::null_mut(), 0) }, BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_loader_get_position(loader, std::ptr::null_mut()) }, BEIT_ERR_NULL_POINTER);
        let mut small = beit_loader_info_default();
        small.struct_size = 4;
        assert_eq!(unsafe { beit_loader_get_info(loader, &mut small) }, BEIT_ERR_INVALID_ARGUMENT);
        // All buffers NULL: the batch is skipped, the position moves on.
        let mut skip = beit_loader_batch_default();
        assert_eq!(unsafe { beit_loader_next(loader, &mut skip) }, BEIT_OK);
        assert_eq!((skip.position, skip.images, skip.labels_written), (1, 2, false));
        unsafe {
            beit_loader_free(loader);
            beit_loader_free(reference);
            beit_loader_free(std::ptr::null_mut());
        }
    }
}
