"""Multi-class scores from one dataset-level confusion matrix (the PASCAL VOC protocol).

The VOC protocol of the WSSS literature, as the evaluation code of SEAM, IRNet
(``step/eval_cam.py``, through chainercv's ``calc_semantic_segmentation_confusion``) and WeakTr
(``evaluation.py``) computes it:

- one K x K confusion matrix (rows = GT class, columns = predicted class; K = 21 for VOC:
  background + 20 classes) summed over every pixel of the split, a ``np.bincount`` of
  ``K * gt + pred`` over the pixels whose GT is not ``ignore_index`` (255, the VOC object
  boundaries); predictions at ignored pixels are not counted;
- per-class IoU ``TP_k / (GT_k + Pred_k - TP_k)``; a class with zero union (absent from the GT
  and never predicted) has an undefined IoU (0 / 0 = NaN in those repositories) and is
  excluded from the mean: ``mIoU = nanmean(IoU)`` over the classes present in the GT or the
  prediction. A class present in the GT and never predicted counts with IoU 0; one predicted
  and absent from the GT also counts with IoU 0;
- pixel accuracy ``trace / total`` over the counted pixels;
- mean precision ``nanmean(TP_k / Pred_k)`` over the predicted classes and mean recall
  ``nanmean(TP_k / GT_k)`` over the classes present in the GT (WeakTr's "Prediction" and
  "Recall").

These are the same numbers as :func:`benchmark.evaluate.metrics_from_confusion` (its ``miou``
and ``iou_<k>``), and for K = 2 the IoU of class 1 is the binary IoU of the positive class.
Zero denominators give NaN, never 0 or 1, as everywhere in :mod:`benchmark.evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from benchmark.evaluate.confusion import _check_classes, _nanmean, _ratio, confusion_matrix
from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)


def accumulate_confusion(
    preds: Iterable[np.ndarray],
    gts: Iterable[np.ndarray],
    num_classes: int,
    ignore_index: int = IGNORE,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """One dataset-level confusion matrix summed over the images of a split.

    Each image is validated and counted by :func:`benchmark.evaluate.confusion_matrix` (one
    ``bincount`` of ``K * gt + pred`` over the non-ignored pixels).

    Args:
        preds: (H, W) predicted class labels in ``[0, K)``, one per image.
        gts: (H, W) GT labels in ``[0, K)`` or ``ignore_index``, one per image.
        num_classes: K, background included (21 for VOC).
        ignore_index: GT value whose pixels are skipped.
        names: Optional image names, quoted in error messages.

    Returns:
        (K, K) int64 counts, rows = GT class, columns = predicted class.

    Raises:
        ValueError: Lengths differ or an image is invalid (see ``confusion_matrix``).
    """
    k = _check_classes(num_classes, ignore_index)
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} GT masks")
    if names is not None and len(names) != len(preds):
        raise ValueError(f"{len(names)} names but {len(preds)} predictions")
    total = np.zeros((k, k), dtype=np.int64)
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        name = f"#{i}" if names is None else names[i]
        total += confusion_matrix(pred, gt, k, ignore_index, name=name)
    return total


@dataclass(frozen=True)
class MulticlassScores:
    """Scores of one (K, K) confusion matrix (see the module docstring for the protocol).

    Attributes:
        confusion: (K, K) int64 counts, rows = GT class, columns = predicted class.
        iou: (K,) per-class IoU, NaN for a class with zero union.
        precision: (K,) per-class precision, NaN for a class never predicted.
        recall: (K,) per-class recall, NaN for a class absent from the GT.
        miou: Mean IoU over the classes with a non-zero union (NaN if none).
        accuracy: Pixel accuracy over the counted pixels (NaN if none).
        mean_precision: Mean precision over the predicted classes.
        mean_recall: Mean recall over the classes present in the GT.
        n_classes: Number of classes in the mIoU (non-zero union).
    """

    confusion: np.ndarray
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    accuracy: float
    mean_precision: float
    mean_recall: float
    n_classes: int

    def as_dict(self) -> dict[str, float]:
        """Flat metrics for result rows.

        Returns:
            ``miou``, ``accuracy``, ``precision`` (the class mean), ``recall`` (the class
            mean) and ``iou_<k>`` for every class k (NaN where undefined).
        """
        out = {
            "miou": self.miou,
            "accuracy": self.accuracy,
            "precision": self.mean_precision,
            "recall": self.mean_recall,
        }
        out.update({f"iou_{k}": float(v) for k, v in enumerate(self.iou)})
        return out


def class_iou(cms: np.ndarray) -> np.ndarray:
    """Per-class IoU of stacked confusion matrices, vectorised.

    Args:
        cms: (..., K, K) counts, rows = GT class, columns = predicted class.

    Returns:
        (..., K) float64 IoU, NaN for a class with zero union.
    """
    cms = np.asarray(cms)
    diag = np.diagonal(cms, axis1=-2, axis2=-1)  # (..., K)
    union = cms.sum(axis=-1) + cms.sum(axis=-2) - diag
    return _ratio(diag, union)


def mean_iou(cms: np.ndarray) -> np.ndarray:
    """The mIoU of stacked confusion matrices over the classes with a non-zero union.

    Args:
        cms: (..., K, K) counts.

    Returns:
        (...) float64, NaN where no class has a non-zero union (nothing counted).
    """
    return _nanmean(class_iou(cms), axis=-1)


def multiclass_metrics(cm: np.ndarray) -> MulticlassScores:
    """The VOC scores of one dataset-level confusion matrix.

    Args:
        cm: (K, K) non-negative integer counts, rows = GT class, columns = predicted class.

    Returns:
        The per-class IoU / precision / recall and their means, and the pixel accuracy.

    Raises:
        ValueError: ``cm`` is not a square non-negative integer matrix with K >= 2.

    Example:
        >>> cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
        >>> round(multiclass_metrics(cm).miou, 4)  # class 2 absent: mean of 3/4 and 2/3
        0.7083
    """
    cm = _check_square(cm)
    diag = np.diagonal(cm).astype(np.float64)
    gt_sum, pred_sum = cm.sum(axis=1), cm.sum(axis=0)
    iou = class_iou(cm)
    precision = _ratio(diag, pred_sum)
    recall = _ratio(diag, gt_sum)
    return MulticlassScores(
        confusion=cm.astype(np.int64, copy=True),
        iou=iou,
        precision=precision,
        recall=recall,
        miou=float(_nanmean(iou)),
        accuracy=float(_ratio(diag.sum(), cm.sum())),
        mean_precision=float(_nanmean(precision)),
        mean_recall=float(_nanmean(recall)),
        n_classes=int(np.count_nonzero(~np.isnan(iou))),
    )


def _check_square(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
        raise ValueError(f"expected one (K, K) confusion matrix with K >= 2, got {cm.shape}")
    if not np.issubdtype(cm.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {cm.dtype}")
    if cm.min() < 0:
        raise ValueError("confusion matrix has negative counts")
    return cm
