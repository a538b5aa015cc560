//! `beit_model`: loading, creating, saving, describing and running a BEiT model.

use std::ffi::c_char;
use std::mem::{align_of, size_of};
use std::path::Path;
use std::sync::Mutex;

use super::context::{beit_context, context_ref};
use super::status::{
    beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut, utf8_arg, FfiError, FfiResult,
};
use crate::context::Device;
use crate::error::Result;
use crate::model::{Architecture, BeitConfig, ImageBatch, Model, OutputBuffers};
use crate::tensor::checked_numel;
use crate::train::gpu_inference::GpuInference;

/// Which Hugging Face class a model is (`architectures[0]` in its config.json).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_architecture {
    /// `BeitModel`: the backbone (+ pooler where configured); outputs `last_hidden_state` and,
    /// with a pooler, `pooler_output`. No logits.
    BEIT_ARCH_BACKBONE = 0,
    /// `BeitForMaskedImageModeling`: logits `[batch, patches, vocab_size]` over the visual
    /// vocabulary. No pooler.
    BEIT_ARCH_MASKED_IMAGE_MODELING = 1,
    /// `BeitForImageClassification`: logits `[batch, num_labels]`, plus the pooler output.
    BEIT_ARCH_IMAGE_CLASSIFICATION = 2,
    /// `BeitForSemanticSegmentation`: logits `[batch, num_labels, 4·H/patch, 4·W/patch]`.
    BEIT_ARCH_SEMANTIC_SEGMENTATION = 3,
}

/// A `beit_architecture` as C passes it in: any 32-bit value, checked before use. The header
/// shows it as `beit_architecture` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawArchitecture(pub u32);

impl RawArchitecture {
    fn to_architecture(self) -> FfiResult<Architecture> {
        match self.0 {
            0 => Ok(Architecture::Backbone),
            1 => Ok(Architecture::MaskedImageModeling),
            2 => Ok(Architecture::ImageClassification),
            3 => Ok(Architecture::SemanticSegmentation),
            other => Err(FfiError::invalid(format!(
                "arch {other} is not a beit_architecture (BEIT_ARCH_BACKBONE = 0, \
                 BEIT_ARCH_MASKED_IMAGE_MODELING = 1, BEIT_ARCH_IMAGE_CLASSIFICATION = 2, \
                 BEIT_ARCH_SEMANTIC_SEGMENTATION = 3)"
            ))),
        }
    }

    fn of(arch: Architecture) -> Self {
        RawArchitecture(match arch {
            Architecture::Backbone => beit_architecture::BEIT_ARCH_BACKBONE,
            Architecture::MaskedImageModeling => beit_architecture::BEIT_ARCH_MASKED_IMAGE_MODELING,
            Architecture::ImageClassification => beit_architecture::BEIT_ARCH_IMAGE_CLASSIFICATION,
            Architecture::SemanticSegmentation => beit_architecture::BEIT_ARCH_SEMANTIC_SEGMENTATION,
        } as u32)
    }
}

/// A BEiT model: config and parameters.
///
/// Thread safety: a model is immutable once created; many threads may run `beit_model_infer`
/// (and `beit_model_save`, `beit_model_get_info`, `beit_model_output_sizes`) on one model at the
/// same time, each with its own input and output buffers (and, for saves, its own directory:
/// two saves into one directory at once may fail with `BEIT_ERR_IO`). On a cuda context its
/// inference runs on the GPU, one call at a time (others wait). Free it only when no call
/// using it is running, and before the context it was created with.
#[allow(non_camel_case_types)]
pub struct beit_model {
    /// Private, and only ever lent out shared (`beit_model::model`): no C API call changes a
    /// model's parameters after creation (a trainer trains its own copy, and loading or
    /// creating makes a new model), which is what keeps `gpu` a faithful copy of them.
    inner: Model,
    /// The parameters on the GPU, uploaded by the model's first inference on a cuda context
    /// and reused by the next ones (an upload per call would cost more than the pass); freed
    /// with the model.
    gpu: Mutex<Option<GpuInference>>,
}

// The thread-safety promise above, checked by the compiler: nothing in a model changes after
// creation except its pool of inference workspaces and its GPU copy, which mutexes guard.
const _: () = super::status::assert_thread_safe::<beit_model>();

impl beit_model {
    fn new(inner: Model) -> Self {
        beit_model { inner, gpu: Mutex::new(None) }
    }

