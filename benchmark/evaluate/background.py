"""Class score maps to label maps with a background score, and the background-threshold curve.

Multi-class WSSS methods give one score map per foreground class, (N, C, h, w) in [0, 1] (VOC:
C = 20); the label of a pixel is the argmax over a background score and the scores of the
classes the image is tagged with, class c of the maps being label c + 1 (label 0 =
background). Untagged classes are never predicted. Two background scores:

- a constant threshold t (IRNet ``step/eval_cam.py`` and SEAM/WeakTr ``evaluation.py``: the
  maps padded with a channel of value t before ``np.argmax``), the literature's default;
- ``(1 - max_c M_c)^alpha`` over the tagged classes c (:func:`power_background`; PSA /
  AffinityNet's ``infer_aff.py``, which IRNet's codebase reuses for its random-walk labels).

Ties: ``np.argmax`` takes the first maximum, so in those repositories the background (channel
0) wins a tie with a class, and a lower class index wins a tie between classes; that is the
default here (``bg_wins_ties=True``: class c wins iff ``M_c > t``). With ``bg_wins_ties=False``
a class wins a tie (``M_c >= t``), which for one class is exactly the binary rule
``map >= t`` of :func:`benchmark.evaluate.threshold_map`. Comparisons are made in float32.

:class:`BackgroundCurve` gives the confusion matrix, hence mIoU, at every threshold of a grid
from one pass over the images: a pixel's label depends on t only through
``m = max over tagged c of M_c``: it is its best tagged class ``a`` while ``m > t`` (or
``>=``) and background after, so one ``np.bincount`` over (GT, a, bin of m) and a reversed
cumulative sum over the bins give the counts of every threshold at once, exactly those of
:func:`labels_from_scores` at each grid threshold. SEAM/WeakTr's ``--curve`` re-runs the whole
evaluation per threshold instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from benchmark.evaluate.confusion import _bad_gt, _check_classes, _check_labels, _where
from benchmark.evaluate.multiclass import mean_iou
from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)


def _check_scores(scores: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, h, w) float32 finite scores in [0, 1] and (N, C) bool tags."""
    scores = np.asarray(scores)
    if scores.ndim != 4 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"scores must be numeric (N, C, h, w), got {scores.shape} {scores.dtype}")
    tags = np.asarray(tags)
    if tags.shape != scores.shape[:2]:
        raise ValueError(f"tags must be (N, C) = {scores.shape[:2]}, got shape {tags.shape}")
    if tags.dtype != np.bool_ and not np.isin(tags, (0, 1)).all():
        raise ValueError("tags must be multi-hot (0/1 or bool)")
    scores = scores.astype(np.float32, copy=False)
    if scores.size and not (np.isfinite(scores).all() and 0 <= scores.min() and scores.max() <= 1):
        raise ValueError("scores must be finite and in [0, 1]")
    return scores, tags.astype(bool)


