"""The method contract: what every WSSS method implements, and the registry that finds it.

A method is one class in one module of this package, registered with ``@register_method``.
The runner (``benchmark.runner``) calls, in order:

1. ``fit(train, ctx)``: learn from images and image-level labels only. ``train.masks`` is
   ``None`` unless the method is a reference that declares ``uses_masks = True``.
2. ``localize(batch, ctx) -> maps``: soft maps of shape (N, C, h, w) in [0, 1], float32.
   For single-label datasets (Oxford-IIIT Pet) C = 1: the map of the image's label class
   (the pet, whatever its breed). Multi-label datasets give one channel per class, absent
   classes zero.
3. ``refine(batch, maps, ctx) -> maps``: optional refinement; the default is the identity.

Methods never compute metrics, never read the clock and never write outside ``ctx.workdir``.
Training loops call ``ctx.should_continue()`` once per step and stop when it returns False.
Internal stages (a classifier, an affinity network, ...) go through ``ctx.stage(name, fn)``
so that the runner can cache, time and resume each of them. Method specs (``name[k=v,...]``)
are parsed and written by :mod:`methods.specs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from methods.specs import (
    format_spec,
    parse_spec,
    short_repr,
    split_top_level,
    strict_yaml_load,
    strict_yaml_loader,
)

logger = logging.getLogger(__name__)

__all__ = [  # spec parsing and formatting live in methods.specs; re-exported here
    "PRESETS",
    "Context",
    "ImageSet",
    "Method",
    "create_method",
    "format_spec",
    "get_method",
    "list_methods",
    "parse_spec",
    "register_method",
    "seed_everything",
    "split_top_level",
    "strict_yaml_load",
    "strict_yaml_loader",
]

PRESETS = ("paper", "quick", "tiny")


@dataclass
class ImageSet:
    """What a method sees of a split: images and image-level labels, never masks by default.

    Attributes:
        images: (N, H, W, 3) uint8 images at the working resolution (often a memory map).
        labels: (N,) int64 class index of each image (0-based); on a multi-label dataset
            (PASCAL VOC, ``synthetic_voc``) (N, C) uint8 multi-hot image tags.
        num_classes: number of image-level classes.
        names: image identifiers, in the order of ``images``.
        masks: (N, H, W) uint8 masks (0 background, 1 pet, 255 ignore) at the working
            resolution; on a multi-label dataset class masks (0 background, 1..C, 255 ignore).
            Only given to methods with ``uses_masks = True`` (the references).
        boxes: (N, 4) float32 boxes (xmin, ymin, xmax, ymax) at the working resolution, NaN
            rows where an image has none (Oxford Pet: head boxes, trainval only); only given
            to methods with ``supervision = "box"``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    names: list[str]
    masks: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def multilabel(self) -> bool:
        """True when ``labels`` are (N, C) multi-hot tags (several classes per image)."""
        return np.ndim(self.labels) == 2

    def tags(self) -> np.ndarray:
        """(N, C) float32 multi-hot tags (one-hot of ``labels`` on a single-label dataset)."""
        labels = np.asarray(self.labels)
        if self.multilabel:
            return labels.astype(np.float32)
        return np.eye(self.num_classes, dtype=np.float32)[labels.astype(np.int64)]

    def subset(self, index: slice | np.ndarray | list[int]) -> ImageSet:
        """Return the images selected by ``index`` (a slice keeps memory maps lazy)."""
        if isinstance(index, slice):
            names = self.names[index]
        else:
            index = np.asarray(index, dtype=np.int64)
            names = [self.names[i] for i in index]
        return ImageSet(
            images=self.images[index],
            labels=np.asarray(self.labels)[index],
            num_classes=self.num_classes,
            names=names,
            masks=None if self.masks is None else self.masks[index],
            boxes=None if self.boxes is None else np.asarray(self.boxes)[index],
        )

    def batches(self, batch_size: int) -> list[ImageSet]:
        """Split into consecutive batches of at most ``batch_size`` images."""
        return [
            self.subset(slice(i, min(i + batch_size, len(self))))
            for i in range(0, len(self), batch_size)
        ]

    def check(self, owner: str, what: str) -> None:
        """Raise ValueError (naming ``owner`` and ``what``) unless images and labels are valid.

        Valid: uint8 (N, H, W, 3) images; (N,) class indices in [0, C) or (N, C) tags of 0 and 1;
        at most 254 classes (pseudo labels are uint8 with 255 = ignore).
        """
        images, labels, c = self.images, np.asarray(self.labels), self.num_classes
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{owner}: {what} images must be uint8 (N, H, W, 3), got {images.dtype} "
                f"{images.shape}"
            )
        if labels.ndim not in (1, 2) or len(labels) != images.shape[0]:
            raise ValueError(
                f"{owner}: {what} labels must be (N,) class indices or (N, C) multi-hot tags, "
                f"got shape {labels.shape}"
            )
        if labels.ndim == 2 and (labels.shape[1] != c or not np.isin(labels, (0, 1)).all()):
            raise ValueError(f"{owner}: {what} tags must be (N, {c}) of 0 and 1")
        if labels.ndim == 1 and len(labels) and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(
                f"{owner}: {what} labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]"
            )
        if c >= 255:
            raise ValueError(f"{owner}: at most 254 classes (uint8 pseudo labels, 255 = ignore)")


