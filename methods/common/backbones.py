"""Backbones from timm: CNN feature pyramids and ViT classifiers, pretrained or not.

``pretrained`` follows :mod:`methods.common.weights`: ``False`` (random init), ``True`` /
``"hub"`` (timm's published weights, fetched from the internet or found in the local Hugging
Face / torch hub cache), ``"offline"`` (the installed package registered for the architecture,
e.g. EfficientNet-Lite0) or a path to a local weights file (a state dict of the full timm
model, e.g. saved with ``torch.save(timm.create_model(name, pretrained=True).state_dict(),
path)`` on a machine with internet). When weights cannot be had, one
:class:`PretrainedWeightsError` says what to do, naming the offline alternative.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

from methods.common.weights import (
    PretrainedWeightsError,
    load_offline,
    offline_hint,
)
from methods.common.weights import normalization as backbone_normalization

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainedWeightsError",
    "create_backbone",
    "create_resnet",
    "create_vit",
    "backbone_normalization",
]


def _advice(name: str) -> str:
    return (
        f"To use pretrained {name!r} weights: run once where internet is available (timm caches "
        f"them in ~/.cache/huggingface); or, on such a machine, save them with "
        f"torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), 'FILE.pth') and "
        f"pass pretrained='FILE.pth'; or set pretrained=False (random init). " + offline_hint(name)
    )


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet18, resnet50, "
            f"tf_efficientnet_lite0, deit_tiny_patch16_224, vit_small_patch16_224)"
        )


def timm_create(name: str, pretrained: bool | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with offline-package or local-file weights, one clear error."""
    _check_name(name)
    if pretrained == "offline":
        return load_offline(timm.create_model(name, pretrained=False, **kwargs), name)
    if pretrained == "hub":
        pretrained = True
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"pretrained weights file not found: {path} (model {name!r}). " + _advice(name)
            )
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        except Exception as exc:  # a corrupt or mismatched file: say which
            raise PretrainedWeightsError(
                f"cannot load pretrained weights for {name!r} from {path}: {exc}"
            ) from exc
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # offline: OSError, hub errors, HTTP errors of any client
        raise PretrainedWeightsError(
            f"could not download or find cached pretrained weights for {name!r} "
            f"({type(exc).__name__}: {exc}). " + _advice(name)
        ) from exc


def create_backbone(
    name: str = "resnet18",
    pretrained: bool | str = False,
    output_stride: int = 16,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
) -> nn.Module:
    """A timm CNN returning four feature maps at strides 4, 8, 16, 32 (before dilation).

    For a ResNet these are layer1..layer4; for an EfficientNet(-Lite) the ends of its stride-4,
    -8, -16 and -32 stages (Lite0: 24, 40, 112, 320 channels).

    Args:
        name: a timm model name (``resnet18``, ``resnet50``, ``tf_efficientnet_lite0``, ...).
        pretrained: see the module docstring.
        output_stride: 8, 16 or 32; the last stage(s) are dilated instead of strided.
        out_indices: timm feature indices to return.

    Returns:
        A module whose ``forward(x)`` returns the feature maps, with ``.channels`` (ints),
        ``.reductions`` (their strides) and ``.input_norm`` (the input normalisation).
    """
    model = timm_create(
        name,
        pretrained,
        features_only=True,
        output_stride=output_stride,
        out_indices=out_indices,
    )
    model.channels = list(model.feature_info.channels())
    model.reductions = list(model.feature_info.reduction())
    model.input_norm = backbone_normalization(name)
    logger.debug("backbone %s channels=%s reductions=%s", name, model.channels, model.reductions)
    return model


create_resnet = create_backbone  # the name the ResNet-only versions had


def create_vit(
    name: str = "deit_tiny_patch16_224",
    pretrained: bool | str = False,
    num_classes: int = 37,
    img_size: int = 224,
) -> nn.Module:
    """A timm ViT classifier with a fresh ``num_classes`` head at ``img_size`` input.

    Position embeddings of pretrained weights are resampled by timm when ``img_size``
    differs from the weights' size.
    """
    return timm_create(name, pretrained, num_classes=num_classes, img_size=img_size)