    /// The model (config and host parameters).
    pub(crate) fn model(&self) -> &Model {
        &self.inner
    }

    /// The inference pass on the GPU ([`GpuInference`], fp32: the CPU's forward to rounding),
    /// uploading the parameters on the first call. What the GPU pass does not run (a
    /// segmentation model, an image of another size than the configured one, a head dim other
    /// than 32 or 64) comes back as its `Unsupported` error: a cuda context never computes on
    /// the CPU instead.
    fn forward_on_gpu(&self, batch: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        let mut gpu = self.gpu.lock().unwrap_or_else(|poisoned| {
            // A panic inside a GPU pass (caught at the C boundary) may have left its memory
            // half planned: drop the copy, and let this call upload the parameters afresh.
            self.gpu.clear_poison();
            let mut gpu = poisoned.into_inner();
            *gpu = None;
            gpu
        });
        let gpu = match &mut *gpu {
            Some(gpu) => gpu,
            empty => empty.insert(GpuInference::fp32(&self.inner)?),
        };
        gpu.forward_into(batch, out)
    }
}

/// What a model is (filled by `beit_model_get_info`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_model_info {
    /// Set by the caller to `sizeof(beit_model_info)`; left as it is.
    pub struct_size: usize,
    /// The model's class.
    pub architecture: RawArchitecture,
    /// Width of every token (`hidden_size`).
    pub hidden_size: usize,
    /// Transformer blocks (`num_hidden_layers`).
    pub num_layers: usize,
    /// Attention heads per block (`num_attention_heads`).
    pub num_heads: usize,
    /// Width of the MLP (`intermediate_size`).
    pub intermediate_size: usize,
    /// The configured input height (`image_size`); other sizes may be run (see infer).
    pub image_height: usize,
    /// The configured input width (`image_size`).
    pub image_width: usize,
    /// Patch height (`patch_size`).
    pub patch_height: usize,
    /// Patch width (`patch_size`).
    pub patch_width: usize,
    /// Input channels (`num_channels`).
    pub num_channels: usize,
    /// Patches of an image of the configured size.
    pub num_patches: usize,
    /// The visual vocabulary (`vocab_size`): the logits width of a masked image modeling model.
    pub vocab_size: usize,
    /// Classes of an image classification or semantic segmentation model; 0 for the other
    /// architectures.
    pub num_labels: usize,
    /// Number of parameters (saved tensors' elements).
    pub num_parameters: u64,
    /// Whether the model has a mask token, i.e. accepts `bool_masked_pos`.
    pub has_mask_token: bool,
}

/// Lengths (in floats) of the outputs for one input size (filled by `beit_model_output_sizes`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_output_sizes {
    /// Set by the caller to `sizeof(beit_output_sizes)`; left as it is.
    pub struct_size: usize,
    /// `batch * num_tokens * hidden_size`.
    pub last_hidden_state_len: usize,
    /// `batch * hidden_size`, or 0 when the model has no pooler.
    pub pooler_output_len: usize,
    /// `batch * num_patches * vocab_size` (masked image modeling), `batch * num_labels`
    /// (classification), `batch * num_labels * 4·gh * 4·gw` for a `gh x gw` patch grid
    /// (segmentation), or 0 for a backbone.
    pub logits_len: usize,
    /// Tokens per image: `num_patches + 1` (the CLS token first).
    pub num_tokens: usize,
    /// Patches per image: `(height / patch_height) * (width / patch_width)`.
    pub num_patches: usize,
}

/// An input batch for `beit_model_infer`: caller-owned, read only during the call.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_image_batch {
    /// `sizeof(beit_image_batch)` as the caller compiled it.
    pub struct_size: usize,
    /// Pixel values, NCHW, f32, already normalised as the model expects. Required.
    pub pixels: *const f32,
    /// Floats at `pixels`; must equal `batch * channels * height * width`.
    pub pixels_len: usize,
    /// Images in the batch (at least 1).
    pub batch: usize,
    /// Channels per image; must equal the model's `num_channels`.
    pub channels: usize,
    /// Image height in pixels (at least one patch; a remainder that is not a whole patch is
    /// ignored).
    pub height: usize,
    /// Image width in pixels (at least one patch).
    pub width: usize,
    /// Optional `[batch, num_patches]` mask, 0 or 1 per patch: 1 replaces that patch's
    /// embedding by the mask token (models with a mask token only). NULL for none.
    pub bool_masked_pos: *const u8,
    /// Bytes at `bool_masked_pos`; must equal `batch * num_patches` (ignored when NULL).
    pub bool_masked_pos_len: usize,
}

