"""WeakTr's Phase 2: a ViT segmenter with a mask-transformer decoder and gradient clipping.

Zhu et al., "WeakTr" (arXiv 2304.01184; code hustvl/WeakTr, ``OnlineRetraining/segm``: the
Segmenter of Strudel et al., ICCV 2021, retrained on CAM pseudo labels).

- :class:`MaskTransformerDecoder`: patch tokens (B, P, D_enc) are projected to D, n_cls
  learned class embeddings are appended, ``layers`` transformer blocks run over both, a
  LayerNorm follows; patches and class embeddings are projected (two D x D matrices) and L2
  normalised; the masks are their scalar products (B, n_cls, gh, gw) after a LayerNorm over
  the classes.
- :class:`ViTSegmenter`: a timm ViT encoder (its final LayerNorm'd patch tokens) + the decoder,
  masks upsampled bilinearly to the input size.
- :func:`gradient_clipped_loss`, the "gradient clipping decoder": per-pixel cross-entropy
  l_p. While the mean loss of the batch is above ``start_value`` it is used as is. Below it, the
  loss map averaged over the batch is pooled in windows of ``window`` pixels, each window's
  mean m_w is raised to at least the global mean m, and every pixel's loss becomes
  ``min(l_p, max(m_w, m))`` with the threshold treated as a constant: a pixel whose loss is
  above its window's level (a probably wrong pseudo label) contributes no gradient at all,
  every other pixel contributes its full gradient.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE = 255


def gradient_clipped_loss(
    logits: torch.Tensor, target: torch.Tensor, start_value: float = 1.2, window: int = 120
) -> torch.Tensor:
    """Cross-entropy with WeakTr's loss clipping (see the module docstring).

    Args:
        logits: (B, K, H, W) class scores.
        target: (B, H, W) int64 labels in 0..K-1, or 255 (ignored: zero loss, as the original).
        start_value: clipping starts once the batch's mean loss is at most this.
        window: window side in pixels; windows tile the image from the top-left, partial
            windows at the right and bottom edges are averaged over their own pixels.

    Returns:
        The scalar loss (the mean over all pixels of the clipped per-pixel loss).
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    return clip_pixel_loss(loss, start_value, window).mean()


def clip_pixel_loss(loss: torch.Tensor, start_value: float, window: int) -> torch.Tensor:
    """The clipped per-pixel loss (B, H, W): ``min(l, max(window mean, global mean))``.

    The threshold is detached, so pixels above it keep their value but lose their gradient.
    """
    detached = loss.detach()
    mean = detached.mean()
    if float(mean) > start_value:
        return loss
    b, h, w = loss.shape
    window = max(1, min(window, h, w))
    batch_map = detached.mean(dim=0, keepdim=True).unsqueeze(1)  # (1, 1, H, W)
    nh, nw = -(-h // window), -(-w // window)
    pad = (0, nw * window - w, 0, nh * window - h)
    sums = F.avg_pool2d(F.pad(batch_map, pad), window, divisor_override=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(batch_map), pad), window, divisor_override=1)
    local = torch.maximum(sums / counts, mean)  # (1, 1, nh, nw)
    local = local.repeat_interleave(window, dim=2).repeat_interleave(window, dim=3)
    threshold = local[0, 0, :h, :w].expand(b, h, w)
    return torch.clamp(loss - threshold, max=0.0) + threshold


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021), as WeakTr's online retraining uses.

    Args:
        in_dim: encoder token width.
        num_classes: output classes (background included).
        dim: decoder width (the original: the encoder's).
        layers: transformer blocks (the original: 2).
        heads: attention heads (the original: dim // 64).
        dropout: dropout in the blocks (the original: 0.1).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int,
        layers: int = 2,
        heads: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_classes = num_classes
        self.proj_dec = nn.Linear(in_dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList(
            [Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout)
             for _ in range(layers)]
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        scale = dim**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, P, in_dim) patch tokens -> (B, num_classes, gh, gw) mask logits."""
        x = torch.cat([self.proj_dec(tokens), self.cls_emb.expand(tokens.shape[0], -1, -1)], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches = F.normalize(x[:, : -self.num_classes] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, -self.num_classes :] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, P, K)
        return masks.transpose(1, 2).reshape(tokens.shape[0], self.num_classes, *grid)


class ViTSegmenter(nn.Module):
    """A timm ViT encoder and a :class:`MaskTransformerDecoder`; logits at the input size.

    Args:
        encoder: a timm ``VisionTransformer`` (plain or hybrid), used at its own ``img_size``.
        num_classes: output classes (background included).
        layers: decoder blocks.
        dropout: decoder dropout.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        dim = int(encoder.embed_dim)
        self.encoder = encoder
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.decoder = MaskTransformerDecoder(
            dim, num_classes, dim, layers, heads=max(1, dim // 64), dropout=dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images at the encoder's size -> (B, K, S, S) logits."""
        tokens = self.encoder.forward_features(x)  # (B, prefix + P, D), final LayerNorm'd
        tokens = tokens[:, int(getattr(self.encoder, "num_prefix_tokens", 1)) :]
        masks = self.decoder(tokens, self.grid)
        return F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)


def poly_lr(base: float, step: int, total: int, min_lr: float = 0.0, power: float = 0.9) -> float:
    """Polynomial decay ``(base - min_lr) (1 - step / total)^power + min_lr`` (timm's form)."""
    frac = min(1.0, step / max(1, total))
    return (base - min_lr) * (1.0 - frac) ** power + min_lr
