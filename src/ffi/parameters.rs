//! Parameters by name, in memory: list a model's or a trainer's parameters (Hugging Face names,
//! shapes, and places in the flat buffer the gradients share), read them, set them, copy them
//! between models, and take a trainer's model as a model handle. Wraps
//! [`crate::model::param_store::ParamStore`] and [`crate::train::trainer::Trainer`].

use std::ffi::c_char;
use std::mem::size_of;

use super::model::check_slice;
use super::model::{beit_model, hand_out, handle_ref, write_versioned};
use super::status::{beit_status, check_struct_size, guard, non_null_mut, utf8_arg, FfiError, FfiResult};
use super::trainer::{beit_trainer, claim, copy_model};
use crate::model::param_store::{ParamSpec, ParamStore};
use crate::model::Model;
use crate::train::trainer::Trainer;

/// The longest name `beit_parameter_info.name` holds, with its NUL.
pub const BEIT_PARAMETER_NAME_CAPACITY: usize = 256;
/// The most dimensions `beit_parameter_info.shape` holds.
pub const BEIT_PARAMETER_MAX_DIMS: usize = 8;

/// One parameter (`beit_model_parameter_info`, `beit_trainer_parameter_info`). Set
/// `struct_size` (or start from `beit_parameter_info_default()`).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_parameter_info {
    /// Set by the caller to `sizeof(beit_parameter_info)`; left as it is.
    pub struct_size: usize,
    /// The Hugging Face name (as in `model.safetensors`), NUL-terminated.
    pub name: [c_char; BEIT_PARAMETER_NAME_CAPACITY],
    /// Dimensions used in `shape`.
    pub ndim: usize,
    /// The shape, outermost first; entries past `ndim` are 0.
    pub shape: [usize; BEIT_PARAMETER_MAX_DIMS],
    /// Values: the product of the shape.
    pub numel: usize,
    /// Where the values start (in floats) in the flat parameter buffer, which the gradient
    /// buffer of `beit_trainer_get_gradients` shares.
    pub offset: usize,
}

const PARAMETER_INFO_V1_SIZE: usize = size_of::<beit_parameter_info>();

/// An empty `beit_parameter_info` with `struct_size` set.
#[no_mangle]
pub extern "C" fn beit_parameter_info_default() -> beit_parameter_info {
    beit_parameter_info {
        struct_size: size_of::<beit_parameter_info>(),
        name: [0; BEIT_PARAMETER_NAME_CAPACITY],
        ndim: 0,
        shape: [0; BEIT_PARAMETER_MAX_DIMS],
        numel: 0,
        offset: 0,
    }
}

/// Writes the number of parameters of `store` to `out`.
///
/// # Safety
/// `out` must be NULL or writable.
unsafe fn write_count(store: &ParamStore, out: *mut usize) -> FfiResult<()> {
    let out = non_null_mut(out, "out")?;
    // SAFETY: non-NULL; the caller promises it is writable.
    unsafe { out.write_unaligned(store.exported().count()) };
    Ok(())
}

/// Describes parameter `index` of `store` into the caller's struct.
///
/// # Safety
/// `out` must be NULL or writable for its `struct_size`.
unsafe fn write_info(store: &ParamStore, index: usize, out: *mut beit_parameter_info) -> FfiResult<()> {
    let out = non_null_mut(out, "out")?;
    // SAFETY: non-NULL; the caller promises struct_size readable bytes.
    let size = unsafe { check_struct_size(out, "out", PARAMETER_INFO_V1_SIZE) }?;
    let count = store.exported().count();
    let spec: &ParamSpec = store
        .exported()
        .nth(index)
        .ok_or_else(|| FfiError::invalid(format!("index {index} is past the last parameter ({count} in all)")))?;
    let mut info = beit_parameter_info { struct_size: size, ..beit_parameter_info_default() };
    let name = spec.name.as_bytes();
    if name.len() >= BEIT_PARAMETER_NAME_CAPACITY || spec.shape.len() > BEIT_PARAMETER_MAX_DIMS {
        return Err(FfiError::new(
            beit_status::BEIT_ERR_INTERNAL,
            format!("parameter {} (shape {:?}) does not fit beit_parameter_info", spec.name, spec.shape),
        ));
    }
    for (dst, &b) in info.name.iter_mut().zip(name) {
        *dst = b as c_char;
    }
    info.ndim = spec.shape.len();
    info.shape[..spec.shape.len()].copy_from_slice(&spec.shape);
    info.numel = spec.len;
    info.offset = spec.offset;
    // SAFETY: `out` is writable for `size` bytes, `size` >= the v1 size.
    unsafe { write_versioned(out, &info, size) };
    Ok(())
}

