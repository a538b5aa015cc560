"""Fine-tuning and evaluation (classification and segmentation) over the C API.

Adds to the classes of beit._core (so that they read as one API): Model.to_classifier,
Model.create_classifier, Model.with_image_size, Model.evaluate, Model.to_segmenter,
Model.create_segmenter, Model.segmentation_finetune, Model.evaluate_segmentation,
Trainer.step_classify, Trainer.finetune and TrainerOptions.finetune; and the option and result
types below. The ctypes mirrors of the header's structs live here too, checked against the
library's struct sizes when this module is imported.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_bool,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional

import numpy as np

from . import _ffi
from ._core import (
    _NORMALISED,
    Model,
    StepStats,
    Trainer,
    TrainerOptions,
    _array,
    _check,
    _config_text,
    _invalid,
    _lib,
    _path,
    _pixel_array,
    _ptr,
    _struct,
    _to_dataclass,
)

_P = POINTER
_status = c_uint32


class beit_classify_batch(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("pixels", _P(c_float)),
        ("pixels_len", c_size_t),
        ("batch", c_size_t),
        ("channels", c_size_t),
        ("height", c_size_t),
        ("width", c_size_t),
        ("labels", _P(c_int64)),
        ("labels_len", c_size_t),
    ]


class beit_finetune_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("steps", c_uint64),
        ("batch_size", c_size_t),
        ("label_smoothing", c_float),
        ("min_crop_scale", c_double),
        ("flip_prob", c_double),
        ("seed", c_uint64),
        ("workers", c_size_t),
        ("label_fraction", c_double),
        ("scratch_dir", c_char_p),
    ]


class beit_evaluation(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("confusion", _P(c_uint64)),
        ("confusion_len", c_size_t),
        ("images", c_uint64),
        ("correct", c_uint64),
        ("top1", c_double),
        ("num_labels", c_size_t),
    ]


class beit_segmentation_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("epochs", c_uint64),
        ("batch_size", c_size_t),
        ("learning_rate", c_double),
        ("min_learning_rate", c_double),
        ("warmup_steps", c_uint64),
        ("weight_decay", c_float),
        ("layer_decay", c_double),
        ("drop_path_rate", c_double),
        ("clip_grad_norm", c_double),
        ("seed", c_uint64),
        ("mean", _P(c_float)),
        ("mean_len", c_size_t),
        ("std", _P(c_float)),
        ("std_len", c_size_t),
        ("flip", c_bool),
        ("test_fraction", c_double),
        ("split_seed", c_uint64),
        ("label_fraction", c_double),
    ]


class beit_segmentation_step(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("total_steps", c_uint64),
        ("epoch", c_uint64),
        ("loss", c_double),
        ("lr", c_double),
        ("grad_norm", c_double),
    ]


class beit_segmentation_report(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("steps", c_uint64),
        ("train_samples", c_uint64),
        ("test_samples", c_uint64),
        ("final_epoch_loss", c_double),
        ("seconds", c_double),
    ]


class beit_segmentation_eval_options(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("batch_size", c_size_t),
        ("mean", _P(c_float)),
        ("mean_len", c_size_t),
        ("std", _P(c_float)),
        ("std_len", c_size_t),
        ("split", c_uint32),
        ("test_fraction", c_double),
        ("split_seed", c_uint64),
    ]


class beit_segmentation_evaluation(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("per_class_iou", _P(c_double)),
        ("per_class_iou_len", c_size_t),
        ("mean_iou", c_double),
        ("pixel_accuracy", c_double),
        ("samples", c_uint64),
        ("num_labels", c_size_t),
    ]


STEP_CALLBACK = CFUNCTYPE(c_int32, _P(_ffi.beit_step_stats), c_void_p)
SEGMENTATION_CALLBACK = CFUNCTYPE(c_int32, _P(beit_segmentation_step), c_void_p)

BEIT_SPLIT_ALL = 0
BEIT_SPLIT_TEST = 1

_VERSIONED = {
    "beit_classify_batch_default": beit_classify_batch,
    "beit_finetune_options_default": beit_finetune_options,
    "beit_evaluation_default": beit_evaluation,
    "beit_segmentation_options_default": beit_segmentation_options,
    "beit_segmentation_report_default": beit_segmentation_report,
    "beit_segmentation_eval_options_default": beit_segmentation_eval_options,
    "beit_segmentation_evaluation_default": beit_segmentation_evaluation,
}
_v = c_void_p
_PROTOTYPES = {
    "beit_trainer_options_finetune_default": (_ffi.beit_trainer_options, [c_uint64]),
    "beit_model_to_classifier": (_status, [_v, _v, c_size_t, c_double, c_uint64, _P(c_void_p)]),
    "beit_classifier_create": (_status, [_v, c_char_p, c_size_t, c_double, c_uint64, _P(c_void_p)]),
    "beit_model_with_image_size": (_status, [_v, _v, c_size_t, c_size_t, _P(c_void_p)]),
    "beit_trainer_step_classify": (
        _status,
        [_v, _P(beit_classify_batch), c_float, _P(_ffi.beit_step_stats)],
    ),
    "beit_trainer_finetune": (_status, [_v, c_char_p, _P(beit_finetune_options), STEP_CALLBACK, c_void_p]),
    "beit_finetune_epoch_steps": (_status, [c_char_p, c_size_t, c_double, c_uint64, _P(c_uint64)]),
    "beit_model_evaluate": (_status, [_v, _v, c_char_p, c_size_t, _P(beit_evaluation)]),
    "beit_model_to_segmenter": (_status, [_v, _v, c_size_t, c_uint64, _P(c_void_p)]),
    "beit_segmenter_create": (_status, [_v, c_char_p, c_size_t, c_uint64, _P(c_void_p)]),
    "beit_segmentation_finetune": (
        _status,
        [
            _v,
            _v,
            c_char_p,
            _P(beit_segmentation_options),
            SEGMENTATION_CALLBACK,
            c_void_p,
            _P(beit_segmentation_report),
            _P(c_void_p),
        ],
    ),
    "beit_model_evaluate_segmentation": (
        _status,
        [_v, _v, c_char_p, _P(beit_segmentation_eval_options), _P(beit_segmentation_evaluation)],
    ),
}
for _name, _struct_type in _VERSIONED.items():
    _PROTOTYPES[_name] = (_struct_type, [])
for _name, (_restype, _argtypes) in _PROTOTYPES.items():
    try:
        _fn = getattr(_lib, _name)
    except AttributeError as _e:
        raise ImportError(f"libbeit lacks {_name} (too old a library?)") from _e
    _fn.restype, _fn.argtypes = _restype, _argtypes
for _name, _struct_type in _VERSIONED.items():
    _got = getattr(_lib, _name)().struct_size
    if _got != ctypes.sizeof(_struct_type):
        raise ImportError(f"{_name}() reports struct_size {_got}, these bindings have {ctypes.sizeof(_struct_type)}")


# ---------------------------------------------------------------------------------------------
# Options and results


def _fill(struct, options: Any, dc, skip=()):
    """Sets the non-None fields of `options` (a dataclass of type `dc`, a dict or None) on
    `struct`; returns the dataclass."""
    if options is None:
        options = dc()
    elif isinstance(options, Mapping):
        options = dc(**options)
    elif not isinstance(options, dc):
        raise _invalid(f"options must be a {dc.__name__} or a dict, got {type(options).__name__}")
    for f in fields(options):
        v = getattr(options, f.name)
        if v is not None and f.name not in skip:
            setattr(struct, f.name, v)
    return options


@dataclass
class FinetuneOptions:
    """How Trainer.finetune feeds a classification trainer (beit_finetune_options); a field
    left None takes the library's default (`beit finetune`'s). `steps` 0: the trainer's
    total_steps. `scratch_dir`: where the labelled subset's temporary file goes."""

    steps: Optional[int] = None
    batch_size: Optional[int] = None
    label_smoothing: Optional[float] = None
    min_crop_scale: Optional[float] = None
    flip_prob: Optional[float] = None
    seed: Optional[int] = None
    workers: Optional[int] = None
    label_fraction: Optional[float] = None
    scratch_dir: Optional[Any] = None


