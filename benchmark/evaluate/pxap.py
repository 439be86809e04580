"""Pixel average precision (PxAP): a threshold-free score of soft maps.

PxAP (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020;
``MaskEvaluator`` of clovaai/wsolevaluation) is the area under the pixel precision-recall curve
of a map swept over all thresholds, with the pixels of the whole split pooled (ignored pixels
skipped):

    PxAP = sum_k precision_k * (recall_k - recall_{k-1}),

over the operating points k ordered from "nothing predicted" (recall 0) to "everything
predicted" (recall 1). It needs no threshold, so it scores the maps themselves rather than the
threshold a method or a search picked.

Here it is computed from the one-pass sweep counts (:class:`benchmark.evaluate.SweepCounts`):
the operating points are the grid thresholds, so the value is exact for maps whose values lie
on the grid and otherwise the PxAP of the maps quantised to it (wsolevaluation does the same
with its own histogram bins, ``cam_curve_interval`` = 0.001 by default). Deviations from the
original: a fraction in [0, 1], not percent; NaN instead of an error when the split has no
positive pixel; the "everything predicted" point is added when the counts do not contain it
(complement predictions ``map < t``, see :meth:`SweepCounts.inverted`), so the curve always
ends at recall 1 as the original's bin [0, t_1) guarantees.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def average_precision(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> float:
    """PxAP from the counts of a family of nested binary predictions (one per threshold).

    The predictions must be nested (each threshold's positive set contains or is contained in
    the next one's), as those of ``map >= t`` or ``map < t`` over a threshold grid are; their
    order in the arrays does not matter (points are ordered by the number of predicted pixels).

    Args:
        tp: (T,) true positives per threshold.
        fp: (T,) false positives.
        fn: (T,) false negatives.
        tn: (T,) true negatives.

    Returns:
        PxAP in [0, 1]; NaN when there is no positive pixel (``tp + fn == 0``).

    Raises:
        ValueError: Arrays of different or non-1-D shapes, negative counts, or counts whose
            positive / negative totals differ between thresholds (not one set of pixels).
    """
    tp, fp, fn, tn = _check_counts(tp, fp, fn, tn)
    positives, negatives = float(tp[0] + fn[0]), float(fp[0] + tn[0])
    if positives == 0:
        return float("nan")
    order = np.argsort(tp + fp, kind="stable")
    # the curve runs from nothing predicted (recall 0) to everything predicted (recall 1)
    tp = np.concatenate([[0.0], tp[order], [positives]])
    fp = np.concatenate([[0.0], fp[order], [negatives]])
    recall = tp / positives
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return float(np.sum(precision[1:] * np.diff(recall)))


def _check_counts(*counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four count arrays as float64, checked to describe one set of pixels."""
    arrays = tuple(np.asarray(c, dtype=np.float64) for c in counts)
    shape = arrays[0].shape
    if len(shape) != 1 or shape[0] == 0 or any(a.shape != shape for a in arrays):
        shapes = [a.shape for a in arrays]
        raise ValueError(f"counts must be 1-D arrays of one length, got {shapes}")
    if any((a < 0).any() for a in arrays):
        raise ValueError("counts must be non-negative")
    tp, fp, fn, tn = arrays
    if np.ptp(tp + fn) != 0 or np.ptp(fp + tn) != 0:
        raise ValueError("positive / negative pixel totals differ between thresholds")
    return arrays
