"""FineCAM (WeakTR-Refinery): fused CLS attention times the coarse CAM of a ViT's patch tokens.

The formula is in :mod:`methods.weaktr_refinery`'s docstring (johnamit/weaktr-refinery): per
image, the CLS-to-patch attention of every layer and head, weighted per layer by a softmax over
heads of its agreement with the mean normalised token, summed over layers and averaged over
heads, min-max shifted (A~); times the coarse CAM of the patch tokens and the head (C~).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.common.vit import ViTOutputs, minmax_shift, resize

FINECAM_PARTS = ("both", "attention", "coarse")  # A~ * C~ | A~ alone | C~ alone (ablation)


def fine_cam(
    out: ViTOutputs,
    head_weight: torch.Tensor,
    classes: torch.Tensor | None,
    size: tuple[int, int],
    clamp: bool = True,
    roundtrip_size: tuple[int, int] | None = None,
    part: str = "both",
) -> torch.Tensor:
    """FineCAM of one class per image, or of every class, batched.

    Args:
        out: a ViT forward pass with CLS attention (N, L, H, P) and pre-LN tokens (N, P, D).
        head_weight: (C, D) weight of the linear classification head.
        classes: (N,) the class of each image whose map is wanted; None: every class (the
            fused attention is shared, the coarse CAM is normalised per class).
        size: (h, w) output size (bilinear upsampling of the patch-grid map).
        clamp: clamp the result to [0, 1] (the original does not).
        roundtrip_size: if given, upsample the coarse CAM to this size and back to the grid
            first (the original's quirk; ``faithful`` only).
        part: ``both`` (FineCAM, A~ * C~), or one factor alone for the ablation:
            ``attention`` (A~, the same for every class) or ``coarse`` (C~).

    Returns:
        (N, 1, h, w) float maps, or (N, C, h, w) with ``classes=None``.
    """
    a, tokens = out.cls_attn.float(), out.tokens.float()  # (N, L, H, P), (N, P, D)
    n = tokens.shape[0]
    m = F.normalize(tokens, dim=-1).mean(dim=-1)  # (N, P)
    s = torch.einsum("nlhp,np->nlh", a, m)  # (N, L, H)
    w = s.softmax(dim=2)  # softmax over heads
    fused = (w.unsqueeze(-1) * a).sum(dim=1).mean(dim=1)  # sum over layers, mean over heads
    attn = minmax_shift(fused)  # (N, P)
    weight = head_weight.float()
    if classes is None:
        coarse = torch.einsum("npd,cd->ncp", tokens, weight)  # (N, C, P)
    else:
        weight = weight[classes.to(head_weight.device)]  # (N, D)
        coarse = torch.einsum("npd,nd->np", tokens, weight)[:, None]  # (N, 1, P)
    k = coarse.shape[1]
    coarse = coarse.reshape(n, k, *out.grid)
    if roundtrip_size is not None:
        coarse = resize(resize(coarse, roundtrip_size), out.grid)
    coarse = minmax_shift(coarse.flatten(0, 1).flatten(1)).reshape(n, k, -1)  # (N, K, P)
    if part == "both":
        cam = attn[:, None] * coarse
    elif part == "attention":
        cam = attn[:, None].expand_as(coarse)
    elif part == "coarse":
        cam = coarse
    else:
        raise ValueError(f"part must be one of {FINECAM_PARTS}, got {part!r}")
    cam = cam.reshape(n, k, *out.grid)  # (N, K, gh, gw)
    cam = resize(cam, size)
    return cam.clamp(0.0, 1.0) if clamp else cam
