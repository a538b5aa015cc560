"""Writing, importing and loading data: DatasetWriter, import_dataset, Loader, MaskGenerator
(beit_dataset_writer_*, beit_dataset_import, beit_loader_*, beit_mask_generator_* in beit.h)."""

from __future__ import annotations

import contextlib
from ctypes import byref, c_float, c_int64, c_size_t, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from . import _ffi
from ._core import (
    Context,
    DatasetInfo,
    Model,
    Tokenizer,
    _array,
    _check,
    _Handle,
    _invalid,
    _lib,
    _path,
    _ptr,
    _struct,
    _to_dataclass,
)

_MASKING = {"block": _ffi.BEIT_MASKING_BLOCKWISE, "random": _ffi.BEIT_MASKING_RANDOM}
_IMPORT_FORMATS = {
    "idx": _ffi.BEIT_IMPORT_IDX,
    "npy": _ffi.BEIT_IMPORT_NPY,
    "image-folder": _ffi.BEIT_IMPORT_IMAGE_FOLDER,
    "emoji": _ffi.BEIT_IMPORT_EMOJI,
}
_TOKEN_SOURCES = {_ffi.BEIT_TOKENS_NONE: None, _ffi.BEIT_TOKENS_CACHED: "cached", _ffi.BEIT_TOKENS_TOKENIZER: "tokenizer"}


def _size(value: Any, name: str) -> Tuple[int, int]:
    """(height, width) from an int (a square) or a pair; every side a positive integer."""
    hw = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in hw):
        raise _invalid(f"{name} must be a positive integer or a (height, width) pair, got {value!r}")
    return int(hw[0]), int(hw[1])


