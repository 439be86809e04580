"""The per-image accumulator: confusion matrix per image, dataset-level and per-image scores.

:class:`Evaluator` keeps one confusion matrix per image and their sum; the primary (dataset-level)
metrics come from the sum, the per-image values feed bootstrap intervals and paired tests.
:func:`evaluate_predictions` is the one-call form for label predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmark.evaluate.confusion import (
    METRICS,
    _check_classes,
    _check_labels,
    _metrics_arrays,
    _nanmean,
    confusion_matrix,
    metrics_from_confusion,
)
from benchmark.evaluate.maps import threshold_map
from datasets.conventions import IGNORE

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


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