/// Caller-owned destinations for `beit_model_infer`. A NULL pointer means that output is not
/// wanted (its length is then ignored); a non-NULL one must have exactly the length that
/// `beit_model_output_sizes` gives. Buffers must not overlap each other or the input.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_infer_outputs {
    /// `sizeof(beit_infer_outputs)` as the caller compiled it.
    pub struct_size: usize,
    /// `[batch, num_tokens, hidden_size]`, what HF `BeitModel` returns as `last_hidden_state`.
    pub last_hidden_state: *mut f32,
    /// Floats at `last_hidden_state`.
    pub last_hidden_state_len: usize,
    /// `[batch, hidden_size]` (models with a pooler only).
    pub pooler_output: *mut f32,
    /// Floats at `pooler_output`.
    pub pooler_output_len: usize,
    /// `[batch, num_patches, vocab_size]`, `[batch, num_labels]` or (segmentation)
    /// `[batch, num_labels, 4·gh, 4·gw]` (not for a backbone).
    pub logits: *mut f32,
    /// Floats at `logits`.
    pub logits_len: usize,
}

const MODEL_INFO_V1_SIZE: usize = size_of::<beit_model_info>();
const OUTPUT_SIZES_V1_SIZE: usize = size_of::<beit_output_sizes>();
const IMAGE_BATCH_V1_SIZE: usize = size_of::<beit_image_batch>();
const INFER_OUTPUTS_V1_SIZE: usize = size_of::<beit_infer_outputs>();

/// A zeroed `beit_model_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_model_info_default() -> beit_model_info {
    beit_model_info {
        struct_size: size_of::<beit_model_info>(),
        architecture: RawArchitecture(0),
        hidden_size: 0,
        num_layers: 0,
        num_heads: 0,
        intermediate_size: 0,
        image_height: 0,
        image_width: 0,
        patch_height: 0,
        patch_width: 0,
        num_channels: 0,
        num_patches: 0,
        vocab_size: 0,
        num_labels: 0,
        num_parameters: 0,
        has_mask_token: false,
    }
}

/// A zeroed `beit_output_sizes` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_output_sizes_default() -> beit_output_sizes {
    beit_output_sizes {
        struct_size: size_of::<beit_output_sizes>(),
        last_hidden_state_len: 0,
        pooler_output_len: 0,
        logits_len: 0,
        num_tokens: 0,
        num_patches: 0,
    }
}

/// An empty `beit_image_batch` (NULL pointers, zero sizes) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_image_batch_default() -> beit_image_batch {
    beit_image_batch {
        struct_size: size_of::<beit_image_batch>(),
        pixels: std::ptr::null(),
        pixels_len: 0,
        batch: 0,
        channels: 0,
        height: 0,
        width: 0,
        bool_masked_pos: std::ptr::null(),
        bool_masked_pos_len: 0,
    }
}

/// A `beit_infer_outputs` requesting nothing (NULL pointers) with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_infer_outputs_default() -> beit_infer_outputs {
    beit_infer_outputs {
        struct_size: size_of::<beit_infer_outputs>(),
        last_hidden_state: std::ptr::null_mut(),
        last_hidden_state_len: 0,
        pooler_output: std::ptr::null_mut(),
        pooler_output_len: 0,
        logits: std::ptr::null_mut(),
        logits_len: 0,
    }
}

/// The handle behind a pointer, or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `model` must be NULL or a live model.
pub(crate) unsafe fn handle_ref<'a>(model: *const beit_model) -> FfiResult<&'a beit_model> {
    let model = non_null(model, "model")?;
    // SAFETY: non-NULL; the caller promises a live model (shared use is fine: see beit_model).
    Ok(unsafe { &*model })
}

/// The model behind a handle, or `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `model` must be NULL or a live model.
unsafe fn model_ref<'a>(model: *const beit_model) -> FfiResult<&'a Model> {
    // SAFETY: the caller's promise, passed on.
    Ok(unsafe { handle_ref(model) }?.model())
}

/// Hands a new model to the caller through `out`.
///
/// # Safety
/// `out` must be non-NULL and writable.
pub(super) unsafe fn hand_out(model: Model, out: *mut *mut beit_model) {
    let handle = Box::into_raw(Box::new(beit_model::new(model)));
    // SAFETY: the caller checked `out`.
    unsafe { out.write(handle) };
}

