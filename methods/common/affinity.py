"""AffinityNet pieces: confident seeds, pair labels, the loss, pair affinities, the network.

Ahn & Kwak, CVPR 2018 (code: jiwoon-ahn/psa); the threshold seed rule is IRNet's. Used by
:mod:`methods.cam_affinitynet`; the random walk itself is in :mod:`methods.common.random_walk`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.conventions import IGNORE
from methods.common.backbones import create_backbone
from methods.common.crf import crf_labels, dense_crf
from methods.common.random_walk import PairGrid

logger = logging.getLogger(__name__)

LOG_EPS = 1e-5


# ---- confident regions and pair labels -----------------------------------------------------
def _class_stack(
    cam: np.ndarray, classes: np.ndarray | list[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) maps of the classes considered and the lookup ``[0, 1 + class...]``."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 2:
        cam = cam[None]  # the binary case: one class
    if cam.ndim != 3:
        raise ValueError(f"confident labels expect an (H, W) or (C, H, W) map; got {cam.shape}")
    keys = np.arange(cam.shape[0]) if classes is None else np.asarray(classes, dtype=np.int64)
    lut = np.concatenate([[0], keys + 1]).astype(np.uint8)  # compact label -> class label
    return cam[keys], lut


def confident_labels(
    cam: np.ndarray,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    image: np.ndarray | None = None,
    crf: bool = False,
    classes: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Confident regions of normalised CAMs (IRNet's rule; one class: fg / bg).

    With several classes (IRNet's ``cam_to_ir_label``): ``M = max_c M_c``; the class
    ``argmax_c M_c`` where ``M >= fg_threshold``, background where ``M < bg_threshold``.

    Args:
        cam: (H, W) CAM of the label class, or (C, H, W) class CAMs, in [0, 1].
        fg_threshold: fg where ``M >= fg_threshold``.
        bg_threshold: bg where ``M < bg_threshold``.
        image: (H, W, 3) uint8 image, needed when ``crf``.
        crf: clean both regions with a dense CRF (IRNet): fg = the CRF of the fg-threshold
            labels says a class; bg = the CRF of the bg-threshold labels says bg; else ignore.
        classes: the 0-based classes that may be labelled (the image's tags); all by default.
            The CRF runs over background and these classes only.

    Returns:
        (H, W) uint8: 0 bg, ``1 + c`` class c (1 fg for one class), 255 ignore.
    """
    if not bg_threshold <= fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must be <= fg_threshold {fg_threshold}")
    sub, lut = _class_stack(cam, classes)
    shape = sub.shape[1:]
    if len(sub) == 0:  # no class may be labelled: everything is background
        return np.zeros(shape, dtype=np.uint8)
    peak = sub.max(axis=0)  # (H, W)
    cls = (sub.argmax(axis=0) + 1).astype(np.uint8)  # compact labels 1..K
    if crf:
        if image is None:
            raise ValueError("confident_labels(crf=True) needs the uint8 image")
        k = len(sub) + 1
        bg_lab = crf_labels(
            image, np.where(peak >= bg_threshold, cls, 0).astype(np.uint8), n_labels=k
        )
        cls = crf_labels(image, np.where(peak >= fg_threshold, cls, 0).astype(np.uint8), n_labels=k)
        fg, bg = cls != 0, bg_lab == 0
    else:
        fg = peak >= fg_threshold
        bg = peak < bg_threshold
    out = np.full(shape, IGNORE, dtype=np.uint8)
    out[bg & ~fg] = 0
    out[fg] = lut[cls[fg]]
    return out