@dataclass(frozen=True)
class Evaluation:
    """What Model.evaluate measured: `confusion[true, predicted]` image counts (uint64)."""

    images: int
    correct: int
    top1: float
    num_labels: int
    confusion: np.ndarray

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Correct / images per class (0 for a class without images)."""
        totals = self.confusion.sum(axis=1)
        diag = np.diagonal(self.confusion).astype(np.float64)
        return np.divide(diag, totals, out=np.zeros(self.num_labels), where=totals > 0)


@dataclass
class SegmentationOptions:
    """How Model.segmentation_finetune trains (beit_segmentation_options); None takes the
    library's default (`beit segment finetune`'s). `mean`/`std`: one value or one per channel."""

    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    min_learning_rate: Optional[float] = None
    warmup_steps: Optional[int] = None
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None
    drop_path_rate: Optional[float] = None
    clip_grad_norm: Optional[float] = None
    seed: Optional[int] = None
    mean: Optional[Any] = None
    std: Optional[Any] = None
    flip: Optional[bool] = None
    test_fraction: Optional[float] = None
    split_seed: Optional[int] = None
    label_fraction: Optional[float] = None


@dataclass(frozen=True)
class SegmentationStep:
    """What one segmentation fine-tuning step did (beit_segmentation_step)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float