/// Writes the fields after `struct_size` of `value` into the caller's struct, keeping its
/// `struct_size` and whatever lies beyond the fields this version knows.
///
/// # Safety
/// `dst` must be writable for `caller_size` bytes, and `caller_size >= size_of::<usize>()`.
pub(crate) unsafe fn write_versioned<T: Copy>(dst: *mut T, value: &T, caller_size: usize) {
    let n = caller_size.min(size_of::<T>());
    let skip = size_of::<usize>();
    if n > skip {
        // SAFETY: both ranges are valid for `n - skip` bytes past the leading size_t; a byte
        // copy carries padding along without reading it as a typed value.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (value as *const T as *const u8).add(skip),
                (dst as *mut u8).add(skip),
                n - skip,
            )
        };
    }
}

/// Loads a Hugging Face model directory (`config.json` + `model.safetensors`). The class comes
/// from `architectures` in config.json (`BeitModel` when absent). Files are fully validated:
/// a truncated or corrupt file, a missing tensor or a shape that does not fit the config is an
/// error, never a crash. On success `*out` receives a model to release with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (dir not UTF-8), `BEIT_ERR_IO`
/// (missing or unreadable files), `BEIT_ERR_FORMAT` (bad JSON or safetensors),
/// `BEIT_ERR_CONFIG`, `BEIT_ERR_UNSUPPORTED` (an architecture or activation not supported).
///
/// # Safety
/// `ctx` must be NULL or a live context; `dir` NULL or a NUL-terminated string; `out` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_load(
    ctx: *mut beit_context,
    dir: *const c_char,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all three): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let dir = unsafe { utf8_arg(dir, "dir") }?;
        let out = non_null_mut(out, "out")?;
        let model = ctx.run(|| Model::load(Path::new(dir)))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out(model, out) };
        Ok(())
    })
}

/// Creates a model with BEiT's random initialisation, reproducible from `seed`, from the text
/// of a Hugging Face config.json (`"{}"` gives BEiT-base defaults). `arch` decides the class;
/// the config's own `architectures` entry is replaced by it. On success `*out` receives a
/// model to release with `beit_model_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (not UTF-8, unknown `arch`),
/// `BEIT_ERR_FORMAT` (not JSON, wrong field types), `BEIT_ERR_CONFIG` (e.g. hidden_size not a
/// multiple of num_attention_heads), `BEIT_ERR_UNSUPPORTED`.
///
/// # Safety
/// `ctx` must be NULL or a live context; `config_json` NULL or a NUL-terminated string; `out`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_create(
    ctx: *mut beit_context,
    config_json: *const c_char,
    arch: RawArchitecture,
    seed: u64,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (all three): the caller's promises above; each helper checks for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let json = unsafe { utf8_arg(config_json, "config_json") }?;
        let out = non_null_mut(out, "out")?;
        let arch = arch.to_architecture()?;
        let config = BeitConfig::from_json_str(json)?;
        let model = ctx.run(|| Model::new_random(config, arch, seed))?;
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { hand_out(model, out) };
        Ok(())
    })
}

/// Saves a model as a Hugging Face directory (`config.json` + `model.safetensors`) that
/// `transformers` `from_pretrained` and `beit_model_load` read. The directory is created if
/// needed; each file is replaced atomically, so a failed save leaves a previous save in `dir`
/// loadable.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (dir not UTF-8), `BEIT_ERR_IO`.
///
/// # Safety
/// `model` must be NULL or a live model; `dir` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn beit_model_save(model: *const beit_model, dir: *const c_char) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises above; each helper checks for NULL.
        let model = unsafe { model_ref(model) }?;
        let dir = unsafe { utf8_arg(dir, "dir") }?;
        model.save(Path::new(dir))?;
        Ok(())
    })
}

/// Frees a model made by `beit_model_load` or `beit_model_create`. NULL is a no-op.
///
/// # Safety
/// `model` must be NULL or a model not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_model_free(model: *mut beit_model) {
    guard_infallible((), || {
        if !model.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// Describes a model. Set `out->struct_size` first (or start from
/// `beit_model_info_default()`); fields this version does not know are left untouched.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (struct_size).
///
/// # Safety
/// `model` must be NULL or a live model; `out` NULL or writable for `out->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_model_get_info(model: *const beit_model, out: *mut beit_model_info) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; model_ref checks for NULL.
        let m = unsafe { model_ref(model) }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", MODEL_INFO_V1_SIZE) }?;
        let info = model_info(m, size);
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &info, size) };
        Ok(())
    })
}