@dataclass
class Context:
    """What the runner gives a method: device, seed, work folder, budget and stage cache.

    The default implementation runs every stage (no cache) and never stops; the runner
    passes a subclass that caches stages and enforces the budget.

    Attributes:
        device: the torch device to train and infer on.
        seed: the seed of this run; methods seed their own generators from it.
        workdir: the only folder a method may write to.
        max_epochs: optional cap on epochs per stage (the budget's epoch cap).
        amp: use autocast (bf16) on CUDA where the method supports it.
        channels_last: keep convolutional networks in channels_last memory format
            (:func:`methods.common.data.place`); faster on CPU (oneDNN) and GPU (cuDNN).
        progress: whether methods may show progress bars.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    workdir: Path = field(default_factory=lambda: Path("."))
    max_epochs: int | None = None
    amp: bool = False
    channels_last: bool = True
    progress: bool = False
    budget_hit: bool = False

    def should_continue(self) -> bool:
        """Return False once the run's budget is spent. Call once per training step."""
        return True

    def epochs(self, wanted: int) -> int:
        """The number of epochs a stage may run: ``wanted`` capped by the budget's epoch cap."""
        return wanted if self.max_epochs is None else min(wanted, self.max_epochs)

    def epoch_range(self, wanted: int, desc: str) -> Iterable[int]:
        """``range(self.epochs(wanted))``, shown as a progress bar when :attr:`progress` is on."""
        epochs = range(self.epochs(wanted))
        if not self.progress:
            return epochs
        from tqdm.auto import tqdm

        return tqdm(epochs, desc=desc, unit="epoch", leave=False)

    def stage(
        self, name: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Run (or reuse) an internal stage whose result is a dict of tensors.

        Args:
            name: the stage name, unique within the method (``classifier``, ``affinity``).
            compute: builds the stage's result; only called when no cached result exists.

        Returns:
            The stage's tensors (a state dict, maps, flags).
        """
        return compute()

    @contextlib.contextmanager
    def as_method(self, method: Method) -> Iterator[None]:
        """Run a sub-method's ``fit`` inside this block as if it were that method's own run.

        A method built on another (``cam_affinitynet`` trains a ``cam`` classifier) wraps the
        inner ``fit`` in this block. The runner's context then uses the seed and the stage
        folder that ``method`` has when it runs on its own, so an identical inner model is
        trained once and shared, with the very same weights, by both runs. The default
        context changes nothing.
        """
        yield

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU torch generator seeded from the run seed (plus ``offset``)."""
        g = torch.Generator()
        g.manual_seed(int(self.seed) * 1000003 + offset)
        return g


def seed_everything(seed: int) -> None:
    """Seed the global generators of Python, numpy and torch (nothing else is switched)."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Method:
    """Base class of every method. Subclasses set ``name``, ``Config`` and ``presets``.

    Attributes:
        name: the registry name (``cam``, ``cam_affinitynet``, ...).
        Config: a frozen dataclass; its defaults are the paper's settings.
        presets: overrides of the defaults per preset (``paper`` is usually empty).
        uses_masks: True for references that read GT masks (``supervised``, ``centre_prior``).
        kind: ``method`` or ``reference`` (references are set apart in tables).
        fixed_threshold: a threshold to use instead of a validation sweep (binary maps).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    uses_masks: ClassVar[bool] = False
    kind: ClassVar[str] = "method"
    fixed_threshold: ClassVar[float | None] = None
    #: What the method learns from, shown in every table: ``image`` (image-level labels),
    #: ``box`` (bounding boxes: never ranked among image-level methods), ``pixel`` (GT masks)
    #: or ``none`` (a fixed prior).
    supervision: ClassVar[str] = "image"
    #: True if the method handles multi-label datasets (labels (N, C), maps of every tagged
    #: class); the runner records the others as ``unsupported`` on such datasets.
    multilabel: ClassVar[bool] = False
    #: True for a reference whose pseudo masks are the GT masks (``supervised``): the runner
    #: then trains the segmenter on the working-resolution GT instead of thresholded maps.
    pseudo_from_gt: ClassVar[bool] = False
    #: Config fields read only by localize/refine, never by fit: variants that differ only in
    #: them (``ccam_ecs[crf=true]``, ``weaktr_refinery[map=decoder]``) share the fitted
    #: stages and the training seed, so they are compared on the very same trained model.
    inference_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any | None = None, preset: str = "paper") -> None:
        self.preset = preset
        self.config = config if config is not None else self.make_config(preset)

    # ---- configuration -------------------------------------------------------------
    @classmethod
    def make_config(cls, preset: str = "paper", **overrides: Any) -> Any:
        """Build a Config from a preset plus explicit overrides (validated by name)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        values = dict(cls.presets.get(preset, {}))
        names = {f.name for f in dataclasses.fields(cls.Config)}
        for key in overrides:
            if key not in names:
                raise ValueError(
                    f"{cls.name}: unknown parameter {key!r}; valid: {', '.join(sorted(names))}"
                )
        _check_types(cls, overrides)
        values.update(overrides)
        _check_bounds(cls, values)
        return cls.Config(**values)

    def params(self) -> dict[str, Any]:
        """All config fields as a plain dict (for result rows and cache keys)."""
        return dataclasses.asdict(self.config)

    def identity(self) -> str:
        """``name[k=v,...]``: the fields that differ from the preset, keys sorted."""
        base = dataclasses.asdict(self.make_config(self.preset))
        diff = {k: v for k, v in self.params().items() if base.get(k) != v}
        return format_spec(self.name, diff)

    def cache_key(self) -> str:
        """A stable JSON string of everything that determines this method's outputs."""
        return json.dumps({"name": self.name, "params": self.params()}, sort_keys=True, default=str)

    def fit_identity(self) -> str:
        """:meth:`identity` without :attr:`inference_fields`: names the fitted model."""
        fit_only = dataclasses.replace(
            self.config,
            **{
                k: getattr(self.make_config(self.preset), k)
                for k in self.inference_fields
                if hasattr(self.config, k)
            },
        )
        return type(self)(fit_only, self.preset).identity()

    def fit_cache_key(self) -> str:
        """:meth:`cache_key` without :attr:`inference_fields` (keys the fitted stages)."""
        params = {k: v for k, v in self.params().items() if k not in self.inference_fields}
        return json.dumps({"name": self.name, "params": params}, sort_keys=True, default=str)

    # ---- the three calls -------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: Context) -> None:
        """Learn from the train images and their image-level labels."""

    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """Return soft maps (N, C, h, w) float32 in [0, 1]."""
        raise NotImplementedError

    def refine(self, batch: ImageSet, maps: np.ndarray, ctx: Context) -> np.ndarray:
        """Refine soft maps; the default is the identity."""
        return maps

    # ---- optional ----------------------------------------------------------------------
    def weight_sources(self) -> dict[str, Any]:
        """``{timm architecture: pretrained setting}`` of the networks this config builds.

        The runner checks ``"offline"`` entries before any work (a missing package is one
        error line naming it). The default reads the ``backbone`` and ``pretrained`` fields.
        """
        arch = getattr(self.config, "backbone", None)
        if isinstance(arch, str) and hasattr(self.config, "pretrained"):
            return {arch: self.config.pretrained}
        return {}

    def search_space(self, trial: Any) -> dict[str, Any]:
        """Hyperparameters for Optuna sweeps (``trial.suggest_*``); none by default."""
        return {}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the resolved type hint ``hint`` (containers: outer type only)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    base = origin or hint
    if not isinstance(base, type):
        return True  # an exotic hint: not checked
    if base is bool:
        return isinstance(value, (bool, np.bool_))
    if base is float:  # numpy scalars (from sweeps) are fine
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if base is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if base is Path:
        return isinstance(value, (str, Path))
    if base is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, base)