def psa_confident_labels(
    cam: np.ndarray,
    low_alpha: float = 4.0,
    high_alpha: float = 32.0,
    image: np.ndarray | None = None,
    crf: bool = False,
    classes: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Confident regions from psa's low / high alpha backgrounds (``infer_cls.py``, ``data.py``).

    For ``alpha`` in (low, high), the label map is the argmax over ``[(1 - max_c M_c) **
    alpha, M_1, ..., M_K]`` (background first, so it wins ties), optionally after a dense CRF
    of these scores (psa's ``out_la_crf`` / ``out_ha_crf``). A low alpha gives a strong
    background, so its classes are confident foreground; a high alpha gives a weak one, so
    its background is confident. As in psa's ``VOC12AffDataset``: label = the low-alpha class
    where it is not background, else ignore; background wherever the high-alpha map says so.

    Args:
        cam: (H, W) CAM of the label class, or (C, H, W) class CAMs, in [0, 1].
        low_alpha: psa ``--low_alpha`` (4).
        high_alpha: psa ``--high_alpha`` (32).
        image: (H, W, 3) uint8 image, needed when ``crf``.
        crf: run the dense CRF on both score stacks (psa does).
        classes: the 0-based classes that may be labelled (the image's tags); all by default.

    Returns:
        (H, W) uint8: 0 bg, ``1 + c`` class c, 255 ignore.
    """
    if not low_alpha <= high_alpha:
        raise ValueError(f"low_alpha {low_alpha} must be <= high_alpha {high_alpha}")
    sub, lut = _class_stack(cam, classes)
    if len(sub) == 0:
        return np.zeros(sub.shape[1:], dtype=np.uint8)
    if crf and image is None:
        raise ValueError("psa_confident_labels(crf=True) needs the uint8 image")
    peak = sub.max(axis=0, keepdims=True)  # (1, H, W)

    def argmax_labels(alpha: float) -> np.ndarray:
        scores = np.concatenate([(1.0 - peak) ** alpha, sub])  # (1 + K, H, W)
        if crf:
            scores = dense_crf(image, scores)
        return scores.argmax(axis=0)  # 0 bg, 1..K compact classes

    low, high = argmax_labels(low_alpha), argmax_labels(high_alpha)
    out = np.where(low != 0, lut[low], IGNORE).astype(np.uint8)
    out[high == 0] = 0
    return out


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest (cell-centre) downsampling of label maps (N, H, W) to (N, h, w), dtype kept."""
    x = labels.unsqueeze(1).float()  # (N, 1, H, W)
    out = F.interpolate(x, size=size, mode="nearest-exact")
    return out.squeeze(1).to(labels.dtype)


def affinity_labels(
    labels: torch.Tensor, grid: PairGrid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels on a grid from node labels (0 bg, k >= 1 a class, 255 ignore).

    Args:
        labels: (N, h, w) integer node labels on the grid of ``grid``.
        grid: the pair grid (``grid.height == h``, ``grid.width == w``).

    Returns:
        ``(pos_bg, pos_fg, neg)``: (N, E) bool masks; pairs with an ignored end are in none.
    """
    n, h, w = labels.shape
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"labels are {h}x{w} but the pair grid is {grid.height}x{grid.width}")
    flat = labels.reshape(n, h * w).long()
    grid = grid.to(labels.device)
    a, b = flat[:, grid.src], flat[:, grid.dst]  # (N, E)
    valid = (a != IGNORE) & (b != IGNORE)
    same = valid & (a == b)
    pos_bg = same & (a == 0)
    pos_fg = same & (a != 0)
    neg = valid & (a != b)
    return pos_bg, pos_fg, neg


def affinity_loss(
    aff: torch.Tensor, pos_bg: torch.Tensor, pos_fg: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """AffinityNet's loss: 1/4 pos_bg + 1/4 pos_fg + 1/2 neg (means over the batch's pairs).

    Args:
        aff: (N, E) affinities in (0, 1].
        pos_bg: (N, E) bool, both ends background.
        pos_fg: (N, E) bool, both ends the same foreground class.
        neg: (N, E) bool, ends with different labels.

    Returns:
        The scalar loss and its parts (floats) for logging.
    """
    aff = aff.float()
    pb, pf, ng = pos_bg.float(), pos_fg.float(), neg.float()
    bg_loss = (-pb * torch.log(aff + LOG_EPS)).sum() / (pb.sum() + LOG_EPS)
    fg_loss = (-pf * torch.log(aff + LOG_EPS)).sum() / (pf.sum() + LOG_EPS)
    neg_loss = (-ng * torch.log(1.0 + LOG_EPS - aff)).sum() / (ng.sum() + LOG_EPS)
    loss = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    parts = {"bg": bg_loss.item(), "fg": fg_loss.item(), "neg": neg_loss.item()}
    return loss, parts


def pair_affinities(embedding: torch.Tensor, grid: PairGrid) -> torch.Tensor:
    """``a_ij = exp(-mean_c |e_i - e_j|)`` for every pair of ``grid``.

    Args:
        embedding: (N, D, h, w) embeddings.
        grid: the pair grid of the (h, w) embedding.

    Returns:
        (N, E) affinities in (0, 1].
    """
    n, d, h, w = embedding.shape
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"embedding is {h}x{w} but the pair grid is {grid.height}x{grid.width}")
    grid = grid.to(embedding.device)
    e = embedding.reshape(n, d, h * w)
    diff = (e[:, :, grid.src] - e[:, :, grid.dst]).abs().mean(dim=1)  # (N, E)
    return torch.exp(-diff)


# ---- the network ---------------------------------------------------------------------------
class AffinityNet(nn.Module):
    """Three backbone stages -> 1x1 reductions (+ELU) -> concat -> 1x1 conv (+ELU) embedding.

    Args:
        backbone: timm ResNet name.
        pretrained: False, True or a local weights file.
        stages: which ResNet stages feed the embedding, 1-based (1 = layer1, stride 4; 2 =
            layer2, stride 8; 3, 4 = layer3, layer4, stride 16 or 8); all are resized to the
            stride-8 grid (average pooling down, bilinear up).
        dims: output channels of the reductions, one per stage (psa: 64, 128, 256).
        embed_dim: embedding channels (psa: 448).
        output_stride: 16 (layer3/4 upsampled to stride 8) or 8 (dilated).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        pretrained: bool | str = False,
        stages: tuple[int, ...] = (2, 3, 4),
        dims: tuple[int, ...] = (64, 128, 256),
        embed_dim: int = 448,
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        if len(stages) != len(dims) or not set(stages) <= {1, 2, 3, 4}:
            raise ValueError(
                f"AffinityNet: stages {stages} must be distinct values in 1..4, one per "
                f"reduction width in dims {dims}"
            )
        self.stages = tuple(int(s) for s in stages)
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, output_stride=output_stride
        )
        self.input_norm = self.backbone.input_norm  # input normalisation of the backbone's weights
        channels = [self.backbone.channels[s - 1] for s in self.stages]
        self.reduce = nn.ModuleList(
            nn.Conv2d(c, d, 1, bias=False) for c, d in zip(channels, dims, strict=True)
        )
        self.embed = nn.Conv2d(sum(dims), embed_dim, 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)
        self.freeze_bn = bool(pretrained)

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers added on top of the backbone (trained at 10x the learning rate)."""
        return [*self.reduce.parameters(), *self.embed.parameters()]

    def train(self, mode: bool = True) -> AffinityNet:
        """Train mode; BatchNorm of a pretrained backbone stays frozen (as in psa)."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, embed_dim, h, w) on the stride-8 grid of ``x`` (N, 3, H, W)."""
        feats = self.backbone(x)  # layer1..layer4
        size = feats[1].shape[-2:]  # layer2: stride 8
        parts = []
        for s, conv in zip(self.stages, self.reduce, strict=True):
            y = F.elu(conv(feats[s - 1]))
            if y.shape[-2] > size[0]:
                y = F.adaptive_avg_pool2d(y, size)
            elif y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            parts.append(y)
        return F.elu(self.embed(torch.cat(parts, dim=1)))


# ---- training helpers ----------------------------------------------------------------------
def random_resized_crop(
    x: torch.Tensor, labels: torch.Tensor, min_side: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a random box (side fraction ``min_side``..1, same for the batch) and resize back.

    Args:
        x: (N, 3, H, W) images.
        labels: (N, H, W) uint8 label maps at the image resolution.
        min_side: smallest crop side as a fraction of the image side (1.0: no crop).
        generator: seeds the box.

    Returns:
        The resized crops of ``x`` (bilinear) and of ``labels`` (nearest), same shapes.
    """
    if min_side >= 1.0:
        return x, labels
    h, w = x.shape[-2:]
    s = min_side + (1.0 - min_side) * float(torch.rand(1, generator=generator))
    ch, cw = max(1, round(h * s)), max(1, round(w * s))
    y0 = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    xc = x[:, :, y0 : y0 + ch, x0 : x0 + cw]
    lc = labels[:, y0 : y0 + ch, x0 : x0 + cw]
    xc = F.interpolate(xc, size=(h, w), mode="bilinear", align_corners=False)
    lc = F.interpolate(lc.unsqueeze(1).float(), size=(h, w), mode="nearest-exact")
    return xc, lc.squeeze(1).to(labels.dtype)


def poly_lr(base: float, step: int, max_step: int, power: float = 0.9) -> float:
    """Polynomial decay ``base * (1 - step / max_step) ** power`` (psa's PolyOptimizer)."""
    return base * (1.0 - min(step, max_step) / max(1, max_step)) ** power