/// What `m` is, as `beit_model_info` (with `struct_size` set to `struct_size`).
pub(crate) fn model_info(m: &Model, struct_size: usize) -> beit_model_info {
    let c = m.config();
    let (image_height, image_width) = c.image_size.hw();
    let (patch_height, patch_width) = c.patch_size.hw();
    let (gh, gw) = c.native_grid();
    beit_model_info {
        struct_size,
        architecture: RawArchitecture::of(m.architecture()),
        hidden_size: c.hidden_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        intermediate_size: c.intermediate_size,
        image_height,
        image_width,
        patch_height,
        patch_width,
        num_channels: c.num_channels,
        num_patches: gh * gw,
        vocab_size: c.vocab_size,
        num_labels: match m.architecture() {
            Architecture::ImageClassification | Architecture::SemanticSegmentation => c.num_labels(),
            Architecture::Backbone | Architecture::MaskedImageModeling => 0,
        },
        num_parameters: m.params().count() as u64,
        has_mask_token: m.has_mask_token(),
    }
}

/// Output lengths of a model for `batch` images of `height` x `width`, and the checks on
/// those sizes.
fn output_sizes(m: &Model, batch: usize, height: usize, width: usize) -> FfiResult<beit_output_sizes> {
    let (ph, pw) = m.config().patch_size.hw();
    if batch == 0 {
        return Err(FfiError::invalid("batch size must be at least 1"));
    }
    if height < ph || width < pw {
        return Err(FfiError::invalid(format!("image of {height}x{width} is smaller than one {ph}x{pw} patch")));
    }
    if height > 1 << 16 || width > 1 << 16 {
        return Err(FfiError::invalid(format!("image of {height}x{width} is too large")));
    }
    let shapes = m.output_shapes(batch, height, width);
    let numel = |shape: &[usize]| {
        checked_numel(shape).ok_or_else(|| FfiError::invalid(format!("output shape {shape:?} is too large")))
    };
    Ok(beit_output_sizes {
        struct_size: size_of::<beit_output_sizes>(),
        last_hidden_state_len: numel(&shapes.last_hidden_state)?,
        pooler_output_len: shapes.pooler_output.as_deref().map(numel).transpose()?.unwrap_or(0),
        logits_len: shapes.logits.as_deref().map(numel).transpose()?.unwrap_or(0),
        num_tokens: shapes.last_hidden_state[1],
        num_patches: shapes.last_hidden_state[1] - 1,
    })
}

/// Lengths (in floats) of the outputs `beit_model_infer` writes for `batch` images of
/// `height` x `width` pixels: what to allocate. Set `out->struct_size` first (or start from
/// `beit_output_sizes_default()`). `beit_model_infer` may still reject a size this accepts
/// (e.g. a grid that absolute position embeddings cannot be resized to).
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (batch 0, an image smaller than a
/// patch, sizes too large, struct_size).
///
/// # Safety
/// `model` must be NULL or a live model; `out` NULL or writable for `out->struct_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn beit_model_output_sizes(
    model: *const beit_model,
    batch: usize,
    height: usize,
    width: usize,
    out: *mut beit_output_sizes,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; model_ref checks for NULL.
        let m = unsafe { model_ref(model) }?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes.
        let size = unsafe { check_struct_size(out, "out", OUTPUT_SIZES_V1_SIZE) }?;
        let sizes = output_sizes(m, batch, height, width)?;
        // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
        unsafe { write_versioned(out, &sizes, size) };
        Ok(())
    })
}

/// A caller's buffer: where, how many elements, and its name for messages.
struct Region {
    name: &'static str,
    start: usize,
    bytes: usize,
}

impl Region {
    fn of<T>(name: &'static str, ptr: *const T, len: usize) -> Region {
        Region { name, start: ptr as usize, bytes: len.saturating_mul(size_of::<T>()) }
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.bytes > 0
            && other.bytes > 0
            && self.start < other.start.saturating_add(other.bytes)
            && other.start < self.start.saturating_add(self.bytes)
    }
}

