"""The Pythonic layer over libbeit's C API (see include/beit.h for the semantics)."""

from __future__ import annotations

import ctypes
import json
import os
import threading
from ctypes import POINTER, byref, c_float, c_int64, c_uint8, c_uint16, c_uint64, c_void_p
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from . import _ffi
from ._errors import BeitError, ClosedError, InvalidArgumentError, error_class

_lib = _ffi.load()

ARCHITECTURES = {
    _ffi.BEIT_ARCH_BACKBONE: "BeitModel",
    _ffi.BEIT_ARCH_MASKED_IMAGE_MODELING: "BeitForMaskedImageModeling",
    _ffi.BEIT_ARCH_IMAGE_CLASSIFICATION: "BeitForImageClassification",
    _ffi.BEIT_ARCH_SEMANTIC_SEGMENTATION: "BeitForSemanticSegmentation",
}
_ARCH_CODES = {v: k for k, v in ARCHITECTURES.items()}
_DEVICES = {"auto": _ffi.BEIT_DEVICE_AUTO, "cpu": _ffi.BEIT_DEVICE_CPU, "cuda": _ffi.BEIT_DEVICE_CUDA}
_WEIGHT_DECAY_ON = {"beit": _ffi.BEIT_WEIGHT_DECAY_BEIT, "all": _ffi.BEIT_WEIGHT_DECAY_ALL}
_PRECISIONS = {
    "default": _ffi.BEIT_PRECISION_DEFAULT,
    "fp32": _ffi.BEIT_PRECISION_FP32,
    "bf16": _ffi.BEIT_PRECISION_BF16,
}


def version() -> str:
    """The loaded library's version, "MAJOR.MINOR.PATCH"."""
    return _lib.beit_version().decode()


def abi_version() -> int:
    """The loaded library's ABI version (checked against the bindings' at import)."""
    return int(_lib.beit_abi_version())


def library_path() -> str:
    """The path the library was loaded from."""
    return _lib._beit_path


_DEVICE_NAMES = {v: k for k, v in _DEVICES.items()}


@dataclass(frozen=True)
class DeviceInfo:
    """What ``device="auto"`` would use on this machine, and what the CUDA probe found
    (beit_get_device_info; the probe runs once and never crashes without CUDA)."""

    kind: str
    """"cuda" or "cpu": what auto picks."""
    cuda_usable: bool
    name: str
    """The GPU's name, or "cpu"."""
    compute_capability: tuple
    total_memory: int
    driver_version: int
    """1000 * major + 10 * minor of the driver's CUDA version; 0 without one."""
    device_count: int
    reason: str
    """Why CUDA is or is not usable."""


def device_info() -> DeviceInfo:
    """The device ``auto`` picks here and the CUDA probe's findings."""
    s = _struct(_ffi.beit_device_info)
    _check(_lib.beit_get_device_info(byref(s)))
    return DeviceInfo(
        kind=_DEVICE_NAMES.get(s.kind, f"unknown({s.kind})"),
        cuda_usable=bool(s.cuda_usable),
        name=s.name.decode("utf-8", "replace"),
        compute_capability=(s.compute_capability_major, s.compute_capability_minor),
        total_memory=int(s.total_memory),
        driver_version=int(s.driver_version),
        device_count=int(s.device_count),
        reason=s.reason.decode("utf-8", "replace"),
    )


def _check(status: int) -> None:
    """Raises the BeitError subclass of `status` with the calling thread's last message."""
    if status != _ffi.BEIT_OK:
        message = _lib.beit_last_error_message().decode("utf-8", "replace")
        name = _lib.beit_status_name(status).decode()
        raise error_class(status)(message, status, name)


def _invalid(message: str) -> InvalidArgumentError:
    """An argument error found by the bindings before calling the library."""
    return InvalidArgumentError(message, _ffi.BEIT_ERR_INVALID_ARGUMENT, "BEIT_ERR_INVALID_ARGUMENT")


def _path(path: Any) -> bytes:
    return os.fsencode(os.fspath(path))


def _array(value: Any, dtype: Any, ndim: int, name: str) -> np.ndarray:
    """`value` as a C-contiguous array of `dtype`: the same object (no copy) when it already is
    one, else exactly one conversion. Only real numbers (and bools) are accepted."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise _invalid(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise _invalid(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if np.dtype(dtype).kind in "iu" and arr.dtype.kind == "f":
        raise _invalid(f"{name} must be an integer or bool array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _pixel_array(value: Any, name: str, scale: str) -> np.ndarray:
    """Pixels as C-contiguous float32 [B, C, H, W]. Integer and bool images are refused: a uint8
    image is 0..255, and used as floats it would silently be 255 times too bright; `scale` says
    what the floats must be."""
    arr = np.asarray(value)
    if arr.dtype.kind in "biu":
        raise _invalid(f"{name} must be a float array ({scale}), got dtype {arr.dtype}")
    return _array(arr, np.float32, 4, name)


_NORMALISED = "normalised as the model expects, e.g. (uint8 / 255 - mean) / std"


def _mask_array(value: Any, name: str) -> np.ndarray:
    """A [B, N] mask as uint8 0/1: bool and uint8 arrays go as they are (bool is viewed, not
    copied); other integer arrays are converted once, after checking they hold only 0 and 1."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_:
        return np.ascontiguousarray(arr).view(np.uint8)
    if arr.dtype != np.uint8 and arr.dtype.kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
        raise _invalid(f"{name} must hold only 0 and 1")
    return _array(arr, np.uint8, 2, name)


