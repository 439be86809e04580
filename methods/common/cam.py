"""Class activation maps: the CAM formula, normalisation, feature hooks and test-time augmentation.

CAM (Zhou et al., CVPR 2016): for backbone features f (K, h, w) and the weights W (C, K) of a
bias-free linear classifier on globally average-pooled features,
``M_c(u) = sum_k W[c, k] f_k(u)``. Maps are normalised by ReLU then division by the spatial
max (+1e-5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

EPS = 1e-5


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """ReLU then divide each map by its spatial max (+1e-5).

    Args:
        cams: (N, C, h, w) raw maps.

    Returns:
        (N, C, h, w) maps in [0, 1); all-non-positive maps become zero.
    """
    if cams.dim() != 4:
        raise ValueError(f"normalize_cams expects (N, C, h, w); got shape {tuple(cams.shape)}")
    cams = F.relu(cams)
    peak = cams.flatten(2).amax(dim=2)[:, :, None, None]  # (N, C, 1, 1)
    return cams / (peak + EPS)


def cam_from_features(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The CAM of each image's label class: ``sum_k W[y_n, k] f_k``.

    Args:
        features: (N, K, h, w) backbone features.
        weight: (C, K) classifier weights.
        labels: (N,) int class index per image.

    Returns:
        (N, 1, h, w) raw (unnormalised) maps.
    """
    w = weight[labels.to(weight.device).long()]  # (N, K)
    return torch.einsum("nkhw,nk->nhw", features, w.to(features.dtype)).unsqueeze(1)


def class_cams(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The CAM of every class: ``M_c = sum_k W[c, k] f_k`` (multi-label datasets).

    Args:
        features: (N, K, h, w) backbone features.
        weight: (C, K) classifier weights.

    Returns:
        (N, C, h, w) raw (unnormalised) maps.
    """
    return torch.einsum("nkhw,ck->nchw", features, weight.to(features.dtype))


def tagged_only(maps: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """Zero the maps of the classes an image is not tagged with.

    Args:
        maps: (N, C, h, w) maps.
        tags: (N, C) multi-hot image tags.
    """
    return maps * (tags.to(maps.device, maps.dtype) > 0)[:, :, None, None]


def multilabel_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """The multi-label soft margin loss of image tags (the loss of PSA, IRNet, SEAM and WeakTr).

    Args:
        logits: (N, C) class scores.
        tags: (N, C) multi-hot image tags.
    """
    return F.multilabel_soft_margin_loss(logits.float(), tags.to(logits.device).float())


class FeatureHook:
    """Capture a module's forward output; the hook is removed on exit, even on exceptions.

    Example:
        >>> with FeatureHook(model.layer4) as hook:
        ...     logits = model(x)
        >>> features = hook.output
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.output: Any = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output

    def __enter__(self) -> FeatureHook:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def tta_maps(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Multi-scale (and flipped) maps, resized to the input, summed and normalised by the max.

    Args:
        fn: maps a batch (N, 3, H', W') to raw maps (N, C, h', w') of any size.
        images: (N, 3, H, W) normalised input batch.
        scales: input rescaling factors (bilinear).
        flip: also run on the left-right flipped input and flip its maps back.

    Returns:
        (N, C, H, W) maps in [0, 1): the sum over scales (and flips) of the ReLU'd maps,
        each bilinearly upsampled to (H, W), then normalised by the spatial max.
    """
    if not scales:
        raise ValueError("tta_maps needs at least one scale")
    size = images.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        x = images
        if scale != 1.0:
            hw = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            x = F.interpolate(images, size=hw, mode="bilinear", align_corners=False)
        variants = [(x, False)] + ([(torch.flip(x, dims=(-1,)), True)] if flip else [])
        for inp, flipped in variants:
            m = fn(inp).float()  # (N, C, h', w')
            if flipped:
                m = torch.flip(m, dims=(-1,))
            m = F.interpolate(F.relu(m), size=size, mode="bilinear", align_corners=False)
            total = m if total is None else total + m
    assert total is not None
    return normalize_cams(total)
