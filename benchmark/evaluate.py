"""The one evaluator: every number in every table comes from this module.

Predictions and ground truth (GT) are accumulated as confusion matrices (rows = GT class,
columns = predicted class); every metric is derived from those counts.

Conventions (documented once, used everywhere):

- GT pixels equal to ``ignore_index`` (default :data:`IGNORE` = 255, e.g. the Oxford-IIIT Pet
  trimap border under the primary convention) are skipped. Any other GT value must be a class
  in ``[0, num_classes)``; anything else raises :class:`ValueError` naming the offending values,
  so a raw trimap (values 1/2/3) passed by mistake never scores silently.
- Binary metrics are those of the class ``positive`` (default 1, the pet):
  ``iou = TP / (TP + FP + FN)``, ``dice = 2 TP / (2 TP + FP + FN)``,
  ``accuracy = trace / total`` (pixel accuracy over all classes),
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``.
  ``miou`` is the mean IoU over the classes present in the GT or the prediction, and
  ``iou_<c>`` is the IoU of class ``c``.
- Zero denominators give NaN ("undefined"), never 0 or 1: an image with an empty GT and an empty
  prediction has NaN IoU/Dice/recall/precision; an empty prediction has NaN precision; an empty
  GT has NaN recall (but IoU 0 if something was predicted); an image whose pixels are all ignored
  has NaN everywhere. Per-image means skip NaN (:meth:`Evaluator.mean_image_metrics`), so an
  image where a metric is undefined does not count towards that metric's mean. The primary,
  dataset-level metrics come from one confusion matrix summed over the split and are NaN only if
  the whole split is degenerate.
- Soft maps are thresholded as ``pred = map >= t`` with both sides in float32 (maps are converted
  to float32, the threshold is cast with ``np.float32(t)``), so a map value stored as
  ``np.float32(0.7)`` counts as positive at threshold 0.7. Maps at another resolution than the
  GT are first resized bilinearly (``align_corners=False``) to the GT's size.
- The threshold sweep (:class:`ThresholdSweep`) evaluates every grid threshold
  ``t_i = i / n_bins`` in one pass per image and gives exactly the counts of the naive loop
  (:func:`sweep_naive`) at each grid threshold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmark import kernels
from datasets.conventions import IGNORE

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

METRICS = ("iou", "dice", "accuracy", "precision", "recall")

# GT values up to this bound use a dense bincount / lookup table; beyond it a masked path.
_DENSE_LABEL_LIMIT = 1 << 16
# Beyond this, float32 cannot tell neighbouring grid thresholds apart near 1.
_MAX_BINS = 1 << 20
# ThresholdSweep.add_many uses threads from this many pixels on (below, their start-up dominates).
_PARALLEL_PIXELS = 1 << 18


def _where(name: str | None) -> str:
    return f" (image {name!r})" if name is not None else ""


def _check_labels(arr: np.ndarray, what: str, name: str | None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{what} must hold integer class labels, got dtype {arr.dtype}{_where(name)}"
            + (
                " (threshold soft maps first, e.g. with Evaluator.add_map)"
                if what == "prediction"
                else ""
            )
        )
    return arr


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Return num / den as float64, NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _binary_metrics(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray
) -> dict[str, np.ndarray]:
    """The five binary metrics from count arrays of any (matching) shape; NaN where undefined."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn, tn))
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """np.nanmean without the all-NaN RuntimeWarning (all NaN -> NaN)."""
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    count = valid.sum(axis=axis)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    return _ratio(total, count)


def _check_classes(num_classes: int, ignore_index: int) -> int:
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(
            f"ignore_index {ignore_index} is a class index; it must lie outside [0, {num_classes})"
        )
    return int(num_classes)


def _bad_gt(gt: np.ndarray, num_classes: int, ignore_index: int, name: str | None) -> ValueError:
    ok = ((gt >= 0) & (gt < num_classes)) | (gt == ignore_index)
    bad = np.unique(gt[~ok])[:10].tolist()
    return ValueError(
        f"GT values must be in [0, {num_classes}) or the ignore index {ignore_index}, "
        f"found {bad}{_where(name)}"
    )


