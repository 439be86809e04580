"""Single-stage WSSS helpers: the two views of a siamese pair, online seg labels and loss.

Used by RTC (:mod:`methods.rtc`), following its original (ChunyanWang1/RTC, on usr922/wseg):

- :func:`to_view` / :func:`from_view`: the view-1 -> view-2 transform (resize, optional flip)
  and its inverse, applied alike to images, maps and features.
- :func:`min_pool_loss`: the lowest quarter of a map pushed to zero.
- :func:`seg_pseudo_labels`: foreground / background / ignore labels from a refined map,
  PAMR-refined against a high and a low background score.
- :func:`balanced_seg_loss`: class-balanced cross-entropy with ignore, images lacking a class
  weighted 0.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from datasets.conventions import IGNORE
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
) -> torch.Tensor:
    """Segmentation labels from a refined foreground map: 1, 0, or 255 where unsure.

    Args:
        images: (N, 3, H, W) images in [0, 1].
        fg: (N, 1, h, w) foreground map in [0, 1].
        bg_high: background score that confident foreground must beat.
        bg_low: background score that confident background must beat too.
        iters: PAMR iterations.
        dilations: PAMR neighbour distances (at half resolution).

    Returns:
        (N, H, W) int64 labels.
    """
    h, w = images.shape[-2:]
    half = (max(1, h // 2), max(1, w // 2))
    small = F.interpolate(images, size=half, mode="bilinear", align_corners=False)
    fg = F.interpolate(fg, size=half, mode="bilinear", align_corners=False)

    def winner(bg: float) -> torch.Tensor:
        probs = torch.softmax(torch.cat([torch.full_like(fg, bg), fg], dim=1), dim=1)
        refined = pamr(small, probs, iters, dilations)  # (N, 2, h/2, w/2)
        refined = F.interpolate(refined, size=(h, w), mode="bilinear", align_corners=False)
        return refined.argmax(dim=1)  # (N, H, W)

    high, low = winner(bg_high), winner(bg_low)
    labels = torch.full_like(high, IGNORE)
    labels[high == FG] = FG
    labels[(high == BG) & (low == BG)] = BG
    return labels


def balanced_seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross-entropy; images whose labels lack a class weigh 0.

    Pixel weight ``(n - n_c) / (1 + n)`` for a pixel of class c (n labelled pixels, n_c of
    class c); ignored pixels weigh 0 but count in the per-image mean, as in the original.

    Args:
        logits: (N, 2, h, w) seg logits (resized to the labels).
        labels: (N, H, W) int64 in {0, 1, 255}.
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    onehot = torch.stack([labels == BG, labels == FG], dim=1).float()  # (N, 2, H, W)
    per_class = onehot.flatten(2).sum(-1)  # (N, 2)
    total = per_class.sum(-1, keepdim=True)
    class_w = (total - per_class) / (1.0 + total)  # (N, 2)
    pixel_w = (onehot * class_w[:, :, None, None]).sum(1)  # (N, H, W)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # (N, H, W)
    image_w = (per_class > 0).all(dim=1).float()  # (N,)
    return (image_w * (pixel_w * ce).flatten(1).mean(1)).mean()