@dataclass(frozen=True)
class SegmentationReport:
    """What a segmentation fine-tuning run did (beit_segmentation_report)."""

    steps: int
    train_samples: int
    test_samples: int
    final_epoch_loss: float
    seconds: float


@dataclass
class SegmentationEvalOptions:
    """How Model.evaluate_segmentation evaluates; `split` is "test" (the default) or "all"."""

    batch_size: Optional[int] = None
    mean: Optional[Any] = None
    std: Optional[Any] = None
    split: Optional[str] = None
    test_fraction: Optional[float] = None
    split_seed: Optional[int] = None


@dataclass(frozen=True)
class SegmentationEvaluation:
    """mIoU, pixel accuracy and per-class IoU (NaN for a class in neither masks nor predictions)."""

    mean_iou: float
    pixel_accuracy: float
    samples: int
    num_labels: int
    per_class_iou: np.ndarray


def _norm(struct, options, keep: list) -> None:
    """Points struct.mean/std at float32 copies of the options' values (kept alive in `keep`)."""
    for name in ("mean", "std"):
        v = getattr(options, name)
        if v is None:
            continue
        arr = np.ascontiguousarray(np.atleast_1d(np.asarray(v, dtype=np.float32)))
        if arr.ndim != 1:
            raise _invalid(f"{name} must be one value or a 1-D sequence, got shape {arr.shape}")
        keep.append(arr)
        setattr(struct, name, _ptr(arr, c_float))
        setattr(struct, name + "_len", arr.size)


class _CallbackRun:
    """A Python callback as a C one: its return value (truthy stops) passes through; an
    exception stops the run and is re-raised when the library call returns."""

    def __init__(self, callback: Optional[Callable], ctype, convert):
        self.error: Optional[BaseException] = None
        self.callback = callback
        if callback is None:
            self.c = ctype()
            return

        def trampoline(p, _user):
            try:
                return 1 if callback(convert(p.contents)) else 0
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                self.error = e
                return 1

        self.c = ctype(trampoline)

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------------------------------------
# Classification


def _finetune_trainer_options(cls, total_steps: int, **overrides) -> TrainerOptions:
    """`beit finetune`'s trainer options for a run of `total_steps` steps (lr 1e-3 after a
    tenth of warmup, cosine to 1e-6, betas (0.9, 0.999), weight decay 0.05, no clipping, drop
    path 0.1, layer decay 0.65), with `overrides` applied."""
    return cls._from_c(_lib.beit_trainer_options_finetune_default(total_steps), **overrides)


