"""Box prior: pseudo masks from bounding boxes, a Gaussian heatmap per box (box-supervised).

The Oxford-IIIT Pet seed project's bounding-box variant (``bbox_heatmap.py`` in the seed README):
parse each image's XML box and draw a Gaussian heatmap from it; the heatmap is then thresholded
into a pseudo mask like any method's map. This is **box supervision**, a stronger signal than the
image-level labels of every other method here, so its rows carry ``supervision = "box"`` and the
tables list it apart from the image-level methods, never ranked among them.

Formula, for a box (x0, y0, x1, y1) at the working resolution, centre (cx, cy), half sides
(hx, hy) and ``s = sigma_scale``::

    M(x, y) = exp(-((x - cx)^2 / (2 (s hx)^2) + (y - cy)^2 / (2 (s hy)^2)))

so the map is 1 at the box centre and exp(-1 / (2 s^2)) on the box's edge midpoints.

Caveats:

- **In Oxford Pet the XML box is the head box**, not the whole animal: a Gaussian around the
  head covers the body only as far as ``sigma_scale`` spreads it. Boxes exist for **trainval
  only**: test images get an all-zero map (their ``maps`` rows on test say nothing about the
  method; the segmenter, trained on the train pseudo masks, is what is scored on test). Train
  images without a box (a few in the real release) get an all-zero map as well, i.e. an
  all-background pseudo mask; the count is logged.
- The synthetic generator writes the same kind of head box (the pet pixels within 1.6 head
  radii of the head centre), for trainval images only.

Deviations: the seed's Gaussian width is not documented in its README; ``sigma_scale`` (the
Gaussian's sigma in half box sides) is a parameter, 1.0 by default. No learning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from methods.base import Context, ImageSet, Method, register_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Box prior settings (no learning)."""

    sigma_scale: float = 1.0  # the Gaussian's sigma in half box sides (seed: undocumented)


def gaussian_box_map(box: np.ndarray, h: int, w: int, sigma_scale: float) -> np.ndarray:
    """The (h, w) Gaussian heatmap of one box (x0, y0, x1, y1); zeros for a NaN box."""
    if not np.all(np.isfinite(box)):
        return np.zeros((h, w), dtype=np.float32)
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx = max(sigma_scale * (x1 - x0) / 2, 0.5)
    sy = max(sigma_scale * (y1 - y0) / 2, 0.5)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    return np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2).astype(np.float32)


@register_method
class BoxPrior(Method):
    """A Gaussian heatmap from each image's (head) box: box-supervised pseudo masks."""

    name = "box_prior"
    supervision = "box"
    Config = Config
    presets = {"paper": {}, "quick": {}, "tiny": {}}

    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """(N, 1, H, W) Gaussian heatmaps of the batch's boxes (zeros where there is none)."""
        if batch.boxes is None:
            raise ValueError("box_prior reads bounding boxes, but the ImageSet has none")
        n, h, w = batch.images.shape[:3]
        boxes = np.asarray(batch.boxes, dtype=np.float32)
        missing = int((~np.isfinite(boxes).all(axis=1)).sum())
        if missing:
            logger.info("box_prior: %d of %d images have no box (all-zero map)", missing, n)
        maps = [gaussian_box_map(b, h, w, self.config.sigma_scale) for b in boxes]
        return np.stack(maps)[:, None] if maps else np.zeros((0, 1, h, w), np.float32)
