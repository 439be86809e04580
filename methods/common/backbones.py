"""Backbones from timm: ResNet feature pyramids and ViT classifiers, pretrained or not.

``pretrained`` is ``False`` (random init), ``True`` (timm's published weights, fetched from the
internet or found in the local Hugging Face / torch hub cache) or a path to a local weights
file (a state dict of the full timm model, e.g. saved with
``torch.save(timm.create_model(name, pretrained=True).state_dict(), path)`` on a machine with
internet). When weights cannot be had, one :class:`PretrainedWeightsError` says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

logger = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing file)."""


def _advice(name: str) -> str:
    return (
        f"To use pretrained {name!r} weights: run once where internet is available (timm caches "
        f"them in ~/.cache/huggingface); or, on such a machine, save them with "
        f"torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), 'FILE.pth') and "
        f"pass pretrained='FILE.pth'; or set pretrained=False (random init, e.g. preset quick)."
    )


def _check_name(name: str) -> None:
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet18, resnet50, "
            f"deit_tiny_patch16_224, vit_small_patch16_224)"
        )


def _timm_create(name: str, pretrained: bool | str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with local-file weights and one clear error when offline."""
    _check_name(name)
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


def create_resnet(
    name: str = "resnet18", pretrained: bool | str = False, output_stride: int = 16
) -> nn.Module:
    """A timm ResNet returning its four stages (layer1..layer4).

    Args:
        name: a timm ResNet-like model name (``resnet18``, ``resnet50``, ...).
        pretrained: False, True (timm weights) or a local weights file.
        output_stride: 8, 16 or 32; the last stage(s) are dilated instead of strided.

    Returns:
        A module whose ``forward(x)`` returns ``[layer1, layer2, layer3, layer4]`` feature
        maps, with ``.channels`` (list of 4 ints) and ``.reductions`` (their strides).
    """
    model = _timm_create(
        name,
        pretrained,
        features_only=True,
        output_stride=output_stride,
        out_indices=(1, 2, 3, 4),
    )
    model.channels = list(model.feature_info.channels())
    model.reductions = list(model.feature_info.reduction())
    logger.debug("resnet %s channels=%s reductions=%s", name, model.channels, model.reductions)
    return model


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
    return _timm_create(name, pretrained, num_classes=num_classes, img_size=img_size)