def _new_model(ctx, fn, *args) -> Model:
    out = c_void_p()
    with ctx._use() as c:
        _check(fn(c, *args, ctypes.byref(out)))
    return Model(out.value, ctx)


def _derived(model: Model, fn, *args) -> Model:
    out = c_void_p()
    with model.context._use() as c, model._use() as m:
        _check(fn(c, m, *args, ctypes.byref(out)))
    return Model(out.value, model.context)


def _to_classifier(self: Model, num_labels: int, drop_path_rate: float = 0.1, seed: int = 0) -> Model:
    """A new BeitForImageClassification with `num_labels` labels from this pretrained model,
    as BEiT (and `beit finetune --model`) starts fine-tuning: backbone copied, fresh head
    drawn from `seed`."""
    return _derived(self, _lib.beit_model_to_classifier, num_labels, drop_path_rate, seed)


def _create_classifier(cls, ctx, config: Any, num_labels: int, drop_path_rate: float = 0.1, seed: int = 0) -> Model:
    """A fresh BeitForImageClassification from a config (as `beit finetune --config`)."""
    return _new_model(ctx, _lib.beit_classifier_create, _config_text(config), num_labels, drop_path_rate, seed)


def _with_image_size(self: Model, height: int, width: Optional[int] = None) -> Model:
    """A copy for `height` x `width` inputs (position tables resized as HF does)."""
    return _derived(self, _lib.beit_model_with_image_size, height, height if width is None else width)


def _evaluate(self: Model, dataset: Any, batch_size: int = 256) -> Evaluation:
    """Top-1 and the confusion matrix of this classifier on a labelled dataset file (as
    `beit eval`)."""
    k = self.info.num_labels
    confusion = np.zeros((k, k), dtype=np.uint64)
    e = _struct(beit_evaluation)
    e.confusion, e.confusion_len = _ptr(confusion, c_uint64), confusion.size
    with self.context._use() as c, self._use() as m:
        _check(_lib.beit_model_evaluate(c, m, _path(dataset), batch_size, byref(e)))
    return Evaluation(e.images, e.correct, e.top1, e.num_labels, confusion)


def _step_classify(self: Trainer, pixels: Any, labels: Any, label_smoothing: float = 0.1) -> StepStats:
    """One fine-tuning step of a classification trainer: pixels float32 [B, C, H, W], labels
    int [B] in [0, num_labels)."""
    px = _pixel_array(pixels, "pixels", _NORMALISED)
    lab = _array(labels, np.int64, 1, "labels")
    if lab.shape[0] != px.shape[0]:
        raise _invalid(f"labels {lab.shape} must hold one label per image of pixels {px.shape}")
    batch = _struct(beit_classify_batch)
    batch.pixels, batch.pixels_len = _ptr(px, c_float), px.size
    batch.batch, batch.channels, batch.height, batch.width = px.shape
    batch.labels, batch.labels_len = _ptr(lab, c_int64), lab.size
    stats = _struct(_ffi.beit_step_stats)
    self._run(_lib.beit_trainer_step_classify, byref(batch), label_smoothing, byref(stats))
    return _to_dataclass(StepStats, stats)


def _trainer_finetune(
    self: Trainer, dataset: Any, options: Any = None, callback: Optional[Callable[[StepStats], Any]] = None
) -> None:
    """Fine-tunes this classification trainer on a labelled dataset file as `beit finetune`
    does, from its data position up to `options.steps` (or its total_steps). `callback(stats)`
    runs after every step on this thread; a truthy return stops the run (an exception stops it
    and is re-raised)."""
    s = _lib.beit_finetune_options_default()
    opts = _fill(s, options, FinetuneOptions, skip=("scratch_dir",))
    scratch = None if opts.scratch_dir is None else _path(opts.scratch_dir)
    s.scratch_dir = scratch
    run = _CallbackRun(callback, STEP_CALLBACK, lambda st: _to_dataclass(StepStats, st))
    self._run(_lib.beit_trainer_finetune, _path(dataset), byref(s), run.c, None)
    run.reraise()