def _binary_confusion(
    pred: np.ndarray, gt: np.ndarray, ignore_index: int, name: str | None
) -> np.ndarray:
    """Two-class confusion matrix from a handful of boolean counts.

    Several times faster than a bincount over int64 keys for C = 2, with the same result.
    """
    gt0 = gt == 0
    gt1 = gt == 1
    n0 = np.count_nonzero(gt0)
    n1 = np.count_nonzero(gt1)
    if n0 + n1 != gt.size and n0 + n1 + np.count_nonzero(gt == ignore_index) != gt.size:
        raise _bad_gt(gt, 2, ignore_index, name)
    if pred.dtype == np.bool_:
        fg = pred
    elif pred.itemsize == 1:
        fg = pred.view(np.bool_)  # values already checked to be 0 or 1
    else:
        fg = pred != 0
    tp = np.count_nonzero(gt1 & fg)
    fp = np.count_nonzero(gt0 & fg)
    return np.array([[n0 - fp, fp], [n1 - tp, tp]], dtype=np.int64)


def confusion_matrix(
    pred: np.ndarray,
    gt: np.ndarray,
    num_classes: int = 2,
    ignore_index: int = IGNORE,
    *,
    name: str | None = None,
) -> np.ndarray:
    """Count (GT class, predicted class) pairs over the pixels of one image (or any array).

    Args:
        pred: Predicted class labels (bool or integer), any shape; values in ``[0, num_classes)``.
        gt: GT labels, same shape; values in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: Number of classes C.
        ignore_index: GT value whose pixels are skipped.
        name: Optional image name, quoted in error messages.

    Returns:
        (C, C) int64 matrix, rows = GT class, columns = predicted class.

    Raises:
        ValueError: Shapes differ, a dtype is not integer/bool, a prediction is outside
            ``[0, C)`` or a GT value is neither a class nor ``ignore_index``.
    """
    c = _check_classes(num_classes, ignore_index)
    pred = _check_labels(pred, "prediction", name)
    gt = _check_labels(gt, "GT", name)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match GT shape {gt.shape}{_where(name)}"
        )
    if gt.size == 0:
        return np.zeros((c, c), dtype=np.int64)
    if pred.dtype != np.bool_:
        pmin, pmax = int(pred.min()), int(pred.max())
        if pmin < 0 or pmax >= c:
            bad = np.unique(pred[(pred < 0) | (pred >= c)])[:10].tolist()
            raise ValueError(f"prediction values must be in [0, {c}), found {bad}{_where(name)}")
    if c == 2:
        return _binary_confusion(pred, gt, ignore_index, name)
    gmin, gmax = int(gt.min()), int(gt.max())
    if gmin >= 0 and gmax < _DENSE_LABEL_LIMIT:
        # One bincount over (gt, pred) keys for every GT value present; rows that are neither a
        # class nor the ignore value must then be empty.
        rows = max(gmax + 1, c)
        idx = gt.astype(np.intp).ravel()
        idx *= c
        idx += pred.ravel()
        counts = np.bincount(idx, minlength=rows * c).reshape(rows, c)
        extra = np.flatnonzero(counts[c:].any(axis=1)) + c
        if any(v != ignore_index for v in extra):
            raise _bad_gt(gt, c, ignore_index, name)
        return counts[:c, :c].astype(np.int64, copy=True)
    # Negative or huge GT values (e.g. ignore_index=-1): mask the ignored pixels first.
    valid = gt != ignore_index
    g = gt[valid].astype(np.intp)
    if g.size and (g.min() < 0 or g.max() >= c):
        raise _bad_gt(gt, c, ignore_index, name)
    idx = g * c + pred[valid]
    return np.bincount(idx, minlength=c * c).reshape(c, c).astype(np.int64)


def _metrics_arrays(cms: np.ndarray, positive: int) -> dict[str, np.ndarray]:
    """Vectorised metrics over stacked confusion matrices (..., C, C)."""
    c = cms.shape[-1]
    diag = np.diagonal(cms, axis1=-2, axis2=-1)  # (..., C)
    gt_sum = cms.sum(axis=-1)  # (..., C)
    pred_sum = cms.sum(axis=-2)  # (..., C)
    total = gt_sum.sum(axis=-1)  # (...)
    tp = diag[..., positive]
    fp = pred_sum[..., positive] - tp
    fn = gt_sum[..., positive] - tp
    tn = total - tp - fp - fn
    out = _binary_metrics(tp, fp, fn, tn)
    out["accuracy"] = _ratio(diag.sum(axis=-1), total)
    class_iou = _ratio(diag, gt_sum + pred_sum - diag)  # (..., C), NaN for absent classes
    out["miou"] = _nanmean(class_iou, axis=-1)
    for k in range(c):
        out[f"iou_{k}"] = class_iou[..., k]
    out["tp"], out["fp"], out["fn"], out["tn"] = tp, fp, fn, tn
    return out