def _check_types(cls: type[Method], overrides: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter when an override has the wrong type."""
    try:
        hints = typing.get_type_hints(cls.Config)
    except Exception:  # noqa: BLE001 - unresolvable annotations: leave it to the Config
        return
    for key, value in overrides.items():
        if key in hints and not _accepts(hints[key], value):
            hint = getattr(hints[key], "__name__", None) or str(hints[key])
            raise ValueError(
                f"{cls.name}: parameter {key!r} expects {hint.replace('typing.', '')}, "
                f"got {short_repr(value)}"
            )


#: Generic bounds of config fields, by name (first match wins): ``(pattern, low, high,
#: low_open)``. Every float (also inside tuples) must be finite and every int >= 0, whatever
#: the name.
_BOUNDS: tuple[tuple[str, float, float | None, bool], ...] = (
    (r"^warmup_epochs$", 0, None, False),
    (r"epochs$", 1, None, False),  # 0 epochs would be "done" without training
    (r"batch_size$", 1, None, False),
    (r"steps$", 0, None, False),
    (r"(^|_)lr$", 0.0, None, True),
    (r"lr_mult$|weight_decay$|momentum$|power$|sigma$", 0.0, None, False),
    (r"threshold$", 0.0, 1.0, False),
    (r"scales$", 0.0, None, True),
    (r"(size|stride|dim|dims|heads|depth|patch|radius|window|images)$", 1, None, False),
)


def _bound_of(key: str, integer: bool) -> tuple[float, float | None, bool]:
    for pattern, low, high, low_open in _BOUNDS:
        if re.search(pattern, key):
            return low, high, low_open and not integer
    return (0, None, False) if integer else (-math.inf, None, False)


def _check_bounds(cls: type[Method], values: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter when a number is nan/inf or out of its range.

    Floats must be finite everywhere (also inside tuples), ints >= 0 unless a name-based rule
    (:data:`_BOUNDS`) says more: epochs and batch sizes >= 1, learning rates > 0, decays and
    multipliers >= 0, thresholds in [0, 1], scales > 0, sizes >= 1.
    """
    for key, value in values.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        numbers_in = [
            v for v in items if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        ]
        if not numbers_in:
            continue
        low, high, low_open = _bound_of(key, isinstance(numbers_in[0], numbers.Integral))
        for v in numbers_in:
            if not math.isfinite(v):
                raise ValueError(f"{cls.name}: parameter {key!r} must be finite, got {v}")
            if v < low or (low_open and v == low) or (high is not None and v > high):
                where = f"({low}, " if low_open else f"[{low}, "
                where += f"{high}]" if high is not None else "inf)"
                raise ValueError(f"{cls.name}: parameter {key!r} must be in {where}, got {v}")


# ---- registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names, sorted; ``kind`` filters ``method`` or ``reference``."""
    return sorted(n for n, c in _REGISTRY.items() if kind is None or c.kind == kind)


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown method {name!r}; valid methods: {', '.join(list_methods())}"
        ) from None


def create_method(spec: str, preset: str = "quick", **overrides: Any) -> Method:
    """Create a configured method from ``name`` or ``name[k=v,...]`` and a preset."""
    name, spec_overrides = parse_spec(spec)
    cls = get_method(name)
    spec_overrides.update(overrides)
    config = cls.make_config(preset, **spec_overrides)
    return cls(config, preset=preset)