def _ptr(arr: np.ndarray, ctype: Any):
    return arr.ctypes.data_as(POINTER(ctype))


def _struct(cls):
    s = cls()
    s.struct_size = ctypes.sizeof(cls)
    return s


def _to_dataclass(dc, struct, **override):
    values = {f.name: getattr(struct, f.name) for f in fields(dc) if f.name not in override}
    values.update(override)
    return dc(**values)


class _Handle:
    """An owned native handle: close() frees it (once, also from __del__), calls in flight keep
    it alive (a close() during a call frees it when the call returns), handles it depends on
    (a model's context) stay alive until it is freed. Use after close raises ClosedError."""

    _free_name = ""

    def __init__(self, ptr: int, deps: Iterable["_Handle"] = ()):
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._deps: tuple = ()
        self._ptr = ptr
        deps = tuple(deps)
        for d in deps:
            d._acquire()
        self._deps = deps

    def _acquire(self) -> int:
        with self._lock:
            if self._closed:
                raise ClosedError(f"this {type(self).__name__} is closed")
            self._users += 1
            return self._ptr

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            ptr = self._take_if_done()
        if ptr:
            self._destroy(ptr)

    def _take_if_done(self):
        if self._closed and self._users == 0 and self._ptr:
            ptr, self._ptr = self._ptr, None
            return ptr
        return None

    def _destroy(self, ptr: int) -> None:
        getattr(_lib, self._free_name)(ptr)
        deps, self._deps = self._deps, ()
        for d in deps:
            d._release()

    class _Use:
        __slots__ = ("h", "ptr")

        def __init__(self, h):
            self.h = h

        def __enter__(self):
            self.ptr = self.h._acquire()
            return self.ptr

        def __exit__(self, *exc):
            self.h._release()

    def _use(self) -> "_Handle._Use":
        return _Handle._Use(self)

    def close(self) -> None:
        """Frees the native handle (after any call still running on it). Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._closed:
                return
            self._closed = True
            ptr = self._take_if_done()
        if ptr:
            self._destroy(ptr)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        self._acquire()
        self._release()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class Context(_Handle):
    """An execution context: a device, a thread pool and a memory budget of its own.

    ``threads=0`` means one per core; ``device`` is "auto" (CUDA when built in and usable, else
    the CPU), "cpu" or "cuda" (an UnsupportedError when unavailable). ``memory_budget`` is how
    many bytes one object planned on the context (a model, a trainer, one inference pass, a
    tokenizer) may need; one that would need more is refused before anything is allocated
    (ConfigError when the size comes from a model config, InvalidArgumentError when it comes
    from an input). ``None`` (or 0) means the memory available to the process at the time.
    ``device_index`` picks the GPU of a "cuda" or "auto" context (as the driver numbers them,
    after CUDA_VISIBLE_DEVICES); a process drives one GPU, and a "cpu" context needs 0.
    Share one context between threads freely. Models keep their context alive; closing a
    context that models still use frees it when the last of them is closed."""

    _free_name = "beit_context_free"

    def __init__(
        self, threads: int = 0, device: str = "auto", memory_budget: Optional[int] = None, device_index: int = 0
    ):
        if device not in _DEVICES:
            raise _invalid(f"device must be one of {sorted(_DEVICES)}, got {device!r}")
        if not isinstance(threads, (int, np.integer)) or not 0 <= threads < 2**32:
            raise _invalid(f"threads must be an integer in [0, 2^32), got {threads!r}")
        budget = 0 if memory_budget is None else memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 0 <= budget < 2**64:
            raise _invalid(f"memory_budget must be None or a byte count in [0, 2^64), got {memory_budget!r}")
        opts = _lib.beit_context_options_default()
        opts.device = _DEVICES[device]
        opts.num_threads = int(threads)
        opts.memory_budget = int(budget)
        if isinstance(device_index, bool) or not isinstance(device_index, (int, np.integer)) or not 0 <= device_index < 2**32:
            raise _invalid(f"device_index must be an integer in [0, 2^32), got {device_index!r}")
        opts.device_index = int(device_index)
        out = c_void_p()
        _check(_lib.beit_context_create(byref(opts), byref(out)))
        super().__init__(out.value)
        self.threads = int(threads)
        self.device = device
        self.device_index = int(device_index)
        #: The budget in bytes, or None for the memory available to the process.
        self.memory_budget = int(budget) or None

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        else:
            state = f"threads={self.threads}, device={self.device!r}"
            if self.memory_budget is not None:
                state += f", memory_budget={self.memory_budget}"
        return f"beit.Context({state})"


@dataclass(frozen=True)
class ModelInfo:
    """What a model is (beit_model_info). ``architecture`` is the HF class name."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_height: int
    image_width: int
    patch_height: int
    patch_width: int
    num_channels: int
    num_patches: int
    vocab_size: int
    num_labels: int
    num_parameters: int
    has_mask_token: bool


def _model_info(struct) -> ModelInfo:
    arch = ARCHITECTURES.get(struct.architecture, f"unknown({struct.architecture})")
    return _to_dataclass(ModelInfo, struct, architecture=arch)


@dataclass(frozen=True)
class OutputSizes:
    """Lengths in floats of each output for one input size (0: the model lacks it)."""

    last_hidden_state_len: int
    pooler_output_len: int
    logits_len: int
    num_tokens: int
    num_patches: int


