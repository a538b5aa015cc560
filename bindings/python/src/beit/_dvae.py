"""Training a visual tokenizer (a dVAE): beit_dvae_trainer (include/beit.h) as DvaeTrainer."""

from __future__ import annotations

import threading
from ctypes import byref, c_float, c_uint64, c_void_p
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

import numpy as np

from . import _ffi
from ._core import Context, Tokenizer, TokenizerInfo, _check, _Handle, _invalid, _lib, _path, _pixel_array
from ._core import _ptr, _struct, _to_dataclass


def map_pixels(images: Any) -> np.ndarray:
    """DALL-E's pixel mapping ``0.8 * x + 0.1`` of images with values in [0, 1], as float32:
    what DvaeTrainer.step takes (Tokenizer.tokenize maps by itself)."""
    x = np.asarray(images, dtype=np.float32)
    return x * np.float32(0.8) + np.float32(0.1)


def _fill(struct, values: Any, cls, what: str) -> None:
    """Sets the fields of `values` (a `cls` or a dict; None fields left at the defaults)."""
    if values is None:
        return
    if isinstance(values, Mapping):
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise _invalid(f"unknown {what} field(s): {', '.join(sorted(unknown))}")
        values = cls(**values)
    if not isinstance(values, cls):
        raise _invalid(f"{what} must be a {cls.__name__} or a dict, got {type(values).__name__}")
    for f in fields(values):
        v = getattr(values, f.name)
        if v is not None:
            setattr(struct, f.name, v)


@dataclass
class DvaeConfig:
    """A new tokenizer's architecture (its config.json); a field left None takes the library's
    default (``beit tokenizer train``'s: 1 channel, 32 px, 8192 codes, n_hid 32, 3 groups of 1
    block, decoder width 64)."""

    in_channels: Optional[int] = None
    image_size: Optional[int] = None
    vocab_size: Optional[int] = None
    n_hid: Optional[int] = None
    group_count: Optional[int] = None
    n_blk_per_group: Optional[int] = None
    decoder_n_init: Optional[int] = None

    @classmethod
    def defaults(cls) -> "DvaeConfig":
        d = _lib.beit_dvae_config_default()
        return cls(**{f.name: getattr(d, f.name) for f in fields(cls)})


