"""Single-stage WSSS helpers: the two views of a siamese pair, online seg labels and loss.

Used by RTC (:mod:`methods.rtc`), following its original (ChunyanWang1/RTC, on usr922/wseg):

- :func:`to_view` / :func:`from_view`: the view-1 -> view-2 transform (resize, optional flip)
  and its inverse, applied alike to images, maps and features.
- :func:`with_background`, :func:`max_onehot`, :func:`contrast_labels`: the background
  channel ``1 - max_c fg_c``, the strongest foreground channel per pixel, and pixel classes.
- :func:`min_pool_loss`: the lowest quarter of a map pushed to zero.
- :func:`seg_pseudo_labels`: class / background / ignore labels from refined maps,
  PAMR-refined against a high and a low background score.
- :func:`balanced_seg_loss`: class-balanced cross-entropy with ignore, images whose labels
  lack one of their classes (background or a tagged one) weighted 0.

Foreground maps are (N, F, h, w): F = 1 on a single-label dataset (the label class), F = C on
a multi-label one, with (N, C) ``tags`` (None on a single-label dataset).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from datasets.conventions import IGNORE
from methods.base import ImageSet
from methods.common.cam import tagged_only
from methods.common.pamr import pamr

logger = logging.getLogger(__name__)

BG, FG = 0, 1  # channels of binary [background, foreground] maps


def to_view(x: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """Map images, maps or features of view 1 into view 2's geometry (resize, then flip)."""
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return torch.flip(x, dims=(-1,)) if flip else x