def _config_text(config: Any) -> bytes:
    """A config as JSON text: a dict, a JSON string, or a path (os.PathLike) to a config.json."""
    if config is None:
        return b"{}"
    if isinstance(config, Mapping):
        return json.dumps(dict(config)).encode()
    if isinstance(config, os.PathLike):
        with open(config, "rb") as f:
            return f.read()
    if isinstance(config, str):
        return config.encode()
    if isinstance(config, bytes):
        return config
    raise _invalid(f"config must be a dict, JSON text or a path, got {type(config).__name__}")


class Model(_Handle):
    """A BEiT model. Any number of threads may infer with one model at once. Only
    set_parameter and copy_parameters_from change it: they never wait, and raise BusyError
    (changing nothing) while another thread's call uses the model."""

    _free_name = "beit_model_free"

    def __init__(self, ptr: int, ctx: Context):
        super().__init__(ptr, deps=(ctx,))
        self.context = ctx
        info = _struct(_ffi.beit_model_info)
        with self._use() as p:
            _check(_lib.beit_model_get_info(p, byref(info)))
        self._info = _model_info(info)

    @classmethod
    def load(cls, ctx: Context, path: Any) -> "Model":
        """Loads a Hugging Face model directory (config.json + model.safetensors)."""
        out = c_void_p()
        with ctx._use() as c:
            _check(_lib.beit_model_load(c, _path(path), byref(out)))
        return cls(out.value, ctx)

    @classmethod
    def create(
        cls,
        ctx: Context,
        config: Any = None,
        architecture: str = "BeitForMaskedImageModeling",
        seed: int = 0,
    ) -> "Model":
        """A randomly initialised model (BEiT's init, reproducible from `seed`) from a config
        (dict, JSON text or path to a config.json; None gives BEiT-base defaults)."""
        if architecture not in _ARCH_CODES:
            raise _invalid(f"architecture must be one of {sorted(_ARCH_CODES)}, got {architecture!r}")
        out = c_void_p()
        with ctx._use() as c:
            _check(_lib.beit_model_create(c, _config_text(config), _ARCH_CODES[architecture], seed, byref(out)))
        return cls(out.value, ctx)

    @property
    def info(self) -> ModelInfo:
        self._acquire()
        self._release()
        return self._info

    def save(self, path: Any) -> None:
        """Saves as a Hugging Face directory (created if needed)."""
        with self._use() as p:
            _check(_lib.beit_model_save(p, _path(path)))

    def output_sizes(self, batch: int, height: int, width: int) -> OutputSizes:
        out = _struct(_ffi.beit_output_sizes)
        with self._use() as p:
            _check(_lib.beit_model_output_sizes(p, batch, height, width, byref(out)))
        return _to_dataclass(OutputSizes, out)

    def infer(
        self,
        pixels: Any,
        bool_masked_pos: Any = None,
        outputs: Optional[Iterable[str]] = None,
    ) -> dict:
        """Runs the model on `pixels` (float32 [B, C, H, W], normalised as the model expects).

        `bool_masked_pos` is an optional [B, num_patches] bool/uint8 mask (models with a mask
        token). `outputs` names the outputs wanted, one name or several (default: every one the
        model has, of "last_hidden_state", "pooler_output", "logits"). Logits are [B, patches,
        vocab] (MIM), [B, labels] (classification) or [B, labels, 4 gh, 4 gw] (segmentation).
        Integer images (uint8 0..255) are refused: normalise them first. Returns a dict of float32 arrays that
        the library wrote into directly. Pixels already C-contiguous float32 are passed as they
        are; others are converted once. Non-finite pixels raise InvalidArgumentError."""
        px = _pixel_array(pixels, "pixels", _NORMALISED)
        b, c, h, w = px.shape
        if not np.isfinite(px).all():
            raise _invalid("pixels contain NaN or infinite values")
        sizes = self.output_sizes(b, h, w)
        info = self._info
        shapes = {}
        if sizes.last_hidden_state_len:
            shapes["last_hidden_state"] = (b, sizes.num_tokens, info.hidden_size)
        if sizes.pooler_output_len:
            shapes["pooler_output"] = (b, info.hidden_size)
        if sizes.logits_len:
            per = sizes.logits_len // b
            if info.architecture == "BeitForMaskedImageModeling":
                shapes["logits"] = (b, sizes.num_patches, per // sizes.num_patches)
            elif info.architecture == "BeitForSemanticSegmentation":
                # [B, labels, 4 gh, 4 gw]: the decode head's logits at 4x the patch grid.
                gh, gw = h // info.patch_height, w // info.patch_width
                shapes["logits"] = (b, info.num_labels, 4 * gh, 4 * gw)
            else:
                shapes["logits"] = (b, per)
        if isinstance(outputs, str):
            outputs = [outputs]  # one name, not its letters
        wanted = list(shapes) if outputs is None else list(outputs)
        for name in wanted:
            if name not in shapes:
                raise _invalid(f"this {info.architecture} has no output {name!r} (it has {sorted(shapes)})")
        if not wanted:
            raise _invalid("no output requested")
        result = {name: np.empty(shapes[name], dtype=np.float32) for name in wanted}

        batch = _struct(_ffi.beit_image_batch)
        batch.pixels = _ptr(px, c_float)
        batch.pixels_len = px.size
        batch.batch, batch.channels, batch.height, batch.width = b, c, h, w
        mask = None
        if bool_masked_pos is not None:
            mask = _mask_array(bool_masked_pos, "bool_masked_pos")
            if mask.shape != (b, sizes.num_patches):
                raise _invalid(f"bool_masked_pos must have shape {(b, sizes.num_patches)}, got {mask.shape}")
            batch.bool_masked_pos = _ptr(mask, c_uint8)
            batch.bool_masked_pos_len = mask.size
        outs = _struct(_ffi.beit_infer_outputs)
        for name, arr in result.items():
            setattr(outs, name, _ptr(arr, c_float))
            setattr(outs, name + "_len", arr.size)
        with self._use() as mp:
            # The model holds a reference on its context's native handle (freed only after the
            # model is), so the pointer is valid here even if the Context was closed.
            _check(_lib.beit_model_infer(self.context._ptr, mp, byref(batch), byref(outs)))
        return result

    def parameters(self) -> list:
        """Every parameter (its Hugging Face name, as in model.safetensors, its shape and its
        offset in the flat parameter buffer), in the model's layout order."""
        with self._use() as p:
            return list(_parameter_index(self, p, _lib.beit_model_parameter_count, _lib.beit_model_parameter_info).values())

    def get_parameter(self, name: str) -> np.ndarray:
        """A copy of parameter `name` (a Hugging Face name, e.g.
        "beit.encoder.layer.0.attention.attention.query.weight"), float32 with its shape."""
        with self._use() as p:
            index = _parameter_index(self, p, _lib.beit_model_parameter_count, _lib.beit_model_parameter_info)
            return _get_parameter(index, name, lambda *a: _lib.beit_model_get_parameter(p, *a))

    def set_parameter(self, name: str, values: Any) -> None:
        """Sets parameter `name` from `values` (real numbers of exactly its shape, all finite;
        converted to float32 once unless already C-contiguous float32). The next inference
        uses them. On error (InvalidArgumentError; BusyError while another thread infers) the
        model is unchanged."""
        with self._use() as p:
            index = _parameter_index(self, p, _lib.beit_model_parameter_count, _lib.beit_model_parameter_info)
            _set_parameter(index, name, values, lambda *a: _lib.beit_model_set_parameter(p, *a))

    def copy_parameters_from(self, other: "Model") -> None:
        """Sets every parameter from `other`, which must have the same ones (names and shapes:
        the same config and architecture). On error this model is unchanged."""
        if not isinstance(other, Model):
            raise _invalid(f"copy_parameters_from takes a beit.Model, got {type(other).__name__}")
        with self._use() as dst, other._use() as src:
            _check(_lib.beit_model_copy_parameters(dst, src))

    def __repr__(self) -> str:
        if self.closed:
            return "beit.Model(closed)"
        i = self._info
        return f"beit.Model({i.architecture}, hidden={i.hidden_size}, layers={i.num_layers}, params={i.num_parameters})"


@dataclass(frozen=True)
class DatasetInfo:
    count: int
    height: int
    width: int
    channels: int
    has_labels: bool
    has_masks: bool
    has_tokens: bool
    token_grid_h: int
    token_grid_w: int
    pixels_len: int
    mask_len: int
    tokens_len: int


class Sample(NamedTuple):
    """One dataset sample: pixels uint8 [H, W, C]; label (int or None); mask uint8 [H, W] or
    None; tokens uint16 [grid_h, grid_w] or None."""

    pixels: np.ndarray
    label: Optional[int]
    mask: Optional[np.ndarray]
    tokens: Optional[np.ndarray]


class Dataset(_Handle):
    """A .beitds dataset file (memory-mapped, read only; thread-safe reads)."""

    _free_name = "beit_dataset_free"

    def __init__(self, ptr: int):
        super().__init__(ptr)
        info = _struct(_ffi.beit_dataset_info)
        with self._use() as p:
            _check(_lib.beit_dataset_get_info(p, byref(info)))
        self._info = _to_dataclass(DatasetInfo, info)

    @classmethod
    def open(cls, path: Any) -> "Dataset":
        out = c_void_p()
        _check(_lib.beit_dataset_open(_path(path), byref(out)))
        return cls(out.value)

    @property
    def info(self) -> DatasetInfo:
        self._acquire()
        self._release()
        return self._info

    def __len__(self) -> int:
        return self.info.count

    def __getitem__(self, index: int) -> Sample:
        import operator

        i = operator.index(index)
        n = self.info.count
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {index} out of range for a dataset of {n}")
        info = self._info
        pixels = np.empty((info.height, info.width, info.channels), dtype=np.uint8)
        mask = np.empty((info.height, info.width), dtype=np.uint8) if info.has_masks else None
        tokens = np.empty((info.token_grid_h, info.token_grid_w), dtype=np.uint16) if info.has_tokens else None
        s = _struct(_ffi.beit_dataset_sample)
        s.pixels, s.pixels_len = _ptr(pixels, c_uint8), pixels.size
        if mask is not None:
            s.mask, s.mask_len = _ptr(mask, c_uint8), mask.size
        if tokens is not None:
            s.tokens, s.tokens_len = _ptr(tokens, c_uint16), tokens.size
        with self._use() as p:
            _check(_lib.beit_dataset_read_sample(p, i, byref(s)))
        return Sample(
            pixels,
            int(s.label) if s.label_written else None,
            mask if s.mask_written else None,
            tokens if s.tokens_written else None,
        )

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        if self.closed:
            return "beit.Dataset(closed)"
        i = self._info
        return f"beit.Dataset(count={i.count}, {i.height}x{i.width}x{i.channels})"


@dataclass(frozen=True)
class TokenizerInfo:
    in_channels: int
    image_size: int
    vocab_size: int
    grid_h: int
    grid_w: int
    tokens_per_image: int
    has_decoder: bool


class Tokenizer(_Handle):
    """A visual tokenizer (DALL-E style dVAE; immutable, thread-safe)."""

    _free_name = "beit_tokenizer_free"

    def __init__(self, ptr: int):
        super().__init__(ptr)
        info = _struct(_ffi.beit_tokenizer_info)
        with self._use() as p:
            _check(_lib.beit_tokenizer_get_info(p, byref(info)))
        self._info = _to_dataclass(TokenizerInfo, info)

    @classmethod
    def load(cls, ctx: Context, path: Any) -> "Tokenizer":
        """Loads a tokenizer directory. It shares `ctx`'s thread pool (ctx may be closed first)."""
        out = c_void_p()
        with ctx._use() as c:
            _check(_lib.beit_tokenizer_load(c, _path(path), byref(out)))
        return cls(out.value)

    @property
    def info(self) -> TokenizerInfo:
        self._acquire()
        self._release()
        return self._info

    def tokenize(self, pixels: Any) -> np.ndarray:
        """float32 [B, C, S, S] images with values in [0, 1] (plain, not DALL-E-mapped) ->
        int64 [B, tokens_per_image] token ids."""
        px = _pixel_array(pixels, "pixels", "values in [0, 1], e.g. uint8 / 255")
        i = self.info
        want = (i.in_channels, i.image_size, i.image_size)
        if px.shape[1:] != want or px.shape[0] == 0:
            raise _invalid(f"pixels must have shape [B, {want[0]}, {want[1]}, {want[2]}] with B >= 1, got {px.shape}")
        tokens = np.empty((px.shape[0], i.tokens_per_image), dtype=np.int64)
        with self._use() as p:
            _check(
                _lib.beit_tokenizer_tokenize(
                    p, _ptr(px, c_float), px.size, px.shape[0], _ptr(tokens, c_int64), tokens.size
                )
            )
        return tokens

    def decode(self, tokens: Any) -> np.ndarray:
        """int [B, tokens_per_image] (or [B, grid_h, grid_w]) tokens -> float32 [B, C, S, S]
        images in [0, 1]. Only for a tokenizer with a decoder (info.has_decoder)."""
        arr = np.asarray(tokens)
        i = self.info
        if arr.ndim == 3 and arr.shape[1:] == (i.grid_h, i.grid_w):
            arr = arr.reshape(arr.shape[0], -1)
        t = _array(arr, np.int64, 2, "tokens")
        if t.shape[1] != i.tokens_per_image or t.shape[0] == 0:
            raise _invalid(f"tokens must have shape [B, {i.tokens_per_image}] with B >= 1, got {t.shape}")
        b = t.shape[0]
        pixels = np.empty((b, i.in_channels, i.image_size, i.image_size), dtype=np.float32)
        with self._use() as p:
            _check(_lib.beit_tokenizer_decode(p, _ptr(t, c_int64), t.size, b, _ptr(pixels, c_float), pixels.size))
        return pixels


@dataclass
class TrainerOptions:
    """Trainer options; a field left None takes the library's default (BEiT's recipe, see
    beit_trainer_options in beit.h). `weight_decay_on` is "beit" or "all"."""

    learning_rate: Optional[float] = None
    min_learning_rate: Optional[float] = None
    warmup_steps: Optional[int] = None
    total_steps: Optional[int] = None
    weight_decay: Optional[float] = None
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    eps: Optional[float] = None
    clip_grad_norm: Optional[float] = None
    drop_path_rate: Optional[float] = None
    layer_decay: Optional[float] = None
    weight_decay_on: Optional[str] = None
    seed: Optional[int] = None
    precision: Optional[str] = None
    """"default" (bf16 on a cuda context, fp32 on the CPU), "fp32" or "bf16" (cuda contexts
    only: a CPU context refuses it with UnsupportedError)."""

    @classmethod
    def defaults(cls) -> "TrainerOptions":
        """The library's defaults, every field filled in."""
        return cls._from_c(_lib.beit_trainer_options_default())

    @classmethod
    def _from_c(cls, d, **overrides) -> "TrainerOptions":
        """The options a C `beit_trainer_options` holds, with `overrides` applied."""
        values = {f.name: getattr(d, f.name) for f in fields(cls)}
        values["weight_decay_on"] = {v: k for k, v in _WEIGHT_DECAY_ON.items()}.get(d.weight_decay_on)
        values["precision"] = {v: k for k, v in _PRECISIONS.items()}.get(d.precision)
        values.update(overrides)
        return cls(**values)

    def _struct(self):
        s = _lib.beit_trainer_options_default()
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if f.name == "weight_decay_on":
                if v not in _WEIGHT_DECAY_ON:
                    raise _invalid(f"weight_decay_on must be 'beit' or 'all', got {v!r}")
                v = _WEIGHT_DECAY_ON[v]
            if f.name == "precision":
                if v not in _PRECISIONS:
                    raise _invalid(f"precision must be one of {sorted(_PRECISIONS)}, got {v!r}")
                v = _PRECISIONS[v]
            setattr(s, f.name, v)
        return s


def _options(options: Any):
    if options is None:
        return None
    if isinstance(options, Mapping):
        options = TrainerOptions(**options)
    return options._struct()


@dataclass(frozen=True)
class StepStats:
    """What one training step did (beit_step_stats)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    masked: int
    seconds: float
    images_per_s: float


class Trainer(_Handle):
    """A masked image modeling pretraining trainer (AdamW, BEiT's schedule). A trainer takes
    one call at a time (the library refuses a concurrent call with BEIT_ERR_BUSY): the bindings
    serialise calls on one trainer, so other threads wait instead of getting BusyError."""

    _free_name = "beit_trainer_free"

    def __init__(self, ptr: int, ctx: Optional[Context] = None):
        super().__init__(ptr)
        # Reentrant: a call from a progress callback (Trainer.finetune) on the calling thread
        # reaches the library, which refuses it with BusyError, instead of deadlocking here.
        self._call_lock = threading.RLock()
        #: The context the trainer was made on (model() pairs its models with it).
        self.context = ctx

    def _run(self, fn, *args):
        with self._call_lock, self._use() as p:
            _check(fn(p, *args))

    @classmethod
    def from_config(cls, ctx: Context, config: Any = None, init_seed: int = 0, options: Any = None) -> "Trainer":
        """A fresh BeitForMaskedImageModeling from a config (dict, JSON text or a path to a
        config.json), initialised from `init_seed`. `options`: TrainerOptions or a dict."""
        opts = _options(options)
        out = c_void_p()
        with ctx._use() as c:
            _check(
                _lib.beit_trainer_create_from_config(
                    c, _config_text(config), init_seed, byref(opts) if opts is not None else None, byref(out)
                )
            )
        return cls(out.value, ctx)

    @classmethod
    def from_model_dir(cls, ctx: Context, path: Any, options: Any = None) -> "Trainer":
        """Trains the BeitForMaskedImageModeling in a Hugging Face directory (fresh optimizer)."""
        opts = _options(options)
        out = c_void_p()
        with ctx._use() as c:
            _check(
                _lib.beit_trainer_load_model_dir(
                    c, _path(path), byref(opts) if opts is not None else None, byref(out)
                )
            )
        return cls(out.value, ctx)

    @classmethod
    def from_model(cls, ctx: Context, model: Model, options: Any = None) -> "Trainer":
        """Trains a copy of `model` (a BeitForMaskedImageModeling; it stays as it is)."""
        opts = _options(options)
        out = c_void_p()
        with ctx._use() as c, model._use() as m:
            _check(_lib.beit_trainer_create(c, m, byref(opts) if opts is not None else None, byref(out)))
        return cls(out.value, ctx)

    @staticmethod
    def _mim_batch(pixels: Any, bool_masked_pos: Any, labels: Any):
        """The beit_mim_batch of a step, and the arrays it points into (keep them alive)."""
        px = _pixel_array(pixels, "pixels", _NORMALISED)
        mask = _mask_array(bool_masked_pos, "bool_masked_pos")
        lab = _array(labels, np.int64, 2, "labels")
        b = px.shape[0]
        if mask.shape[0] != b or lab.shape != mask.shape:
            raise _invalid(
                f"pixels {px.shape}, bool_masked_pos {mask.shape} and labels {lab.shape} must agree: "
                "masks and labels [B, num_patches]"
            )
        batch = _struct(_ffi.beit_mim_batch)
        batch.pixels, batch.pixels_len = _ptr(px, c_float), px.size
        batch.batch, batch.channels, batch.height, batch.width = px.shape
        batch.bool_masked_pos, batch.bool_masked_pos_len = _ptr(mask, c_uint8), mask.size
        batch.labels, batch.labels_len = _ptr(lab, c_int64), lab.size
        return batch, (px, mask, lab)

    def step(self, pixels: Any, bool_masked_pos: Any, labels: Any) -> StepStats:
        """One optimizer step. pixels float32 [B, C, H, W] (the configured size); bool_masked_pos
        [B, num_patches] bool/uint8 (at least one masked); labels int [B, num_patches] visual
        token ids (read at masked patches only)."""
        batch, _arrays = self._mim_batch(pixels, bool_masked_pos, labels)
        stats = _struct(_ffi.beit_step_stats)
        self._run(_lib.beit_trainer_step, byref(batch), byref(stats))
        return _to_dataclass(StepStats, stats)

    def save_checkpoint(self, path: Any) -> None:
        """Writes everything (weights, AdamW state, step, options, RNG, data position), atomically."""
        self._run(_lib.beit_trainer_save_checkpoint, _path(path))

    def load_checkpoint(self, path: Any) -> None:
        """Restores a checkpoint of the same model config (bit-exact resume)."""
        self._run(_lib.beit_trainer_load_checkpoint, _path(path))

    def save_model(self, path: Any) -> None:
        """Saves the current weights as a Hugging Face directory (Model.load reads it)."""
        self._run(_lib.beit_trainer_save_model, _path(path))

    @property
    def step_count(self) -> int:
        v = c_uint64()
        self._run(_lib.beit_trainer_step_count, byref(v))
        return v.value

    @property
    def data_position(self) -> int:
        v = c_uint64()
        self._run(_lib.beit_trainer_get_data_position, byref(v))
        return v.value

    @data_position.setter
    def data_position(self, position: int) -> None:
        self._run(_lib.beit_trainer_set_data_position, position)

    @property
    def model_info(self) -> ModelInfo:
        info = _struct(_ffi.beit_model_info)
        self._run(_lib.beit_trainer_get_model_info, byref(info))
        return _model_info(info)

    # -- the split step: forward_backward, then the host's work on gradients(), then apply ------

    def forward_backward(self, pixels: Any, bool_masked_pos: Any, labels: Any) -> "PassStats":
        """The first half of a split step (for data-parallel training's all-reduce, or clipping
        of your own): checks the batch as step() does, runs the forward and backward into the
        trainer's gradient buffer and leaves the step pending. Then gradients() shows the
        buffer, and apply_gradients() finishes the step (clipping + AdamW) or
        discard_gradients() drops it; forward_backward + apply_gradients equals step() bit for
        bit. While a step is pending, step(), another forward_backward, checkpoints and
        set_parameter raise InvalidArgumentError. On error nothing is pending."""
        batch, _arrays = self._mim_batch(pixels, bool_masked_pos, labels)
        stats = _struct(_ffi.beit_pass_stats)
        self._run(_lib.beit_trainer_forward_backward, byref(batch), byref(stats))
        return _to_dataclass(PassStats, stats)

    def _gradients(self):
        """The pending step's beit_gradients and a lease on this trainer's native handle."""
        g = _struct(_ffi.beit_gradients)
        with self._call_lock, self._use() as p:
            _check(_lib.beit_trainer_get_gradients(p, byref(g)))
            return g, _Lease(self)

    def gradients(self) -> np.ndarray:
        """The pending step's gradients as a writable float32 array [n] over the trainer's own
        buffer (zero-copy), laid out like the parameters: ``info.of(grads)`` is parameter
        ``info``'s part, shaped (see parameters()). Read it and change it in place (an
        all-reduce, your own clipping): apply_gradients() uses it as you left it.

        The values are the step's only until apply_gradients() or discard_gradients(); after
        those the array shows the trainer's scratch memory (the next forward_backward
        overwrites it). The array keeps the trainer's native memory alive, so it never
        dangles, even after close(). InvalidArgumentError when no step is pending;
        UnsupportedError on a cuda context, whose gradients are on the GPU: device_gradients()."""
        g, lease = self._gradients()
        if g.location != _ffi.BEIT_MEMORY_HOST:
            raise error_class(_ffi.BEIT_ERR_UNSUPPORTED)(
                "the gradients are in CUDA device memory (a cuda context): use device_gradients()",
                _ffi.BEIT_ERR_UNSUPPORTED,
                "BEIT_ERR_UNSUPPORTED",
            )
        return np.asarray(_HostFloats(lease, ctypes.addressof(g.host.contents) if g.len else 0, g.len))

    def device_gradients(self) -> "DeviceGradients":
        """The pending step's gradients on a cuda context: the CUdeviceptr, the CUstream the
        backward pass was queued on, and the length; ``__cuda_array_interface__`` lets CuPy,
        Numba or PyTorch wrap them without a copy (consumers synchronise on the stream). Work
        on them must be finished, or queued on that stream, before apply_gradients(). Valid
        until apply_gradients() or discard_gradients(). UnsupportedError on a CPU context
        (use gradients())."""
        g, lease = self._gradients()
        if g.location != _ffi.BEIT_MEMORY_CUDA_DEVICE:
            raise error_class(_ffi.BEIT_ERR_UNSUPPORTED)(
                "the gradients are in host memory (a CPU context): use gradients()",
                _ffi.BEIT_ERR_UNSUPPORTED,
                "BEIT_ERR_UNSUPPORTED",
            )
        return DeviceGradients(int(g.device_pointer), int(g.stream or 0), int(g.len), lease)

    def apply_gradients(self) -> StepStats:
        """The second half of a split step: the gradient norm, clipping and AdamW on the
        gradients as left by the host. NumericalError when their norm is not finite (the step
        is dropped: the trainer is as before forward_backward); InvalidArgumentError when no
        step is pending."""
        stats = _struct(_ffi.beit_step_stats)
        self._run(_lib.beit_trainer_apply_gradients, byref(stats))
        return _to_dataclass(StepStats, stats)

    def discard_gradients(self) -> None:
        """Drops the pending step: the trainer is as before forward_backward (random state
        included). Nothing happens when no step is pending."""
        self._run(_lib.beit_trainer_discard_gradients)

    # -- parameters by name ----------------------------------------------------------------------

    def parameters(self) -> list:
        """Every parameter of the trainer's model (as Model.parameters()); ``offset`` also
        places it in gradients()."""
        with self._call_lock, self._use() as p:
            index = _parameter_index(self, p, _lib.beit_trainer_parameter_count, _lib.beit_trainer_parameter_info)
            return list(index.values())

    def get_parameter(self, name: str) -> np.ndarray:
        """A copy of the trainer's parameter `name`, float32 with its shape, as of the last
        applied step."""
        with self._call_lock, self._use() as p:
            index = _parameter_index(self, p, _lib.beit_trainer_parameter_count, _lib.beit_trainer_parameter_info)
            return _get_parameter(index, name, lambda *a: _lib.beit_trainer_get_parameter(p, *a))

    def set_parameter(self, name: str, values: Any) -> None:
        """Sets the trainer's parameter `name` (values of exactly its shape, all finite): the
        next step trains from them; the optimizer state is kept. InvalidArgumentError while a
        split step is pending. On error nothing changes."""
        with self._call_lock, self._use() as p:
            index = _parameter_index(self, p, _lib.beit_trainer_parameter_count, _lib.beit_trainer_parameter_info)
            _set_parameter(index, name, values, lambda *a: _lib.beit_trainer_set_parameter(p, *a))

    def copy_parameters_from(self, model: Model) -> None:
        """Sets every parameter from `model` (the same names and shapes); the optimizer state
        is kept. InvalidArgumentError while a split step is pending. On error nothing changes."""
        if not isinstance(model, Model):
            raise _invalid(f"copy_parameters_from takes a beit.Model, got {type(model).__name__}")
        with self._call_lock, self._use() as p, model._use() as m:
            _check(_lib.beit_trainer_copy_parameters_from(p, m))

    def model(self, ctx: Optional[Context] = None) -> Model:
        """A new Model holding a copy of the trainer's model as of its last applied step (it
        does not follow later steps): infer with it, save it, read its parameters. It runs on
        `ctx`, by default the context the trainer was made on."""
        ctx = ctx if ctx is not None else self.context
        if ctx is None:
            raise _invalid("this trainer does not know its context: pass model(ctx)")
        out = c_void_p()
        with ctx._use():  # a closed context raises here, before a model is made for it
            with self._call_lock, self._use() as p:
                _check(_lib.beit_trainer_get_model(p, byref(out)))
            # Model frees the handle itself should it fail (its close() runs from __del__).
            return Model(out.value, ctx)


@dataclass(frozen=True)
class PassStats:
    """What Trainer.forward_backward computed (beit_pass_stats)."""

    loss: float
    images: int
    masked: int
    """Masked patches the loss averaged over: combining several trainers' gradients into the
    gradient of their joint batch, each share weighs masked / total masked."""


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a model or trainer (beit_parameter_info)."""

    name: str
    """The Hugging Face name, as in model.safetensors."""
    shape: tuple
    offset: int
    """Where its values start (in floats) in the flat parameter buffer, which
    Trainer.gradients() shares."""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def of(self, flat: np.ndarray) -> np.ndarray:
        """This parameter's part of a flat buffer laid out like the parameters (e.g.
        Trainer.gradients()), shaped: a view, writes go through."""
        return flat[self.offset : self.offset + self.numel].reshape(self.shape)