def finetune_epoch_steps(dataset: Any, batch_size: int, label_fraction: float = 1.0, seed: int = 0) -> int:
    """Steps of one epoch of Trainer.finetune over `dataset` (its labelled fraction)."""
    n = c_uint64()
    _check(_lib.beit_finetune_epoch_steps(_path(dataset), batch_size, label_fraction, seed, byref(n)))
    return n.value


# ---------------------------------------------------------------------------------------------
# Segmentation


def _to_segmenter(self: Model, num_labels: int, seed: int = 0) -> Model:
    """A new BeitForSemanticSegmentation with this model's backbone and a fresh head."""
    return _derived(self, _lib.beit_model_to_segmenter, num_labels, seed)


def _create_segmenter(cls, ctx, config: Any, num_labels: int, seed: int = 0) -> Model:
    """A fresh BeitForSemanticSegmentation from a config (as `beit segment finetune --config`)."""
    return _new_model(ctx, _lib.beit_segmenter_create, _config_text(config), num_labels, seed)


def _segmentation_finetune(
    self: Model,
    dataset: Any,
    options: Any = None,
    callback: Optional[Callable[[SegmentationStep], Any]] = None,
) -> tuple:
    """Fine-tunes a copy of this segmentation model on a dataset file with masks (as
    `beit segment finetune`); returns (trained Model, SegmentationReport). `callback(step)` as in
    Trainer.finetune."""
    s = _lib.beit_segmentation_options_default()
    keep: list = []
    opts = _fill(s, options, SegmentationOptions, skip=("mean", "std"))
    _norm(s, opts, keep)
    run = _CallbackRun(callback, SEGMENTATION_CALLBACK, lambda st: _to_dataclass(SegmentationStep, st))
    report = _struct(beit_segmentation_report)
    out = c_void_p()
    with self.context._use() as c, self._use() as m:
        status = _lib.beit_segmentation_finetune(
            c, m, _path(dataset), byref(s), run.c, None, byref(report), byref(out)
        )
    if status == _ffi.BEIT_OK:
        trained = Model(out.value, self.context)
        if run.error is not None:
            trained.close()
    else:
        run.reraise()
        _check(status)
    run.reraise()
    return trained, _to_dataclass(SegmentationReport, report)


_SPLITS = {"all": BEIT_SPLIT_ALL, "test": BEIT_SPLIT_TEST}


def _evaluate_segmentation(self: Model, dataset: Any, options: Any = None) -> SegmentationEvaluation:
    """mIoU, pixel accuracy and per-class IoU on a dataset with masks (as `beit segment eval`)."""
    s = _lib.beit_segmentation_eval_options_default()
    keep: list = []
    opts = _fill(s, options, SegmentationEvalOptions, skip=("mean", "std", "split"))
    _norm(s, opts, keep)
    if opts.split is not None:
        if opts.split not in _SPLITS:
            raise _invalid(f"split must be 'test' or 'all', got {opts.split!r}")
        s.split = _SPLITS[opts.split]
    k = self.info.num_labels
    per_class = np.zeros(k, dtype=np.float64)
    e = _struct(beit_segmentation_evaluation)
    e.per_class_iou, e.per_class_iou_len = _ptr(per_class, c_double), k
    with self.context._use() as c, self._use() as m:
        _check(_lib.beit_model_evaluate_segmentation(c, m, _path(dataset), byref(s), byref(e)))
    return SegmentationEvaluation(e.mean_iou, e.pixel_accuracy, e.samples, e.num_labels, per_class)


Model.to_classifier = _to_classifier
Model.create_classifier = classmethod(_create_classifier)
Model.with_image_size = _with_image_size
Model.evaluate = _evaluate
Model.to_segmenter = _to_segmenter
Model.create_segmenter = classmethod(_create_segmenter)
Model.segmentation_finetune = _segmentation_finetune
Model.evaluate_segmentation = _evaluate_segmentation
Trainer.step_classify = _step_classify
Trainer.finetune = _trainer_finetune
TrainerOptions.finetune = classmethod(_finetune_trainer_options)
