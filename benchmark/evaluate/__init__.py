"""The one evaluator: every number in every table comes from this package.

Every public name is importable from ``benchmark.evaluate``; the modules split it by
responsibility:

- :mod:`~benchmark.evaluate.confusion`: confusion matrices and the metrics derived from them;
- :mod:`~benchmark.evaluate.maps`: soft maps to binary predictions (resize, one threshold rule);
- :mod:`~benchmark.evaluate.evaluator`: :class:`Evaluator`, per-image and dataset-level scores;
- :mod:`~benchmark.evaluate.sweep`: the one-pass threshold sweep and its curves;
- :mod:`~benchmark.evaluate.pxap`: pixel average precision, a threshold-free score of maps;
- :mod:`~benchmark.evaluate.multiclass`: K-class scores of one dataset-level confusion matrix
  (the PASCAL VOC protocol: mIoU over the classes present, per-class IoU);
- :mod:`~benchmark.evaluate.background`: class score maps to label maps with a background
  score, and the background-threshold curve in one pass.

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
  (:func:`sweep_naive`) at each grid threshold. Its counts also give the pixel average precision
  (:meth:`SweepCounts.pxap`), a threshold-free score of the maps.
- Multi-class (K classes, background = 0): one confusion matrix summed over the split
  (:func:`accumulate_confusion`); mIoU over the classes with a non-zero union, as the VOC code
  of IRNet / SEAM / WeakTr computes it (:func:`multiclass_metrics`). Label maps come from class
  scores by argmax over a background score and the tagged classes (:func:`labels_from_scores`);
  :class:`BackgroundCurve` scores every background threshold of a grid in one pass.
"""

from __future__ import annotations

import logging

from benchmark.evaluate.background import (
    BackgroundCurve,
    labels_from_scores,
    power_background,
    upsample_scores,
)
from benchmark.evaluate.confusion import METRICS, confusion_matrix, metrics_from_confusion
from benchmark.evaluate.evaluator import Evaluator, evaluate_predictions
from benchmark.evaluate.maps import threshold_map, upsample_map
from benchmark.evaluate.multiclass import (
    MulticlassScores,
    accumulate_confusion,
    class_iou,
    mean_iou,
    multiclass_metrics,
)
from benchmark.evaluate.pxap import average_precision
from benchmark.evaluate.sweep import SweepCounts, ThresholdSweep, sweep_naive
from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "METRICS",
    "BackgroundCurve",
    "Evaluator",
    "MulticlassScores",
    "SweepCounts",
    "ThresholdSweep",
    "accumulate_confusion",
    "average_precision",
    "class_iou",
    "confusion_matrix",
    "evaluate_predictions",
    "labels_from_scores",
    "mean_iou",
    "metrics_from_confusion",
    "multiclass_metrics",
    "power_background",
    "sweep_naive",
    "threshold_map",
    "upsample_map",
    "upsample_scores",
]
