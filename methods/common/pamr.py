"""Pixel-adaptive mask refinement (PAMR): soft masks smoothed along image colour edges.

Araslanov and Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020. For each
pixel u and each of its 8 neighbours v at every dilation d, the affinity is

    k(u, v) = softmax_v( -mean_c |I_c(u) - I_c(v)| / (1e-8 + 0.1 * sigma_c(u)) )

with sigma_c(u) the standard deviation of channel c over the 3 x 3 windows of u at all dilations
together (9 values per dilation), and the softmax over all neighbours of all dilations. Each
of ``num_iter`` steps replaces a mask value by the affinity-weighted mean of its neighbours' values:
``m(u) <- sum_v k(u, v) m(v)``. Borders are replicated. The mask channels are not mixed, so a
mask stack that sums to one per pixel keeps doing so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

#: (dy, dx) of the 8 neighbours of a 3 x 3 window, row by row, centre excluded.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_stack(
    x: torch.Tensor, dilations: Sequence[int], centre: bool = False
) -> torch.Tensor:
    """Values of each pixel's 8 (or 9, with the centre) neighbours at every dilation.

    Args:
        x: (B, K, H, W) maps.
        dilations: neighbour distances in pixels.
        centre: include the pixel itself (9 per dilation instead of 8).

    Returns:
        (B, K, P, H, W) with P = len(dilations) x (8 or 9); borders replicated.
    """
    h, w = x.shape[-2:]
    offsets = ((0, 0),) + NEIGHBOURS if centre else NEIGHBOURS
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")  # (B, K, H + 2d, W + 2d)
        for dy, dx in offsets:
            out.append(padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w])
    return torch.stack(out, dim=2)


def pamr_kernel(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The PAMR affinities of every pixel to its neighbours.

    Args:
        image: (B, 3, H, W) image (any fixed scaling; the kernel is scale invariant).
        dilations: neighbour distances in pixels.

    Returns:
        (B, 1, P, H, W) weights, summing to one over P (8 per dilation).
    """
    window = neighbour_stack(image, dilations, centre=True)  # (B, 3, 9 D, H, W)
    centre_idx = torch.arange(0, window.shape[2], 9, device=image.device)
    is_centre = torch.zeros(window.shape[2], dtype=torch.bool, device=image.device)
    is_centre[centre_idx] = True
    std = window.std(dim=2, keepdim=True)  # (B, 3, 1, H, W): over all windows together
    diff = (window[:, :, ~is_centre] - image.unsqueeze(2)).abs()  # (B, 3, 8 D, H, W)
    logits = (-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True)  # (B, 1, P, H, W)
    return torch.softmax(logits, dim=2)


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
) -> torch.Tensor:
    """Refine soft masks along the image's edges (no gradient).

    Args:
        image: (B, 3, H, W) image.
        masks: (B, C, h, w) soft masks; resized bilinearly to (H, W) first.
        num_iter: propagation steps.
        dilations: neighbour distances in pixels.

    Returns:
        (B, C, H, W) refined masks.
    """
    if image.dim() != 4 or masks.dim() != 4 or image.shape[0] != masks.shape[0]:
        raise ValueError(f"pamr: image {tuple(image.shape)} and masks {tuple(masks.shape)}")
    size = image.shape[-2:]
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=True)
    kernel = pamr_kernel(image.float(), dilations)  # (B, 1, P, H, W)
    masks = masks.float()
    for _ in range(num_iter):
        masks = (neighbour_stack(masks, dilations) * kernel).sum(dim=2)  # (B, C, H, W)
    return masks