def best_tagged(scores: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the best tagged class label and its score.

    Args:
        scores: (N, C, h, w) class scores in [0, 1].
        tags: (N, C) multi-hot image tags.

    Returns:
        ``(label, score)``: (N, h, w) int64 labels in ``[1, C]`` (the first maximum among the
        tagged classes; 1 for an image with no tag) and (N, h, w) float32 scores (``-inf`` for
        an image with no tag, so that it is background at every threshold).

    Raises:
        ValueError: Shapes, dtypes or values as in :func:`labels_from_scores`.
    """
    scores, tags = _check_scores(scores, tags)
    masked = np.where(tags[:, :, None, None], scores, np.float32(-np.inf))  # (N, C, h, w)
    label = np.argmax(masked, axis=1)  # (N, h, w), first maximum
    best = np.take_along_axis(masked, label[:, None], axis=1)[:, 0]  # (N, h, w)
    return label.astype(np.int64) + 1, best


def power_background(scores: np.ndarray, tags: np.ndarray, alpha: float) -> np.ndarray:
    """PSA's background score ``(1 - max over tagged c of M_c) ** alpha``, in float32.

    Args:
        scores: (N, C, h, w) class scores in [0, 1].
        tags: (N, C) multi-hot image tags (an image with no tag gets background 1).
        alpha: The exponent (> 0; PSA uses 4 to 32: larger alpha, less background).

    Returns:
        (N, h, w) float32 background scores in [0, 1].
    """
    _, best = best_tagged(scores, tags)
    return _power(best, alpha)


def _power(best: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - best) ** alpha`` in float32, from the best tagged score (-inf: no tag)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    top = np.maximum(best, np.float32(0))  # no tag: -inf -> 0, background 1
    return np.power(np.float32(1) - top, np.float32(alpha), dtype=np.float32)


def labels_from_scores(
    scores: np.ndarray,
    tags: np.ndarray,
    threshold: float | None = None,
    *,
    alpha: float | None = None,
    bg_wins_ties: bool = True,
) -> np.ndarray:
    """Label maps: argmax over [background, tagged classes]; untagged classes never predicted.

    Exactly one of ``threshold`` (constant background score) and ``alpha`` (PSA's
    ``(1 - max_c M_c) ** alpha``) is given. Scores are used at their resolution: upsample
    them to the GT's size first (:func:`upsample_scores`) to evaluate at the original size.

    Args:
        scores: (N, C, h, w) class scores in [0, 1]; channel c is label c + 1.
        tags: (N, C) multi-hot image tags.
        threshold: Constant background score t.
        alpha: Exponent of the power background.
        bg_wins_ties: Whether the background wins a tie (the literature's ``np.argmax``);
            ``False`` makes a class win it (``M_c >= t``, the binary ``map >= t`` rule).

    Returns:
        (N, h, w) uint8 labels in ``[0, C]`` (0 = background).

    Raises:
        ValueError: Not exactly one of threshold / alpha, scores not (N, C, h, w) finite
            values in [0, 1], tags not (N, C) multi-hot, or more than 255 classes.
    """
    if (threshold is None) == (alpha is None):
        raise ValueError("give exactly one of threshold and alpha")
    if np.asarray(scores).ndim == 4 and np.asarray(scores).shape[1] > 254:
        raise ValueError("at most 254 classes fit uint8 labels next to the ignore value 255")
    label, best = best_tagged(scores, tags)
    bg = _power(best, alpha) if alpha is not None else np.float32(threshold)
    wins = best > bg if bg_wins_ties else best >= bg
    return np.where(wins, label, 0).astype(np.uint8)


def upsample_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (C, h, w) class scores bilinearly (``align_corners=False``) to ``size`` = (H, W).

    The scores of every class are resized at once, as :func:`benchmark.evaluate.upsample_map`
    resizes one map, and clipped back to [0, 1] (bilinear weights sum to 1 only up to rounding).

    Args:
        scores: (C, h, w) float scores.
        size: Target (H, W).

    Returns:
        (C, H, W) float32 array (a float32 copy if it already has that size).
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"expected (C, h, w) scores, got shape {scores.shape}")
    size = (int(size[0]), int(size[1]))
    if scores.shape[1:] == size:
        return scores.astype(np.float32, copy=True)
    import torch
    import torch.nn.functional as F  # noqa: N812

    t = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None]  # (1, C, h, w)
    with torch.no_grad():
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
    return np.clip(out, 0.0, 1.0, out=out)


class BackgroundCurve:
    """Dataset-level confusion matrices at every background threshold of a grid, in one pass.

    Args:
        num_classes: K = C + 1 (background + the classes of the score maps).
        thresholds: Ascending background thresholds; default ``i / 100``, i = 0..100.
        ignore_index: GT value whose pixels are skipped.
        bg_wins_ties: As in :func:`labels_from_scores`.

    Example:
        >>> curve = BackgroundCurve(3, thresholds=[0.2, 0.95])
        >>> scores = np.array([[[[0.5]], [[0.9]]]])  # (1, 2, 1, 1): class 2 wins
        >>> curve.add(scores[0], np.array([True, True]), np.array([[2]]))
        >>> curve.miou().tolist()  # class 2 right at 0.2; background at 0.95
        [1.0, 0.0]
    """

    def __init__(
        self,
        num_classes: int,
        thresholds: Sequence[float] | np.ndarray | None = None,
        ignore_index: int = IGNORE,
        bg_wins_ties: bool = True,
    ) -> None:
        self.num_classes = _check_classes(num_classes, ignore_index)
        if thresholds is None:
            thresholds = np.arange(101) / 100
        thr = np.asarray(thresholds, dtype=np.float64)
        if thr.ndim != 1 or thr.size == 0 or np.any(np.diff(thr) < 0):
            raise ValueError("thresholds must be a non-empty 1-D ascending sequence")
        self.thresholds = thr
        self._t32 = thr.astype(np.float32)
        self.ignore_index = ignore_index
        self._side = "left" if bg_wins_ties else "right"
        k, t = self.num_classes, thr.size
        self._hist = np.zeros((k, k, t + 1), dtype=np.int64)  # (GT, best class, bin of m)
        self.n_images = 0

    def add(
        self, scores: np.ndarray, tags: np.ndarray, gt: np.ndarray, name: str | None = None
    ) -> None:
        """Accumulate one image.

        Args:
            scores: (C, h, w) class scores in [0, 1], any resolution (resized bilinearly to
                the GT's size, :func:`upsample_scores`).
            tags: (C,) multi-hot tags of the image.
            gt: (H, W) GT labels in ``[0, K)`` or ``ignore_index``.
            name: Optional image name, quoted in error messages.

        Raises:
            ValueError: C + 1 != K, or invalid scores, tags or GT.
        """
        gt = _check_labels(gt, "GT", name)
        scores = np.asarray(scores)
        if gt.ndim != 2 or scores.ndim != 3 or scores.shape[0] + 1 != self.num_classes:
            raise ValueError(
                f"expected (C, h, w) scores with C + 1 = {self.num_classes} and a 2-D GT, got "
                f"{scores.shape} and {gt.shape}{_where(name)}"
            )
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.intp)
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise _bad_gt(gt, self.num_classes, self.ignore_index, name)
        up = upsample_scores(scores, gt.shape)
        label, best = best_tagged(up[None], np.asarray(tags)[None])
        b = np.searchsorted(self._t32, best[0][valid], side=self._side)  # (P,) in [0, T]
        k, bins = self.num_classes, self.thresholds.size + 1
        keys = (g * k + label[0][valid]) * bins + b
        self._hist += np.bincount(keys, minlength=k * k * bins).reshape(k, k, bins)
        self.n_images += 1

    def confusions(self) -> np.ndarray:
        """(T, K, K) int64 confusion matrices, one per threshold, summed over the images."""
        k, t = self.num_classes, self.thresholds.size
        # a pixel in bin b keeps its class at thresholds j < b: reversed cumulative sum over b
        above = np.cumsum(self._hist[:, :, ::-1], axis=2)[:, :, ::-1]  # (K, K, T + 1)
        cms = np.zeros((t, k, k), dtype=np.int64)
        cms[:, :, 1:] = above[:, 1:, 1:].transpose(2, 0, 1)  # (T, K, K-1): sum over b > j
        cms[:, :, 0] = self._hist.sum(axis=(1, 2))[None] - cms[:, :, 1:].sum(axis=2)
        return cms

    def miou(self) -> np.ndarray:
        """(T,) mIoU at each threshold (classes with a non-zero union; NaN if none)."""
        return mean_iou(self.confusions())

    def best(self) -> tuple[float, float]:
        """The threshold of the highest mIoU (ties: the lowest threshold) and that mIoU.

        Raises:
            ValueError: mIoU is undefined at every threshold (no image, or all ignored).
        """
        values = self.miou()
        if np.all(np.isnan(values)):
            raise ValueError("mIoU is undefined (NaN) at every threshold")
        i = int(np.nanargmax(values))
        return float(self.thresholds[i]), float(values[i])
