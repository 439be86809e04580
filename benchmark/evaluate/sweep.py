"""The one-pass threshold sweep: TP/FP/FN/TN of ``map >= t`` at every grid threshold.

:class:`ThresholdSweep` histograms each image's map values separately for GT-positive and
GT-negative pixels; cumulative sums give the counts of every grid threshold ``t_i = i / n_bins``
at once (:class:`SweepCounts`), exactly those of the naive loop :func:`sweep_naive`. From the
same counts come the threshold curves (:meth:`SweepCounts.metric`) and the threshold-free pixel
average precision (:meth:`SweepCounts.pxap`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from benchmark import kernels
from benchmark.evaluate.confusion import (
    METRICS,
    _bad_gt,
    _binary_metrics,
    _check_classes,
    _check_labels,
    _where,
    confusion_matrix,
)
from benchmark.evaluate.maps import _prepare_map
from benchmark.evaluate.pxap import average_precision
from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)

# Beyond this, float32 cannot tell neighbouring grid thresholds apart near 1.
_MAX_BINS = 1 << 20
# ThresholdSweep.add_many uses threads from this many pixels on (below, their start-up dominates).
_PARALLEL_PIXELS = 1 << 18


@dataclass
class SweepCounts:
    """Pixel counts of a binary prediction ``map >= t`` at every threshold t, summed over images.

    Attributes:
        thresholds: (T,) ascending thresholds.
        tp: (T,) int64 true positives.
        fp: (T,) int64 false positives.
        fn: (T,) int64 false negatives.
        tn: (T,) int64 true negatives.
        n_images: Number of images accumulated.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    n_images: int = 0

    def metric(self, name: str = "iou") -> np.ndarray:
        """Dataset-level metric at every threshold.

        Args:
            name: One of :data:`METRICS`.

        Returns:
            (T,) float64, NaN where undefined.

        Raises:
            ValueError: Unknown metric name.
        """
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
        return _binary_metrics(self.tp, self.fp, self.fn, self.tn)[name]

    def inverted(self) -> SweepCounts:
        """The counts of the complementary prediction ``map < t`` at the same thresholds.

        Exact, with no second pass: a GT-positive pixel not counted as a TP of ``map >= t`` is
        a TP of ``map < t``, and so on. Used where the positive class is the side a pet map
        predicts as negative (``weaktr_refinery``), so that both conventions score the one
        prediction ``map >= t``.
        """
        return SweepCounts(
            thresholds=self.thresholds.copy(),
            tp=self.fn.copy(),
            fp=self.tn.copy(),
            fn=self.tp.copy(),
            tn=self.fp.copy(),
            n_images=self.n_images,
        )

    def pxap(self) -> float:
        """Pixel average precision over the swept thresholds (threshold-free; see PxAP docs).

        The area under the split's pixel precision-recall curve,
        :func:`benchmark.evaluate.pxap.average_precision` of these counts: exact for maps whose
        values lie on the threshold grid, else the PxAP of the maps quantised to it.

        Returns:
            PxAP in [0, 1]; NaN when the split has no positive pixel.
        """
        return average_precision(self.tp, self.fp, self.fn, self.tn)

    def best(self, name: str = "iou") -> tuple[float, float]:
        """The threshold maximising a metric.

        Ties (a plateau, e.g. no map value between two thresholds) go to the LOWEST threshold,
        so the choice is deterministic. NaN values are skipped.

        Args:
            name: One of :data:`METRICS`.

        Returns:
            (threshold, value).

        Raises:
            ValueError: Unknown metric, or the metric is undefined at every threshold.
        """
        values = self.metric(name)
        if np.all(np.isnan(values)):
            raise ValueError(f"{name} is undefined (NaN) at every threshold")
        i = int(np.nanargmax(values))  # first maximum = lowest threshold
        return float(self.thresholds[i]), float(values[i])

    def index(self, threshold: float) -> int:
        """Index of ``threshold`` in :attr:`thresholds` (within 1e-9).

        Raises:
            ValueError: ``threshold`` is not one of the swept thresholds.
        """
        hits = np.flatnonzero(np.abs(self.thresholds - float(threshold)) <= 1e-9)
        if hits.size == 0:
            raise ValueError(
                f"threshold {threshold} is not on the sweep grid ({self.thresholds.size} values "
                f"from {self.thresholds[0]} to {self.thresholds[-1]}); use a grid threshold or "
                "Evaluator.add_map for an arbitrary one"
            )
        return int(hits[0])

    def at(self, threshold: float) -> dict[str, float]:
        """Metrics and counts at one swept threshold.

        Args:
            threshold: A value of :attr:`thresholds` (matched within 1e-9).

        Returns:
            ``threshold``, the :data:`METRICS` and ``tp``, ``fp``, ``fn``, ``tn``.

        Raises:
            ValueError: ``threshold`` is not on the grid.
        """
        i = self.index(threshold)
        out = {"threshold": float(self.thresholds[i])}
        vals = _binary_metrics(self.tp[i], self.fp[i], self.fn[i], self.tn[i])
        out.update({k: float(vals[k]) for k in METRICS})
        out.update(
            tp=float(self.tp[i]), fp=float(self.fp[i]), fn=float(self.fn[i]), tn=float(self.tn[i])
        )
        return out


