"""ctypes declarations of include/beit.h: library loading, versioned structs, prototypes.

Everything here mirrors the header exactly (field order and C types); the Pythonic layer is
in beit._core. Struct layouts are checked against the library at load time: every
``beit_*_default()`` reports ``struct_size`` as the library compiled it, which must equal
``ctypes.sizeof`` of the mirror below.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
    c_float,
)
from pathlib import Path

#: The ABI version these bindings were written against (``BEIT_ABI_VERSION`` in beit.h).
ABI_VERSION = 2

# enum beit_status (uint32_t)
BEIT_OK = 0
BEIT_ERR_INVALID_ARGUMENT = 1
BEIT_ERR_NULL_POINTER = 2
BEIT_ERR_IO = 3
BEIT_ERR_FORMAT = 4
BEIT_ERR_CONFIG = 5
BEIT_ERR_UNSUPPORTED = 6
BEIT_ERR_BUFFER_SIZE = 7
BEIT_ERR_INTERNAL = 8
BEIT_ERR_NUMERICAL = 9
BEIT_ERR_BUSY = 10

# enum beit_device
BEIT_DEVICE_AUTO = 0
BEIT_DEVICE_CPU = 1
BEIT_DEVICE_CUDA = 2

# enum beit_architecture
BEIT_ARCH_BACKBONE = 0
BEIT_ARCH_MASKED_IMAGE_MODELING = 1
BEIT_ARCH_IMAGE_CLASSIFICATION = 2
BEIT_ARCH_SEMANTIC_SEGMENTATION = 3

# enum beit_weight_decay_on
BEIT_WEIGHT_DECAY_BEIT = 0
BEIT_WEIGHT_DECAY_ALL = 1

# enum beit_precision
BEIT_PRECISION_DEFAULT = 0
BEIT_PRECISION_FP32 = 1
BEIT_PRECISION_BF16 = 2

# enum beit_memory_location
BEIT_MEMORY_HOST = 0
BEIT_MEMORY_CUDA_DEVICE = 1

beit_status = c_uint32
beit_device = c_uint32
beit_architecture = c_uint32
beit_weight_decay_on = c_uint32
beit_precision = c_uint32
beit_memory_location = c_uint32


class beit_context_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("device", beit_device),
        ("num_threads", c_uint32),
        ("memory_budget", c_uint64),
        ("device_index", c_uint32),
    ]


class beit_dataset_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("count", c_uint64),
        ("height", c_uint32),
        ("width", c_uint32),
        ("channels", c_uint32),
        ("has_labels", c_bool),
        ("has_masks", c_bool),
        ("has_tokens", c_bool),
        ("token_grid_h", c_uint32),
        ("token_grid_w", c_uint32),
        ("pixels_len", c_size_t),
        ("mask_len", c_size_t),
        ("tokens_len", c_size_t),
    ]


class beit_dataset_sample(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("pixels", POINTER(c_uint8)),
        ("pixels_len", c_size_t),
        ("mask", POINTER(c_uint8)),
        ("mask_len", c_size_t),
        ("tokens", POINTER(c_uint16)),
        ("tokens_len", c_size_t),
        ("label", c_uint32),
        ("label_written", c_bool),
        ("mask_written", c_bool),
        ("tokens_written", c_bool),
    ]


class beit_model_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("architecture", beit_architecture),
        ("hidden_size", c_size_t),
        ("num_layers", c_size_t),
        ("num_heads", c_size_t),
        ("intermediate_size", c_size_t),
        ("image_height", c_size_t),
        ("image_width", c_size_t),
        ("patch_height", c_size_t),
        ("patch_width", c_size_t),
        ("num_channels", c_size_t),
        ("num_patches", c_size_t),
        ("vocab_size", c_size_t),
        ("num_labels", c_size_t),
        ("num_parameters", c_uint64),
        ("has_mask_token", c_bool),
    ]


BEIT_DEVICE_NAME_BYTES = 256
BEIT_DEVICE_REASON_BYTES = 512


class beit_device_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", beit_device),
        ("cuda_usable", c_uint32),
        ("name", c_char * BEIT_DEVICE_NAME_BYTES),
        ("compute_capability_major", c_int32),
        ("compute_capability_minor", c_int32),
        ("total_memory", c_uint64),
        ("driver_version", c_int32),
        ("device_count", c_int32),
        ("reason", c_char * BEIT_DEVICE_REASON_BYTES),
    ]


class beit_output_sizes(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("last_hidden_state_len", c_size_t),
        ("pooler_output_len", c_size_t),
        ("logits_len", c_size_t),
        ("num_tokens", c_size_t),
        ("num_patches", c_size_t),
    ]


class beit_image_batch(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("pixels", POINTER(c_float)),
        ("pixels_len", c_size_t),
        ("batch", c_size_t),
        ("channels", c_size_t),
        ("height", c_size_t),
        ("width", c_size_t),
        ("bool_masked_pos", POINTER(c_uint8)),
        ("bool_masked_pos_len", c_size_t),
    ]


class beit_infer_outputs(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("last_hidden_state", POINTER(c_float)),
        ("last_hidden_state_len", c_size_t),
        ("pooler_output", POINTER(c_float)),
        ("pooler_output_len", c_size_t),
        ("logits", POINTER(c_float)),
        ("logits_len", c_size_t),
    ]


class beit_tokenizer_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("in_channels", c_size_t),
        ("image_size", c_size_t),
        ("vocab_size", c_size_t),
        ("grid_h", c_size_t),
        ("grid_w", c_size_t),
        ("tokens_per_image", c_size_t),
        ("has_decoder", c_bool),
    ]


class beit_trainer_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("learning_rate", c_double),
        ("min_learning_rate", c_double),
        ("warmup_steps", c_uint64),
        ("total_steps", c_uint64),
        ("weight_decay", c_double),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("clip_grad_norm", c_double),
        ("drop_path_rate", c_double),
        ("layer_decay", c_double),
        ("weight_decay_on", beit_weight_decay_on),
        ("seed", c_uint64),
        ("precision", beit_precision),
    ]


class beit_mim_batch(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("pixels", POINTER(c_float)),
        ("pixels_len", c_size_t),
        ("batch", c_size_t),
        ("channels", c_size_t),
        ("height", c_size_t),
        ("width", c_size_t),
        ("bool_masked_pos", POINTER(c_uint8)),
        ("bool_masked_pos_len", c_size_t),
        ("labels", POINTER(c_int64)),
        ("labels_len", c_size_t),
    ]


class beit_step_stats(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("loss", c_double),
        ("lr", c_double),
        ("grad_norm", c_double),
        ("masked", c_size_t),
        ("seconds", c_double),
        ("images_per_s", c_double),
    ]


BEIT_PARAMETER_NAME_CAPACITY = 256
BEIT_PARAMETER_MAX_DIMS = 8


class beit_parameter_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("name", c_char * BEIT_PARAMETER_NAME_CAPACITY),
        ("ndim", c_size_t),
        ("shape", c_size_t * BEIT_PARAMETER_MAX_DIMS),
        ("numel", c_size_t),
        ("offset", c_size_t),
    ]


class beit_pass_stats(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("loss", c_double),
        ("images", c_size_t),
        ("masked", c_size_t),
    ]


class beit_gradients(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("location", beit_memory_location),
        ("host", POINTER(c_float)),
        ("device_pointer", c_uint64),
        ("stream", c_void_p),
        ("len", c_size_t),
    ]


#: Every versioned struct and the function returning its default.
VERSIONED_STRUCTS = {
    "beit_context_options_default": beit_context_options,
    "beit_device_info_default": beit_device_info,
    "beit_dataset_info_default": beit_dataset_info,
    "beit_dataset_sample_default": beit_dataset_sample,
    "beit_model_info_default": beit_model_info,
    "beit_output_sizes_default": beit_output_sizes,
    "beit_image_batch_default": beit_image_batch,
    "beit_infer_outputs_default": beit_infer_outputs,
    "beit_tokenizer_info_default": beit_tokenizer_info,
    "beit_trainer_options_default": beit_trainer_options,
    "beit_mim_batch_default": beit_mim_batch,
    "beit_step_stats_default": beit_step_stats,
    "beit_parameter_info_default": beit_parameter_info,
    "beit_pass_stats_default": beit_pass_stats,
    "beit_gradients_default": beit_gradients,
}

_P = POINTER
_ctx, _model, _ds, _tok, _tr = c_void_p, c_void_p, c_void_p, c_void_p, c_void_p

# name: (restype, argtypes). Opaque handles travel as void*.
PROTOTYPES = {
    # context
    "beit_context_create": (beit_status, [_P(beit_context_options), _P(c_void_p)]),
    "beit_context_free": (None, [_ctx]),
    # device
    "beit_get_device_info": (beit_status, [_P(beit_device_info)]),
    # dataset
    "beit_dataset_open": (beit_status, [c_char_p, _P(c_void_p)]),
    "beit_dataset_free": (None, [_ds]),
    "beit_dataset_get_info": (beit_status, [_ds, _P(beit_dataset_info)]),
    "beit_dataset_read_sample": (beit_status, [_ds, c_uint64, _P(beit_dataset_sample)]),
    # model
    "beit_model_load": (beit_status, [_ctx, c_char_p, _P(c_void_p)]),
    "beit_model_create": (beit_status, [_ctx, c_char_p, beit_architecture, c_uint64, _P(c_void_p)]),
    "beit_model_save": (beit_status, [_model, c_char_p]),
    "beit_model_free": (None, [_model]),
    "beit_model_get_info": (beit_status, [_model, _P(beit_model_info)]),
    "beit_model_output_sizes": (beit_status, [_model, c_size_t, c_size_t, c_size_t, _P(beit_output_sizes)]),
    "beit_model_infer": (beit_status, [_ctx, _model, _P(beit_image_batch), _P(beit_infer_outputs)]),
    # status
    "beit_last_error_message": (c_char_p, []),
    "beit_status_name": (c_char_p, [beit_status]),
    # tokenizer
    "beit_tokenizer_load": (beit_status, [_ctx, c_char_p, _P(c_void_p)]),
    "beit_tokenizer_free": (None, [_tok]),
    "beit_tokenizer_get_info": (beit_status, [_tok, _P(beit_tokenizer_info)]),
    "beit_tokenizer_tokenize": (beit_status, [_tok, _P(c_float), c_size_t, c_size_t, _P(c_int64), c_size_t]),
    "beit_tokenizer_decode": (beit_status, [_tok, _P(c_int64), c_size_t, c_size_t, _P(c_float), c_size_t]),
    # trainer
    "beit_trainer_create": (beit_status, [_ctx, _model, _P(beit_trainer_options), _P(c_void_p)]),
    "beit_trainer_create_from_config": (
        beit_status,
        [_ctx, c_char_p, c_uint64, _P(beit_trainer_options), _P(c_void_p)],
    ),
    "beit_trainer_load_model_dir": (beit_status, [_ctx, c_char_p, _P(beit_trainer_options), _P(c_void_p)]),
    "beit_trainer_free": (None, [_tr]),
    "beit_trainer_step": (beit_status, [_tr, _P(beit_mim_batch), _P(beit_step_stats)]),
    "beit_trainer_save_checkpoint": (beit_status, [_tr, c_char_p]),
    "beit_trainer_load_checkpoint": (beit_status, [_tr, c_char_p]),
    "beit_trainer_save_model": (beit_status, [_tr, c_char_p]),
    "beit_trainer_step_count": (beit_status, [_tr, _P(c_uint64)]),
    "beit_trainer_get_data_position": (beit_status, [_tr, _P(c_uint64)]),
    "beit_trainer_set_data_position": (beit_status, [_tr, c_uint64]),
    "beit_trainer_get_model_info": (beit_status, [_tr, _P(beit_model_info)]),
    # the split step
    "beit_trainer_forward_backward": (beit_status, [_tr, _P(beit_mim_batch), _P(beit_pass_stats)]),
    "beit_trainer_get_gradients": (beit_status, [_tr, _P(beit_gradients)]),
    "beit_trainer_apply_gradients": (beit_status, [_tr, _P(beit_step_stats)]),
    "beit_trainer_discard_gradients": (beit_status, [_tr]),
    # parameters by name
    "beit_model_parameter_count": (beit_status, [_model, _P(c_size_t)]),
    "beit_model_parameter_info": (beit_status, [_model, c_size_t, _P(beit_parameter_info)]),
    "beit_model_get_parameter": (beit_status, [_model, c_char_p, _P(c_float), c_size_t]),
    "beit_model_set_parameter": (beit_status, [_model, c_char_p, _P(c_float), c_size_t]),
    "beit_model_copy_parameters": (beit_status, [_model, _model]),
    "beit_trainer_parameter_count": (beit_status, [_tr, _P(c_size_t)]),
    "beit_trainer_parameter_info": (beit_status, [_tr, c_size_t, _P(beit_parameter_info)]),
    "beit_trainer_get_parameter": (beit_status, [_tr, c_char_p, _P(c_float), c_size_t]),
    "beit_trainer_set_parameter": (beit_status, [_tr, c_char_p, _P(c_float), c_size_t]),
    "beit_trainer_copy_parameters_from": (beit_status, [_tr, _model]),
    "beit_trainer_get_model": (beit_status, [_tr, _P(c_void_p)]),
    # version
    "beit_version": (c_char_p, []),
    "beit_abi_version": (c_uint32, []),
}
for _name, _struct in VERSIONED_STRUCTS.items():
    PROTOTYPES[_name] = (_struct, [])


def library_path() -> str:
    """Where the library is looked for, in order:

    1. ``$BEIT_LIBRARY`` (a path to libbeit.so), when set;
    2. ``libbeit.so`` next to this package (``beit/libbeit.so``);
    3. the system loader: ``ctypes.util.find_library("beit")``, else plain ``libbeit.so``
       (which honours ``LD_LIBRARY_PATH``).
    """
    env = os.environ.get("BEIT_LIBRARY")
    if env:
        if not os.path.isfile(env):
            raise ImportError(f"BEIT_LIBRARY={env!r} is not a file")
        return env
    here = Path(__file__).resolve().parent / "libbeit.so"
    if here.is_file():
        return str(here)
    return ctypes.util.find_library("beit") or "libbeit.so"


def load(path: str | None = None) -> ctypes.CDLL:
    """Loads libbeit, declares every prototype and checks the ABI version and struct sizes."""
    path = path or library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(
            f"cannot load libbeit from {path!r} ({e}); set BEIT_LIBRARY to the path of libbeit.so "
            "(e.g. target/release/libbeit.so after `cargo build --release`)"
        ) from e
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise ImportError(f"{path}: libbeit lacks {name} (too old a library?)") from e
        fn.restype = restype
        fn.argtypes = argtypes
    abi = lib.beit_abi_version()
    if abi != ABI_VERSION:
        raise ImportError(
            f"{path}: libbeit ABI version {abi}, but these bindings need {ABI_VERSION} "
            f"(library version {lib.beit_version().decode()})"
        )
    for name, struct in VERSIONED_STRUCTS.items():
        got = getattr(lib, name)().struct_size
        if got != ctypes.sizeof(struct):
            raise ImportError(
                f"{path}: {name}() reports struct_size {got}, these bindings have {ctypes.sizeof(struct)}"
            )
    lib._beit_path = path
    return lib


# ---- Data: dataset writer, import, loader, mask generator (src/ffi/dataset_writer.rs,
# loader.rs, masking.rs). Appended: the dicts above are read when load() runs.

# enum beit_import_format
BEIT_IMPORT_IDX = 0
BEIT_IMPORT_NPY = 1
BEIT_IMPORT_IMAGE_FOLDER = 2
BEIT_IMPORT_EMOJI = 3

# enum beit_masking_strategy
BEIT_MASKING_BLOCKWISE = 0
BEIT_MASKING_RANDOM = 1

# enum beit_token_source
BEIT_TOKENS_NONE = 0
BEIT_TOKENS_CACHED = 1
BEIT_TOKENS_TOKENIZER = 2

beit_import_format = c_uint32
beit_masking_strategy = c_uint32
beit_token_source = c_uint32


class beit_dataset_spec(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("height", c_uint32),
        ("width", c_uint32),
        ("channels", c_uint32),
        ("has_labels", c_bool),
        ("has_masks", c_bool),
        ("has_tokens", c_bool),
        ("token_grid_h", c_uint32),
        ("token_grid_w", c_uint32),
    ]


class beit_dataset_samples(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("count", c_size_t),
        ("pixels", POINTER(c_uint8)),
        ("pixels_len", c_size_t),
        ("labels", POINTER(c_uint32)),
        ("labels_len", c_size_t),
        ("masks", POINTER(c_uint8)),
        ("masks_len", c_size_t),
        ("tokens", POINTER(c_uint16)),
        ("tokens_len", c_size_t),
    ]


class beit_dataset_import_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("format", beit_import_format),
        ("out", c_char_p),
        ("images", c_char_p),
        ("labels", c_char_p),
        ("dir", c_char_p),
        ("height", c_uint32),
        ("width", c_uint32),
        ("channels", c_uint32),
        ("set", c_char_p),
    ]


class beit_loader_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("batch_size", c_size_t),
        ("model", c_void_p),
        ("image_height", c_size_t),
        ("image_width", c_size_t),
        ("patch_height", c_size_t),
        ("patch_width", c_size_t),
        ("view2_height", c_size_t),
        ("view2_width", c_size_t),
        ("masked_patches", c_size_t),
        ("masking", beit_masking_strategy),
        ("min_mask_block", c_size_t),
        ("crop_scale_min", c_double),
        ("crop_scale_max", c_double),
        ("crop_ratio_min", c_double),
        ("crop_ratio_max", c_double),
        ("flip_prob", c_double),
        ("color_jitter", c_double),
        ("mean", POINTER(c_float)),
        ("mean_len", c_size_t),
        ("std", POINTER(c_float)),
        ("std_len", c_size_t),
        ("seed", c_uint64),
        ("epoch_start", c_uint64),
        ("workers", c_size_t),
        ("prefetch", c_size_t),
        ("drop_last", c_bool),
        ("token_source", beit_token_source),
        ("tokenizer", c_void_p),
    ]


class beit_loader_info(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("batch_size", c_size_t),
        ("channels", c_size_t),
        ("height", c_size_t),
        ("width", c_size_t),
        ("view2_height", c_size_t),
        ("view2_width", c_size_t),
        ("patch_height", c_size_t),
        ("patch_width", c_size_t),
        ("grid_h", c_size_t),
        ("grid_w", c_size_t),
        ("num_patches", c_size_t),
        ("masked_patches", c_size_t),
        ("min_mask_block", c_size_t),
        ("batches_per_epoch", c_uint64),
        ("dataset_count", c_uint64),
        ("has_labels", c_bool),
        ("has_tokens", c_bool),
        ("token_source", beit_token_source),
        ("view1_len", c_size_t),
        ("view2_len", c_size_t),
        ("bool_masked_pos_len", c_size_t),
        ("labels_len", c_size_t),
        ("tokens_len", c_size_t),
    ]


class beit_loader_batch(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("view1", POINTER(c_float)),
        ("view1_len", c_size_t),
        ("view2", POINTER(c_float)),
        ("view2_len", c_size_t),
        ("bool_masked_pos", POINTER(c_uint8)),
        ("bool_masked_pos_len", c_size_t),
        ("labels", POINTER(c_int64)),
        ("labels_len", c_size_t),
        ("tokens", POINTER(c_int64)),
        ("tokens_len", c_size_t),
        ("images", c_size_t),
        ("position", c_uint64),
        ("epoch", c_uint64),
        ("labels_written", c_bool),
        ("tokens_written", c_bool),
    ]


class beit_mask_generator_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("grid_height", c_size_t),
        ("grid_width", c_size_t),
        ("masked_patches", c_size_t),
        ("min_block", c_size_t),
        ("max_block", c_size_t),
        ("min_aspect", c_double),
        ("strategy", beit_masking_strategy),
        ("seed", c_uint64),
    ]


_DATA_STRUCTS = {
    "beit_dataset_spec_default": beit_dataset_spec,
    "beit_dataset_samples_default": beit_dataset_samples,
    "beit_dataset_import_options_default": beit_dataset_import_options,
    "beit_loader_options_default": beit_loader_options,
    "beit_loader_info_default": beit_loader_info,
    "beit_loader_batch_default": beit_loader_batch,
    "beit_mask_generator_options_default": beit_mask_generator_options,
}
VERSIONED_STRUCTS.update(_DATA_STRUCTS)
_wr, _ld, _mg = c_void_p, c_void_p, c_void_p
PROTOTYPES.update(
    {
        "beit_dataset_writer_create": (beit_status, [c_char_p, _P(beit_dataset_spec), _P(c_void_p)]),
        "beit_dataset_writer_append": (beit_status, [_wr, _P(beit_dataset_samples)]),
        "beit_dataset_writer_count": (beit_status, [_wr, _P(c_uint64)]),
        "beit_dataset_writer_finish": (beit_status, [_wr, _P(beit_dataset_info)]),
        "beit_dataset_writer_free": (None, [_wr]),
        "beit_dataset_import": (beit_status, [_P(beit_dataset_import_options), _P(beit_dataset_info)]),
        "beit_loader_create": (beit_status, [_ctx, c_char_p, _P(beit_loader_options), _P(c_void_p)]),
        "beit_loader_free": (None, [_ld]),
        "beit_loader_get_info": (beit_status, [_ld, _P(beit_loader_info)]),
        "beit_loader_next": (beit_status, [_ld, _P(beit_loader_batch)]),
        "beit_loader_get_position": (beit_status, [_ld, _P(c_uint64)]),
        "beit_loader_seek": (beit_status, [_ld, c_uint64]),
        "beit_mask_generator_create": (beit_status, [_P(beit_mask_generator_options), _P(c_void_p)]),
        "beit_mask_generator_next": (beit_status, [_mg, _P(c_uint8), c_size_t, _P(c_size_t)]),
        "beit_mask_generator_free": (None, [_mg]),
    }
)
for _name, _struct in _DATA_STRUCTS.items():
    PROTOTYPES[_name] = (_struct, [])


# --- tokenizer training (beit_dvae_trainer, src/ffi/dvae.rs) ---------------------------------


class beit_dvae_config(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("in_channels", c_size_t),
        ("image_size", c_size_t),
        ("vocab_size", c_size_t),
        ("n_hid", c_size_t),
        ("group_count", c_size_t),
        ("n_blk_per_group", c_size_t),
        ("decoder_n_init", c_size_t),
    ]


class beit_dvae_train_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("lr", c_float),
        ("kl_weight", c_float),
        ("tau_start", c_float),
        ("tau_end", c_float),
        ("total_steps", c_uint64),
        ("seed", c_uint64),
    ]


class beit_dvae_data_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("steps", c_uint64),
        ("batch", c_size_t),
        ("crop_scale_min", c_double),
        ("workers", c_size_t),
        ("seed", c_uint64),
    ]


class beit_dvae_step_stats(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("loss", c_double),
        ("recon_mse", c_double),
        ("kl", c_double),
        ("perplexity", c_double),
        ("tau", c_double),
        ("lr", c_double),
    ]


class beit_dvae_train_summary(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("steps", c_uint64),
        ("stopped", c_bool),
        ("seconds", c_double),
    ]


#: int32_t (*beit_dvae_progress_fn)(const beit_dvae_step_stats *stats, void *user_data)
beit_dvae_progress_fn = ctypes.CFUNCTYPE(c_int32, POINTER(beit_dvae_step_stats), c_void_p)

VERSIONED_STRUCTS.update(
    {
        "beit_dvae_config_default": beit_dvae_config,
        "beit_dvae_train_options_default": beit_dvae_train_options,
        "beit_dvae_data_options_default": beit_dvae_data_options,
        "beit_dvae_step_stats_default": beit_dvae_step_stats,
        "beit_dvae_train_summary_default": beit_dvae_train_summary,
    }
)
_dv = c_void_p
PROTOTYPES.update(
    {
        "beit_dvae_trainer_create": (
            beit_status,
            [_ctx, _P(beit_dvae_config), _P(beit_dvae_train_options), _P(c_void_p)],
        ),
        "beit_dvae_trainer_load": (beit_status, [_ctx, c_char_p, _P(beit_dvae_train_options), _P(c_void_p)]),
        "beit_dvae_trainer_free": (None, [_dv]),
        "beit_dvae_trainer_step": (beit_status, [_dv, _P(c_float), c_size_t, c_size_t, _P(beit_dvae_step_stats)]),
        "beit_dvae_trainer_train": (
            beit_status,
            [
                _dv,
                c_char_p,
                _P(beit_dvae_data_options),
                beit_dvae_progress_fn,
                c_void_p,
                _P(beit_dvae_train_summary),
            ],
        ),
        "beit_dvae_trainer_save": (beit_status, [_dv, c_char_p]),
        "beit_dvae_trainer_get_tokenizer": (beit_status, [_dv, _P(c_void_p)]),
        "beit_dvae_trainer_step_count": (beit_status, [_dv, _P(c_uint64)]),
        "beit_dvae_trainer_get_info": (beit_status, [_dv, _P(beit_tokenizer_info)]),
    }
)
for _name, _struct in VERSIONED_STRUCTS.items():
    PROTOTYPES.setdefault(_name, (_struct, []))