/// Checks that `len` elements at `ptr` can be a Rust slice: aligned, and not larger than
/// `isize::MAX` bytes.
pub(crate) fn check_slice<T>(ptr: *const T, len: usize, name: &str) -> FfiResult<()> {
    if !(ptr as usize).is_multiple_of(align_of::<T>()) {
        return Err(FfiError::invalid(format!("{name} is not aligned to {} bytes", align_of::<T>())));
    }
    if len.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(FfiError::invalid(format!("{name}_len = {len} is larger than any buffer can be")));
    }
    Ok(())
}

/// Runs a model on a batch of images inside the context's thread pool, writing the requested
/// outputs into the caller's buffers (see `beit_infer_outputs`). At least one output must be
/// requested. Every argument is checked before anything runs; on an error nothing is written.
///
/// On a cuda context the pass runs on the GPU (fp32, the CPU's outputs to rounding), with the
/// model's parameters uploaded by its first call there and kept until `beit_model_free`. It
/// runs the backbone, masked image modeling and classification models at their configured
/// image size, with a head dim (`hidden_size / num_heads`) of 32 or 64; anything else is
/// `BEIT_ERR_UNSUPPORTED` there, never computed on the CPU instead.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (ctx, model, input, outputs, input->pixels),
/// `BEIT_ERR_INVALID_ARGUMENT` (struct_size, shape, channel count, image smaller than a patch,
/// pixels_len, bool_masked_pos length or values, an output this model does not have, nothing
/// requested, overlapping buffers), `BEIT_ERR_BUFFER_SIZE` (an output buffer of the wrong
/// length), `BEIT_ERR_UNSUPPORTED` (a size the position embeddings cannot be resized to; on a
/// cuda context, what the GPU pass does not run, above).
///
/// Thread safety: any number of threads may call this at once with the same model and context
/// (on a cuda context they take turns on the GPU).
///
/// # Safety
/// `ctx` and `model` must be NULL or live handles; `input` and `outputs` NULL or readable for
/// their `struct_size`; every non-NULL buffer must hold its stated length and stay valid, and
/// the output buffers unaliased, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn beit_model_infer(
    ctx: *mut beit_context,
    model: *const beit_model,
    input: *const beit_image_batch,
    outputs: *const beit_infer_outputs,
) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let ctx = unsafe { context_ref(ctx, "ctx") }?;
        let handle = unsafe { handle_ref(model) }?;
        let m = handle.model();
        let input = non_null(input, "input")?;
        let outputs = non_null(outputs, "outputs")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, which
        // check_struct_size makes sure cover the fields of the first version read here.
        let (input, outputs) = unsafe {
            check_struct_size(input, "input", IMAGE_BATCH_V1_SIZE)?;
            check_struct_size(outputs, "outputs", INFER_OUTPUTS_V1_SIZE)?;
            (input.read_unaligned(), outputs.read_unaligned())
        };

        non_null(input.pixels, "input->pixels")?;
        check_slice(input.pixels, input.pixels_len, "input->pixels")?;
        let mask_given = !input.bool_masked_pos.is_null();
        if mask_given {
            check_slice(input.bool_masked_pos, input.bool_masked_pos_len, "input->bool_masked_pos")?;
        }
        // SAFETY: non-NULL, aligned, size checked; the caller promises pixels_len readable
        // floats (and bool_masked_pos_len bytes) that nobody writes during the call.
        let pixels = unsafe { std::slice::from_raw_parts(input.pixels, input.pixels_len) };
        let mask =
            mask_given.then(|| unsafe { std::slice::from_raw_parts(input.bool_masked_pos, input.bool_masked_pos_len) });
        let batch = ImageBatch {
            pixels,
            batch: input.batch,
            channels: input.channels,
            height: input.height,
            width: input.width,
            bool_masked_pos: mask,
        };
        m.check_input(&batch)?;
        let sizes = output_sizes(m, input.batch, input.height, input.width)?;

        let requested = [
            (
                "last_hidden_state",
                outputs.last_hidden_state,
                outputs.last_hidden_state_len,
                sizes.last_hidden_state_len,
            ),
            ("pooler_output", outputs.pooler_output, outputs.pooler_output_len, sizes.pooler_output_len),
            ("logits", outputs.logits, outputs.logits_len, sizes.logits_len),
        ];
        let mut regions = vec![Region::of("input->pixels", input.pixels, input.pixels_len)];
        if let Some(mask) = mask {
            regions.push(Region::of("input->bool_masked_pos", mask.as_ptr(), mask.len()));
        }
        let inputs = regions.len();
        for &(name, ptr, len, want) in &requested {
            if ptr.is_null() {
                continue;
            }
            if want == 0 {
                return Err(FfiError::invalid(format!(
                    "outputs->{name} was requested, but this {} model has no {name} output",
                    m.architecture().hf_name()
                )));
            }
            if len != want {
                return Err(FfiError::buffer_size(format!(
                    "outputs->{name}_len is {len}, but {name} for this input needs {want} floats"
                )));
            }
            check_slice(ptr as *const f32, len, &format!("outputs->{name}"))?;
            regions.push(Region::of(
                match name {
                    "last_hidden_state" => "outputs->last_hidden_state",
                    "pooler_output" => "outputs->pooler_output",
                    _ => "outputs->logits",
                },
                ptr as *const f32,
                len,
            ));
        }
        if regions.len() == inputs {
            return Err(FfiError::invalid(
                "outputs requests nothing: set at least one of last_hidden_state, pooler_output, logits",
            ));
        }
        for i in inputs..regions.len() {
            for j in 0..i {
                if regions[i].overlaps(&regions[j]) {
                    return Err(FfiError::invalid(format!(
                        "{} overlaps {}; output buffers must not alias each other or the input",
                        regions[i].name, regions[j].name
                    )));
                }
            }
        }

        // SAFETY: each non-NULL pointer is aligned, holds exactly the checked length (the
        // caller's promise), and overlaps no other buffer of this call.
        let slice =
            |ptr: *mut f32, len: usize| (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(ptr, len) });
        let buffers = OutputBuffers {
            last_hidden_state: slice(outputs.last_hidden_state, outputs.last_hidden_state_len),
            pooler_output: slice(outputs.pooler_output, outputs.pooler_output_len),
            logits: slice(outputs.logits, outputs.logits_len),
        };
        match ctx.device() {
            // Outside the pool: the GPU pass makes no host allocation that the budget covers,
            // and the calls take turns on the model's GPU copy, so a pool thread waiting for
            // it would idle rather than serve the context's CPU passes.
            Device::Cuda => handle.forward_on_gpu(&batch, buffers)?,
            Device::Cpu | Device::Auto => ctx.run(|| m.forward_into(&batch, buffers))?,
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::context::{beit_context_create, beit_context_free, beit_context_options_default};
    use std::ffi::{CStr, CString};
    use std::ptr;

    const TINY: &str = r#"{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 8, "patch_size": 4, "vocab_size": 5,
        "use_mask_token": true, "use_shared_relative_position_bias": true}"#;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(crate::ffi::status::beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    fn context() -> *mut beit_context {
        let mut opts = beit_context_options_default();
        opts.num_threads = 2;
        let mut ctx = ptr::null_mut();
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK);
        ctx
    }

    fn create(ctx: *mut beit_context, json: &str, arch: beit_architecture) -> (beit_status, *mut beit_model) {
        let json = CString::new(json).unwrap();
        let mut model = ptr::null_mut();
        let status = unsafe { beit_model_create(ctx, json.as_ptr(), RawArchitecture(arch as u32), 7, &mut model) };
        (status, model)
    }

    #[test]
    fn create_describe_infer() {
        let ctx = context();
        let (status, model) = create(ctx, TINY, beit_architecture::BEIT_ARCH_MASKED_IMAGE_MODELING);
        assert_eq!(status, beit_status::BEIT_OK, "{}", last_error());

        let mut info = beit_model_info_default();
        assert_eq!(unsafe { beit_model_get_info(model, &mut info) }, beit_status::BEIT_OK);
        assert_eq!(info.struct_size, size_of::<beit_model_info>());
        assert_eq!(info.architecture, RawArchitecture(1));
        assert_eq!((info.hidden_size, info.num_heads, info.num_patches, info.vocab_size), (8, 2, 4, 5));
        assert!(info.has_mask_token);
        assert!(info.num_parameters > 0);

        let mut sizes = beit_output_sizes_default();
        assert_eq!(unsafe { beit_model_output_sizes(model, 2, 8, 8, &mut sizes) }, beit_status::BEIT_OK);
        assert_eq!((sizes.num_tokens, sizes.num_patches), (5, 4));
        assert_eq!((sizes.last_hidden_state_len, sizes.pooler_output_len, sizes.logits_len), (80, 0, 40));

        let pixels: Vec<f32> = (0..2 * 3 * 64).map(|i| (i as f32 * 0.01).sin()).collect();
        let mut input = beit_image_batch_default();
        input.pixels = pixels.as_ptr();
        input.pixels_len = pixels.len();
        (input.batch, input.channels, input.height, input.width) = (2, 3, 8, 8);
        let mut logits = vec![f32::NAN; 40];
        let mut outputs = beit_infer_outputs_default();
        outputs.logits = logits.as_mut_ptr();
        outputs.logits_len = logits.len();
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &outputs) }, beit_status::BEIT_OK, "{}", last_error());
        assert!(logits.iter().all(|v| v.is_finite()));

        outputs.logits_len = 39;
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &outputs) }, beit_status::BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("39") && last_error().contains("40"), "{}", last_error());

        // Overlapping outputs are refused.
        let mut shared = vec![0f32; 120];
        outputs.logits = shared.as_mut_ptr();
        outputs.logits_len = 40;
        outputs.last_hidden_state = unsafe { shared.as_mut_ptr().add(20) };
        outputs.last_hidden_state_len = 80;
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &outputs) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("overlaps"), "{}", last_error());

        unsafe { beit_model_free(model) };
        unsafe { beit_model_free(ptr::null_mut()) };
        unsafe { beit_context_free(ctx) };
    }

    #[test]
    fn bad_arguments() {
        let ctx = context();
        let (status, model) = create(ctx, TINY, beit_architecture::BEIT_ARCH_BACKBONE);
        assert_eq!(status, beit_status::BEIT_OK);
        let json = CString::new(TINY).unwrap();
        let mut out = ptr::null_mut();
        let bad_arch = unsafe { beit_model_create(ctx, json.as_ptr(), RawArchitecture(9), 1, &mut out) };
        assert_eq!(bad_arch, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(out.is_null());
        let (status, _) =
            create(ctx, r#"{"hidden_size": 10, "num_attention_heads": 3}"#, beit_architecture::BEIT_ARCH_BACKBONE);
        assert_eq!(status, beit_status::BEIT_ERR_CONFIG);
        let (status, _) = create(ctx, "{not json", beit_architecture::BEIT_ARCH_BACKBONE);
        assert_eq!(status, beit_status::BEIT_ERR_FORMAT);
        let non_utf8 = [0xffu8, 0xfe, 0];
        let status = unsafe { beit_model_create(ctx, non_utf8.as_ptr().cast(), RawArchitecture(0), 1, &mut out) };
        assert_eq!(status, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("UTF-8"));
        let status = unsafe { beit_model_create(ptr::null_mut(), json.as_ptr(), RawArchitecture(0), 1, &mut out) };
        assert_eq!(status, beit_status::BEIT_ERR_NULL_POINTER);
        assert_eq!(last_error(), "ctx is NULL");

        let mut info = beit_model_info_default();
        info.struct_size = 8;
        assert_eq!(unsafe { beit_model_get_info(model, &mut info) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert_eq!(info.hidden_size, 0, "nothing written on failure");

        let mut sizes = beit_output_sizes_default();
        assert_eq!(
            unsafe { beit_model_output_sizes(model, 1, 3, 8, &mut sizes) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { beit_model_output_sizes(model, 0, 8, 8, &mut sizes) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { beit_model_output_sizes(model, usize::MAX / 2, 8, 8, &mut sizes) },
            beit_status::BEIT_ERR_INVALID_ARGUMENT
        );

        // A misaligned pixel pointer is refused, not turned into an unaligned slice.
        let pixels = vec![0f32; 3 * 64 + 1];
        let mut input = beit_image_batch_default();
        input.pixels = unsafe { (pixels.as_ptr() as *const u8).add(1) } as *const f32;
        input.pixels_len = 3 * 64;
        (input.batch, input.channels, input.height, input.width) = (1, 3, 8, 8);
        let mut hidden = vec![0f32; 40];
        let mut outputs = beit_infer_outputs_default();
        outputs.last_hidden_state = hidden.as_mut_ptr();
        outputs.last_hidden_state_len = hidden.len();
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &outputs) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("aligned"), "{}", last_error());
        input.pixels = pixels.as_ptr();
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &outputs) }, beit_status::BEIT_OK, "{}", last_error());
        let none = beit_infer_outputs_default();
        assert_eq!(unsafe { beit_model_infer(ctx, model, &input, &none) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("requests nothing"));

        unsafe { beit_model_free(model) };
        unsafe { beit_context_free(ctx) };
    }
}
