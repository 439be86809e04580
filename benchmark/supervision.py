"""Mixed supervision: which train images use their GT mask instead of their pseudo mask.

Two rules (``gt_rule``):

``subset`` (the default)
    A fixed, seeded subset of ``round(r * n)`` train images (:func:`gt_subset`), nested as the
    ratio ``r`` grows and identical for every method.
``weaktr_batch``
    The WeakTR-Refinery repository's rule (:class:`PerBatchGTMasks`): in every training batch of
    ``b`` images, ``max(1, int(r * b))`` images (redrawn each batch) use their GT mask.

This module sits in the lowest layer of ``benchmark``: the runner and the sweeps import it, it
imports neither.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

GT_RULES = ("subset", "weaktr_batch")


def gt_subset(n: int, ratio: float, key: str) -> np.ndarray:
    """Indices of the ``ratio`` share of ``n`` images whose pseudo masks are replaced by GT.

    A seeded permutation (by ``key``: split hash and base seed) is cut at round(ratio * n), so
    the subsets are nested as the ratio grows and identical for every method.
    """
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: int(round(ratio * n))])


def n_gt_per_batch(ratio: float, batch: int) -> int:
    """GT images per batch under the WeakTR-Refinery rule: ``max(1, int(ratio * batch))``.

    ``ratio = 0`` gives 0 (no GT); the result never exceeds ``batch``.
    """
    if ratio <= 0 or batch <= 0:
        return 0
    return min(batch, max(1, int(ratio * batch)))


class PerBatchGTMasks:
    """Pseudo masks whose batches get ``max(1, int(r * b))`` GT masks, redrawn every batch.

    The WeakTR-Refinery repository's mixed supervision: the training loop indexes this object
    with each batch's indices (``masks[idx]``, as :func:`train_segmenter` does); each call draws
    (seeded) which images of the batch use their GT mask. :attr:`draws` records the count per
    batch.

    Args:
        pseudo: (N, H, W) uint8 pseudo masks.
        gt: (N, H, W) uint8 GT masks (0, 1, 255).
        ratio: the GT ratio ``r``.
        seed: seed of the draws.
    """

    def __init__(self, pseudo: np.ndarray, gt: np.ndarray, ratio: float, seed: int) -> None:
        if pseudo.shape != gt.shape:
            raise ValueError(f"pseudo masks {pseudo.shape} and GT {gt.shape} differ")
        self.pseudo, self.gt, self.ratio = pseudo, gt, float(ratio)
        self.shape, self.dtype = pseudo.shape, pseudo.dtype
        self.rng = np.random.default_rng(seed)
        self.draws: list[int] = []

    def __len__(self) -> int:
        return len(self.pseudo)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out = np.array(self.pseudo[idx])  # (b, H, W) copy
        k = n_gt_per_batch(self.ratio, len(idx))
        if k:
            pick = np.sort(self.rng.choice(len(idx), size=k, replace=False))
            out[pick] = np.asarray(self.gt)[idx[pick]]
        self.draws.append(k)
        return out if np.ndim(index) else out[0]


def gt_rule_masks(
    rule: str, pseudo: np.ndarray, gt: np.ndarray, ratio: float, seed: int
) -> np.ndarray | PerBatchGTMasks:
    """The masks the segmenter trains on under a GT rule (``subset``: ``pseudo`` as it is).

    Raises:
        ValueError: unknown rule.
    """
    if rule == "subset":
        return pseudo
    if rule == "weaktr_batch":
        return PerBatchGTMasks(pseudo, gt, ratio, seed)
    raise ValueError(f"unknown gt rule {rule!r}; valid: {', '.join(GT_RULES)}")