@dataclass(frozen=True)
class DeviceGradients:
    """The pending step's gradients in CUDA device memory (Trainer.device_gradients())."""

    pointer: int
    """The buffer's CUdeviceptr."""
    stream: int
    """The CUstream the backward pass was queued on, as an integer (0: the default stream)."""
    size: int
    """float32 values in the buffer."""
    _lease: Any = field(default=None, repr=False, compare=False)

    @property
    def __cuda_array_interface__(self) -> dict:
        # Version 3: consumers synchronise on "stream" (1 names the legacy default stream).
        return {
            "shape": (self.size,),
            "typestr": "<f4",
            "data": (self.pointer, False),
            "version": 3,
            "stream": self.stream or 1,
        }


class _Lease:
    """Keeps a handle's native object alive (a close() then frees it when the lease ends), so
    that memory the library lends to Python (the gradient buffer) never dangles."""

    def __init__(self, handle: _Handle):
        handle._acquire()
        self._handle = handle

    def __del__(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            try:
                handle._release()
            except Exception:  # interpreter shutdown: the library may be gone already
                pass


class _HostFloats:
    """float32 memory the library owns, for np.asarray (which keeps this object, and so the
    lease, as the array's base)."""

    def __init__(self, lease: _Lease, address: int, length: int):
        self._lease = lease
        self.__array_interface__ = {"version": 3, "shape": (length,), "typestr": "<f4", "data": (address, False)}


def _parameter_index(owner: _Handle, ptr: int, count_fn, info_fn) -> dict:
    """{name: ParameterInfo} of a model or trainer, listed once: the parameters of a handle
    never change their names, shapes or places."""
    index = getattr(owner, "_parameters_by_name", None)
    if index is None:
        n = ctypes.c_size_t()
        _check(count_fn(ptr, byref(n)))
        index = {}
        for i in range(n.value):
            s = _struct(_ffi.beit_parameter_info)
            _check(info_fn(ptr, i, byref(s)))
            name = s.name.decode("utf-8")
            index[name] = ParameterInfo(name, tuple(int(d) for d in s.shape[: s.ndim]), int(s.offset))
        owner._parameters_by_name = index
    return index


def _lookup(index: dict, name: Any) -> ParameterInfo:
    if not isinstance(name, str):
        raise _invalid(f"a parameter name is a str, got {type(name).__name__}")
    info = index.get(name)
    if info is None:
        first = next(iter(index), "")
        raise _invalid(f"no parameter is named {name!r} (parameters() lists them: {first!r}, ...)")
    return info


def _get_parameter(index: dict, name: Any, get) -> np.ndarray:
    info = _lookup(index, name)
    out = np.empty(info.shape, dtype=np.float32)
    _check(get(name.encode(), _ptr(out, c_float), out.size))
    return out


def _set_parameter(index: dict, name: Any, values: Any, set_) -> None:
    info = _lookup(index, name)
    arr = np.asarray(values)
    if arr.shape != info.shape:
        raise _invalid(f"{name} has shape {list(info.shape)}, the values given have shape {list(arr.shape)}")
    arr = _array(arr, np.float32, len(info.shape), "values")
    _check(set_(name.encode(), _ptr(arr, c_float), arr.size))
