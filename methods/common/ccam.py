"""C2AM (CCAM) and ECS pieces: the contrastive loss, the polarity vote and the ECS erasing.

C2AM: Xie et al., CVPR 2022 (code: CVI-SZU/CCAM); ECS: Sun et al., ICCV 2021. Used by
:mod:`methods.ccam_ecs`, whose docstring gives the formulas and the deviations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from methods.common.cam import cam_from_features, class_cams, normalize_cams, tagged_only

SIM_MIN = 5e-4  # cosine similarity clamp, as in the official code
SIM_MAX = 1.0 - 5e-4


# ---- losses ------------------------------------------------------------------------------------
def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity ``s_ij = cos(a_i, b_j)`` clamped to [5e-4, 1 - 5e-4].

    Args:
        a: (N, C) embeddings.
        b: (M, C) embeddings.

    Returns:
        (N, M) clamped similarities.
    """
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T  # (N, M)
    return sim.clamp(SIM_MIN, SIM_MAX)


def rank_weights(sim: torch.Tensor, alpha: float, first_rank: int = 1) -> torch.Tensor:
    """Rank weights ``w_ij = exp(-alpha (rank_ij - 1))``, ranks descending within each row.

    Args:
        sim: (N, M) similarities.
        alpha: decay of the weight with the rank.
        first_rank: the rank of a row's most similar entry: 1 (the paper's formula) or 0
            (the official code, whose top pair then weighs ``exp(alpha)``).

    Returns:
        (N, M) float weights (no gradient).
    """
    order = torch.argsort(sim.detach(), dim=1, descending=True, stable=True)  # (N, M)
    rank = torch.argsort(order, dim=1, stable=True) + first_rank  # (N, M)
    return torch.exp(-alpha * (rank.to(sim.dtype) - 1.0))


def positive_loss(v: torch.Tensor, alpha: float, first_rank: int = 1) -> torch.Tensor:
    """Rank-weighted pull of same-side embeddings: mean of ``w_ij * -log s_ij`` (all i, j)."""
    sim = cosine_similarity_matrix(v, v)  # (N, N)
    return (rank_weights(sim, alpha, first_rank) * -torch.log(sim)).mean()


def negative_loss(v_bg: torch.Tensor, v_fg: torch.Tensor) -> torch.Tensor:
    """Push of background from foreground: mean over all i, j of ``-log(1 - s(bg_i, fg_j))``."""
    return -torch.log(1.0 - cosine_similarity_matrix(v_bg, v_fg)).mean()


def ccam_loss(
    v_fg: torch.Tensor, v_bg: torch.Tensor, alpha: float = 0.25, first_rank: int = 1
) -> dict[str, torch.Tensor]:
    """The CCAM contrastive loss ``L_pos^fg + L_neg + L_pos^bg`` over a batch.

    Args:
        v_fg: (N, C) foreground embeddings.
        v_bg: (N, C) background embeddings.
        alpha: rank-weight decay (0.25 official, 0.8 in the Pet repo).
        first_rank: see :func:`rank_weights`.

    Returns:
        ``{"total", "pos_fg", "neg", "pos_bg"}`` scalar tensors.
    """
    if v_fg.shape != v_bg.shape or v_fg.ndim != 2:
        raise ValueError(f"ccam_loss: expected two (N, C) tensors, got {v_fg.shape}, {v_bg.shape}")
    pos_fg = positive_loss(v_fg, alpha, first_rank)
    pos_bg = positive_loss(v_bg, alpha, first_rank)
    neg = negative_loss(v_bg, v_fg)
    return {"total": pos_fg + neg + pos_bg, "pos_fg": pos_fg, "neg": neg, "pos_bg": pos_bg}