/// The caller's output buffer of `len` floats, checked against parameter `name`'s size.
///
/// # Safety
/// `out` must be NULL or writable for `len` floats.
unsafe fn copy_named_out(store: &ParamStore, name: &str, values: &[f32], out: *mut f32, len: usize) -> FfiResult<()> {
    let out = non_null_mut(out, "out")?;
    if len != values.len() {
        let shape = &store.specs[store.find_exported(name)?.0].shape;
        return Err(FfiError::buffer_size(format!(
            "out_len is {len}, but {name} (shape {shape:?}) holds {} values",
            values.len()
        )));
    }
    check_slice(out as *const f32, len, "out")?;
    // SAFETY: non-NULL, aligned, and the caller promises `len` writable floats.
    unsafe { std::slice::from_raw_parts_mut(out, len) }.copy_from_slice(values);
    Ok(())
}

/// The caller's `len` input floats.
///
/// # Safety
/// `values` must be NULL or readable for `len` floats, unwritten during the call.
unsafe fn input_values<'a>(values: *const f32, len: usize) -> FfiResult<&'a [f32]> {
    super::status::non_null(values, "values")?;
    check_slice(values, len, "values")?;
    // SAFETY: non-NULL, aligned, and the caller promises `len` readable floats.
    Ok(unsafe { std::slice::from_raw_parts(values, len) })
}

/// Writes how many parameters `model` has (its Hugging Face tensors) to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`.
///
/// # Safety
/// `model` must be NULL or a live model; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_model_parameter_count(model: *const beit_model, out: *mut usize) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let handle = unsafe { handle_ref(model) }?;
        unsafe { write_count(handle.model().params(), out) }
    })
}

/// Describes parameter `index` (0 .. count-1, in the model's layout order) of `model`: name,
/// shape, size and offset in the flat buffer.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (struct_size; index past the end).
///
/// # Safety
/// `model` must be NULL or a live model; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_model_parameter_info(
    model: *const beit_model,
    index: usize,
    out: *mut beit_parameter_info,
) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let handle = unsafe { handle_ref(model) }?;
        unsafe { write_info(handle.model().params(), index, out) }
    })
}

/// Copies the values of parameter `name` (a Hugging Face name, e.g.
/// `beit.encoder.layer.0.attention.attention.query.weight`) of `model` into `out`, which holds
/// `out_len` floats: exactly the parameter's size.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (name not UTF-8, no such
/// parameter), `BEIT_ERR_BUFFER_SIZE` (out_len is not the parameter's size).
///
/// # Safety
/// `model` must be NULL or a live model; `name` NULL or a NUL-terminated string; `out` NULL or
/// writable for `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn beit_model_get_parameter(
    model: *const beit_model,
    name: *const c_char,
    out: *mut f32,
    out_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises; the helpers check for NULL.
        let handle = unsafe { handle_ref(model) }?;
        let name = unsafe { utf8_arg(name, "name") }?;
        let m = handle.model();
        let values = m.params().get(m.params().find_exported(name)?);
        unsafe { copy_named_out(m.params(), name, values, out, out_len) }
    })
}

/// Sets parameter `name` of `model` from `values` (`values_len` floats: exactly the
/// parameter's size, all finite). The next inference uses the new values (on a cuda context
/// they are uploaded again). On error the model is unchanged.
///
/// Thread safety: the one model call that changes a model. It never waits: while another call
/// uses the model (an inference on another thread) it returns `BEIT_ERR_BUSY` and changes
/// nothing.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (name not UTF-8, no such
/// parameter, a length other than its size, a non-finite value), `BEIT_ERR_BUSY`.
///
/// # Safety
/// `model` must be NULL or a live model; `name` NULL or a NUL-terminated string; `values` NULL
/// or readable for `values_len` floats.
#[no_mangle]
pub unsafe extern "C" fn beit_model_set_parameter(
    model: *mut beit_model,
    name: *const c_char,
    values: *const f32,
    values_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises; the helpers check for NULL.
        let handle = unsafe { handle_ref(model) }?;
        let name = unsafe { utf8_arg(name, "name") }?;
        let values = unsafe { input_values(values, values_len) }?;
        let mut m = handle.model_mut("beit_model_set_parameter")?;
        Ok(m.params_mut().set_named(name, values)?)
    })
}

/// Copies every parameter of `src` into `dst`, which must have the same parameters (names and
/// shapes: the same config and architecture). On error `dst` is unchanged.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (the first parameter that
/// differs, or `dst` and `src` are the same model), `BEIT_ERR_BUSY` (`dst` in use).
///
/// # Safety
/// `dst` and `src` must be NULL or live models.
#[no_mangle]
pub unsafe extern "C" fn beit_model_copy_parameters(dst: *mut beit_model, src: *const beit_model) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; handle_ref checks for NULL.
        let to = unsafe { handle_ref(dst) }?;
        let from = unsafe { handle_ref(src) }?;
        if std::ptr::eq(to, from) {
            return Err(FfiError::invalid("dst and src are the same model: nothing to copy"));
        }
        let source = from.model();
        let mut target = to.model_mut("beit_model_copy_parameters")?;
        Ok(target.params_mut().copy_exported_from(source.params())?)
    })
}

