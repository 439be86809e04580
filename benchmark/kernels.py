"""Compiled inner loops (numba) for the evaluator's hot paths.

Each kernel is one pass over the pixels with no temporary arrays: numpy would need five to
eight full-size passes (products, casts, corrections, keys, ``bincount``) for the same work,
and the threshold sweep is the one place where the harness touches every pixel of every map
many times (validation sweeps, Optuna threshold studies, reports).

The kernels are compiled on first use and cached on disk (``cache=True``), so only the first
process on a machine pays the compilation (about a second per kernel).
"""

from __future__ import annotations

import logging

import numba
import numpy as np

logger = logging.getLogger(__name__)

#: GT codes used by :func:`sweep_histogram`: rows of its output.
NEGATIVE, POSITIVE, IGNORED, INVALID = 0, 1, 2, 3
#: Independent sub-histograms, so that neighbouring pixels (which often share a bin) do not
#: wait on each other's increments.
_LANES = 4


@numba.njit(cache=True, nogil=True, boundscheck=False)
def bin_values(values: np.ndarray, next_t: np.ndarray, n_bins: int, out: np.ndarray) -> int:
    """Write the threshold bin of each float32 value in [0, 1] into ``out`` (int32).

    The bin of v is the largest i with ``float32(i / n_bins) <= v``. ``floor(v * n_bins)`` in
    float64 is exact (a float32 times an integer below 2**29); it is one too low only when v
    equals a grid point that float32 rounded down, which the comparison with
    ``next_t[b] = float32((b + 1) / n_bins)`` (``+inf`` for ``b = n_bins``) corrects. It is
    never one too high: no float32 lies between ``b / n_bins`` and its float32 rounding up.

    Args:
        values: 1-D float32 values.
        next_t: float64 array of length ``n_bins + 1``: ``float32((i + 1) / n_bins)``, then inf.
        n_bins: Number of threshold intervals.
        out: 1-D int32 output, same length as ``values``.

    Returns:
        The number of values outside [0, 1] or NaN (their bins are meaningless).
    """
    bad = 0
    scale = np.float64(n_bins)
    for i in range(values.size):
        x = np.float64(values[i])
        ok = (x >= 0.0) & (x <= 1.0)
        bad += not ok
        b = int(x * scale) if ok else 0
        out[i] = b + (x >= next_t[b])
    return bad


@numba.njit(cache=True, nogil=True, boundscheck=False)
def sweep_histogram(
    values: np.ndarray,
    gt: np.ndarray,
    code_of: np.ndarray,
    next_t: np.ndarray,
    n_bins: int,
    hist: np.ndarray,
) -> int:
    """Add one image to a (4, n_bins + 1) histogram of (GT code, threshold bin) in one pass.

    Args:
        values: 1-D float32 map values in [0, 1].
        gt: 1-D uint8 GT values, same length.
        code_of: uint8 lookup table of 256 entries: GT value -> :data:`NEGATIVE`,
            :data:`POSITIVE`, :data:`IGNORED` or :data:`INVALID`.
        next_t: As in :func:`bin_values`.
        n_bins: Number of threshold intervals.
        hist: int64 array (4, n_bins + 1), incremented in place.

    Returns:
        The number of map values outside [0, 1] or NaN; when non-zero, ``hist`` is not
        meaningful (the caller discards it).
    """
    bad = 0
    scale = np.float64(n_bins)
    lanes = np.zeros((_LANES, 4, n_bins + 1), dtype=np.int64)
    for i in range(values.size):
        x = np.float64(values[i])
        ok = (x >= 0.0) & (x <= 1.0)
        bad += not ok
        b = int(x * scale) if ok else 0
        b += x >= next_t[b]
        lanes[i & (_LANES - 1), code_of[gt[i]], b] += 1
    for lane in range(_LANES):
        for code in range(4):
            for b in range(n_bins + 1):
                hist[code, b] += lanes[lane, code, b]
    return bad
