"""Confusion matrices and the metrics derived from them (the kernels of the one evaluator).

Every score of :mod:`benchmark.evaluate` is a function of a (C, C) confusion matrix (rows = GT
class, columns = predicted class) or of the four binary counts TP/FP/FN/TN; the conventions
(ignore index, NaN for zero denominators) are those of the package docstring. The underscore
helpers (validation, NaN-safe ratios) are shared by the other modules of the package.
"""

from __future__ import annotations

import logging

import numpy as np

from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)

METRICS = ("iou", "dice", "accuracy", "precision", "recall")

# GT values up to this bound use a dense bincount / lookup table; beyond it a masked path.
_DENSE_LABEL_LIMIT = 1 << 16


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