/// Writes how many parameters the trainer's model has to `*out`.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_parameter_count(trainer: *const beit_trainer, out: *mut usize) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_parameter_count") }?;
        unsafe { write_count(claimed.trainer.model().params(), out) }
    })
}

/// Describes parameter `index` of the trainer's model, as `beit_model_parameter_info` does;
/// `offset` places it in the gradient buffer of `beit_trainer_get_gradients` too.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT`, `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable for its `struct_size`.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_parameter_info(
    trainer: *const beit_trainer,
    index: usize,
    out: *mut beit_parameter_info,
) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_parameter_info") }?;
        unsafe { write_info(claimed.trainer.model().params(), index, out) }
    })
}

/// Copies the current values of the trainer's parameter `name` into `out` (`out_len` floats,
/// exactly its size), as of the last applied step.
///
/// Errors: as `beit_model_get_parameter`, and `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `name` NULL or a NUL-terminated string; `out` NULL
/// or writable for `out_len` floats.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_get_parameter(
    trainer: *const beit_trainer,
    name: *const c_char,
    out: *mut f32,
    out_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises; the helpers check for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_get_parameter") }?;
        let name = unsafe { utf8_arg(name, "name") }?;
        let values = claimed.ctx.run(|| claimed.trainer.parameter(name))?;
        unsafe { copy_named_out(claimed.trainer.model().params(), name, &values, out, out_len) }
    })
}

/// Sets the trainer's parameter `name` from `values` (`values_len` floats, exactly its size, all
/// finite): the next step trains from them (a host's own optimizer, weights from elsewhere).
/// The optimizer state is kept. Refused while a split step is pending. On error nothing changes.
///
/// Errors: as `beit_model_set_parameter`; `BEIT_ERR_INVALID_ARGUMENT` while a step is pending.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `name` NULL or a NUL-terminated string; `values`
/// NULL or readable for `values_len` floats.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_set_parameter(
    trainer: *mut beit_trainer,
    name: *const c_char,
    values: *const f32,
    values_len: usize,
) -> beit_status {
    guard(|| {
        // SAFETY (all): the caller's promises; the helpers check for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_set_parameter") }?;
        let name = unsafe { utf8_arg(name, "name") }?;
        let values = unsafe { input_values(values, values_len) }?;
        let ctx = claimed.ctx;
        let t: &mut Trainer = &mut claimed.trainer;
        Ok(ctx.run(|| t.change_parameters(|store| store.set_named(name, values)))?)
    })
}

/// Sets every parameter of the trainer from `model`, which must have the same parameters
/// (names and shapes). The optimizer state is kept. Refused while a split step is pending. On
/// error nothing changes.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_INVALID_ARGUMENT` (the first parameter that
/// differs; a step pending), `BEIT_ERR_BUSY`.
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `model` NULL or a live model.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_copy_parameters_from(
    trainer: *mut beit_trainer,
    model: *const beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY (both): the caller's promises; the helpers check for NULL.
        let mut claimed = unsafe { claim(trainer, "beit_trainer_copy_parameters_from") }?;
        let source = unsafe { handle_ref(model) }?.model();
        let ctx = claimed.ctx;
        let t: &mut Trainer = &mut claimed.trainer;
        let source: &Model = &source;
        Ok(ctx.run(|| t.change_parameters(|store| store.copy_exported_from(source.params())))?)
    })
}

/// A model handle holding a copy of the trainer's model as of its last applied step: infer
/// with it, save it, list or read its parameters, or make another trainer from it. On success
/// `*out` receives a model to release with `beit_model_free`; it does not follow later steps.
///
/// Errors: `BEIT_ERR_NULL_POINTER`, `BEIT_ERR_BUSY`, `BEIT_ERR_INVALID_ARGUMENT` (the copy is
/// over the context's memory budget).
///
/// # Safety
/// `trainer` must be NULL or a live trainer; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_trainer_get_model(
    trainer: *const beit_trainer,
    out: *mut *mut beit_model,
) -> beit_status {
    guard(|| {
        // SAFETY: the caller's promise; claim checks for NULL.
        let claimed = unsafe { claim(trainer, "beit_trainer_get_model") }?;
        let out = non_null_mut(out, "out")?;
        let t: &Trainer = &claimed.trainer;
        let model: Model = claimed.ctx.run(|| -> FfiResult<Model> {
            let mut copy = copy_model(t.model())?;
            t.current_parameters_into(copy.params_mut())?;
            Ok(copy)
        })?;
        // SAFETY: `out` is non-NULL and writable (the caller's promise).
        unsafe { hand_out(model, out) };
        Ok(())
    })
}