@dataclass
class DvaeTrainOptions:
    """How a tokenizer trainer optimises (beit_dvae_train_options); a field left None takes the
    library's default (lr 1e-3, kl_weight 5e-3, tau 1 -> 0.125, 600 total steps, seed 0).
    `seed` also seeds the initial weights of DvaeTrainer.create."""

    lr: Optional[float] = None
    kl_weight: Optional[float] = None
    tau_start: Optional[float] = None
    tau_end: Optional[float] = None
    total_steps: Optional[int] = None
    seed: Optional[int] = None

    @classmethod
    def defaults(cls) -> "DvaeTrainOptions":
        d = _lib.beit_dvae_train_options_default()
        return cls(**{f.name: getattr(d, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DvaeStepStats:
    """What one tokenizer training step did (beit_dvae_step_stats)."""

    step: int
    loss: float
    recon_mse: float
    kl: float
    perplexity: float
    tau: float
    lr: float


@dataclass(frozen=True)
class DvaeTrainSummary:
    """What DvaeTrainer.train did: steps applied, whether the callback stopped it, seconds."""

    steps: int
    stopped: bool
    seconds: float


class DvaeTrainer(_Handle):
    """Trains a visual tokenizer (a dVAE with a decoder), on numpy batches (step) or on a
    dataset file with ``beit tokenizer train``'s loop (train). It shares its context's thread
    pool (the context may be closed first); on a cuda context the steps run on the GPU. A trainer takes one call at a time: the bindings serialise calls from several
    threads; a call made from inside a train() callback raises BusyError."""

    _free_name = "beit_dvae_trainer_free"

    def __init__(self, ptr: int):
        super().__init__(ptr)
        # Reentrant: a callback's call into its own trainer reaches the library, which says
        # BUSY, instead of deadlocking here.
        self._call_lock = threading.RLock()

    def _run(self, fn, *args):
        with self._call_lock, self._use() as p:
            _check(fn(p, *args))

    @classmethod
    def create(cls, ctx: Context, config: Any = None, options: Any = None) -> "DvaeTrainer":
        """A new tokenizer of `config` (DvaeConfig or dict), randomly initialised from
        options.seed; `options`: DvaeTrainOptions or dict."""
        c = _lib.beit_dvae_config_default()
        _fill(c, config, DvaeConfig, "config")
        o = _lib.beit_dvae_train_options_default()
        _fill(o, options, DvaeTrainOptions, "options")
        out = c_void_p()
        with ctx._use() as p:
            _check(_lib.beit_dvae_trainer_create(p, byref(c), byref(o), byref(out)))
        return cls(out.value)

    @classmethod
    def load(cls, ctx: Context, path: Any, options: Any = None) -> "DvaeTrainer":
        """Goes on training the tokenizer directory at `path` (it needs a decoder), from step 0
        with fresh optimizer state."""
        o = _lib.beit_dvae_train_options_default()
        _fill(o, options, DvaeTrainOptions, "options")
        out = c_void_p()
        with ctx._use() as p:
            _check(_lib.beit_dvae_trainer_load(p, _path(path), byref(o), byref(out)))
        return cls(out.value)

    @property
    def info(self) -> TokenizerInfo:
        """The tokenizer's shapes (as Tokenizer.info)."""
        info = _struct(_ffi.beit_tokenizer_info)
        self._run(_lib.beit_dvae_trainer_get_info, byref(info))
        return _to_dataclass(TokenizerInfo, info)

    @property
    def step_count(self) -> int:
        v = c_uint64()
        self._run(_lib.beit_dvae_trainer_step_count, byref(v))
        return v.value

    def step(self, mapped_pixels: Any) -> DvaeStepStats:
        """One optimizer step on float32 [B, C, S, S] images in the tokenizer's pixel mapping
        (``map_pixels`` of [0, 1] images: values 0.1 to 0.9). A C-contiguous float32 array is
        passed without a copy."""
        px = _pixel_array(mapped_pixels, "mapped_pixels", "map_pixels of [0, 1] images, beit.map_pixels")
        i = self.info
        want = (i.in_channels, i.image_size, i.image_size)
        if px.shape[1:] != want or px.shape[0] == 0:
            raise _invalid(
                f"mapped_pixels must have shape [B, {want[0]}, {want[1]}, {want[2]}] with B >= 1, got {px.shape}"
            )
        stats = _struct(_ffi.beit_dvae_step_stats)
        self._run(_lib.beit_dvae_trainer_step, _ptr(px, c_float), px.size, px.shape[0], byref(stats))
        return _to_dataclass(DvaeStepStats, stats)

    def train(
        self,
        dataset: Any,
        steps: int = 0,
        batch: Optional[int] = None,
        crop_scale_min: Optional[float] = None,
        workers: Optional[int] = None,
        seed: Optional[int] = None,
        callback: Optional[Callable[[DvaeStepStats], Any]] = None,
    ) -> DvaeTrainSummary:
        """Trains on the images of the dataset file at `dataset` (a .beitds path) with
        ``beit tokenizer train``'s loop: `steps` steps (0: up to options.total_steps), `batch`
        images each (default 64), random resized crops of at least `crop_scale_min` of the area
        (default 0.5), `workers` loader threads (default 1; the batches are the same for any
        number), `seed` for the data order and augmentation (default 0).

        `callback(stats)` runs after each step; a true return value stops the run there. An
        exception it raises also stops the run, and is raised again from train()."""
        d = _lib.beit_dvae_data_options_default()
        d.steps = steps
        for name, value in (("batch", batch), ("crop_scale_min", crop_scale_min), ("workers", workers), ("seed", seed)):
            if value is not None:
                setattr(d, name, value)
        raised: list = []

        def progress(stats_ptr, _user):
            try:
                return 1 if callback(_to_dataclass(DvaeStepStats, stats_ptr.contents)) else 0
            except BaseException as e:  # noqa: BLE001 - kept and raised again after the run
                raised.append(e)
                return 1

        c_progress = _ffi.beit_dvae_progress_fn(progress) if callback is not None else _ffi.beit_dvae_progress_fn()
        summary = _struct(_ffi.beit_dvae_train_summary)
        self._run(_lib.beit_dvae_trainer_train, _path(dataset), byref(d), c_progress, None, byref(summary))
        if raised:
            raise raised[0]
        return _to_dataclass(DvaeTrainSummary, summary)

    def save(self, path: Any) -> None:
        """Writes the tokenizer directory (config.json + model.safetensors) that Tokenizer.load
        reads; both files are written in full before either replaces its old version."""
        self._run(_lib.beit_dvae_trainer_save, _path(path))

    def tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer as it stands now (later steps do not change it)."""
        out = c_void_p()
        self._run(_lib.beit_dvae_trainer_get_tokenizer, byref(out))
        return Tokenizer(out.value)

    def __repr__(self) -> str:
        if self.closed:
            return "DvaeTrainer(closed)"
        i = self.info
        return (
            f"DvaeTrainer({i.in_channels}x{i.image_size}x{i.image_size} -> {i.grid_h}x{i.grid_w} tokens of "
            f"{i.vocab_size}, step {self.step_count})"
        )
