"""WeakTr's Phase-1 pieces: a ViT with one class token per class, learned attention fusion.

Zhu et al., "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic
Segmentation" (arXiv 2304.01184; code hustvl/WeakTr, ``models.py``, ``AAF.py``, ``engine.py``).

- :class:`ClassTokenViT` runs a timm ``VisionTransformer`` (a plain DeiT/ViT or the hybrid of
  :func:`methods.common.vit.build_hybrid_vit`) with C class tokens in place of its one CLS
  token (the original's ``--extra-token``: the pretrained CLS token and its position embedding
  repeated C times). It returns the class-token logits ``mean_d(t_c)`` (the mean over the
  channels of class token c after the last block, no final LayerNorm, as the original), the
  coarse CAM of a 3x3 convolution head on the patch-token map, and the softmax attention
  A_{l,h} (T x T, T = C + P) of every block l and head h, detached.
- :class:`AdaptiveAttentionFusion` (the original's AAF) is a squeeze-and-excitation gate over
  the K = L*H attention maps: s_k = pool(A_k) (mean or max over all entries),
  w = sigmoid(W2 relu(W1 s)) with W1 (K/r x K), W2 (K x K/r), no biases; the fused attention is
  A = mean_k w_k A_k. The weights w depend on the image; W1 and W2 are learned end to end.
- :func:`fused_cams`: cross attention X_c = A[c, C:] (class c to the patches) times
  relu(coarse CAM), optionally refined by the patch-to-patch block A[C:, C:]
  (:func:`patch_attention_refine`: ``cam'_c(i) = sum_j A[i, j] cam_c(j)``).
- :func:`multi_scale_cams`: the sum over scales and flips (each map resized to the input),
  then min-max normalisation per map, as the original's CAM generation script.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.cam import tta_maps

logger = logging.getLogger(__name__)

POOLS = ("avg", "max")


class AdaptiveAttentionFusion(nn.Module):
    """Learned, image-dependent weights over the K attention maps (WeakTr's AAF).

    Args:
        channels: K = layers x heads.
        reduction: the bottleneck is ``int(K / reduction)`` wide (at least 1).
        pool: ``avg`` or ``max`` squeeze of each attention map.
    """

    def __init__(self, channels: int, reduction: float = 4, pool: str = "avg") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        hidden = max(1, int(channels / reduction))
        self.pool = pool
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def weights(self, attn: torch.Tensor) -> torch.Tensor:
        """(B, K, T, T) attention maps -> (B, K) weights in (0, 1)."""
        squeezed = attn.amax(dim=(2, 3)) if self.pool == "max" else attn.mean(dim=(2, 3))
        return self.fc(squeezed)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        """(B, K, T, T) -> fused (B, T, T) = mean_k w_k A_k."""
        w = self.weights(attn)  # (B, K)
        return (attn * w[:, :, None, None]).mean(dim=1)


def patch_attention_refine(cams: torch.Tensor, patch_attn: torch.Tensor) -> torch.Tensor:
    """Propagate each class map along patch-to-patch attention.

    Args:
        cams: (B, C, gh, gw) maps on the patch grid.
        patch_attn: (B, P, P) attention, row i = how much patch i attends to each patch j.

    Returns:
        (B, C, gh, gw) with ``out[c, i] = sum_j patch_attn[i, j] * cams[c, j]``.
    """
    b, c, gh, gw = cams.shape
    flat = cams.reshape(b, c, gh * gw)  # (B, C, P)
    return torch.einsum("bij,bcj->bci", patch_attn, flat).reshape(b, c, gh, gw)


def fused_cams(
    coarse: torch.Tensor,
    attn: torch.Tensor,
    fusion: AdaptiveAttentionFusion,
    refine: bool = True,
) -> torch.Tensor:
    """WeakTr's fine CAM from the coarse CAM and the fused attention.

    Args:
        coarse: (B, C, gh, gw) output of the convolution head (detached here, as the original).
        attn: (B, L, H, T, T) attention of every block and head, T = C + gh * gw.
        fusion: the learned fusion (its weights are the only parameters this touches).
        refine: apply :func:`patch_attention_refine` with the fused patch-to-patch attention.

    Returns:
        (B, C, gh, gw) non-negative maps.
    """
    b, layers, heads, t, _ = attn.shape
    c, gh, gw = coarse.shape[1:]
    fused = fusion(attn.reshape(b, layers * heads, t, t))  # (B, T, T)
    cross = fused[:, :c, c:].reshape(b, c, gh, gw)  # class token c -> patches
    cams = cross * F.relu(coarse.detach())
    if refine:
        cams = patch_attention_refine(cams, fused[:, c:, c:])
    return cams


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (B, H, T, T) of a timm ``Attention`` module for its input ``x``."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # (B, H, T, hd)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@contextmanager
def _capture_attention(blocks: Sequence[nn.Module], out: list[torch.Tensor]) -> Iterator[None]:
    """Append each block's detached attention to ``out``; hooks removed even on error."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        with torch.no_grad():
            out.append(attention_probs(module, args[0].detach()).float())

    handles = [blk.attn.register_forward_pre_hook(hook) for blk in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (timm's rule)."""
    from timm.layers import DropPath

    n = len(vit.blocks)
    for i, blk in enumerate(vit.blocks):
        r = rate * i / max(1, n - 1)
        blk.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


@dataclass
class ClassTokenOutputs:
    """One forward pass of :class:`ClassTokenViT`.

    Attributes:
        logits: (B, C) class-token scores ``mean_d(t_c)``.
        coarse: (B, C, gh, gw) the convolution head on the patch-token map.
        attn: (B, L, H, T, T) detached softmax attention of every block, T = C + gh * gw.
    """

    logits: torch.Tensor
    coarse: torch.Tensor
    attn: torch.Tensor


class ClassTokenViT(nn.Module):
    """A timm ViT with C class tokens, a 3x3 conv CAM head and the attention fusion.

    Args:
        vit: a timm ``VisionTransformer`` with one CLS token and position embeddings that
            include it (DeiT, ViT, the hybrid); its CLS token, position embedding and head are
            replaced.
        num_classes: C, the number of class tokens.
        reduction: the fusion's bottleneck reduction.
        pool: the fusion's squeeze (``avg`` or ``max``).
    """

    def __init__(self, vit: nn.Module, num_classes: int, reduction: float = 4, pool: str = "avg"):
        super().__init__()
        if getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", False):
            raise ValueError("ClassTokenViT needs a ViT whose position embedding covers its CLS")
        dim = int(vit.embed_dim)
        pos = vit.pos_embed.detach()  # (1, 1 + P, D)
        self.class_tokens = nn.Parameter(vit.cls_token.detach().repeat(1, num_classes, 1))
        self.class_pos = nn.Parameter(pos[:, :1].repeat(1, num_classes, 1))
        self.patch_pos = nn.Parameter(pos[:, 1:].clone())
        self.grid = tuple(vit.patch_embed.grid_size)
        vit.cls_token, vit.pos_embed, vit.head = None, None, nn.Identity()
        if hasattr(vit.patch_embed, "strict_img_size"):
            vit.patch_embed.strict_img_size = False  # multi-scale inference
        self.vit = vit
        self.num_classes = num_classes
        self.head = nn.Conv2d(dim, num_classes, kernel_size=3, padding=1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.fusion = AdaptiveAttentionFusion(len(vit.blocks) * vit.blocks[0].attn.num_heads,
                                              reduction, pool)  # fmt: skip

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with position embeddings (resampled to the input's grid)."""
        h, w = x.shape[-2:]
        patches = self.vit.patch_embed(x)  # (B, P, D)
        stride = round((h * w / patches.shape[1]) ** 0.5)
        grid = (h // stride, w // stride)
        if grid[0] * grid[1] != patches.shape[1]:
            raise ValueError(f"input {h}x{w} gives {patches.shape[1]} tokens, not a grid")
        pos = self.patch_pos
        if grid != self.grid:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
        return patches + pos, grid

    def forward(self, x: torch.Tensor) -> ClassTokenOutputs:
        """(B, 3, H, W) normalised images, H and W multiples of the token stride."""
        patches, grid = self._tokens(x)
        b, c = x.shape[0], self.num_classes
        cls = (self.class_tokens + self.class_pos).expand(b, -1, -1)
        tokens = self.vit.norm_pre(self.vit.pos_drop(torch.cat([cls, patches], dim=1)))
        attentions: list[torch.Tensor] = []
        with _capture_attention(self.vit.blocks, attentions):
            for blk in self.vit.blocks:
                tokens = blk(tokens)
        patch_map = tokens[:, c:].transpose(1, 2).reshape(b, -1, *grid)  # (B, D, gh, gw)
        return ClassTokenOutputs(
            logits=tokens[:, :c].mean(dim=-1),  # (B, C)
            coarse=self.head(patch_map),  # (B, C, gh, gw)
            attn=torch.stack(attentions, dim=1),  # (B, L, H, T, T)
        )

    def losses(self, out: ClassTokenOutputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three multi-label soft-margin losses of the original's training step.

        ``cls``: class-token logits; ``patch``: the coarse CAM average-pooled; ``attn``: the
        fused, patch-refined CAM average-pooled (only the fusion receives its gradient).
        """
        fine = fused_cams(out.coarse, out.attn, self.fusion, refine=True)
        return {
            "cls": F.multilabel_soft_margin_loss(out.logits.float(), targets),
            "patch": F.multilabel_soft_margin_loss(out.coarse.float().mean(dim=(2, 3)), targets),
            "attn": F.multilabel_soft_margin_loss(fine.float().mean(dim=(2, 3)), targets),
        }


def multi_scale_cams(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    stride: int,
) -> torch.Tensor:
    """Maps summed over scales (and flips), then min-max normalised per image and class.

    Args:
        cam_fn: (B, 3, H', W') -> (B, C, h', w') non-negative maps; H', W' are multiples of
            ``stride``.
        images: (B, 3, H, W) normalised images.
        scales: input scale factors (each size rounded to a multiple of ``stride``).
        flip: also run the mirrored input (its maps mirrored back).
        stride: the token stride of the network.

    Returns:
        (B, C, H, W) maps in [0, 1]: ``(S - min S) / (max S - min S + 1e-8)``.
    """

    def on_grid(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (max(stride, round(h / stride) * stride), max(stride, round(w / stride) * stride))
        if (h, w) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return cam_fn(x)

    total = tta_maps(on_grid, images, scales=tuple(scales), flip=flip)  # sum / max
    flat = total.flatten(2)
    lo = flat.amin(dim=2)[:, :, None, None]
    hi = flat.amax(dim=2)[:, :, None, None]
    return (total - lo) / (hi - lo + 1e-8)