def _gt_codes(
    gt: np.ndarray, positive: int, num_classes: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """GT as uint8 plus the 256-entry table from its values to sweep codes.

    Codes (:mod:`benchmark.kernels`): 0 negative, 1 positive, 2 ignored, 3 invalid (a value
    that is neither a class nor ``ignore_index``; the caller raises when any is counted).
    uint8 and bool GT (the usual case) are used as they are; other integer GT is mapped to
    codes first, with the identity table.
    """
    if gt.dtype == np.bool_:
        gt = gt.view(np.uint8)
    if gt.dtype == np.uint8:
        table = np.full(256, kernels.INVALID, dtype=np.uint8)
        table[: min(num_classes, 256)] = kernels.NEGATIVE
        table[positive] = kernels.POSITIVE
        if 0 <= ignore_index < 256:
            table[ignore_index] = kernels.IGNORED
        return gt, table
    codes = np.full(gt.shape, kernels.INVALID, dtype=np.uint8)
    codes[(gt >= 0) & (gt < num_classes)] = kernels.NEGATIVE
    codes[gt == positive] = kernels.POSITIVE
    codes[gt == ignore_index] = kernels.IGNORED
    return codes, np.arange(256, dtype=np.uint8)


class ThresholdSweep:
    """One-pass evaluation of ``map >= t`` at every grid threshold ``t_i = i / n_bins``.

    Histogram each image's map values separately for GT-positive and GT-negative pixels (ignore
    skipped); cumulative sums give TP/FP/FN/TN at every threshold at once.

    The binning is exact: a pixel of (float32) value v falls in bin i, the largest index with
    ``np.float32(i / n_bins) <= v``, so it is predicted positive at threshold ``t_i`` iff it is in
    a bin >= i, exactly as ``map >= np.float32(t_i)`` in :func:`sweep_naive` and
    :meth:`Evaluator.add_map`. ``floor(v * n_bins)`` computed in float64 is the exact floor (a
    float32 times an integer below 2**29 is exact in float64); it is one bin too low only when v
    equals a grid threshold that float32 rounded down, which one comparison corrects.

    The per-pixel work (binning, GT code lookup, validation, counting) is one compiled pass per
    image (:func:`benchmark.kernels.sweep_histogram`), with no temporary arrays.
    :meth:`add` is :meth:`add_many` with one image.

    Args:
        n_bins: Number of threshold intervals; thresholds are ``i / n_bins``, i = 0..n_bins.
        num_classes: Number of GT classes (GT values are validated against it).
        ignore_index: GT value that is skipped.
        threads: Threads for large :meth:`add_many` calls (images split across them; the
            counts do not depend on it). Default: the CPU count, at most 8.
    """

    def __init__(
        self,
        n_bins: int = 1000,
        num_classes: int = 2,
        ignore_index: int = IGNORE,
        threads: int | None = None,
    ) -> None:
        if not 1 <= int(n_bins) <= _MAX_BINS:
            raise ValueError(f"n_bins must be in [1, {_MAX_BINS}], got {n_bins}")
        self.n_bins = int(n_bins)
        self.num_classes = _check_classes(num_classes, ignore_index)
        self.ignore_index = ignore_index
        self.threads = max(1, int(threads)) if threads else min(8, os.cpu_count() or 1)
        self.thresholds = np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins
        # float32((i + 1) / n_bins) as float64, with a +inf sentinel so bin n_bins never moves up
        self._next_t = np.append(self.thresholds.astype(np.float32)[1:].astype(np.float64), np.inf)
        self._hist = np.zeros((3, self.n_bins + 1), dtype=np.int64)  # (neg, pos, ignore) x bins
        self._n_images = 0

    def bin_index(self, values: np.ndarray) -> np.ndarray:
        """Bin of each value v in [0, 1] (as float32): the largest i with float32(i/n_bins) <= v.

        Args:
            values: Array of values in [0, 1].

        Returns:
            int32 array of the same shape, values in [0, n_bins].

        Raises:
            ValueError: A value outside [0, 1] or NaN.
        """
        v = np.ascontiguousarray(values, dtype=np.float32)
        out = np.empty(v.shape, dtype=np.int32)
        if kernels.bin_values(v.reshape(-1), self._next_t, self.n_bins, out.reshape(-1)):
            raise ValueError("values must be in [0, 1] (no NaN)")
        return out

    def add(
        self, soft: np.ndarray, gt: np.ndarray, positive: int = 1, name: str | None = None
    ) -> None:
        """Accumulate one image.

        Args:
            soft: (h, w) map in [0, 1] at any resolution (resized bilinearly to the GT's size).
            gt: (H, W) GT labels.
            positive: GT class counted as positive; every other class is negative.
            name: Optional image name, quoted in error messages.

        Raises:
            ValueError: Invalid map or GT (see :meth:`Evaluator.add_map`).
        """
        self.add_many([soft], [gt], positive=positive, names=[name])

    def add_many(
        self,
        maps: Iterable[np.ndarray],
        gts: Iterable[np.ndarray],
        positive: int = 1,
        names: Sequence[str | None] | None = None,
    ) -> None:
        """Accumulate several images (all or nothing: if one is invalid, nothing is added).

        Each image costs one compiled pass (:func:`benchmark.kernels.sweep_histogram`) over its
        pixels that bins, validates and counts at once; maps that are float32 (or float16,
        converted exactly) at their GT's size are used without a copy.

        Args:
            maps: (h, w) maps in [0, 1], any resolution (resized bilinearly to their GT's size);
                a (N, H, W) array works too.
            gts: (H, W) GT label arrays, one per map.
            positive: GT class counted as positive; every other class is negative.
            names: Image names quoted in error messages; defaults to ``"#<index>"``.

        Raises:
            ValueError: Lengths differ, or an invalid map or GT (see :meth:`Evaluator.add_map`).
        """
        if not 0 <= positive < self.num_classes:
            raise ValueError(f"positive class {positive} is outside [0, {self.num_classes})")
        maps, gts = list(maps), list(gts)
        if len(maps) != len(gts):
            raise ValueError(f"{len(maps)} maps but {len(gts)} GT masks")
        if names is None:
            names = [f"#{i}" for i in range(len(maps))]
        elif len(names) != len(maps):
            raise ValueError(f"{len(maps)} maps but {len(names)} names")
        items = [self._prepare(m, g, positive, n) for m, g, n in zip(maps, gts, names)]
        pixels = sum(item[0].size for item in items)
        workers = min(self.threads, len(items)) if pixels >= _PARALLEL_PIXELS else 1
        if workers > 1:  # the kernel releases the GIL: images split across threads
            groups = [items[k::workers] for k in range(workers)]
            with ThreadPoolExecutor(workers) as pool:
                hist = sum(pool.map(self._count, groups))
        else:
            hist = self._count(items)
        self._hist += hist[:3]
        self._n_images += len(gts)

    def _prepare(
        self, soft: np.ndarray, gt: np.ndarray, positive: int, name: str | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str | None]:
        """Flat float32 values, uint8 GT codes and code table of one image (checks shapes)."""
        gt = _check_labels(gt, "GT", name)
        if gt.ndim != 2:
            raise ValueError(f"GT must be 2-D (H, W), got shape {gt.shape}{_where(name)}")
        soft = np.asarray(soft)
        if soft.shape != gt.shape or soft.dtype not in (np.float32, np.float16):
            soft = _prepare_map(soft, gt.shape, name)
        values = np.ascontiguousarray(soft, dtype=np.float32).reshape(-1)
        codes, table = _gt_codes(gt, positive, self.num_classes, self.ignore_index)
        return values, np.ascontiguousarray(codes).reshape(-1), table, soft, gt, name

    def _count(self, items: list[tuple]) -> np.ndarray:
        """(4, n_bins + 1) histogram of prepared images; raises on the first invalid one."""
        hist = np.zeros((4, self.n_bins + 1), dtype=np.int64)
        for values, codes, table, soft, gt, name in items:
            if kernels.sweep_histogram(values, codes, table, self._next_t, self.n_bins, hist):
                _prepare_map(soft, gt.shape, name)  # raises, naming the image and the range
            if hist[kernels.INVALID].any():
                raise _bad_gt(gt, self.num_classes, self.ignore_index, name)
        return hist

    def counts(self) -> SweepCounts:
        """TP/FP/FN/TN at every grid threshold, summed over the images added so far."""
        neg, pos = self._hist[0], self._hist[1]
        tp = np.cumsum(pos[::-1])[::-1]  # pixels with bin >= i among positives
        fp = np.cumsum(neg[::-1])[::-1]
        return SweepCounts(
            thresholds=self.thresholds.copy(),
            tp=tp.astype(np.int64),
            fp=fp.astype(np.int64),
            fn=(pos.sum() - tp).astype(np.int64),
            tn=(neg.sum() - fp).astype(np.int64),
            n_images=self._n_images,
        )


def _binarise_gt(
    gt: np.ndarray, positive: int, num_classes: int, ignore_index: int, name: str | None
) -> np.ndarray:
    gt = _check_labels(gt, "GT", name)
    ok = ((gt >= 0) & (gt < num_classes)) | (gt == ignore_index)
    if not ok.all():
        raise _bad_gt(gt, num_classes, ignore_index, name)
    out = np.zeros(gt.shape, dtype=np.uint8)
    out[gt == positive] = 1
    out[gt == ignore_index] = IGNORE
    return out


def sweep_naive(
    maps: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    thresholds: Sequence[float] | np.ndarray,
    positive: int = 1,
    num_classes: int = 2,
    ignore_index: int = IGNORE,
) -> SweepCounts:
    """The reference loop: for every threshold and every image, one :func:`confusion_matrix`.

    Slow (T x N passes); used to test :class:`ThresholdSweep` and as the performance baseline.

    Args:
        maps: (h, w) maps in [0, 1], any resolution (resized like :meth:`Evaluator.add_map`).
        gts: (H, W) GT label arrays, one per map.
        thresholds: Ascending thresholds; a pixel is positive iff ``map >= np.float32(t)``.
        positive: GT class counted as positive.
        num_classes: Number of GT classes.
        ignore_index: GT value that is skipped.

    Returns:
        Summed counts per threshold.

    Raises:
        ValueError: Thresholds not 1-D ascending, lengths differ, or invalid maps/GT.
    """
    thr = np.asarray(thresholds, dtype=np.float64)
    if thr.ndim != 1 or thr.size == 0 or np.any(np.diff(thr) < 0):
        raise ValueError("thresholds must be a non-empty 1-D ascending sequence")
    maps, gts = list(maps), list(gts)
    if len(maps) != len(gts):
        raise ValueError(f"{len(maps)} maps but {len(gts)} GT masks")
    prepared = []
    for i, (m, g) in enumerate(zip(maps, gts)):
        gb = _binarise_gt(g, positive, num_classes, ignore_index, f"#{i}")
        prepared.append((_prepare_map(m, gb.shape, f"#{i}"), gb))
    counts = np.zeros((4, thr.size), dtype=np.int64)
    for j, t in enumerate(thr):
        t32 = np.float32(t)
        for m, gb in prepared:
            cm = confusion_matrix(m >= t32, gb, 2, IGNORE)
            counts[:, j] += (cm[1, 1], cm[0, 1], cm[1, 0], cm[0, 0])
    return SweepCounts(thr.copy(), counts[0], counts[1], counts[2], counts[3], len(prepared))