def _check_cm(cm: np.ndarray, positive: int) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim < 2 or cm.shape[-1] != cm.shape[-2]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if not np.issubdtype(cm.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {cm.dtype}")
    if cm.size and cm.min() < 0:
        raise ValueError("confusion matrix has negative counts")
    if not 0 <= positive < cm.shape[-1]:
        raise ValueError(f"positive class {positive} is outside [0, {cm.shape[-1]})")
    return cm


def metrics_from_confusion(cm: np.ndarray, positive: int = 1) -> dict[str, float]:
    """Derive metrics from one (C, C) confusion matrix.

    Binary metrics are those of class ``positive`` (see the module docstring for formulas).
    Zero denominators give NaN: ``iou``/``dice`` when the class is absent from both GT and
    prediction, ``precision`` when nothing is predicted positive, ``recall`` when the GT has no
    positive pixel, ``accuracy`` when there are no (non-ignored) pixels at all.

    Args:
        cm: (C, C) integer counts, rows = GT class, columns = predicted class.
        positive: Index of the positive class.

    Returns:
        ``iou``, ``dice``, ``accuracy``, ``precision``, ``recall``, ``miou`` (mean IoU over the
        classes present in GT or prediction; NaN if none), ``iou_<c>`` for every class ``c``
        (NaN if absent from both), and the counts ``tp``, ``fp``, ``fn``, ``tn`` (as floats).

    Raises:
        ValueError: ``cm`` is not a square non-negative integer matrix or ``positive`` is out of
            range.
    """
    cm = _check_cm(cm, positive)
    if cm.ndim != 2:
        raise ValueError(f"expected one (C, C) confusion matrix, got shape {cm.shape}")
    return {k: float(v) for k, v in _metrics_arrays(cm, positive).items()}


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


class Evaluator:
    """Accumulates per-image confusion matrices; dataset-level and per-image aggregation.

    Args:
        num_classes: Number of classes C (2 for foreground/background).
        positive: Class whose binary metrics (iou, dice, precision, recall) are reported.
        ignore_index: GT value that is skipped.

    Example:
        >>> ev = Evaluator()
        >>> ev.add(np.array([[1, 0]]), np.array([[1, 1]]), name="a")
        >>> ev.dataset_metrics()["iou"]
        0.5
    """

    def __init__(self, num_classes: int = 2, positive: int = 1, ignore_index: int = IGNORE) -> None:
        num_classes = _check_classes(num_classes, ignore_index)
        if not 0 <= positive < num_classes:
            raise ValueError(f"positive class {positive} is outside [0, {num_classes})")
        self.num_classes = num_classes
        self.positive = positive
        self.ignore_index = ignore_index
        self._cms: list[np.ndarray] = []
        self._names: list[str] = []
        self._name_set: set[str] = set()
        self._total = np.zeros((num_classes, num_classes), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._cms)

    def _register(self, cm: np.ndarray, name: str) -> None:
        self._cms.append(cm)
        self._names.append(name)
        self._name_set.add(name)
        self._total += cm

    def _next_name(self, name: str | None) -> str:
        if name is None:
            name = f"#{len(self._cms)}"
        name = str(name)
        if name in self._name_set:
            raise ValueError(f"image name {name!r} was already added to this evaluator")
        return name

    def add(self, pred: np.ndarray, gt: np.ndarray, name: str | None = None) -> None:
        """Add one image's predicted labels.

        Args:
            pred: (H, W) predicted class labels (bool or integer).
            gt: (H, W) GT labels (classes or ``ignore_index``).
            name: Image name (unique within this evaluator); defaults to ``"#<index>"``.

        Raises:
            ValueError: See :func:`confusion_matrix`; also for a duplicate name.
        """
        key = self._next_name(name)
        cm = confusion_matrix(pred, gt, self.num_classes, self.ignore_index, name=key)
        self._register(cm, key)

    def add_map(
        self, soft: np.ndarray, gt: np.ndarray, threshold: float, name: str | None = None
    ) -> None:
        """Add one image's soft map of the positive class, thresholded at ``threshold``.

        The map may have any resolution: it is resized bilinearly to the GT's (H, W) first.
        Pixels with ``map >= np.float32(threshold)`` are predicted ``positive``, the others the
        other class (binary evaluators only).

        Args:
            soft: (h, w) map in [0, 1].
            gt: (H, W) GT labels.
            threshold: Decision threshold.
            name: Image name (unique within this evaluator).

        Raises:
            ValueError: Not a binary evaluator, the map is not 2-D, not finite or outside
                [0, 1], or the GT is invalid.
        """
        if self.num_classes != 2:
            raise ValueError("add_map needs a binary evaluator (num_classes == 2)")
        key = self._next_name(name)
        gt = _check_labels(gt, "GT", key)
        fg = threshold_map(soft, gt.shape, threshold, key)
        pred = fg if self.positive == 1 else ~fg
        cm = confusion_matrix(pred, gt, 2, self.ignore_index, name=key)
        self._register(cm, key)

    @property
    def confusion(self) -> np.ndarray:
        """The (C, C) confusion matrix summed over all images added so far (a copy)."""
        return self._total.copy()

    @property
    def names(self) -> list[str]:
        """Image names in the order they were added."""
        return list(self._names)

    def _require_images(self) -> None:
        if not self._cms:
            raise ValueError("no images were added to the evaluator")

    def dataset_metrics(self) -> dict[str, float]:
        """Metrics of the confusion matrix summed over the whole split (the primary numbers).

        Returns:
            See :func:`metrics_from_confusion`.
        """
        self._require_images()
        return metrics_from_confusion(self._total, self.positive)

    def mean_image_metrics(self) -> dict[str, float]:
        """Mean over images of each per-image metric, skipping images where it is NaN.

        Returns:
            ``iou``, ``dice``, ``accuracy``, ``precision``, ``recall``, ``miou`` and
            ``iou_<c>``; a metric that is undefined for every image is NaN.
        """
        self._require_images()
        per = _metrics_arrays(np.stack(self._cms), self.positive)
        keys = [*METRICS, "miou", *(f"iou_{k}" for k in range(self.num_classes))]
        return {k: float(_nanmean(per[k])) for k in keys}

    def per_image(self) -> pd.DataFrame:
        """One row per image, in insertion order.

        Returns:
            DataFrame with columns ``name``, ``tp``, ``fp``, ``fn``, ``tn`` (int64, for the
            positive class), ``iou``, ``dice``, ``accuracy``, ``precision``, ``recall``,
            ``miou`` (float64, NaN where undefined).
        """
        import pandas as pd

        columns = ["name", "tp", "fp", "fn", "tn", *METRICS, "miou"]
        if not self._cms:
            return pd.DataFrame({c: [] for c in columns})
        per = _metrics_arrays(np.stack(self._cms), self.positive)
        data: dict[str, Any] = {"name": list(self._names)}
        for k in ("tp", "fp", "fn", "tn"):
            data[k] = np.asarray(per[k], dtype=np.int64)
        for k in (*METRICS, "miou"):
            data[k] = per[k]
        return pd.DataFrame(data, columns=columns)


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


def evaluate_predictions(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    names: Sequence[str] | None = None,
    num_classes: int = 2,
    positive: int = 1,
    ignore_index: int = IGNORE,
) -> dict[str, Any]:
    """Evaluate label predictions against GT masks in one call.

    Args:
        preds: (H, W) predicted labels, one per image.
        gts: (H, W) GT labels, one per image.
        names: Optional image names (same length).
        num_classes: Number of classes.
        positive: Positive class for binary metrics.
        ignore_index: GT value that is skipped.

    Returns:
        ``{"dataset": dict, "image_mean": dict, "per_image": DataFrame}``.

    Raises:
        ValueError: Lengths differ or any input is invalid.
    """
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} GT masks")
    if names is not None and len(names) != len(preds):
        raise ValueError(f"{len(names)} names but {len(preds)} predictions")
    ev = Evaluator(num_classes, positive, ignore_index)
    for i, (p, g) in enumerate(zip(preds, gts)):
        ev.add(p, g, None if names is None else names[i])
    return {
        "dataset": ev.dataset_metrics(),
        "image_mean": ev.mean_image_metrics(),
        "per_image": ev.per_image(),
    }
