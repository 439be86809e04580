"""Class prototypes, pixel-to-prototype contrast and feature-affinity CAM refinement.

The building blocks of prototype-based single-stage WSSS (wseg: Du et al., "Weakly Supervised
Semantic Segmentation by Pixel-to-Prototype Contrast", CVPR 2022; RTC builds on it):

- :func:`affinity_refine` (PCM): ``A = relu(f^T f)`` over L2-normalised pixel features,
  column-normalised, then ``M'(:, j) = sum_i M(:, i) A(i, j) / sum_i A(i, j)``.
- :func:`class_prototypes`: per class, the score-weighted mean of the features at the k
  highest-scoring positions of the whole batch, L2-normalised.
- :func:`compensate`: every pixel attends (softmax of cosine similarity) to the features of
  those top-k positions and adds the attention-weighted mean of their scores to its own.
- :func:`prototype_contrast`: InfoNCE of each pixel against the prototypes,
  ``-log exp(f . p_y / tau) / sum_c exp(f . p_c / tau)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EPS = 1e-5


def minmax_norm(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then ``relu(m - min - 1e-5) / (max - min + 1e-5)`` per map (SEAM's max_norm).

    Args:
        maps: (N, C, h, w).

    Returns:
        (N, C, h, w) in [0, 1).
    """
    maps = F.relu(maps)
    flat = maps.flatten(2)
    hi = flat.amax(dim=2)[:, :, None, None]  # (N, C, 1, 1)
    lo = flat.amin(dim=2)[:, :, None, None]
    return F.relu(maps - lo - EPS) / (hi - lo + EPS)


def topk_mean(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``fraction`` of each item's values (the originals' hard-pixel mean).

    Args:
        x: (N, ...) values.
        fraction: share of values kept per item, in (0, 1].

    Returns:
        A scalar.
    """
    flat = x.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean()


def affinity_refine(maps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Propagate maps along the cosine affinities of pixel features (PCM).

    Args:
        maps: (N, C, h', w') maps; resized bilinearly to the feature grid.
        features: (N, K, h, w) pixel features.

    Returns:
        (N, C, h, w) refined maps.
    """
    n, _, h, w = features.shape
    if maps.shape[-2:] != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=True)
    f = features.flatten(2)  # (N, K, hw)
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    aff = F.relu(f.transpose(1, 2) @ f)  # (N, hw, hw)
    aff = aff / (aff.sum(dim=1, keepdim=True) + EPS)
    return (maps.flatten(2) @ aff).view(n, -1, h, w)  # (N, C, h, w)


@dataclass
class Prototypes:
    """Class prototypes and the batch positions they were pooled from.

    Attributes:
        vectors: (C, K) L2-normalised prototypes.
        index: (C, k) flat positions (over N x h x w) of each class's top scores.
        weight: (C, k) those scores.
    """

    vectors: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


@torch.no_grad()
def class_prototypes(scores: torch.Tensor, features: torch.Tensor, k: int) -> Prototypes:
    """Per class, the score-weighted mean feature at the k top-scoring positions of the batch.

    ``scores`` and ``features`` may come from different views of the same images (RTC's
    cross-transform prototypes): they must share the grid.

    Args:
        scores: (N, C, h, w) class scores (>= 0).
        features: (N, K, h, w) features on the same grid.
        k: positions per class (clipped to N h w).

    Returns:
        The :class:`Prototypes`.
    """
    if scores.shape[0] != features.shape[0] or scores.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"class_prototypes: scores {scores.shape} vs features {features.shape}")
    c, kdim = scores.shape[1], features.shape[1]
    flat_scores = scores.transpose(0, 1).reshape(c, -1)  # (C, N h w)
    flat_feats = features.permute(0, 2, 3, 1).reshape(-1, kdim)  # (N h w, K)
    k = max(1, min(k, flat_scores.shape[1]))
    weight, index = flat_scores.topk(k, dim=1)  # (C, k)
    pooled = (weight.unsqueeze(-1) * flat_feats[index]).sum(1) / (weight.sum(1, keepdim=True) + EPS)
    return Prototypes(F.normalize(pooled, dim=-1), index, weight)


@torch.no_grad()
def compensate(
    scores: torch.Tensor, features: torch.Tensor, protos: Prototypes, channels: list[int]
) -> torch.Tensor:
    """Feed global context back to rough maps: ``s'(u) = s(u) + sum_j a_uj s_j`` per class.

    ``a_uj = softmax_j(cos(f(u), f_j))`` over the class's k top positions j (features taken
    from ``features`` at ``protos.index``), ``s_j`` their scores (``protos.weight``).

    Args:
        scores: (N, C, h, w) maps to compensate.
        features: (N, K, h, w) features on the same grid.
        protos: from :func:`class_prototypes` (index into this batch's ``features``).
        channels: the classes to compensate (the others are copied).

    Returns:
        (N, C, h, w) compensated maps.
    """
    n, _, h, w = scores.shape
    flat = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=-1)
    out = scores.clone()
    for c in channels:
        keys = flat[protos.index[c]]  # (k, K)
        att = torch.softmax(flat @ keys.T, dim=1)  # (N h w, k)
        out[:, c] += (att @ protos.weight[c]).view(n, h, w)
    return out


def prototype_contrast(
    features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Pixel-to-prototype InfoNCE: mean over pixels of ``-log softmax(f . P^T / tau)[y]``.

    Args:
        features: (N, K, h, w) pixel features (normalised here).
        prototypes: (C, K) L2-normalised prototypes.
        labels: (N, h, w) int class of each pixel.
        temperature: tau.

    Returns:
        A scalar.
    """
    f = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=-1)
    logits = f @ prototypes.T / temperature  # (N h w, C)
    return F.cross_entropy(logits, labels.reshape(-1).long())
