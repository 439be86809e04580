"""Soft maps to binary predictions: validation, bilinear resizing, the one threshold rule.

A soft map in [0, 1] is resized bilinearly (``align_corners=False``) to its GT's (H, W) and
thresholded as ``map >= np.float32(t)`` (both sides float32); every score of a soft map goes
through :func:`threshold_map`.
"""

from __future__ import annotations

import logging

import numpy as np

from benchmark.evaluate.confusion import _where

logger = logging.getLogger(__name__)


def upsample_map(soft: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map bilinearly (``align_corners=False``) to ``size`` = (H, W).

    Args:
        soft: (h, w) float map.
        size: Target (H, W).

    Returns:
        (H, W) float32 array (a float32 copy of ``soft`` if it already has that size).

    Raises:
        ValueError: ``soft`` is not 2-D or ``size`` is not two positive integers.
    """
    soft = np.asarray(soft)
    if soft.ndim != 2:
        raise ValueError(f"expected a 2-D map (h, w), got shape {soft.shape}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    if soft.shape == size:
        return soft.astype(np.float32, copy=True)
    import torch
    import torch.nn.functional as F  # noqa: N812

    t = torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32))[None, None]  # (1,1,h,w)
    with torch.no_grad():
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def _prepare_map(soft: np.ndarray, shape: tuple[int, ...], name: str | None) -> np.ndarray:
    """Validate a soft map in [0, 1] and bring it to the GT shape as float32 in [0, 1]."""
    soft = np.asarray(soft)
    if soft.ndim != 2:
        raise ValueError(f"soft map must be 2-D (h, w), got shape {soft.shape}{_where(name)}")
    if len(shape) != 2:
        raise ValueError(f"GT must be 2-D (H, W), got shape {shape}{_where(name)}")
    if not (np.issubdtype(soft.dtype, np.floating) or np.issubdtype(soft.dtype, np.integer)):
        raise ValueError(f"soft map must be numeric, got dtype {soft.dtype}{_where(name)}")
    if soft.size == 0:
        raise ValueError(f"soft map is empty{_where(name)}")
    lo, hi = float(np.min(soft)), float(np.max(soft))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"soft map contains NaN or infinite values{_where(name)}")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"soft map values must be in [0, 1], found range [{lo:.6g}, {hi:.6g}]{_where(name)}"
        )
    if soft.shape == tuple(shape):
        return soft.astype(np.float32, copy=False)
    out = upsample_map(soft, (int(shape[0]), int(shape[1])))
    # Bilinear weights sum to 1 only up to rounding: keep the [0, 1] contract exactly.
    return np.clip(out, 0.0, 1.0, out=out)


def threshold_map(
    soft: np.ndarray, shape: tuple[int, ...], threshold: float, name: str | None = None
) -> np.ndarray:
    """The one binary prediction of a soft map: ``map >= np.float32(threshold)`` at ``shape``.

    Every score of a soft map goes through here: the map is validated, resized bilinearly to
    the GT's (H, W) (see the module docstring) and thresholded in float32. Scores under another
    convention take this prediction or its complement, never a second threshold.

    Args:
        soft: (h, w) map in [0, 1].
        shape: (H, W) of the GT.
        threshold: Decision threshold.
        name: Optional image name, quoted in error messages.

    Returns:
        (H, W) bool array.

    Raises:
        ValueError: The map is not 2-D, not finite or outside [0, 1], or ``shape`` is not 2-D.
    """
    return _prepare_map(soft, tuple(shape), name) >= np.float32(threshold)