def pool_fg_bg(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features under the map and its complement, both divided by ``h * w``.

    Args:
        z: (N, K, h, w) features.
        p: (N, 1, h, w) foreground probability.

    Returns:
        ``(v_fg, v_bg)``, each (N, K).
    """
    hw = z.shape[-2] * z.shape[-1]
    p = p.to(z.dtype)
    v_fg = torch.einsum("nkhw,nhw->nk", z, p[:, 0]) / hw  # (N, K)
    v_bg = torch.einsum("nkhw,nhw->nk", z, 1.0 - p[:, 0]) / hw  # (N, K)
    return v_fg, v_bg


# ---- polarity ----------------------------------------------------------------------------------
def ring_width(h: int, w: int) -> int:
    """Border ring width in cells: 1 on small maps, 4 on the official 28 x 28 maps."""
    return max(1, min(h, w) // 7)


def border_mean(p: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Mean of each map on its border ring.

    Args:
        p: (N, 1, h, w) maps.
        width: ring width in cells; ``None`` uses :func:`ring_width`.

    Returns:
        (N,) per-image border means.
    """
    h, w = p.shape[-2:]
    width = ring_width(h, w) if width is None else width
    ring = torch.ones(h, w, dtype=torch.bool, device=p.device)
    if h > 2 * width and w > 2 * width:
        ring[width : h - width, width : w - width] = False
    return p[:, 0][:, ring].float().mean(dim=1)  # (N,)


def is_inverted(p: torch.Tensor, width: int | None = None) -> bool:
    """Polarity vote: True when the border ring, averaged over images, is above 0.5.

    Objects rarely fill the border, so a map that is bright there marks the background.
    """
    return bool(border_mean(p, width).mean() > 0.5)


def orient(p: torch.Tensor, inverted: bool | torch.Tensor) -> torch.Tensor:
    """Return ``1 - p`` for an inverted head, ``p`` otherwise."""
    return 1.0 - p if bool(inverted) else p


# ---- ECS ---------------------------------------------------------------------------------------
def blur_images(x: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    """A strong Gaussian blur of (N, 3, H, W) images; sigma = ``sigma_frac`` x min(H, W).

    Separable (one pass along x, one along y), so a wide kernel stays cheap; the kernel covers
    +-3 sigma, capped so that its reflect padding stays smaller than the image.
    """
    side = min(x.shape[-2:])
    sigma = max(sigma_frac * side, 0.5)
    k = min(2 * math.ceil(3.0 * sigma) + 1, 2 * side - 1)  # odd
    x = gaussian_blur(x, kernel_size=[k, 1], sigma=[sigma, sigma])  # along W
    return gaussian_blur(x, kernel_size=[1, k], sigma=[sigma, sigma])  # along H


def ecs_erase(
    images: torch.Tensor, cam: torch.Tensor, threshold: float = 0.6, sigma_frac: float = 0.08
) -> torch.Tensor:
    """Replace the pixels where the CAM exceeds ``threshold`` by a blurred copy of the image.

    Args:
        images: (N, 3, H, W) images (any normalisation; the blur is linear).
        cam: (N, 1, h, w) class CAM in [0, 1]; upsampled bilinearly to (H, W) if needed.
        threshold: erase where ``cam > threshold`` (0.6 in ECS).
        sigma_frac: blur sigma as a fraction of the image side.

    Returns:
        (N, 3, H, W) erased images; pixels with ``cam <= threshold`` are unchanged bit for bit.
    """
    if cam.shape[-2:] != images.shape[-2:]:
        size = images.shape[-2:]
        cam = F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)
    mask = cam > threshold  # (N, 1, H, W)
    return torch.where(mask, blur_images(images, sigma_frac), images)


def class_cam(feat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised CAM of each image's label class: ReLU(sum_k W[y, k] f_k) / (max + 1e-5).

    With (N, C) multi-hot tags as ``labels``: the class-agnostic ECS map, the pixelwise max
    over the tagged classes of their normalised CAMs (so ``T = max(M, M')`` of the erased
    image is the max over the tagged classes of ECS's per-class targets).

    Args:
        feat: (N, K, h, w) features.
        weight: (C, K) classifier weight.
        labels: (N,) class indices, or (N, C) multi-hot tags.

    Returns:
        (N, 1, h, w) float32 maps in [0, 1).
    """
    if labels.dim() == 2:
        cams = normalize_cams(class_cams(feat.float(), weight.float()))  # (N, C, h, w)
        return tagged_only(cams, labels).amax(dim=1, keepdim=True)
    return normalize_cams(cam_from_features(feat.float(), weight.float(), labels))


def fg_times_class_share(fg: torch.Tensor, cams: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Class maps from a class-agnostic foreground and class CAMs: ``fg * M_c / max_c' M_c'``.

    The tagged class with the largest CAM at a pixel gets the foreground score itself, the
    other tagged classes their share of it, untagged classes zero. So the harness's argmax
    over ``[t, maps]`` is C2AM's combination: background where ``fg <= t``, else the tagged
    class with the largest CAM (a pixel where every tagged CAM is zero: the first tagged
    class).

    Args:
        fg: (N, 1, H, W) foreground map in [0, 1].
        cams: (N, C, H, W) class CAMs in [0, 1].
        tags: (N, C) multi-hot image tags.

    Returns:
        (N, C, H, W) maps in [0, 1]; ``max_c`` equals ``fg`` on images with a tag.
    """
    cams = tagged_only(cams.float(), tags)  # (N, C, H, W)
    eps = 1e-5
    share = (cams + eps) / (cams.amax(dim=1, keepdim=True) + eps)  # 1 for the top class
    return tagged_only(fg.float() * share.clamp(max=1.0), tags)