def from_view(x: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """The inverse of :func:`to_view`: view-2 maps back in view 1's geometry."""
    x = torch.flip(x, dims=(-1,)) if flip else x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def view2_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """View 2's image size: ``hw`` times ``scale``, at least 8 px a side."""
    return max(8, round(hw[0] * scale)), max(8, round(hw[1] * scale))


# ---- channels ----------------------------------------------------------------------------------
def targets(data: ImageSet) -> torch.Tensor:
    """(N,) int64 label indices, or (N, C) float32 tags on a multi-label dataset."""
    if data.multilabel:
        return torch.from_numpy(data.tags())
    return torch.tensor(np.asarray(data.labels), dtype=torch.long)


def map_channels(data: ImageSet) -> int:
    """Foreground maps per image: C on a multi-label dataset, else 1 (the label class)."""
    return data.num_classes if data.multilabel else 1


def keep_tagged(maps: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
    """Zero the channels of untagged classes (maps (N, C, h, w)); as is when ``tags`` is None."""
    return maps if tags is None else tagged_only(maps, tags)


def tagged_softmax(scores: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
    """Softmax of (N, 1 + F, h, w) ``[bg, fg]`` scores over background and tagged classes.

    Untagged classes get probability 0; a plain softmax when ``tags`` is None.
    """
    if tags is not None:
        keep = torch.cat([torch.ones_like(tags[:, :1]), tags], dim=1) > 0  # (N, 1 + F)
        scores = scores.masked_fill(~keep[:, :, None, None], float("-inf"))
    return torch.softmax(scores, dim=1)


def with_background(fg: torch.Tensor) -> torch.Tensor:
    """``[1 - max_c fg_c, fg]``: (N, F, h, w) foreground maps -> (N, 1 + F, h, w)."""
    return torch.cat([1.0 - fg.amax(dim=1, keepdim=True), fg], dim=1)


def max_onehot(fg: torch.Tensor) -> torch.Tensor:
    """Keep each pixel's largest foreground value, zero the other channels (ties kept).

    The original's ``max_onehot``; one channel is returned as is.
    """
    if fg.shape[1] == 1:
        return fg
    return torch.where(fg == fg.amax(dim=1, keepdim=True), fg, torch.zeros_like(fg))


def contrast_labels(fg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixel classes (N, h, w): the argmax of ``[threshold, fg]`` (ties to background).

    0 where no foreground map exceeds ``threshold``, else 1 + the strongest channel.
    """
    return torch.cat([torch.full_like(fg[:, :1], threshold), fg], dim=1).argmax(dim=1)


# ---- losses and labels ---------------------------------------------------------------------
def min_pool_loss(maps: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """Mean of the lowest ``fraction`` of each map's (ReLU'd) values: pushes them to zero."""
    flat = maps.amax(dim=1).flatten(1)  # (N, h w)
    k = max(1, int(flat.shape[1] * fraction))
    return F.relu(flat.topk(k, dim=1, largest=False).values).mean()


@torch.no_grad()
def seg_pseudo_labels(
    images: torch.Tensor,
    fg: torch.Tensor,
    bg_high: float = 0.55,
    bg_low: float = 0.2,
    iters: int = 10,
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24),
    tags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segmentation labels from refined foreground maps: 1 + class, 0, or 255 where unsure.

    Per image, the softmax of ``[bg, fg_c]`` over the background and the tagged classes (the
    original's valid keys; untagged classes cannot win), PAMR-refined, argmax: a class where
    it wins against ``bg_high``, background where background wins against both scores.

    Args:
        images: (N, 3, H, W) images in [0, 1].
        fg: (N, F, h, w) foreground maps in [0, 1].
        bg_high: background score that confident foreground must beat.
        bg_low: background score that confident background must beat too.
        iters: PAMR iterations.
        dilations: PAMR neighbour distances (at half resolution).
        tags: (N, F) multi-hot tags, or None (every channel is valid).

    Returns:
        (N, H, W) int64 labels.
    """
    h, w = images.shape[-2:]
    half = (max(1, h // 2), max(1, w // 2))
    small = F.interpolate(images, size=half, mode="bilinear", align_corners=False)
    fg = F.interpolate(fg, size=half, mode="bilinear", align_corners=False)

    def winner(bg: float) -> torch.Tensor:
        scores = torch.cat([torch.full_like(fg[:, :1], bg), fg], dim=1)  # (N, 1 + F, h/2, w/2)
        refined = pamr(small, tagged_softmax(scores, tags), iters, dilations)
        refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
        return refined.argmax(dim=1)  # (N, H, W)

    high, low = winner(bg_high), winner(bg_low)
    labels = torch.full_like(high, IGNORE)
    labels[high >= FG] = high[high >= FG]
    labels[(high == BG) & (low == BG)] = BG
    return labels


def balanced_seg_loss(
    logits: torch.Tensor, labels: torch.Tensor, tags: torch.Tensor | None = None
) -> torch.Tensor:
    """Class-balanced cross-entropy; an image counts only if its labels hold all its classes.

    Pixel weight ``(n - n_c) / (1 + n)`` for a pixel of class c (n labelled pixels, n_c of
    class c); ignored pixels weigh 0 but count in the per-image mean, as in the original. An
    image weighs 0 unless its labels hold the background and every class it is tagged with
    (single-label: both classes).

    Args:
        logits: (N, K, h, w) seg logits (resized to the labels); K = 1 + F.
        labels: (N, H, W) int64 in {0, .., K - 1, 255}.
        tags: (N, K - 1) multi-hot tags, or None (every class must be present).
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    k = logits.shape[1]
    onehot = torch.stack([labels == c for c in range(k)], dim=1).float()  # (N, K, H, W)
    per_class = onehot.flatten(2).sum(-1)  # (N, K)
    total = per_class.sum(-1, keepdim=True)
    class_w = (total - per_class) / (1.0 + total)  # (N, K)
    pixel_w = (onehot * class_w[:, :, None, None]).sum(1)  # (N, H, W)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # (N, H, W)
    if tags is None:
        image_w = (per_class > 0).all(dim=1).float()  # (N,)
    else:  # the original's rule: as many classes in the labels as tags, plus background
        wanted = (tags > 0).sum(dim=1) + 1
        image_w = ((per_class > 0).sum(dim=1) == wanted).float()
    return (image_w * (pixel_w * ce).flatten(1).mean(1)).mean()