def _count(value: Optional[int], name: str) -> int:
    """A non-negative integer option; None means 0 (the library's default)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
        raise _invalid(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _integers(value: Any, dtype: Any, ndim: int, name: str) -> np.ndarray:
    """An integer array converted to `dtype` after checking every value fits it."""
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise _invalid(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind not in "biu":
        raise _invalid(f"{name} must be an integer array, got dtype {arr.dtype}")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise _invalid(f"{name} values must be in [{info.min}, {info.max}]")
    return np.ascontiguousarray(arr, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Writer and import


class DatasetWriter(_Handle):
    """Writes a .beitds dataset file from arrays, atomically: nothing exists at `path` until
    finish(); an abandoned writer (close() without finish(), or an exception inside a ``with``
    block) leaves nothing behind. As a context manager it finishes on a normal exit.

    ``token_grid`` is (rows, cols) when every sample carries visual tokens."""

    _free_name = "beit_dataset_writer_free"

    def __init__(
        self,
        path: Any,
        height: int,
        width: int,
        channels: int,
        labels: bool = False,
        masks: bool = False,
        token_grid: Optional[Tuple[int, int]] = None,
    ):
        spec = _lib.beit_dataset_spec_default()
        for name, value in (("height", height), ("width", width), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
                raise _invalid(f"{name} must be an integer in [0, 2^32), got {value!r}")
            setattr(spec, name, int(value))
        spec.has_labels, spec.has_masks = bool(labels), bool(masks)
        if token_grid is not None:
            spec.has_tokens = True
            spec.token_grid_h, spec.token_grid_w = _size(token_grid, "token_grid")
        out = c_void_p()
        _check(_lib.beit_dataset_writer_create(_path(path), byref(spec), byref(out)))
        super().__init__(out.value)
        self.path = path
        self.shape = (spec.height, spec.width, spec.channels)
        self.token_grid = (spec.token_grid_h, spec.token_grid_w) if token_grid is not None else None
        self.has_labels, self.has_masks = bool(labels), bool(masks)
        self.info: Optional[DatasetInfo] = None

    def append(self, pixels: Any, labels: Any = None, masks: Any = None, tokens: Any = None) -> None:
        """Appends N samples: pixels uint8 [N, H, W, C] (or [N, H, W] for one channel);
        labels integers [N] (stored as u32); masks uint8 [N, H, W]; tokens integers
        [N, rows, cols] in [0, 65535]. Each optional part is given exactly when the writer has
        that section. All or nothing: a refused call appends nothing."""
        h, w, c = self.shape
        px = np.asarray(pixels)
        if px.ndim == 3 and c == 1:
            px = px[..., None]
        if px.dtype != np.uint8:
            raise _invalid(f"pixels must be uint8 [N, H, W, C], got dtype {px.dtype}")
        px = _array(px, np.uint8, 4, "pixels")
        n = px.shape[0]
        if px.shape[1:] != (h, w, c):
            raise _invalid(f"pixels must have shape [N, {h}, {w}, {c}], got {px.shape}")
        s = _struct(_ffi.beit_dataset_samples)
        s.count, s.pixels, s.pixels_len = n, _ptr(px, c_uint8), px.size
        keep = [px]
        for part, value, dtype, ndim, ctype in (
            ("labels", labels, np.uint32, 1, c_uint32),
            ("masks", masks, np.uint8, 3, c_uint8),
            ("tokens", tokens, np.uint16, 3, c_uint16),
        ):
            if value is None:
                continue
            arr = _integers(value, dtype, ndim, part)
            if arr.shape[0] != n:
                raise _invalid(f"{part} must have {n} entries (one per image), got shape {arr.shape}")
            keep.append(arr)
            setattr(s, part, _ptr(arr, ctype))
            setattr(s, f"{part}_len", arr.size)
        with self._use() as p:
            _check(_lib.beit_dataset_writer_append(p, byref(s)))

    def __len__(self) -> int:
        """Samples appended so far."""
        n = c_uint64()
        with self._use() as p:
            _check(_lib.beit_dataset_writer_count(p, byref(n)))
        return int(n.value)

    def finish(self) -> DatasetInfo:
        """Writes the file (atomically) and closes the writer; returns what the file holds."""
        info = _struct(_ffi.beit_dataset_info)
        try:
            with self._use() as p:
                _check(_lib.beit_dataset_writer_finish(p, byref(info)))
        finally:
            self.close()
        self.info = _to_dataclass(DatasetInfo, info)
        return self.info

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and not self.closed:
            self.finish()
        else:
            self.close()

    def __repr__(self) -> str:
        h, w, c = self.shape
        return f"beit.DatasetWriter({str(self.path)!r}, {h}x{w}x{c}{', closed' if self.closed else ''})"


def import_dataset(
    format: str,
    out: Any,
    *,
    images: Any = None,
    labels: Any = None,
    dir: Any = None,
    size: Any = None,
    channels: Optional[int] = None,
    set: Optional[str] = None,
    pad: Any = None,
) -> DatasetInfo:
    """Converts images (and labels) into a dataset file at `out`, as `beit dataset import`:

    - ``"idx"``: ``images`` (and ``labels``) IDX files, raw or gzip; ``pad`` (int or (h, w))
      centres every image on a zero canvas of that size;
    - ``"npy"``: ``images`` [N, H, W] or [N, H, W, C] .npy (u1, or f4/f8 in [0, 1]) and
      ``labels`` [N] .npy;
    - ``"image-folder"``: ``dir``/<class>/<image>.png|jpg resized to ``size`` (int or (h, w)),
      ``channels`` 1 or 3 (default 3); class names go to ``<out>.classes.json``;
    - ``"emoji"``: an unpacked emoji-datasource package in ``dir``, image ``set`` (google,
      twitter) at ``size`` (default 64).

    An `out` that is, or lies inside, an input is refused before anything is written."""
    if format not in _IMPORT_FORMATS:
        raise _invalid(f"format must be one of {sorted(_IMPORT_FORMATS)}, got {format!r}")
    o = _lib.beit_dataset_import_options_default()
    o.format = _IMPORT_FORMATS[format]
    keep = {name: _path(v) for name, v in (("out", out), ("images", images), ("labels", labels), ("dir", dir))
            if v is not None}
    if set is not None:
        keep["set"] = set.encode()
    for name, value in keep.items():
        setattr(o, name, value)
    hw = pad if format == "idx" else size
    if format == "idx" and size is not None:
        raise _invalid("size is for image-folder and emoji; use pad for idx")
    if format != "idx" and pad is not None:
        raise _invalid("pad is for format='idx'")
    if hw is not None:
        o.height, o.width = _size(hw, "pad" if format == "idx" else "size")
    if channels is not None:
        o.channels = _count(channels, "channels")
    info = _struct(_ffi.beit_dataset_info)
    _check(_lib.beit_dataset_import(byref(o), byref(info)))
    return _to_dataclass(DatasetInfo, info)


# ---------------------------------------------------------------------------------------------
# Loader


@dataclass(frozen=True)
class LoaderInfo:
    """The shapes of a loader's batches (beit_loader_info). ``token_source`` is None,
    "cached" or "tokenizer"."""

    batch_size: int
    channels: int
    height: int
    width: int
    view2_height: int
    view2_width: int
    patch_height: int
    patch_width: int
    grid_h: int
    grid_w: int
    num_patches: int
    masked_patches: int
    min_mask_block: int
    batches_per_epoch: int
    dataset_count: int
    has_labels: bool
    has_tokens: bool
    token_source: Optional[str]


class LoaderBatch(NamedTuple):
    """One batch of B images (B = ``images``; the last batch of an epoch may be short without
    drop_last): view1 float32 [B, C, H, W] (normalised: what Trainer.step takes as pixels);
    view2 float32 [B, C, H2, W2] (DALL-E mapped); bool_masked_pos uint8 [B, N]; labels int64
    [B] or None; tokens int64 [B, N] or None (Trainer.step's labels); the batch's global
    position and epoch."""

    view1: np.ndarray
    view2: np.ndarray
    bool_masked_pos: np.ndarray
    labels: Optional[np.ndarray]
    tokens: Optional[np.ndarray]
    images: int
    position: int
    epoch: int


def _floats(value: Any, name: str):
    """NULL for None, else a float32 array of 1 or more values (kept alive by the caller)."""
    if value is None:
        return None
    arr = np.ascontiguousarray(np.atleast_1d(np.asarray(value, dtype=np.float32)))
    if arr.ndim != 1 or arr.size == 0:
        raise _invalid(f"{name} must be a number or a sequence of numbers, got {value!r}")
    return arr


def _pair(value: Any, name: str) -> Tuple[float, float]:
    """(-1, -1) (the recipe's) for None, else a (min, max) pair of numbers."""
    if value is None:
        return (-1.0, -1.0)
    try:
        lo, hi = value
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise _invalid(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None


class Loader(_Handle):
    """BEiT's augmenting pretraining loader over a dataset file: an endless iterator of
    LoaderBatch (epochs follow each other; ``for batch in itertools.islice(loader, steps)``),
    every batch a pure function of the options and its global position, so ``seek(position)``
    resumes a run exactly. The defaults are `beit pretrain`'s: with the same dataset,
    ``batch_size``, ``seed``, model and token source, the batches are the ones it trains on.

    ``model`` gives view 1's size, the patch size and the channels (else give ``image_size`` and
    ``patch_size``); ``tokens`` is None, "cached" (the dataset's token cache; view 1 is then the
    whole image) or a Tokenizer run on every view 2. ``crop_scale``, ``crop_ratio`` and
    ``flip_prob`` left None take the recipe's values; ``mean``/``std`` one value or one per
    channel (default 0.5). See beit_loader_options in beit.h for every option."""

    _free_name = "beit_loader_free"

    def __init__(
        self,
        ctx: Context,
        path: Any,
        *,
        batch_size: int = 64,
        model: Optional[Model] = None,
        image_size: Any = None,
        patch_size: Any = None,
        view2_size: Any = None,
        masked_patches: Optional[int] = None,
        masking: str = "block",
        min_mask_block: Optional[int] = None,
        crop_scale: Optional[Tuple[float, float]] = None,
        crop_ratio: Optional[Tuple[float, float]] = None,
        flip_prob: Optional[float] = None,
        color_jitter: float = 0.0,
        mean: Any = None,
        std: Any = None,
        seed: int = 0,
        epoch_start: int = 0,
        workers: int = 0,
        prefetch: int = 0,
        drop_last: bool = True,
        tokens: Any = None,
    ):
        if masking not in _MASKING:
            raise _invalid(f"masking must be one of {sorted(_MASKING)}, got {masking!r}")
        o = _lib.beit_loader_options_default()
        o.batch_size = _count(batch_size, "batch_size")
        if image_size is not None:
            o.image_height, o.image_width = _size(image_size, "image_size")
        if patch_size is not None:
            o.patch_height, o.patch_width = _size(patch_size, "patch_size")
        if view2_size is not None:
            o.view2_height, o.view2_width = _size(view2_size, "view2_size")
        o.masked_patches = _count(masked_patches, "masked_patches")
        o.masking = _MASKING[masking]
        o.min_mask_block = _count(min_mask_block, "min_mask_block")
        o.crop_scale_min, o.crop_scale_max = _pair(crop_scale, "crop_scale")
        o.crop_ratio_min, o.crop_ratio_max = _pair(crop_ratio, "crop_ratio")
        o.flip_prob = -1.0 if flip_prob is None else float(flip_prob)
        o.color_jitter = float(color_jitter)
        norm = {name: _floats(v, name) for name, v in (("mean", mean), ("std", std))}
        for name, arr in norm.items():
            if arr is not None:
                setattr(o, name, _ptr(arr, c_float))
                setattr(o, f"{name}_len", arr.size)
        o.seed = _count(seed, "seed")
        o.epoch_start = _count(epoch_start, "epoch_start")
        o.workers = _count(workers, "workers")
        o.prefetch = _count(prefetch, "prefetch")
        o.drop_last = bool(drop_last)
        if tokens is None:
            o.token_source = _ffi.BEIT_TOKENS_NONE
        elif isinstance(tokens, str) and tokens == "cached":
            o.token_source = _ffi.BEIT_TOKENS_CACHED
        elif isinstance(tokens, Tokenizer):
            o.token_source = _ffi.BEIT_TOKENS_TOKENIZER
        else:
            raise _invalid(f"tokens must be None, 'cached' or a beit.Tokenizer, got {tokens!r}")
        out = c_void_p()
        with contextlib.ExitStack() as stack:
            c = stack.enter_context(ctx._use())
            if model is not None:
                o.model = stack.enter_context(model._use())
            if isinstance(tokens, Tokenizer):
                o.tokenizer = stack.enter_context(tokens._use())
            _check(_lib.beit_loader_create(c, _path(path), byref(o), byref(out)))
        super().__init__(out.value)
        info = _struct(_ffi.beit_loader_info)
        with self._use() as p:
            _check(_lib.beit_loader_get_info(p, byref(info)))
        self._info = _to_dataclass(LoaderInfo, info, token_source=_TOKEN_SOURCES.get(info.token_source))
        self._batch = _struct(_ffi.beit_loader_batch)

    @property
    def info(self) -> LoaderInfo:
        self._acquire()
        self._release()
        return self._info

    @property
    def position(self) -> int:
        """The global position of the next batch."""
        pos = c_uint64()
        with self._use() as p:
            _check(_lib.beit_loader_get_position(p, byref(pos)))
        return int(pos.value)

    def seek(self, position: int) -> None:
        """Makes the batch at global `position` the next one (e.g. Trainer.data_position)."""
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not 0 <= position < 2**64:
            raise _invalid(f"position must be an integer in [0, 2^64), got {position!r}")
        with self._use() as p:
            _check(_lib.beit_loader_seek(p, int(position)))

    def next(self) -> LoaderBatch:
        """The batch at the current position (new arrays, filled in place by the library)."""
        i = self._info
        b_, c = i.batch_size, i.channels
        view1 = np.empty((b_, c, i.height, i.width), dtype=np.float32)
        view2 = np.empty((b_, c, i.view2_height, i.view2_width), dtype=np.float32)
        masks = np.empty((b_, i.num_patches), dtype=np.uint8)
        labels = np.empty(b_, dtype=np.int64) if i.has_labels else None
        tokens = np.empty((b_, i.num_patches), dtype=np.int64) if i.has_tokens else None
        b = _struct(_ffi.beit_loader_batch)
        b.view1, b.view1_len = _ptr(view1, c_float), view1.size
        b.view2, b.view2_len = _ptr(view2, c_float), view2.size
        b.bool_masked_pos, b.bool_masked_pos_len = _ptr(masks, c_uint8), masks.size
        if labels is not None:
            b.labels, b.labels_len = _ptr(labels, c_int64), labels.size
        if tokens is not None:
            b.tokens, b.tokens_len = _ptr(tokens, c_int64), tokens.size
        with self._use() as p:
            _check(_lib.beit_loader_next(p, byref(b)))
        n = int(b.images)
        cut = (lambda a: a) if n == b_ else (lambda a: None if a is None else a[:n])
        return LoaderBatch(
            cut(view1), cut(view2), cut(masks), cut(labels), cut(tokens), n, int(b.position), int(b.epoch)
        )

    def __iter__(self):
        return self

    def __next__(self) -> LoaderBatch:
        return self.next()

    def __repr__(self) -> str:
        if self.closed:
            return "beit.Loader(closed)"
        i = self._info
        return (
            f"beit.Loader(batch_size={i.batch_size}, view1={i.height}x{i.width}, "
            f"batches_per_epoch={i.batches_per_epoch}, tokens={i.token_source!r})"
        )


# ---------------------------------------------------------------------------------------------
# Mask generator


class MaskGenerator(_Handle):
    """BEiT's block-wise mask generator (or random masking) on a ``grid`` (int or (rows,
    cols)): next() gives a uint8 [rows, cols] mask (1 = masked) and its masked count. Seeded:
    the same options and seed give the same masks. ``masked_patches`` None is BEiT's ratio
    (75/196 of the grid); ``min_block`` None is 16 (capped at the count); ``max_block`` None is
    the count; blocks' aspect ratios lie in [min_aspect, 1/min_aspect]."""

    _free_name = "beit_mask_generator_free"

    def __init__(
        self,
        grid: Any,
        *,
        masked_patches: Optional[int] = None,
        min_block: Optional[int] = None,
        max_block: Optional[int] = None,
        min_aspect: float = 0.3,
        strategy: str = "block",
        seed: int = 0,
    ):
        if strategy not in _MASKING:
            raise _invalid(f"strategy must be one of {sorted(_MASKING)}, got {strategy!r}")
        o = _lib.beit_mask_generator_options_default()
        o.grid_height, o.grid_width = _size(grid, "grid")
        o.masked_patches = _count(masked_patches, "masked_patches")
        o.min_block = _count(min_block, "min_block")
        o.max_block = _count(max_block, "max_block")
        o.min_aspect = float(min_aspect)
        o.strategy = _MASKING[strategy]
        o.seed = _count(seed, "seed")
        out = c_void_p()
        _check(_lib.beit_mask_generator_create(byref(o), byref(out)))
        super().__init__(out.value)
        self.grid = (int(o.grid_height), int(o.grid_width))

    def next(self) -> Tuple[np.ndarray, int]:
        """The next mask, uint8 [rows, cols], and how many patches it masks."""
        mask = np.empty(self.grid, dtype=np.uint8)
        count = c_size_t()
        with self._use() as p:
            _check(_lib.beit_mask_generator_next(p, _ptr(mask, c_uint8), mask.size, byref(count)))
        return mask, int(count.value)

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[np.ndarray, int]:
        return self.next()

    def __repr__(self) -> str:
        return f"beit.MaskGenerator(grid={self.grid}{', closed' if self.closed else ''})"

