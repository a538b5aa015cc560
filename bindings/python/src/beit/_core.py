"""The Pythonic layer over libbeit's C API (see include/beit.h for the semantics)."""

from __future__ import annotations

import ctypes
import json
import os
import threading
from ctypes import POINTER, byref, c_float, c_int64, c_uint8, c_uint16, c_uint64, c_void_p
from dataclasses import dataclass, fields
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
    Share one context between threads freely. Models keep their context alive; closing a
    context that models still use frees it when the last of them is closed."""

    _free_name = "beit_context_free"

    def __init__(self, threads: int = 0, device: str = "auto", memory_budget: Optional[int] = None):
        if device not in _DEVICES:
            raise _invalid(f"device must be one of {sorted(_DEVICES)}, got {device!r}")
        if not isinstance(threads, (int, np.integer)) or not 0 <= threads < 2**32:
            raise _invalid(f"threads must be an integer in [0, 2^32), got {threads!r}")
        budget = 0 if memory_budget is None else memory_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 0 <= budget < 2**64:
            raise _invalid(f"memory_budget must be None or a byte count in [0, 2^64), got {memory_budget!r}")
        opts = _struct(_ffi.beit_context_options)
        opts.device = _DEVICES[device]
        opts.num_threads = int(threads)
        opts.memory_budget = int(budget)
        out = c_void_p()
        _check(_lib.beit_context_create(byref(opts), byref(out)))
        super().__init__(out.value)
        self.threads = int(threads)
        self.device = device
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
    """A BEiT model (immutable: any number of threads may infer with one model at once)."""

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

    @classmethod
    def defaults(cls) -> "TrainerOptions":
        """The library's defaults, every field filled in."""
        d = _lib.beit_trainer_options_default()
        values = {f.name: getattr(d, f.name) for f in fields(cls)}
        values["weight_decay_on"] = {v: k for k, v in _WEIGHT_DECAY_ON.items()}.get(d.weight_decay_on)
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

    def __init__(self, ptr: int):
        super().__init__(ptr)
        # Reentrant: a call from a progress callback (Trainer.finetune) on the calling thread
        # reaches the library, which refuses it with BusyError, instead of deadlocking here.
        self._call_lock = threading.RLock()

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
        return cls(out.value)

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
        return cls(out.value)

    @classmethod
    def from_model(cls, ctx: Context, model: Model, options: Any = None) -> "Trainer":
        """Trains a copy of `model` (a BeitForMaskedImageModeling; it stays as it is)."""
        opts = _options(options)
        out = c_void_p()
        with ctx._use() as c, model._use() as m:
            _check(_lib.beit_trainer_create(c, m, byref(opts) if opts is not None else None, byref(out)))
        return cls(out.value)

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
