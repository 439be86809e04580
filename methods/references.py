"""References that frame every table: the supervised upper bound and two trivial floors.

- ``supervised``: the ground-truth masks themselves (the runner trains the shared segmenter on
  the GT masks, ignore pixels included): the upper bound of any weak method.
- ``all_foreground``: every pixel is pet.
- ``centre_prior``: a centred ellipse, with the image's aspect ratio, covering the mean pet
  fraction of the train masks. Pets are large and centred, so this floor is not low: a method
  that does not beat it has learned nothing about the images.

On a multi-label dataset (PASCAL VOC, ``synthetic_voc``) each gives one map per class: the GT
class masks; ones for every tagged class (the first tagged class everywhere once pseudo labels
take the argmax); the ellipse (covering the mean foreground fraction) for every tagged class.

These are not methods from a paper; they have no deviations. Their maps are binary, so they
use ``fixed_threshold = 0.5`` instead of a threshold sweep (a background score of 0.5 on a
multi-class dataset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from datasets.conventions import IGNORE
from methods.base import Context, ImageSet, Method, register_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmptyConfig:
    """References have no parameters."""


_PRESETS: dict[str, dict] = {"paper": {}, "quick": {}, "tiny": {}}


def _channels(batch: ImageSet) -> np.ndarray:
    """(N, C, 1, 1) tags on a multi-label dataset (maps of untagged classes are zero), else 1."""
    if not batch.multilabel:
        return np.ones((len(batch), 1, 1, 1), dtype=np.float32)
    return batch.tags()[:, :, None, None]


def _need_masks(batch: ImageSet, who: str) -> np.ndarray:
    if batch.masks is None:
        raise ValueError(f"{who} reads ground-truth masks, but the ImageSet has none (masks=None)")
    return np.asarray(batch.masks)


@register_method
class Supervised(Method):
    """The ground-truth masks as maps: the fully supervised upper bound."""

    name = "supervised"
    supervision = "pixel"
    Config = EmptyConfig
    presets = _PRESETS
    kind = "reference"
    multilabel = True
    uses_masks = True
    fixed_threshold = 0.5
    pseudo_from_gt: ClassVar[bool] = True  # the runner uses the GT masks (with ignore) as pseudo

    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """``mask == 1`` as a float map (N, 1, H, W); ignore pixels count as 0.

        Multi-label: ``mask == c + 1`` for every class c, (N, C, H, W).
        """
        masks = _need_masks(batch, "supervised")
        if batch.multilabel:
            classes = np.arange(1, batch.num_classes + 1, dtype=masks.dtype)
            return (masks[:, None] == classes[None, :, None, None]).astype(np.float32)
        return (masks == 1).astype(np.float32)[:, None]


@register_method
class AllForeground(Method):
    """Every pixel is pet."""

    name = "all_foreground"
    supervision = "none"
    Config = EmptyConfig
    presets = _PRESETS
    kind = "reference"
    multilabel = True
    fixed_threshold = 0.5

    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """Ones (N, 1, H, W); multi-label: ones for every tagged class, (N, C, H, W).

        With several tags the maps tie everywhere; pseudo labels take the first tagged class.
        """
        n, h, w = batch.images.shape[:3]
        return np.ones((n, 1, h, w), dtype=np.float32) * _channels(batch)


def centred_ellipse(h: int, w: int, fraction: float) -> np.ndarray:
    """A centred ellipse (aspect of the image) covering ``fraction`` of the h x w pixels.

    The ellipse's semi-axes are ``s * w / 2`` and ``s * h / 2``; ``s`` is found by bisection on
    the pixel grid, so the covered fraction is exact up to one ring of pixels even when the
    ellipse is cut by the image border (fractions above pi / 4).

    Returns:
        (h, w) bool mask.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    yy = (np.arange(h) + 0.5 - h / 2) / (h / 2)  # in (-1, 1)
    xx = (np.arange(w) + 0.5 - w / 2) / (w / 2)
    r2 = yy[:, None] ** 2 + xx[None, :] ** 2  # (h, w) normalised squared radius
    target = fraction * h * w
    lo, hi = 0.0, float(np.sqrt(r2.max())) + 1e-6
    for _ in range(40):
        mid = (lo + hi) / 2
        if (r2 <= mid * mid).sum() < target:
            lo = mid
        else:
            hi = mid
    # pick whichever of the two bracketing radii covers a count closer to the target
    n_lo, n_hi = (r2 <= lo * lo).sum(), (r2 <= hi * hi).sum()
    s = lo if abs(n_lo - target) <= abs(n_hi - target) else hi
    return r2 <= s * s


@register_method
class CentrePrior(Method):
    """A centred ellipse covering the mean pet fraction of the train masks."""

    name = "centre_prior"
    supervision = "pixel"  # the mean foreground fraction of the train masks
    Config = EmptyConfig
    presets = _PRESETS
    kind = "reference"
    multilabel = True
    uses_masks = True
    fixed_threshold = 0.5

    def __init__(self, config: EmptyConfig | None = None, preset: str = "paper") -> None:
        super().__init__(config, preset)
        self.fraction: float | None = None

    def fit(self, train: ImageSet, ctx: Context) -> None:
        """Mean over train images of the pet fraction of labelled (non-ignored) pixels."""
        masks = _need_masks(train, "centre_prior")
        state = ctx.stage("prior", lambda: {"fraction": _mean_fraction(masks)})
        self.fraction = float(state["fraction"])
        logger.info("centre_prior: mean pet fraction %.3f", self.fraction)

    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """The binary ellipse (N, 1, H, W), the same for every image."""
        if self.fraction is None:
            raise RuntimeError("centre_prior.localize called before fit()")
        n, h, w = batch.images.shape[:3]
        ellipse = centred_ellipse(h, w, self.fraction).astype(np.float32)
        return np.broadcast_to(ellipse, (n, 1, h, w)) * _channels(batch)


def _mean_fraction(masks: np.ndarray) -> torch.Tensor:
    fractions = []
    for m in masks:  # one image at a time (masks may be a memory map)
        m = np.asarray(m)
        labelled = int((m != IGNORE).sum())
        if labelled:  # foreground: any class (pet, or 1..C on a multi-class dataset)
            fractions.append(float(((m != 0) & (m != IGNORE)).sum()) / labelled)
    if not fractions:
        raise ValueError("centre_prior: every train mask is entirely ignored (255)")
    return torch.tensor(float(np.mean(fractions)), dtype=torch.float64)
