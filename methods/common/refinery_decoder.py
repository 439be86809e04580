"""WeakTR-Refinery's decoder and its WeakTr-style gradient-clipping BCE against soft targets.

:class:`RefineryDecoder` (johnamit/weaktr-refinery): the (D, h, w) pre-LayerNorm token map ->
conv3x3 + BN + ReLU -> x2 -> conv3x3 + BN + ReLU -> x2 -> conv3x3 (+ BN on ``large``) + ReLU ->
x4 -> conv1x1 -> one logit per output. Channels D-64-32-16 (small), D-128-64-32 (medium),
D-256-128-64 (large).

:func:`clipped_bce` adapts the gradient-clipping decoder of WeakTr (Zhu et al. 2023) to sigmoid
outputs and a soft target y (FineCAM): per-pixel BCE l_p(z_p, y_p), its gradient magnitude
g_p = |sigmoid(z_p) - y_p| * y_p / sum(y); in each window (120 px at 224 px, scaled with the
image size) keep pixels with g_p <= tau * max(window mean, image mean); the loss is the mean of
l_p over the kept pixels, per image (or per map), then over the batch. The original's windows
(``top_left_only``) cover only the whole windows from the top-left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODER_CHANNELS = {"small": (64, 32, 16), "medium": (128, 64, 32), "large": (256, 128, 64)}

#: The resolution at which the original's 120 px clipping window is defined.
REFERENCE_SIZE = 224


# ---- decoder ---------------------------------------------------------------------------------
class RefineryDecoder(nn.Module):
    """Token map (N, D, h, w) -> ``outputs`` logits per pixel (N, outputs, 16h, 16w).

    One output on a single-label set (the original), one per class on a multi-label set.
    """

    def __init__(self, in_dim: int, size: str = "medium", outputs: int = 1) -> None:
        super().__init__()
        c1, c2, c3 = DECODER_CHANNELS[size]

        def up(factor: int) -> nn.Module:
            return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)

        last_bn = [nn.BatchNorm2d(c3)] if size == "large" else []
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            up(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            up(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            *last_bn,
            nn.ReLU(inplace=True),
            up(4),
            nn.Conv2d(c3, outputs, 1),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)  # as the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode a token map into logits."""
        return self.layers(x)


# ---- loss ------------------------------------------------------------------------------------
def clip_window_size(image_size: int, window: int = 120) -> int:
    """The clipping window scaled from its size at 224 px to ``image_size`` (at least 1)."""
    return max(1, round(window * image_size / REFERENCE_SIZE))


def gradient_magnitude(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|d loss / d z| of the y-weighted BCE: |sigmoid(z) - y| * y / sum(y), per image.

    ``y`` is clamped to [0, 1] for the weight, as in the original. The original divides by the
    sum over the whole batch; the keep rule compares pixels of one image only, so a per-image
    divisor selects the same pixels.
    """
    y = target.clamp(0.0, 1.0)
    denom = y.sum(dim=(1, 2, 3), keepdim=True) + 1e-12
    return ((torch.sigmoid(logits) - target).abs() * y / denom).detach()


def clip_keep_mask(
    logits: torch.Tensor,
    target: torch.Tensor,
    window: int,
    tau: float = 1.2,
    top_left_only: bool = False,
) -> torch.Tensor:
    """Pixels the gradient-clipping loss keeps (bool, same shape as ``logits``).

    Args:
        logits: (N, 1, H, W) decoder logits.
        target: (N, 1, H, W) FineCAM targets.
        window: window side in pixels.
        tau: keep g <= tau * max(window mean, image mean).
        top_left_only: the original's windows: unfold with stride = window and no padding,
            so only whole windows from the top-left count (everything else is dropped) and the
            image mean is the mean of those windows' means.

    Returns:
        (N, 1, H, W) bool mask of kept pixels.
    """
    g = gradient_magnitude(logits, target)  # (N, 1, H, W)
    n, _, h, w = g.shape
    window = min(window, h, w)
    if top_left_only:
        nh, nw = h // window, w // window
        means = F.avg_pool2d(g[..., : nh * window, : nw * window], window, stride=window)
        image_mean = means.mean(dim=(2, 3), keepdim=True)
    else:
        nh, nw = -(-h // window), -(-w // window)
        pad = (0, nw * window - w, 0, nh * window - h)
        sums = F.avg_pool2d(F.pad(g, pad), window, stride=window, divisor_override=1)
        counts = F.avg_pool2d(
            F.pad(torch.ones_like(g), pad), window, stride=window, divisor_override=1
        )
        means = sums / counts  # (N, 1, nh, nw) means over valid pixels
        image_mean = g.mean(dim=(2, 3), keepdim=True)
    per_pixel = means.repeat_interleave(window, dim=2).repeat_interleave(window, dim=3)
    per_pixel = F.pad(
        per_pixel, (0, max(0, w - per_pixel.shape[3]), 0, max(0, h - per_pixel.shape[2]))
    )
    per_pixel = per_pixel[..., :h, :w]
    keep = g <= tau * torch.maximum(per_pixel, image_mean)
    if top_left_only:
        covered = torch.zeros_like(keep)
        covered[..., : nh * window, : nw * window] = True
        keep &= covered
    return keep


def clipped_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    window: int,
    tau: float = 1.2,
    top_left_only: bool = False,
) -> torch.Tensor:
    """Gradient-clipping BCE: mean BCE over kept pixels per image, then over the batch."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    keep = clip_keep_mask(logits, target, window, tau, top_left_only).float()
    per_image = (loss * keep).sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) + 1e-6)
    return per_image.mean()
